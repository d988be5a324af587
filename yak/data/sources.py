"""Continued-pretraining sources and their mix: find the sources of ``dataset_dir``, read ``--mix``, and
draw the validation split and the mixed training blocks."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from yak import YakError

logger = logging.getLogger(__package__)  # "yak.data", the name its log lines have always shown

DEFAULT_MIX = "bo=3,en+zh=4"
SUFFIXES = (".txt", ".jsonl")
ROOT_SOURCE = "."


# ----------------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """A sub-folder of ``dataset_dir`` and its text files (sorted)."""

    name: str
    files: list[Path]


def find_sources(dataset_dir: str | os.PathLike) -> list[Source]:
    """The sources under ``dataset_dir``, sorted by name; hidden files and folders are ignored.

    Args:
        dataset_dir: the folder given by ``--dataset_dir``.

    Raises:
        YakError: the folder is missing or holds no ``*.txt`` / ``*.jsonl`` file.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise YakError(f"dataset_dir {root} does not exist or is not a folder; pass --dataset_dir FOLDER")
    by_source: dict[str, list[Path]] = {}
    others: dict[str, int] = {}
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if not name.endswith(SUFFIXES):
                suffix = "".join(path.suffixes) or name
                others[suffix] = others.get(suffix, 0) + 1
                continue
            rel = path.relative_to(root)
            by_source.setdefault(rel.parts[0] if len(rel.parts) > 1 else ROOT_SOURCE, []).append(path)
    if not by_source:
        found = ", ".join(f"{n} {s}" for s, n in sorted(others.items())) or "nothing"
        raise YakError(
            f"dataset_dir {root} holds no *.txt or *.jsonl files (found: {found}); put UTF-8 text there, "
            "one sample a line (*.txt) or one {\"text\": ...} object a line (*.jsonl)"
        )
    if others:
        logger.warning("ignoring files that are not *.txt or *.jsonl in %s: %s", root, others)
    return [Source(name, sorted(files)) for name, files in sorted(by_source.items())]


def parse_mix(spec: str) -> list[tuple[tuple[str, ...], float]] | None:
    """Parse ``"bo=3,en+zh=4"`` into ``[(("bo",), 3.0), (("en", "zh"), 4.0)]``; ``"none"`` gives None.

    Args:
        spec: the ``--mix`` option.

    Raises:
        YakError: a malformed pair, a weight that is not a positive number, or a source named twice.
    """
    if spec.strip().lower() in ("", "none"):
        return None
    groups, seen, problems = [], set(), []
    for pair in spec.split(","):
        names, sep, weight = pair.partition("=")
        sources = tuple(n.strip() for n in names.split("+"))
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not sep or not all(sources) or not w > 0 or not np.isfinite(w):
            problems.append(f"'{pair.strip()}' is not source[+source...]=positive_weight")
            continue
        problems += [f"source '{n}' appears twice" for n in sources if n in seen]
        seen.update(sources)
        groups.append((sources, w))
    if problems:
        raise YakError(f"--mix '{spec}': {'; '.join(problems)}. Example: --mix '{DEFAULT_MIX}', or 'none'")
    return groups


def resolve_mix(spec: str, source_names: list[str]) -> list[tuple[tuple[str, ...], float]]:
    """The groups to mix, every source in exactly one group.

    An explicit spec must name exactly the sources present. The default spec drops absent sources and falls
    back to natural proportions (one group) when sources it does not name are present or fewer than two of
    its groups remain.

    Args:
        spec: the ``--mix`` option.
        source_names: the sources found under ``dataset_dir``.
    """
    natural = [(tuple(source_names), 1.0)]
    groups = parse_mix(spec)
    if groups is None:
        return natural
    named = {n for names, _ in groups for n in names}
    missing = sorted(named - set(source_names))
    unnamed = sorted(set(source_names) - named)
    if spec == DEFAULT_MIX:
        kept = [(tuple(n for n in names if n in source_names), w) for names, w in groups]
        kept = [(names, w) for names, w in kept if names]
        if unnamed or len(kept) < 2:
            logger.warning(
                "the default mix %s does not fit the sources found (%s): using their natural proportions; "
                "set --mix, e.g. --mix 'bo=3,en+zh=4' with sub-folders bo/, en/, zh/",
                DEFAULT_MIX, ", ".join(source_names),
            )
            return natural
        if missing:
            logger.warning("mix %s: no folder for %s; mixing the rest", DEFAULT_MIX, ", ".join(missing))
        return kept
    problems = []
    if missing:
        problems.append(f"it names {', '.join(missing)}, which are not sub-folders with text")
    if unnamed:
        problems.append(f"it does not name {', '.join(unnamed)}")
    if problems:
        raise YakError(
            f"--mix '{spec}': {'; and '.join(problems)}. The sources found are: {', '.join(source_names)}; "
            "name each exactly once, or pass --mix none"
        )
    return groups


# ---------------------------------------------------------------------------------------- split and mix


def split_and_mix(counts: dict[str, int], groups, pct: float, rng: np.random.Generator):
    """Block indices (into the sources concatenated in ``counts`` order) for train and validation.

    Returns:
        (train indices, validation indices, {source: (validation blocks, natural train blocks, mixed train blocks)})
    """
    offsets = dict(zip(counts, np.cumsum([0, *counts.values()])))
    own_train, val, stats = {}, [], {}
    for name, n in counts.items():
        perm = offsets[name] + rng.permutation(n)
        n_val = min(max(round(n * pct / 100), 1), n - 1) if pct > 0 and n > 1 else 0
        val.append(perm[:n_val])
        own_train[name] = perm[n_val:]
    group_blocks = [sum(len(own_train[s]) for s in names) for names, _ in groups]
    total_weight = sum(w for _, w in groups)
    # The first group is used once: the total follows from its share.
    total = group_blocks[0] * total_weight / groups[0][1]
    train = []
    for (names, weight), n_group in zip(groups, group_blocks):
        factor = total * weight / total_weight / n_group
        for name in names:
            idx = own_train[name]
            reps, rest = divmod(round(len(idx) * factor), len(idx))
            train += [idx] * reps + [rng.choice(idx, rest, replace=False)]
            stats[name] = (len(val[list(counts).index(name)]), len(idx), reps * len(idx) + rest)
    train = np.concatenate(train)
    rng.shuffle(train)
    return train, np.sort(np.concatenate(val)), stats


def share_tables(groups, stats, metas, block_size: int) -> str:
    import pandas as pd

    total = sum(s[2] for s in stats.values())
    weight_sum = sum(w for _, w in groups)
    rows, group_rows = [], []
    for names, weight in groups:
        for name in names:
            n_val, n_own, n_mixed = stats[name]
            files = metas[name]["files"]
            rows.append({
                "source": name,
                "files": len(files),
                "MB": round(sum(f["bytes"] for f in files) / 1e6, 2),
                "samples": sum(f["samples"] for f in files),
                "skipped lines": sum(f["undecodable_lines"] for f in files),
                "tokens": (n_own + n_val) * block_size,
                "validation tokens": n_val * block_size,
                "sampling": f"x{n_mixed / n_own:.2f}",
                "train tokens": n_mixed * block_size,
                "share": f"{100 * n_mixed / total:.1f}%",
            })
        mixed = sum(stats[n][2] for n in names)
        group_rows.append({
            "group": "+".join(names),
            "weight": weight,
            "requested": f"{100 * weight / weight_sum:.1f}%",
            "achieved": f"{100 * mixed / total:.1f}%",
            "train tokens": mixed * block_size,
        })
    return (pd.DataFrame(rows).to_string(index=False) + "\n\n"
            + pd.DataFrame(group_rows).to_string(index=False))

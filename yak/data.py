"""Continued-pretraining data: read sources, tokenize, group into blocks, cache, split, mix.

Layout: every sub-folder of ``dataset_dir`` is a *source* (``bo/``, ``en/``, ``zh/``); files directly in
``dataset_dir`` form the source ``.``. A source holds ``*.txt`` files (one sample a line) and ``*.jsonl``
files (one ``{"text": ...}`` object a line), in any sub-folders. Blank lines are skipped.

Pipeline, per source: check every line (undecodable bytes, JSON without ``"text"``) -> tokenize with the
fast tokenizer, one ``datasets.map`` call over ~1 MB line-aligned chunks in ``preprocessing_num_workers``
processes -> BOS (as the tokenizer adds it) + ids + EOS per sample -> concatenate and cut into
``block_size`` blocks -> save to ``data_cache_dir`` under a key made of the files' bytes, the tokenizer's
full serialization and the block size. The validation split and the mix are then drawn from the cached
blocks with ``seed``: changing them never re-tokenizes, and changing a file re-tokenizes only its source.

Mixing (the paper's Tibetan : English+Chinese = 3 : 4): the ``mix`` spec gives each group of sources a
weight; shares are in tokens (every block has ``block_size`` tokens, so in blocks). The first group is the
anchor: its training blocks are used once; every other group is down-sampled (without repetition) or
repeated (whole copies, then a random part) to reach its share. Sources inside a group keep their natural
proportions.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from yak import YakError
from yak.formats import tokenizer_fingerprint
from yak.io import atomic_write_json, content_hash
from yak.outdir import cache_entry

logger = logging.getLogger(__name__)

DEFAULT_MIX = "bo=3,en+zh=4"
SUFFIXES = (".txt", ".jsonl")
ROOT_SOURCE = "."
# Tokenization unit: one chunk is one map call; blocks do not span chunks, so at most block_size - 1 tokens
# are dropped per chunk (under 0.1% at 1 MB). Part of the cache key because it changes the blocks.
CHUNK_BYTES = 1 << 20
CACHE_VERSION = 3
MAX_LISTED = 20  # problems listed in one error message


@dataclass
class DataArguments:
    """Where the continued-pretraining text is, how to cut it into blocks, and how to mix its sources."""

    dataset_dir: str = field(
        default="data/pt",
        metadata={
            "help": "Folder of the pretraining text. Each sub-folder is a source (e.g. bo/, en/, zh/) holding "
            "*.txt files (one sample a line) and *.jsonl files (one {\"text\": ...} a line); files directly "
            "in the folder form the source '.'."
        },
    )
    data_cache_dir: str = field(
        default="data_cache",
        metadata={
            "help": "Folder for the tokenized blocks. Entries are keyed by the files' content, the tokenizer's "
            "full serialization and block_size, so a changed file or tokenizer is never served stale ids. "
            "Old entries may be deleted at any time."
        },
    )
    validation_split_percentage: float = field(
        default=0.05,
        metadata={
            "help": "Percentage (0-100, not a fraction) of each source's blocks held out for validation; at "
            "least one block per source when above 0. The original passed this value to "
            "train_test_split as a fraction: its 0.005 is 0.5 here."
        },
    )
    block_size: int = field(
        default=512,
        metadata={"help": "Tokens per training sequence; must not exceed the model's context length."},
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes for tokenization (default: the number of CPU cores, at most 16)."},
    )
    mix: str = field(
        default=DEFAULT_MIX,
        metadata={
            "help": "Share of training tokens per group of sources, as name=weight pairs over sub-folder "
            "names; '+' joins sources into a group that keeps their natural proportions. The first group "
            "is used once; the others are down- or up-sampled to their share. 'none': natural proportions. "
            f"The default '{DEFAULT_MIX}' (Tibetan : English+Chinese = 3 : 4, as the paper) drops absent "
            "folders and falls back to natural proportions when it does not fit the folders."
        },
    )
    on_decode_error: str = field(
        default="skip",
        metadata={
            "help": "Lines that are not valid UTF-8: 'skip' leaves them out and reports how many and where; "
            "'stop' refuses the data and lists them (file:line).",
            "choices": ["skip", "stop"],
        },
    )


@dataclass
class Source:
    """A sub-folder of ``dataset_dir`` and its text files (sorted)."""

    name: str
    files: list[Path]


# ----------------------------------------------------------------------------------------------- sources


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


# ------------------------------------------------------------------------------------------------ reading


def _line_chunks(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, bytes)`` pieces of about CHUNK_BYTES that end at a line break (a UTF-8 BOM skipped)."""
    with open(path, "rb") as f:
        start = len(codecs.BOM_UTF8) if f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8 else 0
        f.seek(start)
        parts: list[bytes] = []  # joined only at a cut, so a line of gigabytes is not copied again and again
        size = 0
        while block := f.read(CHUNK_BYTES):
            parts.append(block)
            size += len(block)
            if size >= CHUNK_BYTES and b"\n" in block:
                buf = b"".join(parts)
                cut = buf.rfind(b"\n") + 1
                yield start, buf[:cut]
                start, parts, size = start + cut, [buf[cut:]], len(buf) - cut
        if tail := b"".join(parts):
            yield start, tail


def _samples(data: bytes, jsonl: bool) -> tuple[list[str], list[tuple[int, str]]]:
    """The samples of a chunk and its problems as ``(line index in the chunk, what)``.

    Problems: ``"undecodable"`` (not UTF-8; the line is left out), ``"not JSON"``, ``"no text"``.
    """
    try:  # the fast path: the whole chunk decodes
        lines: list[str | None] = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = []
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(None)
    texts, problems = [], []
    for i, line in enumerate(lines):
        if line is None:
            problems.append((i, "undecodable"))
            continue
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if jsonl:
            try:
                obj = json.loads(line)
            except ValueError:
                problems.append((i, "not JSON"))
                continue
            line = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(line, str):
                problems.append((i, 'no "text" string'))
                continue
            if not line.strip():
                continue
        texts.append(line)
    return texts, problems


@dataclass
class _FileScan:
    path: Path
    chunks: list[tuple[int, int]] = field(default_factory=list)
    samples: int = 0
    undecodable: int = 0
    undecodable_at: list[int] = field(default_factory=list)  # the first MAX_LISTED 1-based line numbers
    bad_json: int = 0
    bad_json_at: list[str] = field(default_factory=list)  # the first MAX_LISTED "line N: what"


def _scan_file(path: Path, progress) -> _FileScan:
    """Read a file once: its line-aligned chunks, sample count and problems with line numbers."""
    scan, line_no = _FileScan(path), 1
    for start, data in _line_chunks(path):
        progress.update(len(data))
        texts, problems = _samples(data, jsonl=path.suffix == ".jsonl")
        scan.chunks.append((start, start + len(data)))
        scan.samples += len(texts)
        for i, what in problems:
            if what == "undecodable":
                scan.undecodable += 1
                if len(scan.undecodable_at) < MAX_LISTED:
                    scan.undecodable_at.append(line_no + i)
            else:
                scan.bad_json += 1
                if len(scan.bad_json_at) < MAX_LISTED:
                    scan.bad_json_at.append(f"line {line_no + i}: {what}")
        line_no += data.count(b"\n")
    return scan


def _listed(items: list[str]) -> str:
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "".join(f"\n  {s}" for s in items[:MAX_LISTED]) + more


# ------------------------------------------------------------------------------------------- tokenization


def _backend_json(tokenizer) -> str:
    """The tokenizer's Rust backend serialized without truncation or padding (a ``tokenizer.json`` that sets
    them must not cut samples)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend.to_str()


@functools.lru_cache(maxsize=2)
def _encoder(backend_json: str):
    """The backend for ``_tokenize_chunks``, built once per worker process from its JSON (pickling a
    ``Tokenizer`` loses ``encode_special_tokens``). A corpus line containing ``</s>`` must not become an
    end-of-sequence id, so special-token text is encoded as plain text."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(backend_json)
    backend.encode_special_tokens = True
    return backend


def _tokenize_chunks(batch: dict, backend_json: str, eos_id: int, add_eos: bool, block_size: int) -> dict:
    """``datasets.map`` function: chunk references -> ``block_size`` blocks of ids (remainder dropped)."""
    ids: list[int] = []
    for path, start, end in zip(batch["path"], batch["start"], batch["end"]):
        with open(path, "rb") as f:
            f.seek(start)
            texts, _ = _samples(f.read(end - start), jsonl=path.endswith(".jsonl"))
        # encode_batch_fast skips character offsets, which pretraining does not need: about 2x faster.
        for enc in _encoder(backend_json).encode_batch_fast(texts):
            ids += enc.ids
            if add_eos:
                ids.append(eos_id)
    n = len(ids) // block_size
    return {"input_ids": np.asarray(ids[: n * block_size], dtype=np.int32).reshape(n, block_size)}


def _num_workers(data_args: DataArguments) -> int:
    return data_args.preprocessing_num_workers or min(os.cpu_count() or 1, 16)


def _build_source(source: Source, scans: list[_FileScan], backend_json: str, eos_id: int,
                  data_args: DataArguments, entry: Path) -> int:
    """Tokenize and group one source into the cache entry ``entry``; returns the number of blocks.

    The entry is written atomically (a crash leaves none); a source too short for one block gets none.
    """
    import datasets

    # Append EOS unless the tokenizer's post-processor already does.
    add_eos = _encoder(backend_json).encode("a").ids[-1:] != [eos_id]
    chunks = [(str(s.path), a, b) for s in scans for a, b in s.chunks]
    num_proc = min(_num_workers(data_args), len(chunks))
    table = datasets.Dataset.from_dict(
        {"path": [c[0] for c in chunks], "start": [c[1] for c in chunks], "end": [c[2] for c in chunks]}
    )
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=data_args.block_size)})
    work = entry.parent / f".{entry.name}.work-{os.getpid()}"
    try:
        blocks = table.map(
            _tokenize_chunks,
            batched=True,
            batch_size=1,
            remove_columns=table.column_names,
            features=features,
            fn_kwargs={"backend_json": backend_json, "eos_id": eos_id, "add_eos": add_eos,
                       "block_size": data_args.block_size},
            num_proc=num_proc if num_proc > 1 else None,  # datasets starts a pool even for num_proc=1
            cache_file_name=str(work / "blocks.arrow"),
            new_fingerprint=entry.name,
            desc=f"tokenizing source {source.name}",
        )
        if len(blocks):
            with cache_entry(entry) as tmp:
                blocks.save_to_disk(tmp / "blocks")
                atomic_write_json(tmp / "meta.json", {
                    "source": source.name,
                    "block_size": data_args.block_size,
                    "files": [{"path": str(s.path), "bytes": s.path.stat().st_size, "samples": s.samples,
                               "undecodable_lines": s.undecodable, "undecodable_at": s.undecodable_at}
                              for s in scans],
                })
        return len(blocks)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------- split and mix


def _split_and_mix(counts: dict[str, int], groups, pct: float, rng: np.random.Generator):
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


def _share_tables(groups, stats, metas, block_size: int) -> str:
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


# ------------------------------------------------------------------------------------------------- build


def option_problems(data_args: DataArguments, layout: bool = True) -> list[str]:
    """The problems with the data options and (``layout``) the data folder's sources and ``--mix`` that can be
    found without a tokenizer or reading the text: train.py checks them before it changes the output folder."""
    problems = []
    if data_args.block_size < 1:
        problems.append(f"--block_size {data_args.block_size}: must be a positive number of tokens")
    if not 0 <= data_args.validation_split_percentage < 100:
        problems.append(
            f"--validation_split_percentage {data_args.validation_split_percentage}: must be a percentage "
            "from 0 up to (not including) 100"
        )
    if data_args.on_decode_error not in ("skip", "stop"):
        problems.append(f"--on_decode_error {data_args.on_decode_error!r}: use 'skip' or 'stop'")
    if data_args.preprocessing_num_workers is not None and data_args.preprocessing_num_workers < 1:
        problems.append(f"--preprocessing_num_workers {data_args.preprocessing_num_workers}: must be 1 or more")
    if layout:
        try:
            resolve_mix(data_args.mix, [s.name for s in find_sources(data_args.dataset_dir)])
        except YakError as e:
            problems.append(str(e))
    return problems


def _check_args(data_args: DataArguments, tokenizer) -> list[str]:
    problems = option_problems(data_args, layout=False)  # the caller reads the layout next
    if not getattr(tokenizer, "is_fast", False):
        problems.append(
            f"{type(tokenizer).__name__} is not a fast tokenizer; load it with yak.tokenizer.load_tokenizer "
            "or AutoTokenizer.from_pretrained(folder) (which converts a tokenizer.model)"
        )
    if getattr(tokenizer, "eos_token_id", None) is None:
        problems.append("the tokenizer has no EOS token, which separates the samples; set its eos_token")
    return problems


def build_pretraining_datasets(tokenizer, data_args: DataArguments, seed: int = 42):
    """Tokenized, grouped, mixed continued-pretraining data, built once and then loaded from the cache.

    Every row of both splits is ``block_size`` ids (stored as int32; rows read as Python lists). Labels are
    the collator's job. The achieved shares per source and group are logged as a table.

    Distributed runs: let the main process build the cache first and the others load it:
    ``with training_args.main_process_first(local=False): build_pretraining_datasets(...)`` (``local=True``
    when every node has its own ``data_cache_dir``).

    Args:
        tokenizer: a fast (tokenizers-backed) Hugging Face tokenizer with an EOS token.
        data_args: the data options.
        seed: seeds the validation split, the sampling for the mix and the order of the training blocks.

    Returns:
        ``datasets.DatasetDict`` with ``train`` and ``validation``, column ``input_ids``.

    Raises:
        YakError: with every problem found in the options or the files.
    """
    import datasets

    problems = _check_args(data_args, tokenizer)
    if problems:
        raise YakError("invalid data options:" + _listed(problems))
    sources = find_sources(data_args.dataset_dir)
    groups = resolve_mix(data_args.mix, [s.name for s in sources])
    cache = Path(data_args.data_cache_dir)
    root = Path(data_args.dataset_dir)
    extra = {"tokenizer": tokenizer_fingerprint(tokenizer), "block_size": data_args.block_size,
             "chunk_bytes": CHUNK_BYTES, "version": CACHE_VERSION}
    logger.info("hashing %d files (%.1f MB) for the cache keys",
                sum(len(s.files) for s in sources), sum(f.stat().st_size for s in sources for f in s.files) / 1e6)
    entries = {
        s.name: cache / "{}-{}".format(
            re.sub(r"[^\w-]", "_", s.name),
            content_hash(s.files, {**extra, "files": [str(f.relative_to(root)) for f in s.files]})[:24],
        )
        for s in sources
    }
    todo = [s for s in sources if not (entries[s.name] / "meta.json").is_file()]

    # Check every file to build before tokenizing anything, and report all problems at once.
    scans = {}
    for s in todo:
        with tqdm(total=sum(f.stat().st_size for f in s.files), unit="B", unit_scale=True,
                  desc=f"checking source {s.name}") as progress:
            scans[s.name] = [_scan_file(f, progress) for f in s.files]
    problems = []
    for name, file_scans in scans.items():
        for scan in file_scans:
            problems += [f"{scan.path}: {b}" for b in scan.bad_json_at]
            if scan.bad_json > len(scan.bad_json_at):
                problems.append(f"{scan.path}: {scan.bad_json - len(scan.bad_json_at)} more lines like these")
            if data_args.on_decode_error == "stop" and scan.undecodable:
                problems += [f"{scan.path}:{n}: not valid UTF-8" for n in scan.undecodable_at]
                if scan.undecodable > len(scan.undecodable_at):
                    problems.append(f"{scan.path}: {scan.undecodable - len(scan.undecodable_at)} more lines "
                                    "that are not UTF-8")
        if not sum(scan.samples for scan in file_scans):
            problems.append(f"source {name}: its files hold no text (only blank or unusable lines)")
    if data_args.on_decode_error == "stop":  # an entry cached by a run that skipped them does not hide them
        for s in sources:
            files = [] if s in todo else json.loads((entries[s.name] / "meta.json").read_text("utf-8"))["files"]
            for f in files:
                problems += [f"{f['path']}:{n}: not valid UTF-8" for n in f["undecodable_at"]]
                if f["undecodable_lines"] > len(f["undecodable_at"]):
                    problems.append(f"{f['path']}: {f['undecodable_lines'] - len(f['undecodable_at'])} more "
                                    "lines that are not UTF-8")
    if problems:
        undecodable = any("UTF-8" in p for p in problems)  # only --on_decode_error stop lists them
        raise YakError(
            "the pretraining text has problems:" + _listed(problems) + "\nFix these lines (every *.jsonl line "
            "must be a JSON object with a \"text\" string; text must be UTF-8)"
            + (", or pass --on_decode_error skip to leave out undecodable lines" if undecodable else "")
        )
    short = []
    backend_json = _backend_json(tokenizer) if todo else ""
    for source in todo:
        logger.info("building cache entry %s for source %s", entries[source.name], source.name)
        if not _build_source(source, scans[source.name], backend_json, tokenizer.eos_token_id, data_args,
                             entries[source.name]):
            samples = sum(scan.samples for scan in scans[source.name])
            short.append(f"source {source.name}: {samples} samples give fewer than {data_args.block_size} tokens")
    if short:
        raise YakError(
            f"--block_size {data_args.block_size} is larger than the data:" + _listed(short)
            + "\nAdd text to these sources or lower --block_size"
        )

    metas, blocks = {}, {}
    for source in sources:
        entry = entries[source.name]
        metas[source.name] = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        blocks[source.name] = datasets.load_from_disk(str(entry / "blocks"))
        if source not in todo:
            logger.info("source %s: loaded %d blocks from cache %s", source.name, len(blocks[source.name]), entry)
        for f in metas[source.name]["files"]:
            if f["undecodable_lines"]:
                logger.warning("%s: skipped %d lines that are not UTF-8 (lines %s%s)", f["path"],
                               f["undecodable_lines"], ", ".join(map(str, f["undecodable_at"])),
                               ", ..." if f["undecodable_lines"] > len(f["undecodable_at"]) else "")
    counts = {name: len(b) for name, b in blocks.items()}
    train_idx, val_idx, stats = _split_and_mix(
        counts, groups, data_args.validation_split_percentage, np.random.default_rng(seed)
    )
    logger.info("pretraining data, %d-token blocks (shares in tokens):\n%s", data_args.block_size,
                _share_tables(groups, stats, metas, data_args.block_size))
    for (names, _), n in zip(groups, [sum(stats[s][1] for s in g) for g, _ in groups]):
        factor = sum(stats[s][2] for s in names) / n
        if factor > 4:
            logger.warning("group %s is repeated x%.1f to reach its share; add text to it or lower its weight",
                           "+".join(names), factor)
    everything = datasets.concatenate_datasets(list(blocks.values()))
    return datasets.DatasetDict(
        {"train": everything.select(train_idx), "validation": everything.select(val_idx)}
    )


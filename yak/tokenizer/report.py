"""Measure tokenizers: lengths against a reference, the merge guarantees, and encoding speed.

``tokenizer_stats`` is the reusable length measure; ``run_report`` compares candidate tokenizers on held-out
files and writes a table, JSON and a PNG chart (``tokenizer_report.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from yak import YakError
from yak.outdir import inputs_inside, output_dir_problems, replace_dir
from yak.tokenizer.corpus import (
    TIBETAN_RANGES,
    find_corpus_files,
    has_script,
    parse_script_ranges,
    script_pattern,
)
from yak.tokenizer.export import HF_DIR, SOURCE_DIR, SP_DIR, load_tokenizer
from yak.tokenizer.pieces import NORMAL, load_sp_model, sp_processor, unreachable_pieces

logger = logging.getLogger(__name__)

# A Tibetan syllable: a run of letters, vowel signs and subjoined letters (U+0F40-U+0FBC) between tshegs,
# shads or spaces.
TIBETAN_SYLLABLE = re.compile(r"[\u0F40-\u0FBC]+")


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Ids of each text without special tokens, from a transformers tokenizer or a SentencePiece processor.

    Args:
        tokenizer: a transformers tokenizer or a ``sentencepiece.SentencePieceProcessor``.
        texts: the texts.
    """
    if hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return tokenizer.encode(list(texts))


def tokenizer_stats(tokenizer, texts: Sequence[str], reference=None,
                    syllable_pattern: re.Pattern = TIBETAN_SYLLABLE) -> dict:
    """Length statistics of ``tokenizer`` on ``texts`` (no special tokens), optionally against a reference.

    Args:
        tokenizer: a transformers tokenizer or a ``sentencepiece.SentencePieceProcessor``.
        texts: the texts (e.g. the lines of a held-out file).
        reference: another tokenizer of either kind (e.g. the base Llama 2 tokenizer), or None.
        syllable_pattern: what counts as a syllable (default: Tibetan syllables).

    Returns:
        ``{"texts", "bytes", "syllables", "tokens", "tokens_per_syllable", "bytes_per_token"}`` and, with a
        reference, ``"reference_tokens"``, ``"reference_tokens_per_syllable"`` and ``"length_reduction"``
        (``1 - tokens / reference_tokens``: 0.88 means sequences 88% shorter).
    """
    tokens = sum(map(len, encode_texts(tokenizer, texts)))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    syllables = sum(len(syllable_pattern.findall(t)) for t in texts)
    stats = {
        "texts": len(texts),
        "bytes": n_bytes,
        "syllables": syllables,
        "tokens": tokens,
        "tokens_per_syllable": tokens / syllables if syllables else None,
        "bytes_per_token": n_bytes / tokens if tokens else None,
    }
    if reference is not None:
        ref = sum(map(len, encode_texts(reference, texts)))
        stats.update(
            reference_tokens=ref,
            reference_tokens_per_syllable=ref / syllables if syllables else None,
            length_reduction=1 - tokens / ref if ref else None,
        )
    return stats


def encode_speed(tokenizer, texts: Sequence[str], offsets: bool = False, repeats: int = 3) -> float:
    """Encoding speed of a fast tokenizer in MB/s of UTF-8 text on one core (text by text, CPU time).

    Args:
        tokenizer: a transformers tokenizer backed by ``tokenizers``.
        texts: the texts.
        offsets: also compute each token's character offsets (what ``tokenizer(text)`` does); without, ids
            only, as ``yak.data`` tokenizes training text (``encode_batch_fast``, about 1.6x faster).
        repeats: measure this many times and keep the fastest.
    """
    backend = tokenizer.backend_tokenizer
    encode = backend.encode_batch if offsets else backend.encode_batch_fast
    best = float("inf")
    for _ in range(repeats):  # the best of a few runs: other processes slow a shared machine down
        start = time.process_time()
        for text in texts:  # one text per call: no thread pool
            encode([text], add_special_tokens=False)
        best = min(best, time.process_time() - start)
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6 / max(best, 1e-9)


def script_spans(texts: Sequence[str], ranges) -> list[str]:
    """The maximal runs of script characters in ``texts`` (to compare tokenizers on the script alone)."""
    pattern = script_pattern(ranges)
    return [m.group() for t in texts for m in pattern.finditer(t)]


# ------------------------------------------------------------------------------------------------ report
@dataclass
class ReportArguments:
    """Options of ``tokenizer_report.py``."""

    tokenizers: list[str] = field(
        default_factory=list,
        metadata={"help": "Candidates as NAME=PATH (or PATH): a merge_tokenizer.py output folder, a Hugging "
                          "Face tokenizer folder, or a bare tokenizer.model (then its fast tokenizer is "
                          "what transformers' AutoTokenizer converts from it)."},
    )
    reference: str = field(
        default="tokenizer/llama2",
        metadata={"help": "The base tokenizer (tokenizer.model or its folder) to measure length reduction "
                          "and identity against."},
    )
    heldout: list[str] = field(
        default_factory=lambda: ["data/heldout/bo_modern_nanhai_deseg_heldout.txt",
                                 "data/heldout/bo_classical_kangyur_vol078_heldout.txt"],
        metadata={"help": "Held-out text files in the new script, one text a line."},
    )
    other_text: list[str] = field(
        default_factory=lambda: ["data/heldout/en_moby_dick_heldout.txt",
                                 "data/heldout/zh_hongloumeng_ch81-120_heldout.txt"],
        metadata={"help": "Text in other languages: lines without the script must encode as with the "
                          "reference."},
    )
    script_ranges: str = field(default=TIBETAN_RANGES, metadata={"help": "Unicode ranges of the new script."})
    output_dir: str = field(default="tokenizer_report", metadata={"help": "Where report.json, "
                                                                          "report.md and report.png go."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})


@dataclass
class Candidate:
    name: str
    fast: object
    slow: object = None  # sentencepiece.SentencePieceProcessor
    proto: object = None  # its ModelProto
    source: object = None  # the new script's model alone, if the folder has it


def load_candidate(spec: str) -> Candidate:
    """Load ``NAME=PATH`` (see :class:`ReportArguments`) as fast tokenizer, SentencePiece model and source."""
    from transformers import AutoTokenizer

    name, _, path = spec.rpartition("=")
    p = Path(path)
    name = name or p.name
    if not p.exists():
        raise YakError(f"--tokenizers {spec}: {p} does not exist")
    sp_file = next((f for f in (p, p / SP_DIR / "tokenizer.model", p / HF_DIR / "tokenizer.model",
                                p / "tokenizer.model") if f.is_file()), None)
    proto = load_sp_model(sp_file, option=f"--tokenizers {spec}") if sp_file else None
    if (p / HF_DIR).is_dir() or (p / "tokenizer.json").is_file():
        fast = load_tokenizer(p)
    elif proto is not None:
        with tempfile.TemporaryDirectory() as tmp:  # what AutoTokenizer makes of a bare tokenizer.model
            (Path(tmp) / "tokenizer.model").write_bytes(proto.SerializeToString())
            (Path(tmp) / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
            fast = AutoTokenizer.from_pretrained(tmp)
    else:
        raise YakError(f"--tokenizers {spec}: no tokenizer.json or tokenizer.model in {p}")
    source = sp_processor(load_sp_model(p / SOURCE_DIR)) if (p / SOURCE_DIR).is_dir() else None
    return Candidate(name, fast, sp_processor(proto) if proto else None, proto, source)


def _lines(files: Sequence[Path]) -> dict[str, list[str]]:
    """Each file's non-empty lines, keyed by its path from the files' common folder without the suffix: the
    file's stem when all are in one folder, ``modern/test`` and ``classical/test`` when names repeat."""
    paths = [f.resolve() for f in files]
    common = Path(os.path.commonpath([p.parent for p in paths]))
    lines = {}
    for p in paths:
        lines[p.relative_to(common).with_suffix("").as_posix()] = [
            x for x in p.read_text(encoding="utf-8").split("\n") if x]
    return lines


def measure_candidate(c: Candidate, reference, reference_size: int, heldout: dict, other: dict,
                      ranges) -> dict:
    """All measures of one candidate (see :func:`run_report`)."""
    everything = [x for lines in [*heldout.values(), *other.values()] for x in lines]
    # a candidate smaller than the reference adds nothing (it is no extension of it)
    result = {"name": c.name, "vocab_size": len(c.fast), "added_pieces": max(len(c.fast) - reference_size, 0),
              "heldout": {k: tokenizer_stats(c.fast, v, reference) for k, v in heldout.items()}}
    if c.proto is not None:
        added = [p.piece for p in c.proto.pieces[reference_size:] if p.type == NORMAL]
        bad = unreachable_pieces(c.proto, added)
        result["reachable"] = 1 - len(bad) / len(added) if added else None
        fast_ids = encode_texts(c.fast, everything)
        same = sum(a == b for a, b in zip(fast_ids, c.slow.encode(everything)))
        result["fast_slow_agreement"] = same / len(everything)
    plain = [x for lines in other.values() for x in lines if not has_script(x, ranges)]
    if plain:
        same = sum(a == b for a, b in zip(encode_texts(c.fast, plain), encode_texts(reference, plain)))
        result["other_identity"] = same / len(plain)
    result["round_trip"] = sum(c.fast.decode(ids) == x for ids, x in
                               zip(encode_texts(c.fast, everything), everything)) / len(everything)
    script_text = [x for lines in heldout.values() for x in lines]
    result["encode_mb_s"] = encode_speed(c.fast, script_text)
    result["encode_mb_s_with_offsets"] = encode_speed(c.fast, script_text, offsets=True)
    if c.source is not None:
        spans = script_spans(script_text, ranges)
        result["tokens_vs_source_alone"] = (sum(map(len, encode_texts(c.fast, spans)))
                                            / sum(map(len, c.source.encode(spans))))
    return result


def _fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.2f}%" if pct else f"{x:.3f}"


def format_tables(results: list[dict]) -> str:
    """The terminal tables: lengths per held-out file, then guarantees and speed per candidate."""
    rows = [("tokenizer", "held-out file", "added", "tokens/syllable", "bytes/token", "reduction")]
    for r in results:
        for file, s in r["heldout"].items():
            rows.append((r["name"], file, str(r["added_pieces"]), _fmt(s["tokens_per_syllable"]),
                         _fmt(s["bytes_per_token"]), _fmt(s.get("length_reduction"), True)))
    rows2 = [("tokenizer", "reachable", "fast==slow", "other identical", "round trip", "MB/s (1 core)",
              "with offsets", "vs source alone")]
    for r in results:
        rows2.append((r["name"], _fmt(r.get("reachable"), True), _fmt(r.get("fast_slow_agreement"), True),
                      _fmt(r.get("other_identity"), True), _fmt(r["round_trip"], True),
                      f"{r['encode_mb_s']:.1f}", f"{r['encode_mb_s_with_offsets']:.1f}",
                      _fmt(r.get("tokens_vs_source_alone"))))
    out = []
    for table in (rows, rows2):
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines = [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot_report(results: list[dict], path: Path) -> None:
    """PNG: tokens per syllable per held-out file, and length reduction against the number of added pieces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = list(results[0]["heldout"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(files)
    for i, file in enumerate(files):
        ax1.bar([j + i * width for j in range(len(results))],
                [r["heldout"][file]["tokens_per_syllable"] or 0 for r in results], width, label=file)
    ax1.set_xticks([j + width * (len(files) - 1) / 2 for j in range(len(results))])
    ax1.set_xticklabels([r["name"] for r in results], rotation=30, ha="right")
    ax1.set_ylabel("tokens per syllable (lower is better)")
    ax1.legend(fontsize=8)
    for file, marker in zip(files, "osD^v"):
        xs = [r["added_pieces"] for r in results]
        ys = [100 * (r["heldout"][file].get("length_reduction") or 0) for r in results]
        ax2.scatter(xs, ys, marker=marker, label=file)
        for x, y, r in zip(xs, ys, results):
            ax2.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("added pieces")
    ax2.set_ylabel("sequence length reduction vs reference (%)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_report(args: ReportArguments) -> list[dict]:
    """Compare candidate tokenizers; print two tables, write ``report.json``, ``report.md``, ``report.png``.

    Measures, per candidate: tokens per syllable, bytes per token and sequence-length reduction against the
    reference on each held-out file; the share of added pieces that are reachable; the share of lines on
    which the fast tokenizer gives the SentencePiece model's ids; the share of other-language lines (without
    the script) encoded exactly as by the reference; the share of lines with ``decode(encode(x)) == x``;
    fast encoding speed on the held-out files; and, when the folder keeps the new script's own model, its
    tokens on the script's runs of text relative to that model alone.

    Args:
        args: the options (see :class:`ReportArguments`).
    """
    ranges = parse_script_ranges(args.script_ranges)
    problems = []
    if not args.tokenizers:
        problems.append("--tokenizers: give at least one candidate")
    problems += output_dir_problems(args.output_dir, args.overwrite)
    inputs = [spec.rpartition("=")[2] for spec in args.tokenizers] + [args.reference, *args.heldout,
                                                                      *args.other_text]
    for path in inputs_inside(args.output_dir, inputs):  # --overwrite replaces output_dir as a whole
        problems.append(f"--output_dir {args.output_dir} is (or contains) the input {path}; "
                        "choose a new folder")
    heldout = other = {}
    try:
        heldout = _lines(find_corpus_files(args.heldout, "--heldout"))
        other = _lines(find_corpus_files(args.other_text, "--other_text")) if args.other_text else {}
    except YakError as e:
        problems.append(str(e))
    problems += [f"--heldout: {name} holds no text in the script {args.script_ranges}; held-out files are text in "
                 "the new script (other languages go to --other_text)"
                 for name, lines in heldout.items() if not any(has_script(x, ranges) for x in lines)]
    if problems:
        raise YakError("; ".join(problems))
    reference = sp_processor(load_sp_model(args.reference, option="--reference"))
    results = []
    # the folder is locked (and checked again) while the tokenizers are measured, not only when it is written
    with replace_dir(args.output_dir, overwrite=args.overwrite) as tmp:
        for spec in tqdm(args.tokenizers, desc="tokenizers"):
            candidate = load_candidate(spec)
            results.append(measure_candidate(candidate, reference, reference.get_piece_size(), heldout, other,
                                             ranges))
        table = format_tables(results)
        print(table)
        (tmp / "report.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "report.md").write_text(table + "\n")
        plot_report(results, tmp / "report.png")
    return results

"""Read the text files: line-aligned chunks, their samples (``*.txt`` lines, ``*.jsonl`` texts), and every
problem with its line number."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

# Tokenization unit: one chunk is one map call; blocks do not span chunks, so at most block_size - 1 tokens
# are dropped per chunk (under 0.1% at 1 MB). Part of the cache key because it changes the blocks.
CHUNK_BYTES = 1 << 20
MAX_LISTED = 20  # problems listed in one error message


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


def chunk_samples(data: bytes, jsonl: bool) -> tuple[list[str], list[tuple[int, str]]]:
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
class FileScan:
    path: Path
    chunks: list[tuple[int, int]] = field(default_factory=list)
    samples: int = 0
    undecodable: int = 0
    undecodable_at: list[int] = field(default_factory=list)  # the first MAX_LISTED 1-based line numbers
    bad_json: int = 0
    bad_json_at: list[str] = field(default_factory=list)  # the first MAX_LISTED "line N: what"


def scan_file(path: Path, progress) -> FileScan:
    """Read a file once: its line-aligned chunks, sample count and problems with line numbers."""
    scan, line_no = FileScan(path), 1
    for start, data in _line_chunks(path):
        progress.update(len(data))
        texts, problems = chunk_samples(data, jsonl=path.suffix == ".jsonl")
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


def listed(items: list[str]) -> str:
    more = f"\n  ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "".join(f"\n  {s}" for s in items[:MAX_LISTED]) + more

"""The new script's text: its Unicode ranges, and the corpus files read as UTF-8 training sentences."""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from yak import YakError

TIBETAN_RANGES = "0F00-0FFF"
# A sentence is split after a shad (།) followed by whitespace: Tibetan documents are single long lines and
# SentencePiece silently drops training lines longer than max_sentence_length.
_SENTENCE_END = re.compile(r"(?<=།)\s+")


# ------------------------------------------------------------------------------------------ script ranges
def parse_script_ranges(spec: str) -> list[tuple[int, int]]:
    """Parse ``"0F00-0FFF,1000-109F"`` into ``[(0x0F00, 0x0FFF), (0x1000, 0x109F)]``.

    Args:
        spec: comma-separated hexadecimal code point ranges ``START-END`` (or single code points).
    """
    ranges = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            start, end = int(lo, 16), int(hi or lo, 16)
        except ValueError:
            raise YakError(f"--script_ranges: cannot read {part!r}; write hexadecimal ranges like 0F00-0FFF")
        if not 0 <= start <= end <= 0x10FFFF:
            raise YakError(f"--script_ranges: {part!r} is not a valid code point range")
        ranges.append((start, end))
    if not ranges:
        raise YakError("--script_ranges is empty; give at least one range like 0F00-0FFF")
    return ranges


def in_script(text: str, ranges: Sequence[tuple[int, int]]) -> bool:
    """True if every character of ``text`` (non-empty) lies in ``ranges``."""
    return bool(text) and all(any(lo <= ord(c) <= hi for lo, hi in ranges) for c in text)


def has_script(text: str, ranges: Sequence[tuple[int, int]]) -> bool:
    """True if some character of ``text`` lies in ``ranges``."""
    return any(any(lo <= ord(c) <= hi for lo, hi in ranges) for c in text)


def script_pattern(ranges: Sequence[tuple[int, int]]) -> re.Pattern:
    """A regular expression for one maximal run of characters of ``ranges``."""
    return re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges) + "]+")


# ----------------------------------------------------------------------------------------------- corpus
def find_corpus_files(paths: Iterable[str], option: str = "--corpus") -> list[Path]:
    """Resolve files and folders (their ``*.txt``, recursively) and check that each is non-empty UTF-8 text.

    Args:
        paths: files or folders.
        option: the option name used in error messages.

    Raises:
        YakError: listing every missing, empty or non-UTF-8 file.
    """
    files, problems = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.txt"))
            if not found:
                problems.append(f"{p}: folder holds no .txt files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append(f"{p}: no such file or folder")
    for f in files:
        problem = _check_utf8_text(f)
        if problem:
            problems.append(f"{f}: {problem}")
    if not paths:
        problems.append("no files given")
    if problems:
        raise YakError(f"{option}: " + "; ".join(problems))
    return files


def _check_utf8_text(path: Path, chunk: int = 1 << 20) -> str | None:
    """What is wrong with ``path`` as UTF-8 text (empty, or not UTF-8 and where), read in chunks; or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, newlines, blank = 0, 0, True
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                at = offset + e.start
                line = newlines + data[: e.start].count(b"\n") + 1
                return f"not UTF-8 (near byte {at}, line {line}: {e.reason}); convert it to UTF-8"
            blank = blank and not text.strip()
            if not data:
                return "file is empty" if blank else None
            offset += len(data)
            newlines += data.count(b"\n")


def holds_script(files: Iterable[Path], ranges: Sequence[tuple[int, int]]) -> bool:
    """True if some line of ``files`` (UTF-8) has a character of ``ranges``; reads up to the first one."""
    pattern = script_pattern(ranges)
    for f in files:
        with open(f, encoding="utf-8") as fh:
            if any(pattern.search(line) for line in fh):
                return True
    return False


def iter_sentences(files: Iterable[Path], max_bytes: int = 8192) -> Iterator[str]:
    """Yield training text: each line, or, for a line over ``max_bytes``, chunks of it.

    A long line is cut after a shad followed by whitespace, and consecutive sentences are packed into
    chunks of at most ``max_bytes`` (so that SentencePiece, which drops longer lines silently, keeps them,
    and pieces may still span a sentence boundary when whitespace splitting is off); a sentence longer than
    ``max_bytes`` is cut at a tsheg or space.

    Args:
        files: UTF-8 text files.
        max_bytes: the longest chunk, in UTF-8 bytes.
    """
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if len(line.encode()) <= max_bytes:
                    if line:
                        yield line
                    continue
                chunk = ""
                for sent in _cut_long(_SENTENCE_END.split(line), max_bytes):
                    if chunk and len(chunk.encode()) + 1 + len(sent.encode()) > max_bytes:
                        yield chunk
                        chunk = ""
                    chunk = f"{chunk} {sent}" if chunk else sent
                if chunk:
                    yield chunk


def _cut_long(sentences: Iterable[str], max_bytes: int) -> Iterator[str]:
    for sent in sentences:
        while len(sent.encode()) > max_bytes:
            head = sent.encode()[:max_bytes].decode("utf-8", "ignore")
            cut = max(head.rfind("་"), head.rfind(" "))
            cut = cut + 1 if cut > 0 else len(head)
            yield sent[:cut]
            sent = sent[cut:].lstrip()
        if sent:
            yield sent

"""SFT records: find the data files, read Alpaca and chat records (``.json`` arrays or JSON Lines), check
them, and turn each into a list of ``{"role", "content"}`` messages."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from yak import YakError

ROLES = ("system", "user", "assistant")
DATA_SUFFIXES = (".json", ".jsonl")
MAX_PROBLEMS_SHOWN = 100


def find_data_files(dataset_dir: str | os.PathLike) -> list[Path]:
    """Return the ``.json``/``.jsonl`` files of ``dataset_dir`` (a folder or one file), sorted by name."""
    path = Path(dataset_dir)
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise YakError(
                f"dataset_dir {path} is a {path.suffix or 'suffix-less'} file; give a .json or .jsonl file"
            )
        return [path]
    if not path.is_dir():
        raise YakError(
            f"dataset_dir {path} does not exist; give a folder of .json/.jsonl files or one such file"
        )
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        found = sorted(p.name for p in path.iterdir())[:10]
        raise YakError(f"dataset_dir {path} has no .json or .jsonl files (found: {found or 'nothing'})")
    return files


_WS = re.compile(r"\s*")


def _iter_json(path: Path) -> Iterator[tuple[int, object]]:
    """Yield ``(line, value)`` for each record of a JSON array file or a JSON Lines file.

    A hand-written scan (``json.JSONDecoder.raw_decode`` element by element) because ``json.load`` and
    ``datasets``' JSON loader do not say on which line each record starts, and problems must name the line.
    Raises ``ValueError(line, message)`` on malformed JSON.
    """
    text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    decoder = json.JSONDecoder()
    pos = _WS.match(text).end()
    if not text.startswith("[", pos):  # JSON Lines, whatever the suffix
        # split at "\n" only: splitlines() also splits at U+2028, U+0085..., which JSON strings may hold raw
        for line_no, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as e:
                    whole = None
                    with contextlib.suppress(json.JSONDecodeError):
                        whole = json.loads(text)
                    # e.g. a pretty-printed record, or {"data": [...]}; ValueError(line, why) is the contract
                    if isinstance(whole, dict):
                        raise ValueError(  # noqa: TRY004
                            1, f"the file is one JSON object (keys: {', '.join(list(whole)[:5])}) over several "
                            "lines; give a JSON array of records ([{...}, {...}]) or one record a line (JSON Lines)"
                        ) from None
                    raise ValueError(line_no, f"invalid JSON ({e.msg} at column {e.colno})") from None
        return
    line_no, counted = 1, 0

    def line_at(p: int) -> int:
        nonlocal line_no, counted
        line_no += text.count("\n", counted, p)
        counted = p
        return line_no

    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(e.lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
        yield line_at(pos), value
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos) and not text[pos + 1 :].strip():
            return
        else:
            raise ValueError(line_at(pos), "expected ',' or the closing ']' of the array of records")


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _check_text(record: dict, key: str, required: bool, non_empty: bool) -> list[str]:
    if key not in record or record[key] is None:
        return [f"missing '{key}'"] if required else []
    value = record[key]
    if not isinstance(value, str):
        return [f"'{key}' must be a string, found {_type_name(value)}"]
    if non_empty and not value.strip():
        return [f"empty '{key}'"]
    return []


def record_to_messages(record, special_tokens: tuple[str, ...] = ()) -> tuple[list[dict] | None, list[str]]:
    """Check one record and turn it into a chat conversation.

    Args:
        record: a decoded JSON value, Alpaca or chat form.
        special_tokens: token strings (``</s>``...) that must not appear inside the text, where they would be
            encoded as control tokens.

    Returns:
        ``(messages, [])`` for a good record, ``(None, problems)`` otherwise.
    """
    if not isinstance(record, dict):
        return None, [f"record is a {_type_name(record)}, expected an object"]
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return None, [
                f"'messages' must be a non-empty list, found {_type_name(messages)} {messages!r:.40}"
            ]
        problems = []
        turn = 0  # index among the non-system messages: even = user, odd = assistant
        for i, msg in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(msg, dict):
                problems.append(
                    f"{where} is a {_type_name(msg)}, expected an object with 'role' and 'content'"
                )
                continue
            role = msg.get("role")
            if role not in ROLES:
                found = "no 'role'" if "role" not in msg else f"role {role!r}"
                problems.append(f"{where} has {found}; expected one of {', '.join(ROLES)}")
                continue
            is_answer = role == "assistant"
            problems += [
                f"{where}: {p}" for p in _check_text(msg, "content", True, non_empty=role != "system")
            ]
            if role == "system":
                if i != 0:
                    problems.append(f"{where}: a system message may only come first")
                continue
            expected = "user" if turn % 2 == 0 else "assistant"
            if role != expected:
                problems.append(
                    f"{where}: expected role '{expected}', found '{role}' (turns must alternate "
                    "user/assistant after an optional system message)"
                )
            turn += 1
            if i == len(messages) - 1 and not is_answer:
                problems.append(
                    f"{where}: the conversation ends with a {role} message; it must end with an "
                    "assistant answer"
                )
        texts = [m.get("content") for m in messages if isinstance(m, dict)]
    elif "instruction" in record or "output" in record:
        problems = (
            _check_text(record, "instruction", True, True)
            + _check_text(record, "input", False, False)
            + _check_text(record, "output", True, True)
            + _check_text(record, "system", False, False)
        )
        texts = [record.get(k) for k in ("instruction", "input", "output", "system")]
        if not problems:
            user = record["instruction"].strip()
            if (record.get("input") or "").strip():
                user += "\n" + record["input"].strip()
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
            if record.get("system") is not None:
                messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        keys = ", ".join(sorted(record)) or "none"
        return None, [
            f"neither 'messages' (chat form) nor 'instruction'/'output' (Alpaca form); keys: {keys}"
        ]
    for token in special_tokens:
        if any(isinstance(t, str) and token in t for t in texts):
            problems.append(
                f"the text contains the special token {token!r}, which would be encoded as a control "
                "token; remove it"
            )
    if problems:
        return None, problems
    return [{"role": m["role"], "content": m["content"]} for m in messages], []


def read_conversations(files: list[Path], special_tokens: tuple[str, ...] = ()) -> list[list[dict]]:
    """Read and check every record of ``files``; one :class:`YakError` lists all bad records (file:line).

    Args:
        files: ``.json`` / ``.jsonl`` files.
        special_tokens: see :func:`record_to_messages`.
    """
    conversations, problems = [], []
    for path in files:
        try:
            for line, record in _iter_json(path):
                messages, record_problems = record_to_messages(record, special_tokens)
                problems += [f"{path}:{line}: {p}" for p in record_problems]
                if messages is not None:
                    conversations.append(messages)
        except UnicodeDecodeError as e:  # (a ValueError too: caught first)
            problems.append(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})")
        except ValueError as e:  # malformed JSON: the rest of this file cannot be read
            problems.append(f"{path}:{e.args[0]}: {e.args[1]}")
    if problems:
        shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = (
            f"\n  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more"
            if len(problems) > MAX_PROBLEMS_SHOWN
            else ""
        )
        raise YakError(
            f"{len(problems)} problem(s) in the instruction data (see docs/sft.md for the formats):\n  "
            f"{shown}{more}"
        )
    if not conversations:
        raise YakError(f"no records in {', '.join(map(str, files))}")
    return conversations

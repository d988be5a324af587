"""Small file helpers shared by every stage: JSON reading, atomic small files and content hashes.

Output folders, locks and what a tool may delete: :mod:`yak.outdir`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from yak import YakError


def unreadable(path: str | os.PathLike, error: Exception) -> YakError:
    """The error for a file that is there but cannot be read: cut short or corrupt, with how to fix it."""
    return YakError(f"{path} cannot be read ({type(error).__name__}: {error}); the file is cut short or corrupt "
                    "(e.g. an interrupted copy or save): copy it again or re-run the step that wrote it")


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; a :func:`unreadable` error when the file is not one."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise unreadable(path, e) from e
    if not isinstance(obj, dict):
        raise unreadable(path, ValueError(f"expected a JSON object, found {type(obj).__name__}"))
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def content_hash(paths: Iterable[str | os.PathLike], extra: dict | None = None) -> str:
    """SHA-256 over the bytes of ``paths`` (in the given order) and a JSON-able ``extra`` dict.

    Used for cache keys: any change in a file's content or in ``extra`` gives a new key.
    """
    h = hashlib.sha256()
    for p in paths:
        h.update(str(Path(p).name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()

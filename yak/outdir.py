"""The output contract: what a tool may write, replace and delete (docs/safety.md, "Output folders").

Every script that writes a folder or a file goes through this module:

- **A tool deletes only what it wrote.** Each output folder holds a manifest, :data:`MANIFEST`, that lists
  the files (and whole sub-folders, written ``name/``) the tool wrote there. An overwrite flag deletes those
  and nothing else; a folder holding anything else is refused, by a message that names those files.
- **Nothing half-written at the target.** Results are written beside it (``.NAME.tmp-PID``) and renamed into
  place (:func:`replace_dir`, :func:`replace_file`); a failure removes the temporary output.
- **One run per output.** A lock file ``.NAME.lock`` beside the output holds the PID of the process writing it;
  a second run is refused, naming that PID. A lock left by a process that died is taken over, with a note.
- **Leftovers of killed runs** (``.NAME.tmp-PID``, ``.NAME.old-PID``) are removed by the next run on that
  output; SIGINT and SIGTERM end a run through the clean-up (:func:`yak.cli.run_main`).
- **A full disk or a missing permission** ends in one line naming the folder (:func:`write_error`).
- Folders written in place over a long run (training) are held by a :class:`Claim`, which records each file
  or sub-folder in the manifest before it is written, so that even a killed run's files are known as its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from yak import YakError

logger = logging.getLogger(__name__)

MANIFEST = ".yak_manifest.json"
NAMED = 10  # files named in one message
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


# --------------------------------------------------------------------------------------------- the checks


def inputs_inside(output_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> list[str]:
    """The ``inputs`` (files or folders; ``None`` skipped) that ``output_dir`` is or contains.

    Replacing ``output_dir`` (an overwrite flag) would delete them, so callers refuse such an output folder.
    """
    out = Path(output_dir).resolve()
    return [str(p) for p in inputs if p and (out == Path(p).resolve() or out in Path(p).resolve().parents)]


def output_dir_problems(path: str | os.PathLike, overwrite: bool, option: str = "--output_dir",
                        flag: str = "--overwrite") -> list[str]:
    """What stops a tool from writing the folder ``path`` (checked with the other options, before any work).

    A missing or empty folder is fine. An existing one needs ``flag``, and even then only a folder that holds
    nothing but what Yak wrote there (its manifest) may be replaced; the others are named.

    Args:
        path: the output folder.
        overwrite: whether ``flag`` was given.
        option, flag: the option names used in the messages.
    """
    p = Path(path)
    if not p.exists():
        return []
    if not p.is_dir():
        return [f"{option} {p} is a file; give a folder"]
    try:
        if not any(p.iterdir()):
            return []
        foreign = foreign_files(p)
    except OSError as e:
        return [f"{option} {p} cannot be read ({e.strerror}); choose another folder"]
    if foreign:
        return [(f"{option} {p} already exists and holds files that Yak did not write: {listed(foreign)}; "
                 f"{flag} deletes only what Yak wrote there (listed in {MANIFEST}), so move those files out "
                 "or choose another folder")]
    if not overwrite:
        return [(f"{option} {p} already exists; choose another folder, or pass {flag} to replace it (only the "
                 "files Yak wrote there are deleted)")]
    return []


def output_file_problems(path: str | os.PathLike, overwrite: bool, option: str, flag: str = "--overwrite") -> list[str]:
    """What stops a tool from writing the file ``path``: it is a folder, or it exists and ``flag`` is not given."""
    p = Path(path)
    if p.is_dir():
        return [f"{option} {p} is a folder; give a file name"]
    if p.exists() and not overwrite:
        return [f"{option} {p} already exists; choose another file name, or pass {flag} to replace it"]
    return []


def listed(names: list[str]) -> str:
    """``names`` for a message: the first :data:`NAMED`, and how many more."""
    more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
    return ", ".join(names[:NAMED]) + more


# ----------------------------------------------------------------------------------------- the manifest


def read_manifest(folder: str | os.PathLike) -> set[str]:
    """The entries of ``folder``'s manifest: relative file paths, and sub-folders as ``name/``.

    A folder without one (or with an unreadable one) has none: nothing in it counts as Yak's.
    """
    path = Path(folder) / MANIFEST
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("%s cannot be read (%s): no file in %s counts as written by Yak", path, e, folder)
        return set()
    return {f for f in files if isinstance(f, str)}


def _write_manifest(folder: Path, entries: set[str]) -> None:
    from yak.io import atomic_write_json

    atomic_write_json(folder / MANIFEST, {"written_by": "yak", "files": sorted(entries)})


def _owned(rel: str, entries: set[str]) -> bool:
    """Whether the file ``rel`` (posix, relative) is an entry, inside a folder entry, or the temporary file of
    one (``.NAME.tmp-PID``, left when a write was killed)."""
    parts = rel.split("/")
    if rel == MANIFEST or rel in entries or any("/".join(parts[:i]) + "/" in entries for i in range(1, len(parts))):
        return True
    m = _LEFTOVER.match(parts[-1])
    return bool(m) and _owned("/".join([*parts[:-1], m["name"]]), entries)


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """The files in ``folder`` that its manifest does not list (empty sub-folders as ``name/``), sorted.

    Links are listed like files and never followed.
    """
    folder = Path(folder)
    entries = read_manifest(folder)
    found = []
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        if not dirs and not files and rel_root != Path("."):
            found.append(rel_root.as_posix() + "/")
        for d in list(dirs):
            if _owned((rel_root / d).as_posix() + "/x", entries):  # inside a folder the tool wrote whole
                dirs.remove(d)
            elif os.path.islink(Path(root) / d):
                dirs.remove(d)
                files.append(d)
        found += [(rel_root / f).as_posix() for f in files if not _owned((rel_root / f).as_posix(), entries)]
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def delete_own(folder: str | os.PathLike) -> None:
    """Delete what ``folder``'s manifest lists, the manifest, and the sub-folders (and ``folder``) this empties.

    Anything else stays where it is.
    """
    folder = Path(folder)
    entries = read_manifest(folder)
    emptied = {folder}
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        owned = [d for d in dirs if _owned((rel_root / d).as_posix() + "/x", entries)]
        owned += [f for f in files if _owned((rel_root / f).as_posix(), entries) and (rel_root / f) != Path(MANIFEST)]
        for name in owned:
            _remove(Path(root) / name)
        dirs[:] = [d for d in dirs if d not in owned]
        if owned:
            emptied |= {folder / rel_root, *(folder / p for p in rel_root.parents)}
    (folder / MANIFEST).unlink(missing_ok=True)
    for d in sorted(emptied, key=lambda p: len(p.parts), reverse=True):  # the deepest first
        with contextlib.suppress(OSError):  # not empty: it holds something Yak did not write
            d.rmdir()


# --------------------------------------------------------------------------------------- lock, leftovers


def _beside(target: str | os.PathLike, kind: str) -> Path:
    """``.NAME.lock``, ``.NAME.tmp-PID`` or ``.NAME.old-PID`` beside ``target`` (``out/``, ``.`` work too)."""
    target = Path(os.path.abspath(target))
    return target.parent / (f".{target.name}.lock" if kind == "lock" else f".{target.name}.{kind}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class Lock:
    """``.NAME.lock`` beside ``target``: held by the one process that writes ``target``, which it names.

    Held with ``flock``, which the kernel releases when its process dies, however it dies (``kill -9`` too):
    a lock file left by a dead process is not held, and is taken over with a note. Hand-written rather than the
    ``filelock`` package, which truncates the file as it opens it (so the holder's PID, which the refusal
    names, is lost) and leaves the file behind after use.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.path = _beside(target, "lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise a :class:`YakError` naming the process that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise YakError(f"{self.target} is being written by process {holder} (lock {self.path}); wait "
                               "until it ends or stop it, or choose another output") from None
            try:  # the holder may have released and removed this file meanwhile: then lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.read(fd, 32).decode(errors="replace").strip()
        if previous:
            logger.warning("taking over the lock %s of process %s, which ended without releasing it",
                           self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # before the close: nobody may lock this file once it is unlinked
            os.close(self.fd)
            self.fd = None


def remove_leftovers(target: str | os.PathLike) -> None:
    """Remove ``.NAME.tmp-PID`` and ``.NAME.old-PID`` beside ``target`` left by killed runs (their process is
    gone). Call it holding ``target``'s lock. An ``.old`` folder whose run was killed between its two renames
    is put back when ``target`` is missing."""
    target = Path(os.path.abspath(target))
    if not target.parent.is_dir():
        return
    for p in sorted(target.parent.iterdir()):
        m = _LEFTOVER.match(p.name)
        if not m or m["name"] != target.name or (int(m["pid"]) != os.getpid() and _pid_alive(int(m["pid"]))):
            continue
        if m["kind"] == "old" and not os.path.lexists(target):
            logger.warning("restoring %s from %s (a run was killed while replacing it)", target, p.name)
            os.replace(p, target)
        elif m["kind"] == "old" and p.is_dir():
            logger.warning("removing %s, the previous %s, left by process %s", p, target, m["pid"])
            delete_own(p)
        else:
            logger.warning("removing %s, left by process %s, which was killed while writing %s", p, m["pid"], target)
            _remove(p)


# --------------------------------------------------------------------------------------- write errors


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}
# torch.save ("[enforce fail at inline_container.cc] . unexpected pos 576 vs 534": no errno; "PytorchStreamWriter
# failed writing file") and safetensors ("Error while serializing: I/O error: No space left on device") on a full
# disk; not their readers' errors ("PytorchStreamReader failed", "Error while deserializing")
_WRITER_FAILED = ("unexpected pos", "pytorchstreamwriter", "file write failed", "error while serializing",
                  "iostream error")


def write_error(folder: str | os.PathLike, error: BaseException, *also: Path) -> YakError | None:
    """The one-line error for a write into ``folder`` that failed for want of space or permission, or None
    when ``error`` is something else (then it is re-raised as it is).

    Call it before removing what was half-written: the free space it reports is measured as the write failed.

    Args:
        folder: the output named in the message.
        error: what the write raised.
        also: other paths being written for ``folder`` (its temporary folder beside it).
    """
    folder = Path(folder)
    anchor = next((p for p in [folder, *folder.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(anchor).free
    if isinstance(error, OSError) and error.errno in _FULL:
        reason = error.strerror
    elif isinstance(error, OSError) and error.errno in _DENIED:
        written = Path(error.filename).resolve() if error.filename else None
        ours = [folder.resolve(), *(p.resolve() for p in also)]
        if written is not None and not any(p in written.parents or written in (p, *p.parents) for p in ours):
            return None  # an input that cannot be read: its loader reports it
        return YakError(f"cannot write {folder}: {error.strerror}; make {anchor} writable or write elsewhere")
    elif isinstance(error, (RuntimeError, OSError)) or type(error).__name__ == "SafetensorError":
        if not any(s in str(error).lower() for s in _WRITER_FAILED):
            return None
        reason = "No space left on device" if free < 64 << 20 else f"the write failed ({str(error)[:200]})"
    else:
        return None
    return YakError(f"cannot write {folder}: {reason} ({free / 2**20:.1f} MiB free on {anchor}); free some "
                    "space or write elsewhere. Nothing half-written was left there")


@contextlib.contextmanager
def writing(folder: str | os.PathLike) -> Iterator[None]:
    """Turn a disk-full or permission error raised in the block into :func:`write_error`'s one line."""
    try:
        yield
    except Exception as e:
        error = write_error(folder, e)
        if error is None:
            raise
        raise error from e


# ---------------------------------------------------------------------------------------- the writers


@contextlib.contextmanager
def _replacing(target: Path, problems) -> Iterator[tuple[Path, Path]]:
    """Lock ``target``, remove leftovers, check it again (``problems()``), yield ``(tmp, target)``; ``tmp``
    beside it is removed on failure (a write error turned into one line)."""
    with writing(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
    lock = Lock(target)
    with writing(target.parent):
        lock.acquire()
    try:
        remove_leftovers(target)
        found = problems()  # again, holding the lock: the folder may have changed since the options were checked
        if found:
            raise YakError("; ".join(found))
        tmp = _beside(target, "tmp")
        try:
            yield tmp, target
        except BaseException as e:
            error = write_error(target, e, tmp) if isinstance(e, Exception) else None
            with contextlib.suppress(OSError):
                _remove(tmp)
            if error is not None:
                raise error from e
            raise
    finally:
        lock.release()


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike, overwrite: bool = False, option: str = "--output_dir",
                flag: str = "--overwrite") -> Iterator[Path]:
    """Yield a new folder beside ``path``; when the block succeeds, record its files in its manifest and
    rename it to ``path``.

    ``path`` is locked meanwhile. An existing ``path`` is replaced only when ``overwrite`` and it holds nothing
    but what Yak wrote there (:func:`output_dir_problems`); only those files are deleted. On any failure
    (SIGINT and SIGTERM included, see :func:`yak.cli.run_main`) the new folder is removed and ``path`` stays.

    Args:
        path: the final output folder.
        overwrite: replace an existing ``path`` (the tool's overwrite flag).
        option, flag: the option names used in the messages.
    """
    with _replacing(Path(path), lambda: output_dir_problems(path, overwrite, option, flag)) as (tmp, target):
        tmp.mkdir()
        yield tmp
        entries = set()
        for root, dirs, files in os.walk(tmp):
            rel = Path(root).relative_to(tmp)
            entries |= {(rel / f).as_posix() for f in files}
            if not dirs and not files and rel != Path("."):
                entries.add(rel.as_posix() + "/")  # an empty folder the tool wrote
        _write_manifest(tmp, entries)
        if target.is_dir() and any(target.iterdir()):
            old = _beside(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            delete_own(old)
            if old.exists():  # something appeared there after the check
                logger.warning("kept %s: it holds files that Yak did not write: %s", old, listed(foreign_files(old)))
        else:
            os.replace(tmp, target)  # a missing or empty folder


@contextlib.contextmanager
def replace_file(path: str | os.PathLike, overwrite: bool, option: str, flag: str = "--overwrite") -> Iterator[Path]:
    """Yield a temporary file name beside ``path``, renamed to ``path`` when the block succeeds.

    Like :func:`replace_dir`: locked, an existing file replaced only with ``overwrite``, nothing half-written.
    """
    with _replacing(Path(path), lambda: output_file_problems(path, overwrite, option, flag)) as (tmp, target):
        yield tmp
        os.replace(tmp, target)


@contextlib.contextmanager
def cache_entry(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new folder beside the cache entry ``path``, renamed to ``path`` when the block succeeds.

    Cache entries are Yak's own, named by a hash of what they hold: several processes (nodes sharing the cache)
    may build the same entry at once, so there is no lock, and an entry already there (equal) is replaced whole.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(target, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = _beside(target, "old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as e:
        error = write_error(target, e, tmp) if isinstance(e, Exception) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from e
        raise


class Claim:
    """An output folder written in place over a long run (training), held by its :class:`Lock`.

    Every file or sub-folder the run writes there is recorded (:meth:`record`) before it is written, so that
    the folder's manifest lists the run's files even when the run is killed mid-write.

    Args:
        folder: the output folder; created by :meth:`take` when missing.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.lock = Lock(self.folder)
        self.entries: set[str] = set()

    @classmethod
    def take(cls, folder: str | os.PathLike) -> Claim:
        """Lock ``folder`` (a :class:`YakError` names the process holding it) and read its manifest."""
        claim = cls(folder)
        with writing(claim.folder.parent):
            claim.folder.parent.mkdir(parents=True, exist_ok=True)
            claim.lock.acquire()
        claim.entries = read_manifest(claim.folder)
        return claim

    def record(self, *names: str) -> None:
        """Add ``names`` (relative paths; sub-folders as ``name/``) to the manifest, before they are written."""
        if set(names) - self.entries:
            self.entries |= set(names)
            with writing(self.folder):
                self.folder.mkdir(parents=True, exist_ok=True)
                _write_manifest(self.folder, self.entries)

    def forget(self, *names: str) -> None:
        """Drop ``names`` from the manifest, once they are removed."""
        if set(names) & self.entries:
            self.entries -= set(names)
            _write_manifest(self.folder, self.entries)

    def owns(self, name: str) -> bool:
        return _owned(name, self.entries)

    def delete_own(self) -> None:
        """Delete every file the manifest lists (:func:`delete_own`); the folder stays, locked."""
        delete_own(self.folder)
        self.entries = set()

    def release(self) -> None:
        self.lock.release()

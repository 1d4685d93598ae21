"""Writing files safely: atomic replacement, the write check of an output folder, the lock of a run
folder, and relative paths that must stay inside their folder.

* ``write_atomically`` writes the new content to a temporary file beside the target, flushes it to
  disk (``fsync``), renames it over the target (``os.replace``, atomic on POSIX) and flushes the
  folder entry too: a crash, a kill or a power cut at any moment leaves the previous file or the
  new one, never half of one. A write that fails leaves the previous file and no temporary file.
  Unique temporary names let two processes write the same file at once; the last rename wins.
* ``check_writable`` tries to create a file in an output folder before any work starts, so a
  read-only folder, a full disk or a file in the path is one line at once, not a failure later.
* ``hold_lock`` holds an exclusive ``fcntl`` lock on a file while a run writes into its folder,
  so a second process on the same folder stops at once instead of interleaving its files.
* ``path_inside`` resolves a relative path read from a file (a pick's ``weights``) and refuses one
  that leads out of its folder, before anything is opened.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ehrsr.errors import UserError

__all__ = [
    "FolderInUse",
    "FolderNotWritable",
    "PathOutsideFolder",
    "check_writable",
    "hold_lock",
    "path_inside",
    "write_atomically",
    "write_text_atomically",
]


class FolderNotWritable(UserError):
    """An output folder cannot be written (read-only, full, a file in its path)."""


class FolderInUse(UserError):
    """Another process holds the lock of a run folder."""


class PathOutsideFolder(UserError, ValueError):
    """A relative path read from a file leads outside the folder it must stay in."""


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Create ``path`` by calling ``write(temporary)`` on a temporary file beside it, then flush it
    to disk and rename it over ``path`` (see the module docstring). Any exception from ``write``,
    the flush or the rename propagates after the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)  # gone after the rename; after a failure, it must not stay
    _fsync_folder(path.parent)


def write_text_atomically(path: str | Path, text: str) -> None:
    """``write_atomically`` of a UTF-8 text file."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _fsync_folder(folder: Path) -> None:
    """Flush the folder entry, so the rename itself survives a power cut (POSIX; where a folder
    cannot be opened or flushed, as on Windows or some network file systems, the rename stands)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def check_writable(folder: str | Path, *, create: bool = True) -> None:
    """Raise ``FolderNotWritable`` (one line naming ``folder`` and why) unless a file can be
    created in ``folder``. ``create``: make a missing folder first; without it a missing folder
    passes unless a regular file stands in its path (its creation could then never succeed)."""
    folder = Path(folder)
    if not create and not folder.is_dir():
        if folder.exists() or any(parent.is_file() for parent in folder.parents):
            raise FolderNotWritable(f"output folder {folder} is not writable: a file is in its path")
        return
    probe = folder / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # unique: workers start together
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = "a file is in its path" if exc.errno in (errno.ENOTDIR, errno.EEXIST) else exc.strerror or str(exc)
        raise FolderNotWritable(f"output folder {folder} is not writable: {reason}") from None


@contextlib.contextmanager
def hold_lock(path: str | Path, *, hint: str = "") -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (holding this process's pid) for the
    ``with`` block, and remove the file at the end. When another process holds it, raise
    ``FolderInUse`` naming the folder and that process's pid, followed by ``hint``.

    The lock ends with the process however it ends; a file left by a killed process is not held,
    so the next run takes it. A file is removed only by its holder, and a process that locked a
    file just removed (its path now names another file, or none) lets it go and locks the
    current one, so two processes never both hold the lock."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise FolderInUse(f"{path.parent} is in use by another process (pid {holder}, lock file "
                              f"{path.name}){hint}") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(descriptor).st_ino:
            break
        os.close(descriptor)  # locked a file its holder had just removed: lock the one there now
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # still held: nobody can lock this file in between
        os.close(descriptor)  # releases the lock


def path_inside(folder: str | Path, relative: str, what: str) -> Path:
    """``folder / relative``, resolved, when it stays inside ``folder`` (symbolic links followed);
    else ``PathOutsideFolder``: ``what`` names the value in the message (``"pick weights"``)."""
    folder = Path(folder).resolve()
    text = str(relative)
    target = (folder / text).resolve()
    if not text or Path(text).is_absolute() or not target.is_relative_to(folder) or target == folder:
        raise PathOutsideFolder(f"{what} {text!r} is not a file inside {folder}: refused")
    return target

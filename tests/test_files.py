"""ehrsr.files: atomic writes (and every writer that uses them), the output-folder check, the run
lock and paths that must stay inside their folder."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from ehrsr.files import (
    FolderInUse,
    FolderNotWritable,
    PathOutsideFolder,
    check_writable,
    hold_lock,
    path_inside,
    write_atomically,
    write_text_atomically,
)


def _write_checkpoint(path: Path) -> None:
    from ehrsr.fulltrain.checkpoint import save_atomically

    save_atomically({"step": torch.tensor(3)}, path)


def _write_cache(path: Path) -> None:
    from ehrsr.data.cache import save_npz_atomically

    save_npz_atomically(path, {"a": np.arange(5, dtype=np.uint8)})


def _write_latency_model(path: Path) -> None:
    from ehrsr.profiling.latency_model import LatencyModel, LatencyTarget

    target = LatencyTarget("edge", "cpu", "torch", 1, "float32", (32, 32))
    LatencyModel(target, {"name": "tiny", "sha256": "0" * 64}, {"conv(C=8)": {"latency_ms": 1.0}}).save(path)


def _write_text(path: Path) -> None:
    write_text_atomically(path, "new text\n")


WRITERS = {"checkpoint": _write_checkpoint, "data cache": _write_cache, "latency model": _write_latency_model,
           "text": _write_text}


@pytest.fixture
def fsyncs(monkeypatch) -> list[tuple[str, int]]:
    """(kind, inode) of every descriptor passed to os.fsync: 'file' or 'folder'."""
    seen: list[tuple[str, int]] = []
    real = os.fsync

    def spy(descriptor: int) -> None:
        info = os.fstat(descriptor)
        seen.append(("folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino))
        real(descriptor)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_every_writer_flushes_the_file_and_its_folder_and_leaves_only_the_file(writer, tmp_path, fsyncs) -> None:
    path = tmp_path / "out" / "target.bin"
    path.parent.mkdir()
    path.write_bytes(b"old")
    writer(path)
    assert path.read_bytes() != b"old"
    assert os.listdir(path.parent) == ["target.bin"]
    # the file's content reached the disk before the rename, the rename before returning
    assert ("file", path.stat().st_ino) in fsyncs
    assert ("folder", path.parent.stat().st_ino) in fsyncs
    assert [kind for kind, _ in fsyncs].index("file") < [kind for kind, _ in fsyncs].index("folder")


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(writer, tmp_path, monkeypatch) -> None:
    path = tmp_path / "target.bin"
    path.write_bytes(b"old")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)  # the last step: the temporary file is complete by then
    with pytest.raises(OSError, match="No space left"):
        writer(path)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["target.bin"]


def test_an_exception_inside_the_write_leaves_nothing_new(tmp_path) -> None:
    def half_then_fail(temporary: Path) -> None:
        temporary.write_text("half")
        raise KeyboardInterrupt  # even an interrupt: the temporary file goes

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "new.txt", half_then_fail)
    assert os.listdir(tmp_path) == []


def test_check_writable_creates_the_folder_or_names_the_problem(tmp_path) -> None:
    check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and os.listdir(tmp_path / "a" / "b") == []  # the probe is gone
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FolderNotWritable, match=r"^output folder .*/file/out is not writable: a file is in its path$"):
        check_writable(blocker / "out")
    # without create, a missing folder passes (someone else creates it) unless a file blocks it
    check_writable(tmp_path / "later", create=False)
    assert not (tmp_path / "later").exists()
    with pytest.raises(FolderNotWritable, match="a file is in its path"):
        check_writable(blocker / "out", create=False)


def test_check_writable_reports_a_read_only_folder(tmp_path, monkeypatch) -> None:
    # tests run as root, where permissions do not stop writes: simulate the OS refusing
    real = Path.write_bytes

    def refuse(self: Path, data: bytes) -> int:
        if self.name.startswith(".write-test-"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(FolderNotWritable, match=r"is not writable: Read-only file system$"):
        check_writable(tmp_path)


def _try_lock(path: str, queue) -> None:
    try:
        with hold_lock(Path(path), hint="; choose another --out"):
            queue.put("held")
    except FolderInUse as exc:
        queue.put(str(exc))


def test_the_lock_refuses_a_second_process_and_is_gone_afterwards(tmp_path) -> None:
    lock = tmp_path / "run" / ".lock"
    context = mp.get_context("fork")  # a child process of its own: flock locks are per open file
    queue = context.Queue()
    with hold_lock(lock):
        assert lock.read_text().strip() == str(os.getpid())
        other = context.Process(target=_try_lock, args=(str(lock), queue))
        other.start()
        other.join(60)
        message = queue.get(timeout=5)
        assert message == (f"{lock.parent} is in use by another process (pid {os.getpid()}, lock file .lock); "
                           "choose another --out")
        with pytest.raises(FolderInUse), hold_lock(lock):  # the same process, another descriptor: refused too
            pass
    assert not lock.exists()
    other = context.Process(target=_try_lock, args=(str(lock), queue))
    other.start()
    other.join(60)
    assert queue.get(timeout=5) == "held"


def test_a_lock_file_left_by_a_killed_process_is_not_held(tmp_path) -> None:
    lock = tmp_path / ".lock"
    lock.write_text("999999\n")  # what a SIGKILLed holder leaves
    with hold_lock(lock):
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


def test_path_inside_refuses_every_way_out(tmp_path) -> None:
    folder = tmp_path / "deploy"
    folder.mkdir()
    (tmp_path / "secret.safetensors").write_text("")
    (folder / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    assert path_inside(folder, "edge.safetensors", "pick weights") == (folder / "edge.safetensors").resolve()
    assert path_inside(folder, "sub/x.safetensors", "pick weights") == (folder / "sub" / "x.safetensors").resolve()
    for bad in ("../secret.safetensors", str(tmp_path / "secret.safetensors"), "link.safetensors", "", ".",
                "sub/../../secret.safetensors"):
        with pytest.raises(PathOutsideFolder, match=r"^pick weights .* is not a file inside .*deploy: refused$"):
            path_inside(folder, bad, "pick weights")

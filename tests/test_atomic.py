"""Crash-safe writes: a failed write leaves the old file intact and no partial file."""

import errno
import os

import pytest

from grokpipe.errors import GrokpipeError
from grokpipe.io import atomic
from grokpipe.io.atomic import is_temporary, remove_stale_temporaries, sha256_file, write_bytes_atomic


def test_write_returns_sha256_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    digest = write_bytes_atomic(target, b"hello")
    assert target.read_bytes() == b"hello" and digest == sha256_file(target)
    assert os.listdir(tmp_path) == ["a.bin"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_keeps_old_content_and_removes_temporary(tmp_path, monkeypatch, failing):
    target = tmp_path / "a.bin"
    write_bytes_atomic(target, b"old")

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, failing, enospc)
    with pytest.raises(GrokpipeError) as info:
        write_bytes_atomic(target, b"new content")
    assert str(target) in str(info.value) and "No space left on device" in str(info.value)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_permission_error_is_named(tmp_path, monkeypatch):
    def eacces(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", eacces)
    with pytest.raises(GrokpipeError, match=r"x: write failed \(Permission denied\)"):
        write_bytes_atomic(tmp_path / "x", b"1")
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".checkpoint_epoch_00099.safetensors.tmp-abc123").write_bytes(b"torn")
    (tmp_path / "checkpoint_epoch_00099.safetensors").write_bytes(b"whole")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".checkpoint_epoch_00099.safetensors.tmp-abc123"]
    assert os.listdir(tmp_path) == ["checkpoint_epoch_00099.safetensors"]
    assert is_temporary(removed[0]) and not is_temporary(tmp_path / "checkpoint_epoch_00099.safetensors")


def test_the_directory_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    """The rename itself must be durable: the parent directory is fsynced after os.replace."""
    events = []
    real_replace, real_fsync = atomic.os.replace, atomic.os.fsync

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", "dir" if os.path.isdir(target) else os.path.basename(target)))
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    write_bytes_atomic(tmp_path / "a.bin", b"data")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[1] == ("replace", "a.bin") and events[2] == ("fsync", "dir")

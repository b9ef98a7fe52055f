"""Crash-safe file writes: temporary file in the same directory, fsync, rename, fsync the directory.

A reader sees either the old file or the complete new one, never a torn file; files and directories
get the permissions the umask gives (0644/0755 under umask 022), as with a plain ``open``; a crash or a write
error leaves at most a temporary file (``.NAME.tmp-*``), which :func:`remove_stale_temporaries`
clears on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import GrokpipeError

TMP_MARKER = ".tmp-"
log = logging.getLogger(__name__)


def current_umask() -> int:
    """The process umask (Linux reports it in /proc; elsewhere it is read by setting it back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_unique_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named directory under ``parent`` with the umask's permissions (``mkdtemp``
    alone makes it 0700, which hides results from colleagues on a shared file system)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path):
    """A binary file object whose content appears at ``path`` only when the block ends without an
    error: temporary file beside it (the umask's permissions), fsync, rename, fsync the directory.

    On any OS error (disk full, permission) the temporary file is removed, ``path`` keeps its old
    content (or stays absent) and a GrokpipeError names the file.
    """
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARKER}", dir=path.parent)
        # mkstemp creates 0600 whatever the umask; the file gets what open() would have given it.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        fsync_dir(path.parent)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise GrokpipeError(f"{path}: write failed ({reason}); nothing was written there") from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def write_bytes_atomic(path: str | Path, data: bytes) -> str:
    """Write ``data`` to ``path`` crash-safely (:func:`atomic_file`) and return its sha256 (hex)."""
    with atomic_file(path) as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


def write_json_atomic(path: str | Path, data) -> str:
    """Write ``data`` as indented, strict JSON crash-safely (NaN/inf are refused, never written as
    the invalid tokens ``NaN``/``Infinity``); returns the file's sha256."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return write_bytes_atomic(path, text.encode())


def is_temporary(path: str | Path) -> bool:
    name = Path(path).name
    return name.startswith(".") and TMP_MARKER in name


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete temporary files a killed writer left in ``directory``; returns what was removed."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.is_file() and is_temporary(entry):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_directory(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` directory to ``target`` (a sibling); an existing ``target``
    (replaced on ``--force``) is set aside first and removed once the new one is in place."""
    if target.exists():
        if any(target.iterdir()):
            log.warning("%s existed and is replaced (--force)", target)
        aside = make_unique_dir(target.parent, f".{target.name}.replaced-")
        target.rename(aside / target.name)
        staging.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        staging.rename(target)
    fsync_dir(target.parent)


@contextmanager
def staged_directory(target: Path, verb: str, markers: tuple[str, ...]):
    """A new directory ``.{target}.{verb}-*`` beside ``target`` to build it in: renamed into place
    (:func:`replace_directory`) when the block ends without an error, removed either way, so a
    failure leaves ``target`` as it was. What a killed writer staged before (``markers``) is removed
    first; call it with the target's writer lock held."""
    remove_stale_staging(target, markers)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_unique_dir(target.parent, f".{target.name}.{verb}-")
    try:
        yield staging
        replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(target: Path, markers: tuple[str, ...]) -> None:
    """Staging and set-aside directories a killed writer left beside ``target`` (``.NAME{marker}*``);
    call it with the target's writer lock held."""
    for entry in target.parent.glob(f".{target.name}.*"):
        if entry.is_dir() and any(entry.name.startswith(f".{target.name}{m}") for m in markers):
            log.info("removing %s, left by an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)

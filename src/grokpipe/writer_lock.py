"""One writer per run directory: an exclusive ``flock`` on ``.{run_name}.lock`` beside it.

``grokpipe train``, ``convert`` and ``export`` take it before touching a run, so a second writer (a
SLURM resubmission while the old job still runs, two shells) is refused with the holder's pid and
host instead of racing: clearing the other's resume state, deleting its temporary files. The lock
lives beside the run directory, not inside it, because ``convert`` replaces the directory as a
whole. The kernel releases it when the holder exits, however it exits, so a killed writer never
leaves a stale lock; the file itself stays and is reused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import GrokpipeError


def lock_path(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def writer_lock(run_dir: str | Path, command: str, *, wait: float = 0.0):
    """Hold the exclusive writer lock of ``run_dir`` for the duration of the block.

    ``wait``: seconds to wait for another holder to finish before refusing (0: refuse at once).
    Exports wait: two exports of one run (``--grokked`` and ``--final`` as concurrent jobs) may
    name the same directory, and the second then finds the first's result.
    """
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise GrokpipeError(f"{path}: cannot open the run's lock file ({exc.strerror or exc})") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise GrokpipeError(
                        f"{run_dir}: another grokpipe process is writing this run: {_holder(path)}; "
                        "wait for it to finish (or stop it) and run again"
                    ) from None
                time.sleep(0.2)
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": since})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode() + b"\n", 0)
        yield path
    finally:
        os.close(fd)  # releases the flock

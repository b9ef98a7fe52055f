"""Which paths a reader may open: regular files only, and, for names an input gives, only files
that stay inside that input once symlinks are resolved.

A FIFO or device opened for reading blocks forever or yields endless bytes; a symlink in a
checkpoint directory can point at any file of the user's (``/proc/self/environ``). Every reader of
a file grokpipe did not write itself goes through :func:`regular_file` before opening it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import GrokpipeError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | Path, *, root: str | Path | None = None, what: str | None = None) -> Path:
    """``path`` when it is a regular file, and (given ``root``) one that resolves inside ``root``.

    Args:
        path: the file to be opened.
        root: the input directory it must stay in, symlinks resolved; None for a path the user named.
        what: how the error names the file (default: the path).

    Returns:
        ``path`` unchanged.

    Raises:
        GrokpipeError: missing, not a regular file, or a link that leaves ``root``; the content is
        never read, so it never reaches a message.

    Example:
        >>> regular_file("ckpt/config.json", root="ckpt")
        PosixPath('ckpt/config.json')
    """
    path = Path(path)
    name = what or str(path)
    if root is not None and not path.resolve().is_relative_to(Path(root).resolve()):
        raise GrokpipeError(f"{name}: a link that leaves {root}; refused")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise GrokpipeError(f"{name}: missing") from None
    except OSError as exc:
        raise GrokpipeError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise GrokpipeError(f"{name}: {kind_of(mode)}, not a regular file; refused")
    return path


def is_regular_file(path: str | Path) -> bool:
    """Whether ``path`` exists and is a regular file (following symlinks), without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False

"""Which paths may be read as files: regular files only, the one rule for every scan of inputs.

A FIFO listed as an image blocks its reader forever, a device streams without end, and a broken symbolic link reads
as a file that vanished; none of them is data. Every scan (images, slides, feature files, coords) asks
:func:`file_problem` before opening a path, and reports what it found on one line instead of hanging or skipping it
without a word.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["file_problem"]


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """None for a regular file (or a link to one), else what the path is, in words ("a FIFO", "a broken symbolic
    link", "missing"...), to complete a sentence such as "<path> is a FIFO"."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "missing"
    except OSError as e:
        return f"not accessible ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a regular file"
    return "not a regular file"

"""One error family. Every message names the file or key at fault and says what to do."""

from __future__ import annotations

import errno
import os
import re


class PathoTuneError(Exception):
    """Base class for errors a user can cause; the CLI prints them on one line and exits 2."""


class ConfigError(PathoTuneError):
    """An unknown, ill-typed or conflicting configuration key or switch."""


class WeightsError(PathoTuneError):
    """A weight file that is missing, unreadable, or does not fit the architecture."""


class BundleError(PathoTuneError):
    """A prompt bundle that is missing, corrupt, or made for another backbone or format."""


class DataError(PathoTuneError):
    """Unreadable images, empty classes, bad manifests, slides without the metadata needed."""


class OutputError(PathoTuneError):
    """An output that cannot be written: a full disk, a read-only or unusable folder, a path under a file."""


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_ADVICE = {
    errno.ENOSPC: "free some space (or pass another --out) and rerun",
    errno.EDQUOT: "free some space within your quota (or pass another --out) and rerun",
    errno.EROFS: "the file system is read-only; pass a writable --out",
    errno.EACCES: "you lack permission to write there; pass a writable --out",
    errno.EPERM: "you lack permission to write there; pass a writable --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder; pass another --out",
    errno.EISDIR: "a folder is in the way; pass another --out",
    errno.ENAMETOOLONG: "the path is too long; pass a shorter --out",
}


def one_line(e: object, limit: int | None = None) -> str:
    """An exception (or any text) on one line, for messages that must stay one line.

    Runs of whitespace, newlines included, become one space; object addresses (`` at 0x7f3a...``) are dropped so
    the same failure reads the same in every run (error files are compared across runs); an exception without a
    message gives its type name; with ``limit``, longer text is cut to ``limit`` characters ending in "...".
    """
    text = _ADDRESS.sub("", " ".join(str(e).split()))  # "<_io.BytesIO object at 0x7f..>" differs run to run
    if not text and isinstance(e, BaseException):
        text = type(e).__name__
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    return text


def describe_os_error(e: BaseException) -> str:
    """``strerror`` of an OSError (or the text of any other exception) on one line."""
    return one_line(getattr(e, "strerror", None) or str(e) or type(e).__name__)


def write_error(path: str | os.PathLike, e: BaseException) -> OutputError:
    """An OutputError for a failed write of ``path``: which file, why, that nothing was half-written, what to do.

    Every writer in pathotune writes to a temporary name and renames, so a failed write leaves the target as it
    was and everything written before it intact; the message says so.
    """
    code = getattr(e, "errno", None)
    if code is None and "write failed" in str(e).lower():  # torch.save reports ENOSPC as a RuntimeError
        code = errno.ENOSPC
    reason = os.strerror(code) if code in _ADVICE else describe_os_error(e)
    advice = _ADVICE.get(code, "check the folder and rerun")
    return OutputError(
        f"could not write {path} ({reason}); it was left as it was and files written before it are intact; {advice}"
    )


# What an interrupted command has kept and how to go on, for the one line Ctrl-C prints (the CLI reads it).
_interrupt_note: list[str] = []


def note_interrupt(text: str | None) -> None:
    """Say what Ctrl-C would leave behind from here on (``None``: nothing worth saying); the last note wins."""
    _interrupt_note[:] = [] if text is None else [one_line(text)]


def interrupt_message() -> str:
    """The line printed when a command is interrupted: what was kept and how to resume."""
    return "interrupted" + (f": {_interrupt_note[0]}" if _interrupt_note else "; nothing was written")

"""Progress bars for terminals and for logs: one factory, so every bar behaves the same.

On a terminal a bar is tqdm's, redrawn in place and wiped when it ends. Where stderr is a file or a pipe (CI logs,
``nohup``, ``2> log``) carriage-return redraws would pile up as one endless line, so the bar becomes a plain line
every :data:`PLAIN_INTERVAL` seconds instead, and nothing at all for work that ends sooner (a quick command that
fails still prints only its error line). ``TQDM_DISABLE=1`` in the environment turns every bar off.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["PLAIN_INTERVAL", "PlainLines", "bars_disabled", "progress_bar"]

PLAIN_INTERVAL = 30.0  # seconds between progress lines in a log


def bars_disabled() -> bool:
    """Whether ``TQDM_DISABLE`` asks for no progress bars (any value but empty, 0, false, no)."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class PlainLines:
    """A file for tqdm that turns its redraws into whole lines, at most one per ``interval`` seconds.

    What tqdm draws within ``interval`` of the start (its first frame) and blank frames (a bar wiping itself) are
    dropped, so short work prints nothing.
    """

    def __init__(self, stream: TextIO, interval: float = PLAIN_INTERVAL) -> None:
        self.stream, self.interval = stream, interval
        self.start = time.monotonic()

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line and time.monotonic() - self.start >= self.interval:
            self.stream.write(line + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
    file: TextIO | None = None,
    initial: int = 0,
    interval: float | None = None,
) -> tqdm:
    """A tqdm bar on ``file`` (default stderr): in place on a terminal, periodic plain lines elsewhere.

    Disabled when ``enabled`` is false or ``TQDM_DISABLE`` is set. ``interval`` overrides
    :data:`PLAIN_INTERVAL` for the plain lines.
    """
    stream = file if file is not None else sys.stderr
    common = {"total": total, "desc": desc, "unit": unit, "initial": initial, "disable": not enabled or bars_disabled()}
    if _is_tty(stream):
        return tqdm(**common, leave=False, dynamic_ncols=True, file=stream)
    every = PLAIN_INTERVAL if interval is None else interval
    return tqdm(**common, leave=False, file=PlainLines(stream, every), mininterval=every, ascii=True, ncols=80)

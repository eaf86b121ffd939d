"""A cohort survives its bad slides: each slide's step runs on its own, and a failure becomes a row of
``errors.csv`` instead of the end of the run.

Every per-slide command (``slides tile``, ``extract``, ``predict``, ``heatmap``) goes through :class:`Cohort`:

- with ``skip_errors``, a slide that fails (cannot be opened, lacks its mpp, a tile broken deep inside a level)
  is recorded as ``slide_id, slide_path, stage, reason`` and the next slide goes on; the command ends with exit
  code :data:`PARTIAL_EXIT` (3) when any slide failed, so a script can tell "some slides failed" from success (0)
  and from bad input (2);
- without it, the first failure stops the command with its one-line error naming the slide (after the other
  processes of a multi-process run have stopped too); it is recorded as well;
- ``errors.csv`` keeps the failures of earlier runs for slides this run did not retry, and drops a slide once it
  succeeds, so a rerun retries only the failed and unfinished slides and the file always says what is missing.

With several processes each rank keeps ``errors.rank<k>.csv``; rank 0 folds them in at the end.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import DataError, PathoTuneError, one_line
from .report.io import atomic_write_text, csv_text

__all__ = ["ERRORS", "PARTIAL_EXIT", "Cohort", "SlideFailure", "read_errors"]

ERRORS = "errors.csv"
PARTIAL_EXIT = 3  # the command finished, but some slides failed (listed in errors.csv)
FIELDS = ("slide_id", "slide_path", "stage", "reason")
T = TypeVar("T")


@dataclass(frozen=True)
class SlideFailure:
    slide_id: str
    slide_path: str
    stage: str
    reason: str


def _reason(e: BaseException) -> str:
    """A failure on one line: the project's own errors say what to do; anything else names its type."""
    return one_line(e, 500) if isinstance(e, PathoTuneError) else f"{type(e).__name__}: {one_line(e, 480)}"


def read_errors(path: Path) -> dict[str, SlideFailure]:
    """The failures listed in an ``errors.csv`` (empty when it is missing or unreadable: a convenience file)."""
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    out = {}
    for r in rows:
        if r.get("slide_id"):
            out[r["slide_id"]] = SlideFailure(*(str(r.get(k) or "") for k in FIELDS))
    return out


def _errors_path(out: Path, rank: int, world_size: int, name: str = ERRORS) -> Path:
    return out / (name if world_size == 1 else f"{Path(name).stem}.rank{rank}.csv")


class Cohort:
    """The per-slide step of one command over many slides, writing its failures to ``out/errors.csv``."""

    def __init__(
        self, out: str | Path, skip_errors: bool, rank: int = 0, world_size: int = 1, errors_name: str = ERRORS
    ) -> None:
        self.out = Path(out)
        self.errors_name = errors_name
        self.skip_errors = skip_errors
        self.rank, self.world_size = rank, world_size
        self.failures: dict[str, SlideFailure] = {}
        self.succeeded: set[str] = set()
        self._first: tuple[str, BaseException] | None = None

    def run(self, slide_id: str, slide_path: str | Path, stage: str, step: Callable[[], T]) -> T | None:
        """``step()`` for one slide: its result, or None when it failed (recorded; see :attr:`stop`)."""
        try:
            result = step()
        except Exception as e:  # any failure of one slide is that slide's; the caller decides whether to go on
            self.fail(slide_id, slide_path, stage, e)
            return None
        self.succeeded.add(slide_id)
        self.failures.pop(slide_id, None)
        return result

    @property
    def stop(self) -> bool:
        """Whether the command must stop now: a slide failed and failures may not be skipped."""
        return bool(self.failures) and not self.skip_errors

    def raise_first(self) -> None:
        """Without ``skip_errors``, end the command with the first failure's own one-line error (a PathoTuneError
        as it was; anything else, which is a bug, as a DataError naming the slide, the original as its cause)."""
        if self.skip_errors or not self.failures:
            return
        if self._first is not None:
            sid, e = self._first
            if isinstance(e, PathoTuneError):
                raise e
            raise DataError(f"slide {sid} failed: {self.failures[sid].reason}") from e
        first = min(self.failures.values(), key=lambda f: f.slide_id)
        raise DataError(f"slide {first.slide_id} failed ({first.stage}): {first.reason}")

    def fail(self, slide_id: str, slide_path: str | Path, stage: str, e: BaseException) -> None:
        self.failures[slide_id] = SlideFailure(slide_id, str(slide_path), stage, _reason(e))
        if self._first is None:
            self._first = (slide_id, e)

    def write(self) -> None:
        """Rewrite this rank's errors file: earlier failures of slides not retried, plus this run's."""
        path = _errors_path(self.out, self.rank, self.world_size, self.errors_name)
        merged = {
            sid: f
            for sid, f in read_errors(self.out / self.errors_name).items()
            if sid not in self.succeeded and sid not in self.failures
        }
        if self.world_size > 1:
            merged = {}  # rank files hold this run only; rank 0 merges them with the folder's file
        merged.update(self.failures)
        if merged:
            self.out.mkdir(parents=True, exist_ok=True)
            rows = [[f.slide_id, f.slide_path, f.stage, f.reason] for _, f in sorted(merged.items())]
            atomic_write_text(path, csv_text(rows, list(FIELDS)))
        elif path.exists():
            path.unlink()

    @staticmethod
    def merge(out: Path, world_size: int, succeeded: set[str]) -> None:
        """Fold every rank's errors file into ``errors.csv`` (rank 0, after the others finished)."""
        merged = {sid: f for sid, f in read_errors(out / ERRORS).items() if sid not in succeeded}
        for k in range(world_size):
            part = _errors_path(out, k, world_size)
            merged.update(read_errors(part))
            part.unlink(missing_ok=True)
        if merged:
            rows = [[f.slide_id, f.slide_path, f.stage, f.reason] for _, f in sorted(merged.items())]
            atomic_write_text(out / ERRORS, csv_text(rows, list(FIELDS)))
        else:
            (out / ERRORS).unlink(missing_ok=True)

    def summary(self, total: int) -> str | None:
        """The closing line when slides failed, else None."""
        if not self.failures:
            return None
        first = next(iter(sorted(self.failures.values(), key=lambda f: f.slide_id)))
        return (
            f"{len(self.failures)} of {total} slide(s) failed (first: {first.slide_id}: {first.reason}); all are "
            f"listed in {self.out / self.errors_name}; fix them and rerun the same command to retry only those"
        )

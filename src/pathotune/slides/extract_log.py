"""``extract_log.csv``: what happened to each slide of an extraction (tiles, seconds, tiles/s, planning, rank).

Each rank of a multi-process run keeps its own ``extract_log.rank<k>.csv``; rank 0 folds them into
``extract_log.csv`` once every rank is done. A log is a convenience: an unreadable one is rebuilt from this run.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

from ..report.io import atomic_write_csv

__all__ = ["LOG_FIELDS", "LOG_NAME", "ExtractLog", "SlideResult"]

LOG_NAME = "extract_log.csv"
LOG_FIELDS = (
    "slide_id",
    "slide_path",
    "n_tiles",
    "seconds",
    "tiles_per_s",
    "plan_seconds",
    "rank",
    "device",
    "finished_at",
)


@dataclass
class SlideResult:
    """What happened to one slide: extracted (with timing), skipped as already done, or failed (with why)."""

    slide_id: str
    slide_path: str
    path: Path
    status: str
    n_tiles: int
    seconds: float = 0.0
    plan_seconds: float = 0.0
    reason: str = ""

    @property
    def tiles_per_s(self) -> float:
        return self.n_tiles / self.seconds if self.seconds > 0 else float("nan")


def _log_path(out_dir: Path, rank: int, world_size: int) -> Path:
    return out_dir / (LOG_NAME if world_size == 1 else f"{Path(LOG_NAME).stem}.rank{rank}.csv")


def _read(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {r["slide_id"]: r for r in csv.DictReader(f) if r.get("slide_id")}
    except (OSError, csv.Error, UnicodeDecodeError, KeyError):
        return {}


def _write(path: Path, rows: dict[str, dict]) -> None:
    atomic_write_csv(path, [rows[sid] for sid in sorted(rows)], list(LOG_FIELDS))


class ExtractLog:
    """This rank's log in ``out_dir``, with the rows of earlier runs; :meth:`add` rewrites it after each slide."""

    def __init__(self, out_dir: Path, rank: int, world_size: int, device: str) -> None:
        self.path = _log_path(out_dir, rank, world_size)
        self.rank, self.device = rank, device
        self.rows = _read(self.path)

    def add(self, r: SlideResult) -> None:
        self.rows[r.slide_id] = {
            "slide_id": r.slide_id,
            "slide_path": r.slide_path,
            "n_tiles": r.n_tiles,
            "seconds": f"{r.seconds:.3f}",
            "tiles_per_s": f"{r.tiles_per_s:.2f}",
            "plan_seconds": f"{r.plan_seconds:.3f}",
            "rank": self.rank,
            "device": self.device,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write(self.path, self.rows)

    @staticmethod
    def merge(out_dir: Path, world_size: int) -> None:
        """Fold every rank's log into ``extract_log.csv`` (rank 0, after the others finished)."""
        merged = _read(out_dir / LOG_NAME)
        for k in range(world_size):
            merged.update(_read(_log_path(out_dir, k, world_size)))
        _write(out_dir / LOG_NAME, merged)
        for k in range(world_size):
            _log_path(out_dir, k, world_size).unlink(missing_ok=True)

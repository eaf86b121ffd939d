"""A slide's tile plan, made on the spot or ahead in a thread while the previous slide runs through the model.

Planning (thumbnail and tissue mask) costs a fixed time per slide, about 0.45 s on the CMU sample (see
BENCHMARKS.md); with the model on a GPU the CPU is otherwise idle meanwhile. The thread is started only after
the current slide's DataLoader workers have been forked and is joined before the next slide's are, so no
fork ever copies a process mid-way through a reader call of another thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .reader import open_slide, require_mpp
from .tiling import TilePlan, TilingConfig, plan_tiles
from .tissue import TissueConfig

__all__ = ["PlanAhead", "PlannedSlide", "plan_slide"]


@dataclass(frozen=True)
class PlannedSlide:
    """A slide's plan, the reader backend it was made with, and the seconds it took."""

    plan: TilePlan
    backend: str
    seconds: float


def plan_slide(
    slide: Path, tiling: TilingConfig, tissue: TissueConfig | None = None, mpp: float | None = None
) -> PlannedSlide:
    """Open ``slide`` (with ``mpp`` overriding its metadata) and plan its tiles; a target mpp needs a known one."""
    t0 = time.perf_counter()
    with open_slide(slide, mpp=mpp) as reader:
        if tiling.target_mpp is not None:
            require_mpp(reader)
        return PlannedSlide(plan_tiles(reader, tiling, tissue=tissue), reader.backend, time.perf_counter() - t0)


class PlanAhead:
    """:func:`plan_slide` in a thread; :meth:`result` joins it and returns the plan or raises its error."""

    def __init__(self, slide: Path, tiling: TilingConfig, tissue: TissueConfig | None, mpp: float | None) -> None:
        self._result: PlannedSlide | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(slide, tiling, tissue, mpp), daemon=True)
        self._thread.start()

    def _run(self, *args) -> None:
        try:
            self._result = plan_slide(*args)
        except BaseException as e:  # handed to the main thread by result()
            self._error = e

    def join(self) -> None:
        self._thread.join()

    def result(self) -> PlannedSlide:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

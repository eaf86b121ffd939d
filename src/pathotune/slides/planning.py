"""A slide's tile plan, made on the spot or ahead in a thread while the previous slide runs through the model.

A plan is a grid at the requested resolution, or another tool's tiles (:mod:`.coords`); either keeps the tiles
with enough tissue in the Otsu mask or, when the slide comes with one, in its tissue GeoJSON.

Planning (thumbnail and tissue mask) costs a fixed time per slide, about 0.45 s on the CMU sample (see
BENCHMARKS.md); with the model on a GPU the CPU is otherwise idle meanwhile. The thread is started only after
the current slide's DataLoader workers have been forked and is joined before the next slide's are, so no
fork ever copies a process mid-way through a reader call of another thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..features.h5 import tiles_source_text
from .artifacts import ArtifactConfig, drop_settings
from .coords import PatchCoords, read_patch_coords
from .geojson import geojson_tissue_mask, mask_shape
from .inputs import SlideInput, as_inputs
from .reader import SlideReader, open_slide, require_mpp
from .tiling import TilePlan, TilingConfig, plan_from_coords, plan_tiles
from .tissue import TissueConfig

__all__ = ["PlanAhead", "PlannedSlide", "plan_on", "plan_slide", "slide_tiling", "tiles_source"]


@dataclass(frozen=True)
class PlannedSlide:
    """A slide's plan, the tiling it was cut by (another tool's, for its tiles), the reader backend it was made
    with, and the seconds it took."""

    plan: TilePlan
    backend: str
    seconds: float
    tiling: TilingConfig | None = None


def slide_tiling(
    reader: SlideReader, slide: SlideInput, tiling: TilingConfig
) -> tuple[TilingConfig, PatchCoords | None]:
    """The tiling ``slide`` is cut by, and its coords when another tool chose its tiles.

    A grid is ``tiling`` (its target mpp needs the slide's mpp). Another tool's tiles keep their size and
    overlap; their target mpp is the slide's mpp times their scale, or None when the slide's mpp is unknown.
    ``tiling``'s ``min_tissue`` and ``mask_size`` apply to both.
    """
    if slide.coords is None:
        if tiling.target_mpp is not None:
            require_mpp(reader)
        return tiling, None
    pc = read_patch_coords(slide.coords, reader)
    scale = pc.tile_size_level0 / pc.tile_size
    target = None if reader.mpp is None else reader.mpp * scale
    own = TilingConfig(target, pc.tile_size, pc.overlap, tiling.min_tissue, tiling.mask_size)
    return own, pc


def tiles_source(slide: SlideInput, tissue: TissueConfig | None, artifacts: ArtifactConfig | None = None) -> str:
    """Where a slide's tiles and tissue came from, as a feature file's ``tissue_config`` records it: the Otsu
    settings, or the tissue GeoJSON, plus the coords file when another tool chose the tiles and the artifact
    settings when flagged tiles were dropped."""
    source: dict = (
        {"tissue_geojson": str(Path(slide.tissue_geojson).resolve())}
        if slide.tissue_geojson
        else asdict(tissue or TissueConfig())
    )
    if slide.coords is not None:
        source["coords"] = str(Path(slide.coords).resolve())
    if drop_settings(artifacts) is not None:
        source["drop_artifacts"] = drop_settings(artifacts)
    return tiles_source_text(source)


def plan_on(
    reader: SlideReader,
    slide: SlideInput,
    tiling: TilingConfig,
    tissue: TissueConfig | None = None,
    artifacts: ArtifactConfig | None = None,
) -> tuple[TilePlan, TilingConfig]:
    """The plan of the slide open in ``reader`` and the tiling it was cut by (see :func:`slide_tiling`), with
    the ``artifacts`` flags computed and their tiles dropped as it says."""
    own, pc = slide_tiling(reader, slide, tiling)
    mask = None
    if slide.tissue_geojson is not None:
        shape = mask_shape(reader.dimensions, tiling.mask_size)
        mask = geojson_tissue_mask(slide.tissue_geojson, reader.dimensions, shape, slide.repair_geojson)
    if pc is None:
        return plan_tiles(reader, own, mask=mask, tissue=tissue, artifacts=artifacts), own
    plan = plan_from_coords(reader, pc.coords, pc.tile_size_level0, own, mask=mask, tissue=tissue, artifacts=artifacts)
    return plan, own


def plan_slide(
    slide: Path | SlideInput,
    tiling: TilingConfig,
    tissue: TissueConfig | None = None,
    mpp: float | None = None,
    artifacts: ArtifactConfig | None = None,
) -> PlannedSlide:
    """Open ``slide`` (with its mpp, else ``mpp``, overriding its metadata) and plan its tiles."""
    (inp,) = as_inputs([slide], mpp)
    t0 = time.perf_counter()
    with open_slide(inp.path, mpp=inp.mpp) as reader:
        plan, own = plan_on(reader, inp, tiling, tissue, artifacts)
        return PlannedSlide(plan, reader.backend, time.perf_counter() - t0, own)


class PlanAhead:
    """:func:`plan_slide` in a thread; :meth:`result` joins it and returns the plan or raises its error."""

    def __init__(
        self,
        slide: Path | SlideInput,
        tiling: TilingConfig,
        tissue: TissueConfig | None,
        mpp: float | None,
        artifacts: ArtifactConfig | None = None,
    ) -> None:
        self._result: PlannedSlide | None = None
        self._error: BaseException | None = None
        args = (slide, tiling, tissue, mpp, artifacts)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
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

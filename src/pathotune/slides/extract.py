"""Tile features for whole slides, one ``<slide_id>.h5`` per slide, resumable: plan, run, write, log.

A cohort survives its bad slides (:mod:`.cohort`): with ``skip_errors`` a slide that cannot be opened or breaks
while it is read is listed in ``errors.csv`` and the others go on. An interrupted slide resumes inside itself:
its features are kept in chunks while it runs (:mod:`pathotune.features.partial`). The folder is a record
(:mod:`pathotune.records`): another request's features are refused, and ``overwrite`` builds the whole new set
aside and swaps it in once it is complete.

This module only orchestrates. The file is :mod:`pathotune.features` (schema, all-or-nothing writer, the
check that an existing file is this request's result); the model comes from :mod:`.extractor`, the tiles from
:mod:`.dataset` (decoded in DataLoader workers, normalised on the device), and the device loop from
:mod:`pathotune.core.runtime` (``torch.inference_mode`` and, on a GPU, the Fabric's autocast), the plans from
:mod:`.planning` and the per-slide log is :mod:`.extract_log`. A rerun skips slides whose file exists and matches
the request, and refuses to mix in one made by another request. Slides may come as :class:`.inputs.SlideInput`,
with their own mpp, another tool's tiles (TRIDENT, CLAM) or a tissue GeoJSON; those are matched and checked
before the first slide is extracted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cohort import ERRORS, Cohort, read_errors
from ..core.runtime import Runtime, infer_batches
from ..errors import ConfigError, DataError, note_interrupt
from ..features import (
    REQUEST_KEYS,
    SlideFeatures,
    feature_path,
    finished_tiles,
    read_feature_attrs,
    read_slide_features,
    remove_partial_files,
    write_feature_file,
)
from ..features.h5 import read_tiles_source, tiles_source_mismatch
from ..features.partial import PartialFeatures, plan_digest
from ..records import incremental
from ..report import progress_bar
from .artifacts import ArtifactConfig
from .dataset import SlideTileDataset, TileTransform, default_num_workers, tile_loader
from .discover import SLIDE_EXTENSIONS, find_slides, slide_id
from .extract_log import LOG_NAME, ExtractLog, SlideResult
from .extractor import FeatureExtractor, as_extractor, load_extractor
from .geojson import geojson_tissue_mask, mask_shape
from .inputs import SlideInput, as_inputs
from .planning import PlanAhead, PlannedSlide, plan_slide, slide_tiling, tiles_source
from .reader import open_slide
from .tiling import TilingConfig
from .tissue import TissueConfig

# Besides this module's own names, the ones 0.1.0 code imported from here (SlideFeatures, read_slide_features,
# FeatureExtractor, load_extractor, TileTransform...) stay importable; each is defined once, in its own module.
__all__ = [
    "LOG_NAME",
    "SLIDE_EXTENSIONS",
    "FeatureExtractor",
    "SlideFeatures",
    "SlideInput",
    "SlideResult",
    "SlideTileDataset",
    "TileTransform",
    "as_extractor",
    "default_num_workers",
    "extract_slide",
    "extract_slides",
    "DEFAULT_CHUNK_TILES",
    "find_slides",
    "load_extractor",
    "read_slide_features",
    "request_attrs",
    "slide_id",
]

# Tiles kept per chunk of a slide that is being extracted (rounded down to whole batches): what a kill -9 can
# cost at most, against one small file per chunk. 1024 tiles are about a minute on two CPU cores at 224 px.
DEFAULT_CHUNK_TILES = 1024


def request_attrs(ex: FeatureExtractor, tiling: TilingConfig) -> dict[str, Any]:
    """What this request is, as :data:`pathotune.features.REQUEST_KEYS` values."""
    target = None if tiling.target_mpp is None else float(tiling.target_mpp)
    values = (ex.backbone, ex.backbone_fingerprint, ex.bundle_fingerprint, target)
    values += (int(tiling.tile_size), int(ex.image_size), int(tiling.overlap), float(tiling.min_tissue))
    return dict(zip(REQUEST_KEYS, values, strict=True))


def _slide_attrs(
    ex: FeatureExtractor,
    tiling: TilingConfig,
    tissue: TissueConfig | None,
    slide: SlideInput,
    planned: PlannedSlide,
    rt: Runtime,
    artifacts: ArtifactConfig | None = None,
) -> dict[str, Any]:
    plan = planned.plan
    return {
        **request_attrs(ex, planned.tiling or tiling),
        "feature_dim": ex.feature_dim,
        "mpp": None if plan.slide_mpp is None else float(plan.slide_mpp),
        "level": int(plan.level),
        "downsample": float(plan.downsample),
        "read_size": int(plan.read_size),
        "stride": int(plan.stride),
        "tile_size_level0": float(plan.tile_size_level0),
        "dimensions": np.asarray(plan.dimensions, dtype=np.int64),
        "n_tiles": len(plan),
        "n_candidates": int(plan.n_candidates),
        "slide_id": slide.slide_id,
        "slide_path": str(slide.path),
        "slide_backend": planned.backend,
        "bundle_path": ex.bundle_path,
        "norm_mean": np.asarray(ex.mean, dtype=np.float64),
        "norm_std": np.asarray(ex.std, dtype=np.float64),
        "normalization": f"RGB tile at {ex.image_size} px (antialiased resize if needed), x / 255, "
        "then (x - norm_mean) / norm_std per channel",
        "precision": rt.precision,
        "tissue_config": tiles_source(slide, tissue, artifacts),
    }


# -- one slide ------------------------------------------------------------------------------------------------
def _extract_one(
    ex: FeatureExtractor,
    slide: SlideInput,
    out_dir: Path,
    tiling: TilingConfig,
    tissue: TissueConfig | None,
    batch_size: int,
    num_workers: int,
    rt: Runtime,
    progress: bool,
    planned: PlannedSlide | None = None,
    on_started: Callable[[], None] | None = None,
    chunk_tiles: int = DEFAULT_CHUNK_TILES,
    artifacts: ArtifactConfig | None = None,
) -> SlideResult:
    """Extract one slide, resuming the chunks an interrupted run kept; ``planned`` is its plan if made already,
    ``on_started`` runs once the loader's workers are forked (or at once when there is nothing to compute)."""
    sid = slide.slide_id
    planned = planned or plan_slide(slide, tiling, tissue, artifacts=artifacts)
    plan, dim = planned.plan, ex.feature_dim
    attrs = _slide_attrs(ex, tiling, tissue, slide, planned, rt, artifacts)
    chunk = max(batch_size, chunk_tiles - chunk_tiles % batch_size)  # whole batches: a resume cuts the same ones
    key = {**request_attrs(ex, planned.tiling or tiling), "plan": plan_digest(plan.coords, plan.tissue)}
    key.update(precision=rt.precision, tiles_from=attrs["tissue_config"])
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(out_dir, sid)
    partial = PartialFeatures(out_dir, sid, len(plan), dim, chunk, key)
    todo = partial.open()
    indices = partial.pending_tiles(todo)
    if 0 < len(todo) < partial.n_chunks:  # said even with --quiet (on stderr, so --json stays clean)
        print(
            f"{sid}: resuming, {partial.n_chunks - len(todo)} of {partial.n_chunks} chunks already computed",
            file=sys.stderr,
        )
    transform = TileTransform(ex.mean, ex.std, ex.image_size)
    dataset = SlideTileDataset(slide.path, plan, transform.to_uint8, slide.mpp, planned.backend, indices)
    t1 = time.perf_counter()
    if len(indices):
        loader = tile_loader(dataset, batch_size, num_workers, rt.device)
        batches = infer_batches(rt, loader, lambda x: ex.forward(transform.normalize(x)), progress, sid, "tile")
        try:
            for n, (y, (idx,)) in enumerate(batches):
                if n == 0 and on_started is not None:
                    on_started()  # the workers are forked: a planning thread may start now
                first, count = int(idx[0]), len(idx)
                if y.shape != (count, dim):
                    shape = tuple(y.shape)
                    raise ConfigError(f"model gave features of shape {shape} for {count} tiles; expected dim {dim}")
                if int(idx[-1]) - first + 1 != count:  # batches lie within one chunk, in order
                    raise RuntimeError(f"tiles {first}..{int(idx[-1])} of slide {sid} came out of order")
                partial.add(first, y.numpy())
        finally:
            batches.close()  # shuts the worker pool down now, also on error
            dataset.close()
    elif on_started is not None:
        on_started()
    seconds = time.perf_counter() - t1
    path = feature_path(out_dir, sid)
    with write_feature_file(path, plan.coords, plan.tissue, dim, attrs) as out:
        for start, block in partial.blocks():
            out.write(start, block)
    partial.clear()
    return SlideResult(sid, str(slide.path), path, "extracted", len(plan), seconds, planned.seconds)


def _prepare(ex: FeatureExtractor, tiling: TilingConfig | None, batch_size: int) -> TilingConfig:
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return tiling or TilingConfig(tile_size=ex.image_size)


def extract_slide(
    model_or_backbone: Any,
    slide_path: str | Path | SlideInput,
    out_dir: str | Path,
    tiling: TilingConfig | None = None,
    tissue: TissueConfig | None = None,
    mpp_override: float | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    fabric: Any = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Path:
    """Extract one slide into ``out_dir/<slide_id>.h5`` (always recomputed) and return that path."""
    ex = as_extractor(model_or_backbone)
    tiling = _prepare(ex, tiling, batch_size)
    rt = Runtime.of(fabric, device)
    ex.module.eval().to(rt.device)
    workers = default_num_workers(rt.device) if num_workers is None else num_workers
    (slide,) = as_inputs([slide_path], mpp_override)
    partial = PartialFeatures(out_dir, slide.slide_id, 0, ex.feature_dim, 1, {})
    partial.clear()  # recomputed whole
    return _extract_one(ex, slide, Path(out_dir), tiling, tissue, batch_size, workers, rt, progress).path


# -- many slides ----------------------------------------------------------------------------------------------
def _check(slide: SlideInput, tiling: TilingConfig) -> TilingConfig:
    """Open the slide and check what goes with it (its mpp for a grid, its coords file, its tissue GeoJSON);
    return the tiling it is cut by."""
    with open_slide(slide.path, mpp=slide.mpp) as reader:
        own, _ = slide_tiling(reader, slide, tiling)
        if slide.tissue_geojson is not None:
            geojson_tissue_mask(
                slide.tissue_geojson, reader.dimensions, mask_shape(reader.dimensions, 64), slide.repair_geojson
            )
    return own


def _check_tile_source(
    path: Path, slide: SlideInput, tissue: TissueConfig | None = None, artifacts: ArtifactConfig | None = None
) -> None:
    """A finished file counts for this run only if its tiles came from the same tissue GeoJSON and coords file
    and lost the same artifact-flagged tiles (:func:`pathotune.features.h5.tiles_source_mismatch`)."""
    recorded = read_tiles_source(str(read_feature_attrs(path).get("tissue_config", "")))
    wanted = read_tiles_source(tiles_source(slide, tissue, artifacts))
    why = tiles_source_mismatch(recorded, wanted)
    if why is not None:
        raise ConfigError(f"{path} holds features of {why}; pass another --out or --overwrite")


def _finished(
    slides: list[SlideInput],
    out_dir: Path,
    ex: FeatureExtractor,
    tiling: TilingConfig,
    rt: Runtime,
    cohort: Cohort,
    artifacts: ArtifactConfig | None = None,
    tissue: TissueConfig | None = None,
) -> dict[Path, int]:
    """Tile counts of the slides whose file is this request's finished result; every other slide is opened
    (its mpp, coords and tissue GeoJSON checked) now, so a missing one stops the run at once rather than hours
    in, or, with ``skip_errors``, is listed as failed and left out. Every rank checks every slide, so all ranks
    agree on which slides fail and a bad slide stops all of them alike. A slide cut by another tool's tiles is
    its own request (their size and scale), so it is opened either way. A finished file made by another request
    is an error for the whole folder (nothing is mixed into a record), never a skipped slide."""
    done: dict[Path, int] = {}
    for slide in slides:
        final = feature_path(out_dir, slide.slide_id)

        def check(slide: SlideInput = slide, final: Path = final) -> None:
            own = _check(slide, tiling) if slide.coords is not None else None
            if final.exists():
                n = finished_tiles(final, request_attrs(ex, own or tiling))
                if n is not None:
                    _check_tile_source(final, slide, tissue, artifacts)
                    done[slide.path] = n
                    return
                if rt.rank == 0:
                    print(f"note: {final} is not a readable HDF5 file (truncated or foreign); extracting it again")
            if own is None:
                _check(slide, tiling)

        try:
            check()
        except ConfigError:
            raise  # another request's file: the folder, not the slide, is wrong
        except Exception as e:
            cohort.fail(slide.slide_id, slide.path, "open", e)
            if cohort.stop:
                break
    return done


def extract_slides(
    model_or_backbone: Any,
    slides: Sequence[str | Path | SlideInput],
    out_dir: str | Path,
    tiling: TilingConfig | None = None,
    tissue: TissueConfig | None = None,
    mpp_override: float | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    fabric: Any = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    plan_ahead: bool | None = None,
    skip_errors: bool = False,
    chunk_tiles: int = DEFAULT_CHUNK_TILES,
    artifacts: ArtifactConfig | None = None,
) -> list[SlideResult]:
    """Extract every slide of this rank's share (``slides[rank::world_size]`` of those that open), resuming a
    previous run; returns one result per slide of this rank in input order: ``extracted``, ``skipped`` (finished
    before) or ``failed`` (with its reason, also listed in ``errors.csv``; rank 0 also reports the slides that
    failed to open).

    Finished files whose attributes match the request are skipped, and a slide that was interrupted resumes from
    its kept chunks; a finished file from another request is an error (nothing is mixed into one folder). With
    ``overwrite`` the whole set is built aside and swapped in at the end. Every slide is opened (its mpp
    checked) before the first one is extracted. ``skip_errors``: a slide that fails is listed and the rest go
    on; without it the first failure stops the run, naming the slide. ``plan_ahead`` plans the next slide while
    the current one is in the model (default: when the model is on an accelerator).

    ``slides`` are paths or :class:`SlideInput` (from :func:`.inputs.slide_inputs`: a per-slide mpp, TRIDENT or
    CLAM tiles, a tissue GeoJSON); ``mpp_override`` applies to those without their own mpp. ``artifacts``
    drops tiles flagged as pen, blur or fold (:class:`.artifacts.ArtifactConfig`, its ``drop`` kinds).
    """
    ex = as_extractor(model_or_backbone)
    tiling = _prepare(ex, tiling, batch_size)
    final_dir = Path(out_dir)
    every = as_inputs(slides, mpp_override)
    rt = Runtime.of(fabric, device)
    with incremental(final_dir, "features", overwrite, None, rt.main, rt.barrier) as out_dir:
        staged = out_dir != final_dir
        note_interrupt(
            f"nothing was replaced: {final_dir} still holds the previous features, unchanged"
            if staged
            else f"finished slides in {final_dir} are kept, and the slide in progress keeps its finished chunks; "
            "rerun the same command to continue"
        )
        cohort = Cohort(out_dir, skip_errors, rt.rank, rt.world_size)
        results = _extract_cohort(
            ex,
            every,
            out_dir,
            tiling,
            tissue,
            batch_size,
            num_workers,
            rt,
            progress,
            plan_ahead,
            chunk_tiles,
            cohort,
            artifacts,
        )
    cohort.out = final_dir
    if rt.main and rt.world_size > 1 and skip_errors:  # every rank's failures, from the merged list
        ids = {s.slide_id for s in every}
        cohort.failures.update({k: f for k, f in read_errors(final_dir / ERRORS).items() if k in ids})
    results = [replace(r, path=feature_path(final_dir, r.slide_id)) for r in results]
    failed = [
        SlideResult(f.slide_id, f.slide_path, feature_path(final_dir, f.slide_id), "failed", 0, reason=f.reason)
        for f in cohort.failures.values()
        if rt.main or f.stage != "open"
    ]
    order = {s.path: i for i, s in enumerate(every)}
    return sorted(results + failed, key=lambda r: order.get(Path(r.slide_path), len(order)))


def _extract_cohort(
    ex: FeatureExtractor,
    every: list[SlideInput],
    out_dir: Path,
    tiling: TilingConfig,
    tissue: TissueConfig | None,
    batch_size: int,
    num_workers: int | None,
    rt: Runtime,
    progress: bool,
    plan_ahead: bool | None,
    chunk_tiles: int,
    cohort: Cohort,
    artifacts: ArtifactConfig | None = None,
) -> list[SlideResult]:
    """Every usable slide of this rank's share into ``out_dir``; the finished and extracted ones' results."""
    skip_errors = cohort.skip_errors
    done = _finished(every, out_dir, ex, tiling, rt, cohort, artifacts, tissue)
    if cohort.stop:  # every rank saw the same slide fail: stop before any extraction
        cohort.raise_first()
    usable = [s for s in every if s.slide_id not in cohort.failures]
    mine = usable[rt.rank :: rt.world_size]
    todo = [s for s in mine if s.path not in done]
    results = [
        SlideResult(s.slide_id, str(s.path), feature_path(out_dir, s.slide_id), "skipped", done[s.path])
        for s in mine
        if s.path in done
    ]
    workers = default_num_workers(rt.device) if num_workers is None else num_workers
    ex.module.eval().to(rt.device)
    log = ExtractLog(out_dir, rt.rank, rt.world_size, str(rt.device))
    show = progress and rt.rank == 0
    ahead = rt.device.type != "cpu" if plan_ahead is None else plan_ahead
    pending: list[PlanAhead] = []
    tiles = seconds = 0.0
    with progress_bar(total=len(todo), desc="slides", unit="slide", enabled=show) as bar:
        for k, slide in enumerate(todo):
            after = todo[k + 1] if ahead and k + 1 < len(todo) else None

            def plan_next(nxt: SlideInput | None = after) -> None:
                if nxt is not None:
                    pending.append(PlanAhead(nxt, tiling, tissue, None, artifacts))

            def step(slide: SlideInput = slide, plan_next: Callable[[], None] = plan_next) -> SlideResult:
                planned = pending.pop().result() if pending else None
                args = (ex, slide, out_dir, tiling, tissue, batch_size, workers, rt, show, planned, plan_next)
                return _extract_one(*args, chunk_tiles, artifacts)

            try:
                r = cohort.run(slide.slide_id, slide.path, "extract", step)
            finally:
                for p in pending:  # a failed slide's step may have started the next slide's plan
                    p.join()
            if r is None:
                pending.clear()
                if cohort.stop:
                    break
                continue
            results.append(r)
            tiles, seconds = tiles + r.n_tiles, seconds + r.seconds
            bar.set_postfix(tiles=r.n_tiles, tiles_s=f"{tiles / max(seconds, 1e-9):.1f}")
            bar.update(1)
            log.add(r)
    if skip_errors:
        cohort.write()
    if rt.world_size > 1:
        rt.barrier()
        if rt.rank == 0:
            ExtractLog.merge(out_dir, rt.world_size)
            if skip_errors:
                Cohort.merge(out_dir, rt.world_size, lambda sid: feature_path(out_dir, sid).exists())
        rt.barrier()
    _stop_together(cohort, rt)
    return results


def _stop_together(cohort: Cohort, rt: Runtime) -> None:
    """Without ``skip_errors``, every rank ends with the run's first failure once all have reached this point (a
    rank that raised alone would leave the others waiting at a barrier)."""
    if cohort.skip_errors:
        return
    count = len(cohort.failures)
    if rt.world_size > 1 and rt.all_gather is not None:
        count = int(rt.all_gather(torch.tensor([count])).sum())
    if not count:
        return
    if not cohort.failures:
        raise DataError("stopped: a slide failed in another process (its error line names it); rerun to continue")
    cohort.raise_first()

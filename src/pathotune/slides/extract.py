"""Tile features for whole slides, one ``<slide_id>.h5`` per slide, resumable: plan, run, write, log.

This module only orchestrates. The file is :mod:`pathotune.features` (schema, all-or-nothing writer, the
check that an existing file is this request's result); the model comes from :mod:`.extractor`, the tiles from
:mod:`.dataset` (decoded in DataLoader workers, normalised on the device), and the device loop from
:mod:`pathotune.engine.runtime` (``torch.inference_mode`` and, on a GPU, the Fabric's autocast), the plans from
:mod:`.planning` and the per-slide log is :mod:`.extract_log`. A rerun skips slides whose file exists and matches
the request, and refuses to mix in one made by another request. Slides may come as :class:`.inputs.SlideInput`,
with their own mpp, another tool's tiles (TRIDENT, CLAM) or a tissue GeoJSON; those are matched and checked
before the first slide is extracted.
"""

from __future__ import annotations

import ast
import itertools
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine.runtime import Runtime, infer_batches, make_fabric
from ..errors import ConfigError
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
from ..report import progress_bar
from .artifacts import ArtifactConfig, drop_settings
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
    "find_slides",
    "load_extractor",
    "make_extract_fabric",
    "read_slide_features",
    "request_attrs",
    "slide_id",
]

make_extract_fabric = make_fabric  # the engine's one Fabric factory, under the name extraction had in 0.1.0


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
    artifacts: ArtifactConfig | None = None,
) -> SlideResult:
    """Extract one slide; ``planned`` is its plan if made already, ``on_started`` runs once workers are forked."""
    sid = slide.slide_id
    planned = planned or plan_slide(slide, tiling, tissue, artifacts=artifacts)
    plan, dim = planned.plan, ex.feature_dim
    transform = TileTransform(ex.mean, ex.std, ex.image_size)
    dataset = SlideTileDataset(slide.path, plan, transform.to_uint8, mpp=slide.mpp, backend=planned.backend)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(out_dir, sid)
    t1 = time.perf_counter()
    loader = tile_loader(dataset, batch_size, num_workers, rt.device)
    batches = infer_batches(rt, loader, lambda x: ex.forward(transform.normalize(x)), progress, sid, "tile")
    try:
        # Workers start (fork) when iteration begins: start them before the HDF5 file is open, so no child
        # process ever inherits, and on exit flushes, the handle of the file being written.
        first = [next(batches)] if len(plan) else []
        if on_started is not None:
            on_started()
        with write_feature_file(
            feature_path(out_dir, sid),
            plan.coords,
            plan.tissue,
            dim,
            _slide_attrs(ex, tiling, tissue, slide, planned, rt, artifacts),
        ) as out:
            for y, (idx,) in itertools.chain(first, batches):
                if y.shape != (len(idx), dim):
                    raise ConfigError(
                        f"model gave features of shape {tuple(y.shape)} for {len(idx)} tiles; expected dim {dim}"
                    )
                out.write(int(idx[0]), y.numpy())  # sequential loader: indices are contiguous and in order
        seconds = time.perf_counter() - t1
    finally:
        batches.close()  # shuts the worker pool down now, also on error
        dataset.close()
    path = feature_path(out_dir, sid)
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
    return _extract_one(ex, slide, Path(out_dir), tiling, tissue, batch_size, workers, rt, progress).path


# -- many slides ----------------------------------------------------------------------------------------------
def _check(slide: SlideInput, tiling: TilingConfig) -> TilingConfig:
    """Open the slide and check what goes with it (its mpp for a grid, its coords file, its tissue GeoJSON);
    return the tiling it is cut by."""
    with open_slide(slide.path, mpp=slide.mpp) as reader:
        own, _ = slide_tiling(reader, slide, tiling)
        if slide.tissue_geojson is not None:
            geojson_tissue_mask(slide.tissue_geojson, reader.dimensions, mask_shape(reader.dimensions, 64))
    return own


def _recorded_sources(tissue_config: str) -> tuple[str | None, str | None, dict | None]:
    """The (tissue GeoJSON, coords file, artifact drop settings) a feature file's ``tissue_config`` names; Otsu
    files name neither source (files written before these sources existed hold a TissueConfig repr, which is
    Otsu on our grid), and files that dropped no flagged tiles name no artifact settings."""
    try:
        recorded = ast.literal_eval(tissue_config)
    except (ValueError, SyntaxError):
        return None, None, None
    if not isinstance(recorded, dict):
        return None, None, None
    return recorded.get("tissue_geojson"), recorded.get("coords"), recorded.get("drop_artifacts")


def _source_name(source: tuple[str | None, str | None, dict | None]) -> str:
    geojson, coords, dropped = source
    mask = f"tissue GeoJSON {geojson}" if geojson else "the Otsu mask"
    flags = f", without the tiles flagged {','.join(dropped.get('drop', ()))}" if dropped else ""
    return f"{mask} and {f'coords {coords}' if coords else 'our grid'}{flags}"


def _check_tile_source(path: Path, slide: SlideInput, artifacts: ArtifactConfig | None = None) -> None:
    """A finished file counts for this run only if its tiles came from the same tissue GeoJSON and coords file
    and lost the same artifact-flagged tiles: the request keys cannot tell a GeoJSON mask from Otsu's, two
    coords files of the same tile size, or a plan with and without flagged tiles apart."""
    old = _recorded_sources(str(read_feature_attrs(path).get("tissue_config", "")))
    new = (
        None if slide.tissue_geojson is None else str(Path(slide.tissue_geojson).resolve()),
        None if slide.coords is None else str(Path(slide.coords).resolve()),
        drop_settings(artifacts),
    )
    if old != new:
        raise ConfigError(
            f"{path} holds features of tiles from {_source_name(old)}, not {_source_name(new)}; "
            "pass another --out or --overwrite"
        )


def _finished(
    slides: list[SlideInput],
    out_dir: Path,
    ex: FeatureExtractor,
    tiling: TilingConfig,
    overwrite: bool,
    rt: Runtime,
    artifacts: ArtifactConfig | None = None,
) -> dict[Path, int]:
    """Tile counts of the slides whose file is this request's finished result; every other slide is opened
    (its mpp, coords and tissue GeoJSON checked) now, so a missing one stops the run at once rather than hours
    in. Every rank checks every slide, so a bad slide or a clashing file stops all ranks alike instead of leaving
    the others waiting at the final barrier. A slide cut by another tool's tiles is its own request (their size
    and scale), so it is opened either way."""
    done: dict[Path, int] = {}
    for slide in slides:
        final = feature_path(out_dir, slide.slide_id)
        own = _check(slide, tiling) if slide.coords is not None else None
        if final.exists() and not overwrite:
            n = finished_tiles(final, request_attrs(ex, own or tiling))
            if n is not None:
                _check_tile_source(final, slide, artifacts)
                done[slide.path] = n
                continue
            if rt.rank == 0:
                print(f"note: {final} is not a readable HDF5 file (truncated or foreign); extracting it again")
        if own is None:
            _check(slide, tiling)
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
    artifacts: ArtifactConfig | None = None,
) -> list[SlideResult]:
    """Extract every slide of this rank's share (``slides[rank::world_size]``), resuming a previous run.

    Finished files whose attributes match the request are skipped; a finished file from another request is
    an error (nothing is mixed into one folder), unless ``overwrite``. Temporary files of an interrupted run
    are never taken as finished, and a final file that is no readable HDF5 (garbage, truncated) is redone like
    one. Every slide is opened (and its mpp checked) before the first one is extracted. ``plan_ahead`` plans
    the next slide while the current one is in the model (default: when the model is on an accelerator; on a
    CPU the model already has every core). Returns one result per slide of this rank, in input order.

    ``slides`` are paths or :class:`SlideInput` (from :func:`.inputs.slide_inputs`: a per-slide mpp, TRIDENT or
    CLAM tiles, a tissue GeoJSON); ``mpp_override`` applies to those without their own mpp. ``artifacts``
    drops tiles flagged as pen, blur or fold (:class:`.artifacts.ArtifactConfig`, its ``drop`` kinds).
    """
    ex = as_extractor(model_or_backbone)
    tiling = _prepare(ex, tiling, batch_size)
    out_dir = Path(out_dir)
    every = as_inputs(slides, mpp_override)
    rt = Runtime.of(fabric, device)
    done = _finished(every, out_dir, ex, tiling, overwrite, rt, artifacts)
    mine = every[rt.rank :: rt.world_size]
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
            planned = pending.pop().result() if pending else None
            after = todo[k + 1] if ahead and k + 1 < len(todo) else None

            def plan_next(nxt: SlideInput | None = after) -> None:
                if nxt is not None:
                    pending.append(PlanAhead(nxt, tiling, tissue, None, artifacts))

            try:
                r = _extract_one(
                    ex, slide, out_dir, tiling, tissue, batch_size, workers, rt, show, planned, plan_next, artifacts
                )
            except BaseException:
                for p in pending:
                    p.join()
                raise
            results.append(r)
            tiles, seconds = tiles + r.n_tiles, seconds + r.seconds
            bar.set_postfix(tiles=r.n_tiles, tiles_s=f"{tiles / max(seconds, 1e-9):.1f}")
            bar.update(1)
            log.add(r)
    if rt.world_size > 1:
        rt.barrier()
        if rt.rank == 0:
            ExtractLog.merge(out_dir, rt.world_size)
        rt.barrier()
    order = {s.path: i for i, s in enumerate(mine)}
    return sorted(results, key=lambda r: order[Path(r.slide_path)])

"""A quality-control picture per slide: the thumbnail with the tissue outline, the artifact flags and the kept
tiles drawn on it.

One glance shows whether the mask missed faint tissue, kept pen marks or glass, or the grid sits at the wrong
scale, which is cheaper than finding out after feature extraction. :func:`tile_slides` (``pathotune slides
tile``) does that for a whole cohort and writes beside each picture the slide's tile list, its tiles as TRIDENT's
``<slide_id>_patches.h5`` (``slides extract --coords`` takes the folder) and its tissue as QuPath GeoJSON (fix it
by hand in QuPath and feed it back with ``--tissue-geojson``, which takes the folder too); pen, blur and fold
flags (:mod:`.artifacts`) go beside it as masks and GeoJSON.

The output folder is a record (:mod:`pathotune.records`) of one tiling request: a rerun with the same settings
does only the slides not done yet (a slide is done once its ``_patches.h5``, written last, is there), and a
bad slide is skipped and listed in ``errors.csv`` with ``skip_errors`` (:mod:`.cohort`).
"""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..cohort import Cohort
from ..errors import note_interrupt
from ..records import incremental
from ..report.io import atomic_path, atomic_write_csv
from .artifacts import ArtifactConfig, paint_artifacts, tissue_shares, write_artifacts
from .coords import PATCHES_SUFFIX, write_patch_coords
from .geojson import tissue_geojson
from .inputs import SlideInput, as_inputs, slide_inputs
from .planning import plan_on
from .reader import SlideReader, open_slide
from .tiling import TilePlan, TilingConfig
from .tissue import TissueConfig

__all__ = ["MASK_COLOUR", "TILE_COLOUR", "qc_thumbnail", "tile_slides"]

MASK_COLOUR = (0, 200, 0)
TILE_COLOUR = (0, 90, 255)


def _outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boundary pixels of the mask resized to ``size`` (w, h), two pixels wide so it shows on large slides."""
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    inner = ndimage.binary_erosion(resized, iterations=2, border_value=1)
    return resized & ~inner


def qc_thumbnail(reader: SlideReader, plan: TilePlan, path: str | Path, max_size: int = 1024) -> Path:
    """Write the QC PNG to ``path`` atomically (:func:`report.io.atomic_path`) and return the path.

    Readers of the folder never see a half-written PNG, even if the process dies mid-write.
    """
    path = Path(path)
    thumb = reader.thumbnail(max_size)
    tw, th = thumb.size
    width, height = reader.dimensions
    sx, sy = width / tw, height / th

    pixels = paint_artifacts(np.array(thumb), plan.artifacts)
    pixels[_outline(plan.mask, (tw, th))] = MASK_COLOUR
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    side = plan.tile_size_level0
    for x, y in plan.coords.tolist():
        x0, y0 = x / sx, y / sy
        x1, y1 = (x + side) / sx, (y + side) / sy
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=TILE_COLOUR, width=1)

    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


SUMMARY = "tiles_summary.csv"


def _read_summary(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {r["slide_id"]: dict(r) for r in csv.DictReader(f) if r.get("slide_id")}
    except (OSError, csv.Error, UnicodeDecodeError, KeyError):
        return {}


def _tile_one(
    slide: SlideInput,
    out: Path,
    tiling: TilingConfig,
    thumb_size: int,
    tissue: TissueConfig | None,
    artifacts: ArtifactConfig | None,
) -> dict:
    """One slide's QC picture, tile list, tissue and artifact GeoJSON and, last, its ``_patches.h5``."""
    sid = slide.slide_id
    with open_slide(slide.path, mpp=slide.mpp) as reader:
        plan, own = plan_on(reader, slide, tiling, tissue, artifacts)
        qc_thumbnail(reader, plan, out / f"{sid}_qc.png", max_size=thumb_size)
    kinds = list(plan.artifact_fractions)
    columns = [plan.tissue, *plan.artifact_fractions.values()]
    tiles = [[x, y, *(f"{v:.4f}" for v in vs)] for (x, y), *vs in zip(plan.coords.tolist(), *columns, strict=True)]
    atomic_write_csv(out / f"{sid}_tiles.csv", tiles, ["x", "y", "tissue", *kinds])
    tissue_geojson(plan.mask, plan.dimensions, out / f"{sid}_tissue.geojson")
    write_artifacts(plan.artifacts, plan.dimensions, out, sid)
    shares = {k: f"{v:.4f}" for k, v in tissue_shares(plan.artifacts, plan.mask).items()}
    write_patch_coords(out / f"{sid}{PATCHES_SUFFIX}", plan, own.overlap)
    return {
        "slide_id": sid,
        "tiles": len(plan),
        "candidates": plan.n_candidates,
        "level": plan.level,
        "read_size": plan.read_size,
        "slide_mpp": plan.slide_mpp,
        "tile_size_level0": plan.tile_size_level0,
        **shares,
        **({"dropped": plan.n_dropped} if artifacts is not None and artifacts.drop else {}),
        "slide_path": str(slide.path),
    }


def tile_slides(
    slides: str | Path | list[SlideInput],
    out: str | Path,
    tiling: TilingConfig,
    mpp: float | None = None,
    thumb_size: int = 1024,
    tissue: TissueConfig | None = None,
    artifacts: ArtifactConfig | None = None,
    skip_errors: bool = False,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Plan the tiles of every slide in ``slides`` (a folder, a slide or a CSV, see :func:`find_slides`, or
    :class:`SlideInput` from :func:`.inputs.slide_inputs` with their mpp, coords and tissue GeoJSON).

    Writes per slide ``<id>_qc.png`` (:func:`qc_thumbnail`, longer side ``thumb_size``), ``<id>_tiles.csv``
    (level-0 x, y and tissue fraction of each kept tile), ``<id>_tissue.geojson`` (the tissue mask as QuPath
    annotations, level-0 pixels) and ``<id>_patches.h5`` (TRIDENT's layout), then ``tiles_summary.csv`` with one
    row per slide done. With ``artifacts``, each flag it computes also goes out as ``<id>_<kind>.png`` and
    ``<id>_<kind>.geojson``, as a column of the tile list (the fraction of each tile flagged) and of the summary
    (the fraction of the tissue flagged, and the tiles its ``drop`` kinds removed). Returns one row per slide of
    ``slides``: its summary with ``status`` ``tiled``, ``done`` (by an earlier run) or ``failed`` (with
    ``reason``; also in ``errors.csv``). Without ``skip_errors`` the first failure ends the call with its error.
    """
    out = Path(out)
    inputs = as_inputs(slides, mpp) if isinstance(slides, list) else slide_inputs(slides, mpp)
    request = {
        "tiling": asdict(tiling),
        "tissue": asdict(tissue or TissueConfig()),
        "artifacts": None if artifacts is None else asdict(artifacts),
        "thumb_size": int(thumb_size),
        "coords": sorted({str(s.coords.parent) for s in inputs if s.coords is not None}),
        "tissue_geojson": sorted({str(s.tissue_geojson.parent) for s in inputs if s.tissue_geojson is not None}),
    }
    rows: list[dict[str, Any]] = []
    with incremental(out, "tiles", overwrite, request) as workdir:
        note_interrupt(
            f"nothing was replaced: {out} still holds the previous tiles, unchanged"
            if workdir != out
            else f"slides finished in {out} are kept; rerun the same command to do the rest"
        )
        cohort = Cohort(workdir, skip_errors)
        summary = _read_summary(workdir / SUMMARY)
        try:
            for slide in inputs:
                sid = slide.slide_id
                if sid in summary and (workdir / f"{sid}{PATCHES_SUFFIX}").is_file():
                    rows.append({**summary[sid], "status": "done"})
                    continue
                row = cohort.run(
                    sid,
                    slide.path,
                    "tile",
                    lambda s=slide: _tile_one(s, workdir, tiling, thumb_size, tissue, artifacts),
                )
                if row is None:
                    failure = cohort.failures[sid]
                    rows.append(
                        {"slide_id": sid, "slide_path": str(slide.path), "status": "failed", "reason": failure.reason}
                    )
                    if cohort.stop:
                        break
                    continue
                summary[sid] = row
                rows.append({**row, "status": "tiled"})
        finally:
            if summary:
                fields = list(dict.fromkeys(k for r in summary.values() for k in r if k != "slide_path"))
                fields.append("slide_path")
                atomic_write_csv(workdir / SUMMARY, [summary[k] for k in sorted(summary)], fields)
            if skip_errors:
                cohort.write()
        cohort.raise_first()
    return rows

"""A quality-control picture per slide: the thumbnail with the tissue outline, the artifact flags and the kept
tiles drawn on it.

One glance shows whether the mask missed faint tissue, kept pen marks or glass, or the grid sits at the wrong
scale, which is cheaper than finding out after feature extraction. :func:`tile_slides` (``pathotune slides
tile``) does that for a whole set of slides and writes each slide's tile list and its tissue as QuPath GeoJSON
beside its picture, so a mask that needs fixing can be fixed by hand in QuPath and fed back
(``--tissue-geojson``); pen, blur and fold flags (:mod:`.artifacts`) go beside it as masks and GeoJSON.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..report.io import atomic_path
from .artifacts import ArtifactConfig, paint_artifacts, tissue_shares, write_artifacts
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


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def tile_slides(
    slides: str | Path | list[SlideInput],
    out: str | Path,
    tiling: TilingConfig,
    mpp: float | None = None,
    thumb_size: int = 1024,
    tissue: TissueConfig | None = None,
    artifacts: ArtifactConfig | None = None,
) -> list[dict[str, Any]]:
    """Plan the tiles of every slide in ``slides`` (a folder, a slide or a CSV, see :func:`find_slides`, or
    :class:`SlideInput` from :func:`.inputs.slide_inputs` with their mpp, coords and tissue GeoJSON).

    Writes per slide ``<id>_qc.png`` (:func:`qc_thumbnail`, longer side ``thumb_size``), ``<id>_tiles.csv``
    (level-0 x, y and tissue fraction of each kept tile) and ``<id>_tissue.geojson`` (the tissue mask as QuPath
    annotations, level-0 pixels), then ``tiles_summary.csv`` with one row per slide, which is also what this
    returns. With ``artifacts``, each flag it computes also goes out as ``<id>_<kind>.png`` and
    ``<id>_<kind>.geojson``, as a column of the tile list (the fraction of each tile flagged) and of the summary
    (the fraction of the tissue flagged, and the tiles its ``drop`` kinds removed).
    """
    out = Path(out)
    summary = []
    inputs = as_inputs(slides, mpp) if isinstance(slides, list) else slide_inputs(slides, mpp)
    for slide in inputs:
        sid = slide.slide_id
        with open_slide(slide.path, mpp=slide.mpp) as reader:
            plan, _ = plan_on(reader, slide, tiling, tissue, artifacts)
            qc_thumbnail(reader, plan, out / f"{sid}_qc.png", max_size=thumb_size)
        kinds = list(plan.artifact_fractions)
        columns = [plan.tissue, *plan.artifact_fractions.values()]
        tiles = [[x, y, *(f"{v:.4f}" for v in vs)] for (x, y), *vs in zip(plan.coords.tolist(), *columns, strict=True)]
        _write_csv(out / f"{sid}_tiles.csv", ["x", "y", "tissue", *kinds], tiles)
        tissue_geojson(plan.mask, plan.dimensions, out / f"{sid}_tissue.geojson")
        write_artifacts(plan.artifacts, plan.dimensions, out, sid)
        shares = {k: f"{v:.4f}" for k, v in tissue_shares(plan.artifacts, plan.mask).items()}
        summary.append(
            {
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
        )
    _write_csv(out / "tiles_summary.csv", list(summary[0]), [list(r.values()) for r in summary])
    return summary

"""The slides a viewer shows, fixed at start, and the data its page reads: one layout for the server and the export.

The page never asks the server to compute anything: it loads ``data/catalog.js`` (the slide list, each slide's
size, mpp and Deep Zoom geometry, the colour maps) and, per slide, ``data/slides/<slide_id>.js`` (its scored
tiles and region polygons), both as scripts that hand their JSON to the page. Scripts rather than JSON
requests, because a page opened from ``file://`` may load scripts but not fetch files; so the server serves the
very files the export writes, under the same names, and one page works in both.

Heat maps travel as a score grid, not as pictures: one cell per tile step, each an 8-bit level of the score on
the layer's scale (255 where no tile lies), painted by :func:`pathotune.slides.heatmap.paint_scores` (tiles
averaged where they overlap). The page colours it with the chosen colour map, so switching maps needs no
round trip and works from a static folder.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps

from ..errors import DataError
from ..slides.discover import listed_slides, slide_id
from ..slides.heatmap import paint_scores
from ..version import __version__
from .deepzoom import DZ_FORMAT, DZ_OVERLAP, DZ_TILE_SIZE, SlidePyramid, SlideSource
from .overlays import RegionLayer, TileOverlay, check_overlay_options, check_tiles_folder, region_layers, tile_overlays

__all__ = ["COLORMAPS", "Catalog", "SlideEntry", "build_catalog", "score_grid"]

# Colour maps the page offers (matplotlib's, sampled at 256 levels).
COLORMAPS = ("inferno", "viridis", "magma", "RdBu_r", "coolwarm", "turbo")
EMPTY_CELL = 255  # grid value where no tile lies; scores take 0..254
_MAX_GRID_CELLS = 4_000_000  # a score grid never exceeds this many cells (about 4 MB per layer)


@dataclass
class SlideEntry:
    """One slide of the catalog: where it is, its geometry and what is drawn over it."""

    source: SlideSource
    dimensions: tuple[int, int]
    mpp: float | None
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]  # Deep Zoom levels, 1 px to full size
    level_tiles: tuple[tuple[int, int], ...]  # (columns, rows) of tiles per Deep Zoom level
    overlay: TileOverlay | None = None
    regions: list[RegionLayer] = field(default_factory=list)

    @property
    def slide_id(self) -> str:
        return self.source.slide_id

    @property
    def max_level(self) -> int:
        return len(self.level_dimensions) - 1


def _num(v: float) -> int | float:
    r = round(float(v), 3)
    return int(r) if r.is_integer() else r


def _flat(points: np.ndarray) -> list[int | float]:
    return [_num(v) for v in np.asarray(points, dtype=np.float64).reshape(-1).tolist()]


def _short(v: float) -> float | None:
    """A score with 4 significant digits (enough to read, a third of the JSON); None for NaN."""
    return float(f"{v:.4g}") if math.isfinite(v) else None


def lattice_step(coords: np.ndarray, side: float) -> float:
    """The level-0 step between neighbouring tiles: the smallest gap between distinct corners along x or y,
    at most the tile side (tiles apart) and at least a quarter of it (tiles placed off any grid)."""
    gaps = [np.diff(np.unique(coords[:, k])) for k in (0, 1)] if len(coords) else []
    found = np.concatenate(gaps) if gaps else np.empty(0)
    found = found[found > 1e-6]
    step = float(found.min()) if found.size else side
    return float(min(side, max(step, side / 4)))


def score_grid(coords: np.ndarray, side: float, values: np.ndarray, vmin: float, vmax: float) -> dict[str, Any]:
    """The tiles' scores as a grid of 8-bit levels on [vmin, vmax] (base64), one cell per tile step, placed by
    its level-0 origin and step."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    origin = coords.min(axis=0)
    extent = coords.max(axis=0) + side - origin
    step = lattice_step(coords, side)
    cells = math.ceil(extent[0] / step) * math.ceil(extent[1] / step)
    if cells > _MAX_GRID_CELLS:
        step *= math.sqrt(cells / _MAX_GRID_CELLS)
    cols, rows = math.ceil(extent[0] / step), math.ceil(extent[1] / step)
    smap = paint_scores(coords - origin, values, side, (cols * step, rows * step), (cols, rows))
    span = vmax - vmin
    scaled = np.full(smap.shape, 0.5) if span <= 0 else (np.nan_to_num(smap, nan=vmin) - vmin) / span
    levels = np.where(np.isfinite(smap), np.round(np.clip(scaled, 0.0, 1.0) * (EMPTY_CELL - 1)), EMPTY_CELL)
    return {
        "x": _num(origin[0]),
        "y": _num(origin[1]),
        "step": step,
        "cols": cols,
        "rows": rows,
        "levels": base64.b64encode(levels.astype(np.uint8).tobytes()).decode("ascii"),
    }


def _colormap_table(name: str) -> str:
    rgb = np.round(colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    return base64.b64encode(rgb.tobytes()).decode("ascii")


def _script(call: str, payload: dict[str, Any]) -> str:
    return f"PathotuneViewer.{call}({json.dumps(payload, separators=(',', ':'), allow_nan=False)});\n"


@dataclass
class Catalog:
    """The slides a viewer shows, by id (the only name a URL carries), in the order given."""

    entries: dict[str, SlideEntry]
    title: str = "PathoTune viewer"
    unmatched: list[str] = field(default_factory=list)  # scored slide ids with no slide among those shown

    @property
    def sources(self) -> dict[str, SlideSource]:
        return {sid: e.source for sid, e in self.entries.items()}

    def catalog_payload(self, max_levels: dict[str, int] | None = None) -> dict[str, Any]:
        """The slide list; ``max_levels`` cuts a slide's pyramid (an export's ``--max-level``)."""
        slides = []
        for sid, e in self.entries.items():
            top = min(e.max_level, (max_levels or {}).get(sid, e.max_level))
            w, h = e.level_dimensions[top]
            o = e.overlay
            slides.append(
                {
                    "id": sid,
                    "name": e.source.path.name,
                    "width": e.dimensions[0],
                    "height": e.dimensions[1],
                    "mpp": e.mpp,
                    "backend": e.backend,
                    "dzi": {
                        "width": w,
                        "height": h,
                        "tileSize": DZ_TILE_SIZE,
                        "overlap": DZ_OVERLAP,
                        "format": DZ_FORMAT,
                        "maxLevel": top,
                    },
                    "tiles": 0 if o is None else len(o.coords),
                    "layers": [] if o is None else [layer.label for layer in o.layers],
                    "regions": [r.name for r in e.regions],
                    "prediction": None if o is None else o.prediction,
                }
            )
        return {
            "title": self.title,
            "version": __version__,
            "colormaps": {name: _colormap_table(name) for name in COLORMAPS},
            "slides": slides,
        }

    def slide_payload(self, sid: str) -> dict[str, Any]:
        """A slide's scored tiles, heat map grids and region polygons, in level-0 pixels."""
        e = self.entries[sid]
        o = e.overlay
        payload: dict[str, Any] = {"id": sid, "source": None, "tiles": None, "layers": [], "prediction": None}
        if o is not None and len(o.coords):
            classes = list(dict.fromkeys(c for c in (o.top_class or []) if c is not None))
            top = None if o.top_class is None else [-1 if c is None else classes.index(c) for c in o.top_class]
            payload["source"] = o.source
            payload["prediction"] = o.prediction
            payload["tiles"] = {"side": _num(o.side), "xy": _flat(o.coords), "top": top, "classes": classes}
            payload["layers"] = [
                {
                    "name": layer.name,
                    "label": layer.label,
                    "vmin": layer.vmin,
                    "vmax": layer.vmax,
                    "cmap": layer.cmap,
                    "values": [_short(v) for v in layer.values.tolist()],
                    "grid": score_grid(o.coords, o.side, layer.values, layer.vmin, layer.vmax),
                }
                for layer in o.layers
            ]
        payload["regions"] = [
            {"name": r.name, "colour": list(r.colour), "polygons": [[_flat(ring) for ring in p] for p in r.polygons]}
            for r in e.regions
        ]
        return payload

    def catalog_script(self, max_levels: dict[str, int] | None = None) -> str:
        return _script("catalog", self.catalog_payload(max_levels))

    def slide_script(self, sid: str) -> str:
        return _script("slide", self.slide_payload(sid))


def _entry(source: SlideSource) -> SlideEntry:
    pyr = SlidePyramid(source)
    try:
        r = pyr.reader
        return SlideEntry(source, r.dimensions, r.mpp, r.backend, pyr.level_dimensions, pyr.level_tiles)
    finally:
        pyr.close()


def build_catalog(
    slides: str | Path,
    mpp: float | None = None,
    features: str | Path | None = None,
    bundle: str | Path | None = None,
    model: str | Path | None = None,
    heatmap: str | Path | None = None,
    tiles: str | Path | None = None,
    weights: str | None = None,
) -> Catalog:
    """Open every slide once (size, mpp, pyramid), score the overlays once, and match them by slide id.

    ``slides`` is a slide, a folder or a slide list (CSV; its mpp column wins over ``mpp``). Overlay sources
    are those of :func:`pathotune.viewer.overlays.tile_overlays`; ``tiles`` is a ``slides tile`` folder for
    the region masks. Scored tiles made on another slide (another recorded size, tiles past its edge) are
    refused, and so is a score source that matches none of the slides.
    """
    check_overlay_options(features, bundle, model, heatmap)
    check_tiles_folder(tiles)
    entries = {}
    for path, listed_mpp in listed_slides(slides):
        source = SlideSource(slide_id(path), Path(path), listed_mpp if listed_mpp is not None else mpp)
        entries[source.slide_id] = _entry(source)
    scored = tile_overlays(features=features, bundle=bundle, model=model, heatmap=heatmap, weights=weights)
    if scored and not set(scored) & set(entries):
        what = f"--heatmap {heatmap}" if heatmap is not None else f"--features {features}"
        shown = ", ".join(list(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise DataError(
            f"none of the slides ({shown}) has scored tiles in {what}; pass the slides the scores were made on"
        )
    for sid, e in entries.items():
        if sid in scored:
            scored[sid].check_slide(e.dimensions, e.source.path)
            e.overlay = scored[sid]
        e.regions = region_layers(tiles, sid)
    return Catalog(entries, unmatched=sorted(set(scored) - set(entries)))

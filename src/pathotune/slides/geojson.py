"""Tiles and their scores as GeoJSON that QuPath imports (File > Import objects, or drag and drop).

QuPath reads a FeatureCollection of Polygon features in level-0 pixel coordinates; per feature,
``properties.objectType`` ('tile', 'annotation' or 'detection') decides what object it becomes,
``properties.measurements`` (name -> number) fills its measurement table, and ``properties.classification``
(name and RGB colour) its class. JSON has no NaN, so non-finite scores are left out of the measurements
(QuPath shows a missing measurement as NaN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from ..report.io import atomic_write_text

__all__ = ["OBJECT_TYPES", "class_colour", "tiles_feature_collection", "tiles_geojson"]

OBJECT_TYPES = ("tile", "annotation", "detection")


def class_colour(i: int) -> list[int]:
    """A distinct RGB colour per class index (matplotlib's tab10 cycle)."""
    r, g, b, _ = colormaps["tab10"](i % 10)
    return [round(r * 255), round(g * 255), round(b * 255)]


def _num(v: float) -> float | int:
    """Coordinates as ints when whole, else rounded to 1/1000 pixel: smaller files, same geometry."""
    r = round(float(v), 3)
    return int(r) if r.is_integer() else r


def tiles_feature_collection(
    coords: np.ndarray,
    tile_size_level0: float,
    scores: Mapping[str, Sequence[float] | np.ndarray] | None = None,
    object_type: str = "tile",
    classification: Sequence[str | None] | None = None,
    class_names: Sequence[str] | None = None,
    name_prefix: str = "tile",
) -> dict:
    """The FeatureCollection as a dict: one closed square ring (5 points) per tile, scores as measurements.

    ``classification`` gives each tile's class name (or None); its colour follows the name's position in
    ``class_names`` (default: order of first appearance), so classes keep their colours across slides.
    """
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    coords = np.asarray(coords).reshape(-1, 2)
    n = len(coords)
    if not (math.isfinite(tile_size_level0) and tile_size_level0 > 0):
        raise ValueError(f"tile_size_level0 must be a positive number, got {tile_size_level0}")
    if not np.isfinite(coords.astype(np.float64)).all():
        raise ValueError("tile coordinates must be finite")
    columns = {str(k): np.asarray(v, dtype=np.float64).reshape(-1) for k, v in (scores or {}).items()}
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"score '{k}' has {len(v)} values for {n} tiles")
    if classification is not None and len(classification) != n:
        raise ValueError(f"classification has {len(classification)} entries for {n} tiles")
    palette = list(class_names or [])
    for c in classification or []:
        if c is not None and c not in palette:
            palette.append(c)
    s = float(tile_size_level0)
    features = []
    for i, (x, y) in enumerate(coords.tolist()):
        x0, y0, x1, y1 = _num(x), _num(y), _num(x + s), _num(y + s)
        props: dict = {
            "objectType": object_type,
            "name": f"{name_prefix} {i} ({int(x)}, {int(y)})",
            "measurements": {k: float(v[i]) for k, v in columns.items() if math.isfinite(v[i])},
        }
        if classification is not None and classification[i] is not None:
            cls = str(classification[i])
            props["classification"] = {"name": cls, "color": class_colour(palette.index(cls))}
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                "properties": props,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def tiles_geojson(
    coords: np.ndarray,
    tile_size_level0: float,
    scores: Mapping[str, Sequence[float] | np.ndarray] | None,
    path: str | Path,
    object_type: str = "tile",
    classification: Sequence[str | None] | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the tiles' FeatureCollection to ``path`` atomically (strict JSON, no NaN) and return the path."""
    fc = tiles_feature_collection(coords, tile_size_level0, scores, object_type, classification, class_names)
    atomic_write_text(path, json.dumps(fc, separators=(",", ":"), allow_nan=False))
    return Path(path)

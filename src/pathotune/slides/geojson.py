"""GeoJSON that QuPath imports (File > Import objects, or drag and drop): tiles with their scores, and tissue.

QuPath reads a FeatureCollection of Polygon features in level-0 pixel coordinates; per feature,
``properties.objectType`` ('tile', 'annotation' or 'detection') decides what object it becomes,
``properties.measurements`` (name -> number) fills its measurement table, and ``properties.classification``
(name and RGB colour) its class. JSON has no NaN, so non-finite scores are left out of the measurements
(QuPath shows a missing measurement as NaN).

Tiles go both ways too: :func:`read_tiles_geojson` reads such a file back (corners, side, scores, classes).
Tissue goes both ways. :func:`tissue_geojson` writes a mask as annotation polygons with holes (classified
``Tissue``), simplified with shapely to lie within one mask pixel of the mask's own staircase, so the outline
QuPath shows is a clean line with a few vertices rather than a pixel staircase; :func:`geojson_tissue_mask` reads
such a file back, or any QuPath or TRIDENT export of polygons (a FeatureCollection, a bare list of features as
QuPath writes without "Export as FeatureCollection", one Feature, or one geometry), as the tissue mask tiles are
kept by. Every polygon read is checked with shapely (OGC validity: a hole outside its shell, a self-crossing
ring...) and refused on one line naming the feature, unless ``repair`` asks for ``shapely.make_valid``; files
too large or nested too deeply for a tissue outline are refused before they are parsed into memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from matplotlib import colormaps
from shapely import affinity
from shapely.geometry import MultiPolygon, mapping
from shapely.geometry import Polygon as ShapelyPolygon
from shapely.geometry.polygon import orient

from ..errors import DataError, one_line
from ..report.io import atomic_write_text
from .polygons import Polygon, fill_polygons, mask_polygons

__all__ = [
    "OBJECT_TYPES",
    "TISSUE_CLASS",
    "TilesGeojson",
    "class_colour",
    "geojson_tissue_mask",
    "mask_shape",
    "read_geojson_polygons",
    "read_tiles_geojson",
    "tiles_feature_collection",
    "tiles_geojson",
    "tissue_feature_collection",
    "tissue_geojson",
]

OBJECT_TYPES = ("tile", "annotation", "detection")
TISSUE_CLASS = {"name": "Tissue", "color": [0, 200, 0]}  # the QC thumbnail's outline colour
# How far (as a fraction of the slide's size) polygons may reach past its edge before the file is taken for one
# in other coordinates (a thumbnail's, another slide's): QuPath lets a brush stroke run a little off the image.
_EDGE_SLACK = 0.05
# What a tissue outline may be: QuPath's exports of a whole slide's annotations stay far below both.
MAX_GEOJSON_BYTES = 256 * 2**20
MAX_VERTICES = 20_000_000
SIMPLIFY_TOLERANCE = 1.0  # mask pixels an exported outline may move from the mask's staircase


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


_TILE_SLACK = 0.0025  # px: two roundings to 1/1000 px, and float error


@dataclass(frozen=True)
class TilesGeojson:
    """Tiles read back from :func:`tiles_geojson`'s file: level-0 top-left corners (N, 2), the tile side,
    the measurements (name -> (N,), NaN where a tile lacks one) and each tile's class name (or None)."""

    coords: np.ndarray
    side: float
    scores: dict[str, np.ndarray]
    classification: list[str | None]


def read_tiles_geojson(path: str | Path) -> TilesGeojson:
    """The tiles of a ``slides heatmap`` GeoJSON (or any FeatureCollection of equal axis-aligned squares),
    with their measurements and classes, so a finished heat map can be shown again without its model."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"tiles GeoJSON {path} not found; check the path") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot read tiles GeoJSON {path}: {one_line(e, 200)}; rerun `slides heatmap`") from None
    corners, sides, rows, classes = [], [], [], []
    for feature in _features(path, doc):
        props = feature.get("properties") if isinstance(feature, dict) else None
        polygons = _polygons(path, feature.get("geometry") if isinstance(feature, dict) else None)
        ring = polygons[0][0] if len(polygons) == 1 and len(polygons[0]) == 1 else np.empty((0, 2))
        lo, hi = (ring.min(axis=0), ring.max(axis=0)) if len(ring) == 4 else (None, None)
        square = lo is not None and set(map(tuple, ring)) == {
            (lo[0], lo[1]),
            (hi[0], lo[1]),
            (hi[0], hi[1]),
            (lo[0], hi[1]),
        }
        # corners are written to 1/1000 px, so a side may differ from another (or its height) by that much
        if not square or abs((hi[0] - lo[0]) - (hi[1] - lo[1])) > _TILE_SLACK or hi[0] <= lo[0]:
            raise DataError(
                f"tiles GeoJSON {path}: feature {len(corners)} is not an axis-aligned square tile; pass the GeoJSON "
                "`pathotune slides heatmap` wrote"
            )
        corners.append(lo)
        sides.append(float(hi[0] - lo[0]))
        props = props if isinstance(props, dict) else {}
        rows.append(props.get("measurements") if isinstance(props.get("measurements"), dict) else {})
        cls = props.get("classification")
        classes.append(str(cls["name"]) if isinstance(cls, dict) and cls.get("name") is not None else None)
    if sides and max(sides) - min(sides) > _TILE_SLACK:
        raise DataError(
            f"tiles GeoJSON {path} holds tiles of sides {min(sides):g} to {max(sides):g} px; pass one `slides heatmap` "
            "output"
        )
    names = list(dict.fromkeys(k for r in rows for k in r))
    try:
        scores = {k: np.array([float(r.get(k, math.nan)) for r in rows], dtype=np.float64) for k in names}
    except (TypeError, ValueError):
        raise DataError(f"tiles GeoJSON {path}: a measurement is not a number; rerun `slides heatmap`") from None
    coords = np.asarray(corners, dtype=np.float64).reshape(-1, 2)
    return TilesGeojson(coords, round(float(np.median(sides)), 3) if sides else 0.0, scores, classes)


# -- tissue ---------------------------------------------------------------------------------------------------
def mask_shape(dimensions: tuple[int, int], mask_size: int) -> tuple[int, int]:
    """(H, W) of a mask whose longer side is ``mask_size`` (never more than level 0), the grid of the slide's
    thumbnail of that size, so a mask read from GeoJSON lies on the grid an Otsu mask would."""
    width, height = dimensions
    factor = max(width, height) / mask_size
    if factor <= 1:
        return height, width
    return max(1, round(height / factor)), max(1, round(width / factor))


def _shapely(rings: Polygon) -> ShapelyPolygon:
    return ShapelyPolygon(rings[0], [r for r in rings[1:]])


def tissue_feature_collection(
    mask: np.ndarray,
    dimensions: tuple[int, int],
    classification: dict = TISSUE_CLASS,
    name: str = "tissue",
    tolerance: float = SIMPLIFY_TOLERANCE,
) -> dict:
    """The tissue of ``mask`` (covering a slide of level-0 ``dimensions``) as QuPath annotations: one Polygon
    (exterior and holes, closed rings in level-0 pixels) per 4-connected piece, classified ``Tissue``.

    Each piece's outline is traced along pixel edges (:func:`.polygons.mask_polygons`, exact), then simplified by
    shapely within ``tolerance`` mask pixels, topology kept (0 keeps the exact staircase). Any other area mask (an
    artifact's, see :mod:`.artifacts`) goes out the same way under its own ``classification`` (QuPath's name and
    RGB colour) and feature ``name`` ("<name> <i>")."""
    mask = np.asarray(mask, dtype=bool)
    width, height = dimensions
    sx, sy = width / mask.shape[1], height / mask.shape[0]
    features = []
    for i, rings in enumerate(mask_polygons(mask)):
        poly = _shapely(rings)
        if tolerance > 0:
            poly = poly.simplify(tolerance, preserve_topology=True)
        poly = affinity.scale(poly, xfact=sx, yfact=sy, origin=(0, 0))
        geometry = mapping(orient(shapely.set_precision(poly, 0.001), sign=1.0))  # RFC 7946 ring order
        coords = [[[_num(x), _num(y)] for x, y in ring] for ring in geometry["coordinates"]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": coords},
                "properties": {"objectType": "annotation", "name": f"{name} {i}", "classification": classification},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def tissue_geojson(
    mask: np.ndarray,
    dimensions: tuple[int, int],
    path: str | Path,
    classification: dict = TISSUE_CLASS,
    name: str = "tissue",
) -> Path:
    """Write :func:`tissue_feature_collection` to ``path`` atomically and return the path."""
    fc = tissue_feature_collection(mask, dimensions, classification, name)
    atomic_write_text(path, json.dumps(fc, separators=(",", ":"), allow_nan=False))
    return Path(path)


def _ring(path: Path, raw: object) -> np.ndarray:
    try:
        ring = np.asarray([[float(p[0]), float(p[1])] for p in raw], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError, IndexError, KeyError):
        raise DataError(f"GeoJSON {path}: a polygon ring is not a list of [x, y] numbers; re-export it") from None
    if len(ring) and not np.isfinite(ring).all():
        raise DataError(f"GeoJSON {path}: a polygon ring has non-finite coordinates; re-export it")
    if len(ring) > 1 and (ring[0] == ring[-1]).all():
        ring = ring[:-1]  # GeoJSON closes rings; the fill closes them itself
    return ring


def _polygons(path: Path, geometry: object) -> list[Polygon]:
    """The polygons of one geometry; points and lines bound no area and are skipped."""
    if geometry is None:
        return []
    if not isinstance(geometry, dict):
        raise DataError(f"GeoJSON {path}: a geometry is not an object; re-export the file from QuPath")
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries") or [] for p in _polygons(path, g)]
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return []
    if kind not in ("Polygon", "MultiPolygon") or not isinstance(coords, list):
        raise DataError(f"GeoJSON {path}: geometry type {kind!r} is not a Polygon or MultiPolygon; re-export it")
    parts = [coords] if kind == "Polygon" else coords
    return [[_ring(path, r) for r in part] for part in parts if isinstance(part, list) and part]


def _features(path: Path, doc: object) -> list:
    if isinstance(doc, list):  # QuPath without "Export as FeatureCollection"
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        return list(doc.get("features") or [])
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    if isinstance(doc, dict) and ("coordinates" in doc or "geometries" in doc):
        return [{"type": "Feature", "geometry": doc}]
    raise DataError(f"GeoJSON {path} is no FeatureCollection, feature list, Feature or geometry; re-export it")


def _load(path: Path) -> object:
    """The parsed file, after refusing what cannot be a tissue outline: too large, or nested too deeply."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"tissue GeoJSON {path} not found; check the path") from None
    except OSError as e:
        raise DataError(f"cannot read tissue GeoJSON {path}: {one_line(e, 200)}; check the path") from None
    if not path.is_file():
        raise DataError(f"tissue GeoJSON {path} is not a regular file; pass the exported .geojson file")
    if size > MAX_GEOJSON_BYTES:
        raise DataError(
            f"tissue GeoJSON {path} is {size / 2**20:.0f} MiB, more than a tissue outline needs "
            f"({MAX_GEOJSON_BYTES // 2**20} MiB at most); simplify the annotations in QuPath and export again"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except RecursionError:
        raise DataError(f"tissue GeoJSON {path} is nested too deeply to be GeoJSON; re-export it from QuPath") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot read tissue GeoJSON {path}: {one_line(e, 200)}; re-export it from QuPath") from None


def _checked(path: Path, index: int, rings: Polygon, repair: bool) -> list[Polygon]:
    """One polygon as valid polygons: as it is when shapely finds it valid, else repaired (``repair``) or refused."""
    try:
        poly = _shapely(rings)
        reason = shapely.is_valid_reason(poly)
    except (ValueError, shapely.errors.GEOSException) as e:
        reason = one_line(e, 160)
        poly = None
    if reason == "Valid Geometry":
        return [rings]
    if not repair or poly is None:
        raise DataError(
            f"tissue GeoJSON {path}: polygon {index} is not valid ({reason}); fix it in QuPath, or pass "
            "--repair-geojson to repair it with shapely's make_valid"
        )
    fixed = shapely.make_valid(poly, method="structure", keep_collapsed=False)  # shell minus holes, per ring
    parts = [g for g in getattr(fixed, "geoms", [fixed]) if isinstance(g, (ShapelyPolygon, MultiPolygon))]
    out: list[Polygon] = []
    for part in parts:
        for p in getattr(part, "geoms", [part]):
            if not p.is_empty:
                exterior = np.asarray(p.exterior.coords)[:-1]
                out.append([exterior, *[np.asarray(h.coords)[:-1] for h in p.interiors]])
    return out


def read_geojson_polygons(path: str | Path, repair: bool = False, allow_empty: bool = False) -> list[Polygon]:
    """Every Polygon and MultiPolygon part of a GeoJSON file, in its own (level-0 pixel) coordinates, each valid
    as shapely defines it (invalid ones refused, or with ``repair`` made valid). A file without any is refused
    unless ``allow_empty`` (a quality-control mask that found nothing, such as no pen marks)."""
    path = Path(path)
    doc = _load(path)
    polygons: list[Polygon] = []
    vertices = 0
    for feature in _features(path, doc):
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        for rings in _polygons(path, geometry):
            if len(rings[0]) < 3:
                continue
            vertices += sum(len(r) for r in rings)
            if vertices > MAX_VERTICES:
                raise DataError(
                    f"tissue GeoJSON {path} holds more than {MAX_VERTICES:,} vertices, more than a tissue outline "
                    "needs; simplify the annotations in QuPath and export again"
                )
            polygons += _checked(path, len(polygons), rings, repair)
    if not polygons and not allow_empty:
        raise DataError(
            f"tissue GeoJSON {path} holds no Polygon or MultiPolygon; draw or detect the tissue in QuPath and "
            "export its annotations as GeoJSON"
        )
    return polygons


def geojson_tissue_mask(
    path: str | Path, dimensions: tuple[int, int], shape: tuple[int, int], repair: bool = False
) -> np.ndarray:
    """The tissue mask (H, W) = ``shape`` of a slide of level-0 ``dimensions`` from the polygons in ``path``
    (level-0 pixels): a mask pixel is tissue when its centre lies inside a polygon and outside its holes."""
    polygons = read_geojson_polygons(path, repair)
    width, height = dimensions
    pts = np.concatenate([r for p in polygons for r in p])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    slack = _EDGE_SLACK * np.array([width, height])
    if (lo < -slack).any() or (hi > np.array([width, height]) + slack).any():
        raise DataError(
            f"tissue GeoJSON {path} reaches ({hi[0]:.0f}, {hi[1]:.0f}) and ({lo[0]:.0f}, {lo[1]:.0f}), outside the "
            f"{width}x{height} slide; it must hold level-0 pixel coordinates of this slide"
        )
    h, w = shape
    sx, sy = w / width, h / height
    return fill_polygons([[r * (sx, sy) for r in p] for p in polygons], (h, w))

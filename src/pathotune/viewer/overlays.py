"""What the viewer draws over a slide, from the same inputs as ``slides heatmap``, scored by the same code.

Tile scores come from one of three sources, each keyed by slide id:

- a feature folder and a patch bundle: the bundle's class probabilities per tile
  (:class:`pathotune.slides.heatmap.BundleHead`, as ``slides heatmap --bundle``);
- a feature folder and a MIL run: its attention (or per-class tile scores) and the slide's prediction
  (:func:`pathotune.heatmaps.mil_tile_scores`, as ``slides heatmap --model``);
- a finished ``slides heatmap`` folder: the tiles, scores and classes of its ``<slide_id>.geojson``, so a heat
  map can be reviewed without its model.

Region masks come from a ``slides tile --out`` folder: ``<slide_id>_tissue.geojson`` and, where its artifact
flags wrote them, ``<slide_id>_pen.geojson``, ``_blur`` and ``_fold`` (QuPath annotations in level-0 pixels).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from ..features import list_feature_files, require_coords, tile_side
from ..heatmaps import mil_tile_scores
from ..slides.artifacts import ARTIFACT_CLASSES
from ..slides.geojson import TISSUE_CLASS, read_geojson_polygons, read_tiles_geojson
from ..slides.heatmap import BundleHead
from ..slides.polygons import Polygon

__all__ = [
    "MASKS",
    "PROBABILITY_PREFIX",
    "RegionLayer",
    "ScoreLayer",
    "TileOverlay",
    "check_overlay_options",
    "region_layers",
    "tile_overlays",
]

# Region masks a `slides tile` folder may hold (file suffix -> outline colour, RGB: the QuPath class colours).
MASKS: dict[str, tuple[int, ...]] = {
    "tissue": tuple(TISSUE_CLASS["color"]),
    **{kind: tuple(cls["color"]) for kind, cls in ARTIFACT_CLASSES.items()},
}
PROBABILITY_PREFIX = "prob_"
# Colour maps per kind of score, as `slides heatmap` paints them.
PROBABILITY_CMAP = "RdBu_r"
SCORE_CMAP = "inferno"


@dataclass(frozen=True)
class ScoreLayer:
    """One score per tile, shown as a heat map: probabilities on a fixed 0..1 scale, attention and other scores
    from their own min to max (as ``slides heatmap`` paints them)."""

    name: str
    label: str
    values: np.ndarray
    vmin: float
    vmax: float
    cmap: str

    @classmethod
    def of(cls, name: str, values: np.ndarray) -> ScoreLayer:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if name.startswith(PROBABILITY_PREFIX):
            return cls(name, name[len(PROBABILITY_PREFIX) :], values, 0.0, 1.0, PROBABILITY_CMAP)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        return cls(name, name, values, lo, hi, SCORE_CMAP)


@dataclass
class TileOverlay:
    """A slide's scored tiles: level-0 top-left corners (N, 2), the tile side, the score layers, each tile's
    predicted class where the source gives one, and the slide-level prediction of a MIL run."""

    slide_id: str
    source: str
    coords: np.ndarray
    side: float
    layers: list[ScoreLayer]
    top_class: list[str | None] | None = None
    prediction: dict[str, Any] | None = None
    dimensions: tuple[int, int] | None = None  # the slide size the features record, when they do
    origin: Path | None = None  # the file the tiles came from, for error messages

    def check_slide(self, dimensions: tuple[int, int], slide: Path) -> None:
        """Refuse tiles made on another slide: another recorded size, or tiles beyond the slide's edge."""
        where = self.origin or self.source
        if self.dimensions is not None and tuple(self.dimensions) != tuple(dimensions):
            w, h = self.dimensions
            raise DataError(
                f"slide {slide} is {dimensions[0]}x{dimensions[1]} px but the tiles of '{self.slide_id}' in {where} "
                f"were made on a {w}x{h} slide; pass the slides they came from"
            )
        if len(self.coords):
            far = self.coords.max(axis=0) + self.side
            if (
                (self.coords.min(axis=0) < 0).any()
                or far[0] > dimensions[0] + self.side
                or far[1] > dimensions[1] + (self.side)
            ):
                raise DataError(
                    f"the tiles of '{self.slide_id}' in {where} reach ({far[0]:.0f}, {far[1]:.0f}), outside the "
                    f"{dimensions[0]}x{dimensions[1]} slide {slide}; pass the slides they came from"
                )


@dataclass
class RegionLayer:
    """Polygons with holes (level-0 pixels) of one region kind: tissue, pen, blur or fold."""

    name: str
    colour: tuple[int, ...]
    polygons: list[Polygon] = field(default_factory=list)


def check_overlay_options(
    features: str | Path | None, bundle: str | Path | None, model: str | Path | None, heatmap: str | Path | None
) -> None:
    """Exactly one score source, or none: features with one of bundle/model, or a heat map folder."""
    if heatmap is not None and (features is not None or bundle is not None or model is not None):
        raise ConfigError("pass either --heatmap (a `slides heatmap` folder) or --features with --bundle/--model")
    if (bundle is not None or model is not None) and features is None:
        raise ConfigError("--bundle and --model score features: pass --features too")
    if features is not None and (bundle is None) == (model is None):
        raise ConfigError("with --features pass exactly one of --model (a MIL run) or --bundle (a patch bundle)")


def _from_bundle(bundle: str | Path, features: str | Path, weights: str | None) -> Iterable[TileOverlay]:
    files = list_feature_files(features)
    require_coords(files)
    head = BundleHead(bundle, weights=weights)
    classes = head.classes
    for f in files:
        sf, probs = head.probs(f)
        layers = [ScoreLayer.of(f"{PROBABILITY_PREFIX}{c}", probs[:, j]) for j, c in enumerate(classes)]
        top = [classes[int(i)] for i in probs.argmax(1)] if len(probs) else []
        yield TileOverlay(
            sf.slide_id,
            f"bundle {Path(bundle).name}",
            np.asarray(sf.coords, dtype=np.float64),
            sf.tile_side,
            layers,
            top_class=top,
            dimensions=_dimensions(sf.attrs),
            origin=sf.path,
        )


def _from_mil(model: str | Path, features: str | Path) -> Iterable[TileOverlay]:
    for pred in mil_tile_scores(model, features):
        layers = [ScoreLayer.of(n, pred["scores"][:, j]) for j, n in enumerate(pred["names"])]
        probs = {c: float(p) for c, p in zip(pred["classes"], pred["probs"], strict=True)}
        yield TileOverlay(
            pred["slide_id"],
            f"MIL run {Path(model).name}",
            np.asarray(pred["coords"], dtype=np.float64),
            tile_side(pred["attrs"]),
            layers,
            prediction={"label": pred["pred"], "probs": probs},
            dimensions=_dimensions(pred["attrs"]),
        )


def _from_heatmap_folder(folder: str | Path) -> Iterable[TileOverlay]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"heatmap folder {folder} not found; pass the --out folder of `pathotune slides heatmap`")
    files = sorted(p for p in folder.glob("*.geojson") if not p.name.startswith("."))
    if not files:
        raise DataError(f"heatmap folder {folder} holds no <slide_id>.geojson; pass the --out of `slides heatmap`")
    for path in files:
        tiles = read_tiles_geojson(path)
        layers = [ScoreLayer.of(n, v) for n, v in tiles.scores.items()]
        top = tiles.classification if any(c is not None for c in tiles.classification) else None
        yield TileOverlay(
            path.stem, f"heat map {folder.name}", tiles.coords, tiles.side, layers, top_class=top, origin=path
        )


def _dimensions(attrs: Mapping[str, Any]) -> tuple[int, int] | None:
    dims = attrs.get("dimensions")
    return None if dims is None else (int(dims[0]), int(dims[1]))


def tile_overlays(
    features: str | Path | None = None,
    bundle: str | Path | None = None,
    model: str | Path | None = None,
    heatmap: str | Path | None = None,
    weights: str | None = None,
) -> dict[str, TileOverlay]:
    """Slide id -> scored tiles from the one source given (see the module doc); empty when none is."""
    check_overlay_options(features, bundle, model, heatmap)
    if heatmap is not None:
        found = _from_heatmap_folder(heatmap)
    elif bundle is not None:
        found = _from_bundle(bundle, features, weights)  # type: ignore[arg-type]
    elif model is not None:
        found = _from_mil(model, features)  # type: ignore[arg-type]
    else:
        return {}
    return {o.slide_id: o for o in found}


def region_layers(tiles: str | Path | None, slide_id: str) -> list[RegionLayer]:
    """The tissue, pen, blur and fold polygons a ``slides tile`` folder holds for a slide (those present)."""
    if tiles is None:
        return []
    folder = Path(tiles)
    found = []
    for name, colour in MASKS.items():
        path = folder / f"{slide_id}_{name}.geojson"
        if path.is_file():
            found.append(RegionLayer(name, colour, read_geojson_polygons(path, allow_empty=True)))
    return found


def check_tiles_folder(tiles: str | Path | None) -> None:
    if tiles is not None and not Path(tiles).is_dir():
        raise DataError(f"tiles folder {tiles} not found; pass the --out folder of `pathotune slides tile`")

"""Heat maps over whole slides: a patch bundle's tile probabilities, or a MIL run's tile scores, as PNG + GeoJSON.

This is the one module that joins ``slides`` (slide readers, painting) and ``mil`` (the fold ensemble), which
never import each other; both lean on :mod:`pathotune.features` for the files in between.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .features import read_feature_attrs, require_coords, slide_feature_files, tile_side
from .mil.models import FoldEnsemble
from .slides.geojson import tiles_geojson
from .slides.heatmap import bundle_heatmaps, check_heatmap_options, heatmap_cohort, paint_slide, safe_name, slide_map

__all__ = ["bundle_heatmaps", "mil_heatmaps", "mil_slide_scores", "mil_tile_scores"]


def mil_slide_scores(ensemble: FoldEnsemble, path: Path) -> dict:
    """One slide's MIL prediction and tile scores (attention, averaged over the fold models).

    :meth:`FoldEnsemble.predict`'s result (slide_id, probs, pred, classes, coords...) plus ``attrs`` (the feature
    file's attributes), ``scores`` (N, K) and ``names``: ``["attention"]``, or ``score_<class>`` when the
    aggregator scores tiles per class. The file must come from the extractor the models were trained on.
    """
    ensemble.check([path])
    pred = ensemble.predict(path)
    scores = np.asarray(pred["tile_scores"], dtype=np.float64).reshape(len(pred["coords"]), -1)
    names = ["attention"] if scores.shape[1] == 1 else [f"score_{c}" for c in pred["classes"]]
    return {**pred, "attrs": read_feature_attrs(path), "scores": scores, "names": names}


def mil_tile_scores(model_dir: str | Path, features: str | Path) -> list[dict]:
    """:func:`mil_slide_scores` for every feature file in ``features``; ``.pt`` files, which hold no coordinates,
    are refused before any model runs."""
    files = list(slide_feature_files(features).values())
    require_coords(files)
    ensemble = FoldEnsemble(model_dir)
    ensemble.check(files)
    return [mil_slide_scores(ensemble, f) for f in files]


def mil_heatmaps(
    model_dir: str | Path,
    features: str | Path,
    out: str | Path,
    slides: str | Path | None = None,
    max_size: int = 1024,
    alpha: float = 0.5,
    skip_errors: bool = False,
    overwrite: bool = False,
) -> list[dict]:
    """Per slide, a MIL run's tile scores (:func:`mil_slide_scores`): PNG and GeoJSON.

    Writes ``<slide_id>_heatmap.png`` (scores min-max scaled per slide; one PNG per class when the
    aggregator scores tiles per class) and ``<slide_id>.geojson``. Returns per slide: slide_id, status, pred,
    probs, n_tiles, heatmaps, geojson; the folder follows :func:`pathotune.slides.heatmap.heatmap_cohort`. TRIDENT
    and CLAM ``.h5`` features work as PathoTune's; ``.pt`` files, which hold no coordinates, are refused before
    any model runs.
    """
    check_heatmap_options(max_size, alpha)
    files = list(slide_feature_files(features).values())
    require_coords(files)
    slide_paths = slide_map(slides)
    ensemble = FoldEnsemble(model_dir)

    def paint(f: Path, out: Path) -> dict:
        pred = mil_slide_scores(ensemble, f)
        sid, coords, attrs, scores, names = (pred[k] for k in ("slide_id", "coords", "attrs", "scores", "names"))
        suffix = (lambda n: "") if len(names) == 1 else (lambda n: f"_{safe_name(n)}")
        layers = [(out / f"{sid}_heatmap{suffix(n)}.png", scores[:, j], n) for j, n in enumerate(names)]
        pngs = paint_slide(sid, attrs, coords, layers, slide_paths, max_size, alpha, cmap="inferno")
        side = tile_side(attrs)
        geo = tiles_geojson(coords, side, {n: scores[:, j] for j, n in enumerate(names)}, out / f"{sid}.geojson")
        return {
            "slide_id": sid,
            "pred": pred["pred"],
            "probs": pred["probs"],
            "n_tiles": len(coords),
            "heatmaps": pngs,
            "geojson": geo,
        }

    request = {"model": str(Path(model_dir).resolve()), "max_size": max_size, "alpha": alpha}
    return heatmap_cohort(out, request, files, paint, skip_errors, overwrite)

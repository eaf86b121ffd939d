"""Heat maps over whole slides: a patch bundle's tile probabilities, or a MIL run's tile scores, as PNG + GeoJSON.

This is the one module that joins ``slides`` (slide readers, painting) and ``mil`` (the fold ensemble), which
never import each other; both lean on :mod:`pathotune.features` for the files in between.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .features import read_feature_attrs, require_coords, slide_feature_files, tile_side
from .mil import predict_slides
from .slides.geojson import tiles_geojson
from .slides.heatmap import bundle_heatmaps, check_heatmap_options, paint_slide, safe_name, slide_map

__all__ = ["bundle_heatmaps", "mil_heatmaps", "mil_tile_scores"]


def mil_tile_scores(model_dir: str | Path, features: str | Path) -> list[dict]:
    """Per slide, a MIL run's prediction and tile scores (attention, averaged over fold models).

    :func:`pathotune.mil.predict_slides`'s result per slide (slide_id, probs, pred, classes, coords...) plus
    ``attrs`` (the feature file's attributes), ``scores`` (N, K) and ``names``: ``["attention"]``, or
    ``score_<class>`` when the aggregator scores tiles per class. ``.pt`` files, which hold no coordinates, are
    refused before any model runs.
    """
    files = slide_feature_files(features)
    require_coords(list(files.values()))
    done = []
    for pred in predict_slides(model_dir, features):
        scores = np.asarray(pred["tile_scores"], dtype=np.float64).reshape(len(pred["coords"]), -1)
        names = ["attention"] if scores.shape[1] == 1 else [f"score_{c}" for c in pred["classes"]]
        done.append({**pred, "attrs": read_feature_attrs(files[pred["slide_id"]]), "scores": scores, "names": names})
    return done


def mil_heatmaps(
    model_dir: str | Path,
    features: str | Path,
    out: str | Path,
    slides: str | Path | None = None,
    max_size: int = 1024,
    alpha: float = 0.5,
) -> list[dict]:
    """Per slide, a MIL run's tile scores (:func:`mil_tile_scores`): PNG and GeoJSON.

    Writes ``<slide_id>_heatmap.png`` (scores min-max scaled per slide; one PNG per class when the
    aggregator scores tiles per class) and ``<slide_id>.geojson``. Returns per slide: slide_id, pred, probs,
    n_tiles, heatmaps, geojson. TRIDENT and CLAM ``.h5`` features work as PathoTune's; ``.pt`` files, which hold
    no coordinates, are refused before any model runs.
    """
    check_heatmap_options(max_size, alpha)
    slide_paths = slide_map(slides)
    out = Path(out)
    done = []
    for pred in mil_tile_scores(model_dir, features):
        sid, coords, attrs, scores, names = (pred[k] for k in ("slide_id", "coords", "attrs", "scores", "names"))
        suffix = (lambda n: "") if len(names) == 1 else (lambda n: f"_{safe_name(n)}")
        layers = [(out / f"{sid}_heatmap{suffix(n)}.png", scores[:, j], n) for j, n in enumerate(names)]
        pngs = paint_slide(sid, attrs, coords, layers, slide_paths, max_size, alpha, cmap="inferno")
        side = tile_side(attrs)
        geo = tiles_geojson(coords, side, {n: scores[:, j] for j, n in enumerate(names)}, out / f"{sid}.geojson")
        done.append(
            {
                "slide_id": sid,
                "pred": pred["pred"],
                "probs": pred["probs"],
                "n_tiles": len(coords),
                "heatmaps": pngs,
                "geojson": geo,
            }
        )
    return done

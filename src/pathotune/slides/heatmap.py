"""Tile scores painted over the slide thumbnail, so attention or class probabilities can be read in place.

Each tile is painted at its level-0 position scaled to the thumbnail; where tiles overlap their scores are
averaged, and the slide shows through wherever there is no tile. Colours come from a matplotlib colormap on
scores scaled to [vmin, vmax] (by default the scores' own min and max); a colour bar with both ends labelled
sits to the right so the picture can be read on its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError, DataError
from ..report.io import atomic_path
from .reader import SlideReader, open_slide

__all__ = ["COLORBAR_WIDTH", "bundle_heatmaps", "feature_files", "mil_heatmaps", "paint_scores", "score_heatmap"]

COLORBAR_WIDTH = 72  # pixels added on the right of the thumbnail for the colour bar and its labels


def paint_scores(
    coords: np.ndarray, scores: np.ndarray, tile_size_level0: float, dimensions: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """(h, w) float map of mean tile score per thumbnail pixel; NaN where no tile lies.

    Tile edges are rounded (not floored/ceiled) to thumbnail pixels, so neighbouring tiles meet without a
    one-pixel overlap that would blend their scores.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(scores):
        raise ValueError(f"{len(coords)} tiles but {len(scores)} scores")
    tw, th = size
    sx, sy = dimensions[0] / tw, dimensions[1] / th
    total = np.zeros((th, tw), dtype=np.float64)
    count = np.zeros((th, tw), dtype=np.int32)
    finite = np.isfinite(scores)
    x0 = np.clip(np.round(coords[:, 0] / sx), 0, tw - 1).astype(np.int64)
    y0 = np.clip(np.round(coords[:, 1] / sy), 0, th - 1).astype(np.int64)
    x1 = np.clip(np.round((coords[:, 0] + tile_size_level0) / sx), x0 + 1, tw).astype(np.int64)
    y1 = np.clip(np.round((coords[:, 1] + tile_size_level0) / sy), y0 + 1, th).astype(np.int64)
    for i in np.flatnonzero(finite):
        total[y0[i] : y1[i], x0[i] : x1[i]] += scores[i]
        count[y0[i] : y1[i], x0[i] : x1[i]] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _colorbar(cmap, height: int, vmin: float, vmax: float, label: str | None) -> Image.Image:
    strip = Image.new("RGB", (COLORBAR_WIDTH, height), (255, 255, 255))
    if height < 24:
        return strip
    draw = ImageDraw.Draw(strip)
    top, bottom = (18 if label else 8), height - 8
    if bottom - top < 4:
        return strip
    ramp = np.linspace(1.0, 0.0, bottom - top)[:, None].repeat(14, axis=1)
    rgb = (cmap(ramp)[..., :3] * 255).round().astype(np.uint8)
    strip.paste(Image.fromarray(rgb), (6, top))
    draw.rectangle((5, top - 1, 20, bottom), outline=(0, 0, 0))
    draw.text((24, top - 4), f"{vmax:.3g}", fill=(0, 0, 0))
    draw.text((24, bottom - 10), f"{vmin:.3g}", fill=(0, 0, 0))
    if label:
        draw.text((4, 2), label[:11], fill=(0, 0, 0))
    return strip


def score_heatmap(
    reader: SlideReader | None,
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size_level0: float,
    path: str | Path,
    max_size: int = 1024,
    alpha: float = 0.5,
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    label: str | None = None,
    thumbnail: Image.Image | None = None,
    dimensions: tuple[int, int] | None = None,
) -> Path:
    """Write the blended heatmap PNG to ``path`` atomically and return the path.

    The image is the thumbnail (longer side ``max_size``) with tiles coloured by score at opacity ``alpha``,
    plus a ``COLORBAR_WIDTH`` strip when ``colorbar``. Pass ``thumbnail`` (and ``dimensions``, the slide's
    level-0 size) to paint several maps without reading the slide again; ``reader`` may then be None.
    """
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in 0..1, got {alpha}")
    if thumbnail is None:
        if reader is None:
            raise ValueError("pass a reader or a thumbnail")
        thumbnail = reader.thumbnail(max_size)
    if dimensions is None:
        if reader is None:
            raise ValueError("pass the slide's level-0 dimensions with a thumbnail and no reader")
        dimensions = reader.dimensions
    thumb = np.asarray(thumbnail.convert("RGB"), dtype=np.float64)
    th, tw = thumb.shape[:2]
    smap = paint_scores(coords, scores, tile_size_level0, dimensions, (tw, th))
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    lo = float(vmin) if vmin is not None else (float(values.min()) if values.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(values.max()) if values.size else 1.0)
    painted = np.isfinite(smap)
    norm = np.full(smap.shape, 0.5) if hi <= lo else np.clip((np.nan_to_num(smap, nan=lo) - lo) / (hi - lo), 0, 1)
    colour_map = colormaps[cmap]
    colours = colour_map(norm)[..., :3] * 255.0
    out = thumb.copy()
    out[painted] = (1.0 - alpha) * thumb[painted] + alpha * colours[painted]
    img = Image.fromarray(out.round().clip(0, 255).astype(np.uint8), "RGB")
    if colorbar:
        canvas = Image.new("RGB", (tw + COLORBAR_WIDTH, th), (255, 255, 255))
        canvas.paste(img, (0, 0))
        canvas.paste(_colorbar(colour_map, th, lo, hi, label), (tw, 0))
        img = canvas
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


# -- whole folders: feature files in, heatmaps and GeoJSON out ------------------------------------------------
def feature_files(features: str | Path) -> list[Path]:
    """``<slide_id>.h5`` files of a folder (sorted), or the one file given."""
    p = Path(features)
    if p.is_file():
        return [p]
    files = sorted(p.glob("*.h5")) if p.is_dir() else []
    if not files:
        raise DataError(f"no <slide_id>.h5 feature files in {features}; run `pathotune slides extract` first")
    return files


def _safe(name: str) -> str:
    """A class name as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def _slide_map(slides: str | Path | None) -> dict[str, Path] | None:
    from .extract import find_slides, slide_id

    return None if slides is None else {slide_id(p): p for p in find_slides(slides)}


def _open_for(sid: str, attrs: dict, slides: dict[str, Path] | None) -> SlideReader:
    """The slide a feature file came from: by id in ``slides``, else the path recorded at extraction.

    Its level-0 size must be the one recorded, so a heatmap is never painted over another slide.
    """
    if slides is not None:
        if sid not in slides:
            raise DataError(f"no slide with id '{sid}' in --slides; pass the slides the features came from")
        path = slides[sid]
    else:
        path = Path(str(attrs.get("slide_path", "")))
        if not path.is_file():
            raise DataError(f"slide {path} recorded in the features of '{sid}' is not there; pass --slides")
    reader = open_slide(path)
    dims = attrs.get("dimensions")
    if dims is not None and tuple(int(v) for v in dims) != reader.dimensions:
        reader.close()
        raise DataError(
            f"slide {path} is {reader.dimensions[0]}x{reader.dimensions[1]} px but the features of '{sid}' were "
            f"made on a {int(dims[0])}x{int(dims[1])} slide; pass the right --slides"
        )
    return reader


def _tile_side(attrs: dict) -> float:
    """Tile side in level-0 pixels, as recorded (or rebuilt from tile size and the two mpps)."""
    side = attrs.get("tile_size_level0")
    if side is not None:
        return float(side)
    target, mpp = attrs.get("target_mpp"), attrs.get("mpp")
    scale = 1.0 if target is None or not np.isfinite(target) else float(target) / float(mpp)
    return float(attrs["tile_size"]) * scale


def _check_options(max_size: int, alpha: float) -> None:
    if max_size < 1:
        raise ConfigError(f"max_size must be >= 1, got {max_size}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must lie in 0..1, got {alpha}")


def _check_bundle_features(sf: Any, model: Any, manifest: dict, bundle: Path) -> None:
    """A head only means something on its own model's features (a linear probe's: its plain backbone's)."""
    attrs = sf.attrs
    if attrs.get("bundle_fingerprint") == manifest.get("sha256"):
        return
    probe = model.switches.train == "head" and all(m is None for m in (model.tvp, model.ttp, model.ivp))
    same_backbone = (
        attrs.get("backbone_fingerprint") == model.provenance.fingerprint
        and int(attrs.get("image_size", -1)) == model.backbone.img_size
    )
    if not attrs.get("bundle_fingerprint") and probe and same_backbone:
        return
    raise DataError(
        f"features {sf.path} were not extracted with bundle {bundle}; run `pathotune slides extract --bundle "
        f"{bundle}` so its head sees the prompted model's features"
    )


def bundle_heatmaps(
    bundle: str | Path,
    features: str | Path,
    out: str | Path,
    slides: str | Path | None = None,
    weights: str | None = None,
    max_size: int = 1024,
    alpha: float = 0.5,
) -> list[dict]:
    """Per slide, a patch bundle's class probabilities for every tile: one PNG per class and a GeoJSON.

    The features must come from ``slides extract --bundle`` with this bundle, so only its head runs here.
    Writes ``<slide_id>_<class>.png`` (probabilities on a fixed 0..1 scale, comparable across slides and
    classes) and ``<slide_id>.geojson`` (``prob_<class>`` measurements, the top class as classification).
    Returns per slide: slide_id, n_tiles, heatmaps, geojson, class_share (fraction of tiles per top class).
    """
    import torch

    from ..bundle import load_bundle, read_manifest
    from ..engine.infer import resolve_bundle
    from .extract import read_slide_features
    from .geojson import tiles_geojson

    _check_options(max_size, alpha)
    files = feature_files(features)
    slide_paths = _slide_map(slides)
    path = resolve_bundle(bundle)
    manifest = read_manifest(path)
    net = load_bundle(path, weights=weights)
    classes = net.class_names
    out = Path(out)
    done = []
    for f in files:
        sf = read_slide_features(f)
        _check_bundle_features(sf, net, manifest, path)
        with torch.inference_mode():
            probs = net.forward_head(torch.from_numpy(sf.features)).float().softmax(-1).numpy()
        side, sid = _tile_side(sf.attrs), sf.slide_id
        pngs = []
        with _open_for(sid, sf.attrs, slide_paths) as reader:
            thumb = reader.thumbnail(max_size)
            for j, c in enumerate(classes):
                pngs.append(
                    score_heatmap(
                        reader,
                        sf.coords,
                        probs[:, j],
                        side,
                        out / f"{sid}_{_safe(c)}.png",
                        max_size=max_size,
                        alpha=alpha,
                        cmap="RdBu_r",
                        vmin=0.0,
                        vmax=1.0,
                        label=c,
                        thumbnail=thumb,
                    )
                )
        top = [classes[int(i)] for i in probs.argmax(1)] if len(probs) else []
        geo = tiles_geojson(
            sf.coords,
            side,
            {f"prob_{c}": probs[:, j] for j, c in enumerate(classes)},
            out / f"{sid}.geojson",
            classification=top,
            class_names=classes,
        )
        share = {c: (sum(t == c for t in top) / len(top)) if top else 0.0 for c in classes}
        done.append(
            {"slide_id": sid, "n_tiles": len(sf.coords), "heatmaps": pngs, "geojson": geo, "class_share": share}
        )
    return done


def mil_heatmaps(
    model_dir: str | Path,
    features: str | Path,
    out: str | Path,
    slides: str | Path | None = None,
    max_size: int = 1024,
    alpha: float = 0.5,
) -> list[dict]:
    """Per slide, a MIL run's tile scores (attention, averaged over fold models): PNG and GeoJSON.

    Writes ``<slide_id>_heatmap.png`` (scores min-max scaled per slide; one PNG per class when the
    aggregator scores tiles per class) and ``<slide_id>.geojson``. Returns per slide: slide_id, pred, probs,
    n_tiles, heatmaps, geojson.
    """
    from ..mil import predict_slides
    from .extract import read_slide_features
    from .geojson import tiles_geojson

    _check_options(max_size, alpha)
    files = {p.stem: p for p in feature_files(features)}
    slide_paths = _slide_map(slides)
    out = Path(out)
    done = []
    for pred in predict_slides(model_dir, features):
        sid = pred["slide_id"]
        sf = read_slide_features(files[sid])
        scores = np.asarray(pred["tile_scores"], dtype=np.float64).reshape(len(sf.coords), -1)
        names = ["attention"] if scores.shape[1] == 1 else [f"score_{c}" for c in pred["classes"]]
        side = _tile_side(sf.attrs)
        pngs = []
        with _open_for(sid, sf.attrs, slide_paths) as reader:
            thumb = reader.thumbnail(max_size)
            for j, name in enumerate(names):
                suffix = "" if len(names) == 1 else f"_{_safe(name)}"
                pngs.append(
                    score_heatmap(
                        reader,
                        sf.coords,
                        scores[:, j],
                        side,
                        out / f"{sid}_heatmap{suffix}.png",
                        max_size=max_size,
                        alpha=alpha,
                        cmap="inferno",
                        label=name,
                        thumbnail=thumb,
                    )
                )
        geo = tiles_geojson(sf.coords, side, {n: scores[:, j] for j, n in enumerate(names)}, out / f"{sid}.geojson")
        done.append(
            {
                "slide_id": sid,
                "pred": pred["pred"],
                "probs": pred["probs"],
                "n_tiles": len(sf.coords),
                "heatmaps": pngs,
                "geojson": geo,
            }
        )
    return done

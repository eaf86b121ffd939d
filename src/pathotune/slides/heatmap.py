"""Tile scores painted over the slide thumbnail, so attention or class probabilities can be read in place.

Each tile is painted at its level-0 position scaled to the thumbnail; where tiles overlap their scores are
averaged, and the slide shows through wherever there is no tile. Colours come from a matplotlib colormap on
scores scaled to [vmin, vmax] (by default the scores' own min and max); a colour bar with both ends labelled
sits to the right so the picture can be read on its own.

:func:`bundle_heatmaps` paints a patch bundle's class probabilities (:class:`BundleHead`) from features
extracted with it; MIL attention maps are :func:`pathotune.heatmaps.mil_heatmaps` (slides never import ``mil``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from ..bundle import load_bundle, read_manifest, resolve_bundle
from ..cohort import Cohort
from ..errors import ConfigError, DataError, note_interrupt
from ..features import (
    SlideFeatures,
    bundle_mismatch,
    check_unique_slides,
    list_feature_files,
    read_slide_features,
    require_coords,
    tile_side,
)
from ..model import PathoTuneModel
from ..records import incremental
from ..report.io import atomic_path, atomic_write_text, csv_text
from .discover import find_slides, slide_id
from .geojson import tiles_geojson
from .reader import SlideReader, open_slide

__all__ = [
    "COLORBAR_WIDTH",
    "BundleHead",
    "bundle_heatmaps",
    "check_heatmap_options",
    "heatmap_cohort",
    "open_source_slide",
    "paint_scores",
    "paint_slide",
    "safe_name",
    "score_heatmap",
    "slide_map",
]

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
def safe_name(name: str) -> str:
    """A class name as a file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def slide_map(slides: str | Path | None) -> dict[str, Path] | None:
    """Slide id -> path of the slides in ``slides`` (a folder, a slide or a CSV), or None when not given."""
    return None if slides is None else {slide_id(p): p for p in find_slides(slides)}


def open_source_slide(sid: str, attrs: Mapping[str, Any], slides: dict[str, Path] | None) -> SlideReader:
    """The slide a feature file came from: by id in ``slides``, else the path recorded at extraction.

    Its level-0 size must be the one recorded, so a heatmap is never painted over another slide.
    """
    if slides is not None:
        if sid not in slides:
            raise DataError(f"no slide with id '{sid}' in --slides; pass the slides the features came from")
        path = slides[sid]
    else:
        if not attrs.get("slide_path"):
            raise DataError(
                f"the features of '{sid}' record no slide path (TRIDENT and CLAM files do not); pass --slides"
            )
        path = Path(str(attrs["slide_path"]))
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


def check_heatmap_options(max_size: int, alpha: float) -> None:
    if max_size < 1:
        raise ConfigError(f"max_size must be >= 1, got {max_size}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must lie in 0..1, got {alpha}")


def paint_slide(
    sid: str,
    attrs: Mapping[str, Any],
    coords: np.ndarray,
    layers: Sequence[tuple[Path, np.ndarray, str]],
    slides: dict[str, Path] | None,
    max_size: int,
    alpha: float,
    **style: Any,
) -> list[Path]:
    """One PNG per ``(path, tile scores, label)`` layer over the slide a feature file came from (its id and
    attributes), whose thumbnail is read once; ``style`` goes to :func:`score_heatmap`."""
    pngs = []
    side = tile_side(attrs)
    with open_source_slide(sid, attrs, slides) as reader:
        thumb = reader.thumbnail(max_size)
        for path, scores, label in layers:
            pngs.append(
                score_heatmap(
                    reader,
                    coords,
                    scores,
                    side,
                    path,
                    max_size=max_size,
                    alpha=alpha,
                    label=label,
                    thumbnail=thumb,
                    **style,
                )
            )
    return pngs


def _check_bundle_features(sf: SlideFeatures, model: PathoTuneModel, manifest: dict, bundle: Path) -> None:
    """The features must be the bundle's own (:func:`pathotune.features.h5.bundle_mismatch`)."""
    probe = model.switches.train == "head" and not model.groups
    probe_of = (model.provenance.fingerprint, model.backbone.image_size) if probe else None
    if bundle_mismatch(sf.attrs, manifest.get("sha256", ""), probe_of) is not None:
        raise DataError(
            f"features {sf.path} were not extracted with bundle {bundle}; run `pathotune slides extract --bundle "
            f"{bundle}` so its head sees the prompted model's features"
        )


def heatmap_cohort(
    out: str | Path,
    request: Mapping[str, Any],
    files: Sequence[Path],
    paint: Callable[[Path, Path], dict],
    skip_errors: bool = False,
    overwrite: bool = False,
) -> list[dict]:
    """Paint every feature file into ``out`` with ``paint(file, folder) -> row``, one slide at a time.

    ``out`` is a record of heat maps made by ``request`` (:func:`pathotune.records.incremental`): a rerun with
    the same request paints only the slides it lacks (those listed in ``heatmaps.csv``, written after each slide,
    are done), another request is refused unless ``overwrite``. A slide that fails is listed in ``errors.csv``
    with ``skip_errors`` (:mod:`.cohort`), else it ends the call. Returns one row per file with its ``status``
    (``painted``, ``done`` or ``failed``).
    """
    out = Path(out)
    check_unique_slides(files)
    rows: list[dict] = []
    with incremental(out, "heatmaps", overwrite, request) as workdir:
        note_interrupt(
            f"nothing was replaced: {out} still holds the previous heat maps, unchanged"
            if workdir != out
            else f"slides painted in {out} are kept; rerun the same command to paint the rest"
        )
        ledger = _read_ledger(workdir / LEDGER)
        cohort = Cohort(workdir, skip_errors)
        try:
            for f in files:
                sid = f.stem
                if sid in ledger and all((workdir / n).is_file() for n in ledger[sid]["outputs"].split(";") if n):
                    rows.append({**ledger[sid], "status": "done"})
                    continue
                row = cohort.run(sid, f, "heatmap", lambda f=f: paint(f, workdir))
                if row is None:
                    rows.append(
                        {"slide_id": sid, "features": str(f), "status": "failed", "reason": cohort.failures[sid].reason}
                    )
                    if cohort.stop:
                        break
                    continue
                outputs = [Path(p).name for p in [*row.get("heatmaps", []), row.get("geojson")] if p]
                ledger[sid] = {
                    "slide_id": sid,
                    "features": str(f),
                    "n_tiles": row["n_tiles"],
                    "outputs": ";".join(outputs),
                }
                atomic_write_text(workdir / LEDGER, csv_text([ledger[k] for k in sorted(ledger)]))
                rows.append({**row, "status": "painted"})
        finally:
            if skip_errors:
                cohort.write()
        cohort.raise_first()
    return rows


LEDGER = "heatmaps.csv"


def _read_ledger(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return {r["slide_id"]: dict(r) for r in csv.DictReader(f) if r.get("slide_id")}
    except (OSError, csv.Error, UnicodeDecodeError, KeyError):
        return {}


class BundleHead:
    """A patch bundle loaded once, whose head scores the tiles of feature files extracted with it.

    The features must come from ``slides extract --bundle`` with this bundle (or, for a linear probe, from its
    plain backbone), so only the head runs: :meth:`probs` gives a file's features and the (N, C) class
    probabilities of its tiles, in the order of :attr:`classes`.
    """

    def __init__(self, bundle: str | Path, weights: str | None = None) -> None:
        self.path = resolve_bundle(bundle)
        self.manifest = read_manifest(self.path)
        self.net = load_bundle(self.path, weights=weights)
        self.classes: list[str] = list(self.net.class_names)

    def probs(self, features: str | Path) -> tuple[SlideFeatures, np.ndarray]:
        sf = read_slide_features(features)
        _check_bundle_features(sf, self.net, self.manifest, self.path)
        with torch.inference_mode():
            probs = self.net.logits_from_pooled(torch.from_numpy(sf.features)).float().softmax(-1).numpy()
        return sf, probs


def bundle_heatmaps(
    bundle: str | Path,
    features: str | Path,
    out: str | Path,
    slides: str | Path | None = None,
    weights: str | None = None,
    max_size: int = 1024,
    alpha: float = 0.5,
    skip_errors: bool = False,
    overwrite: bool = False,
) -> list[dict]:
    """Per slide, a patch bundle's class probabilities for every tile: one PNG per class and a GeoJSON.

    The probabilities are :class:`BundleHead`'s. Writes ``<slide_id>_<class>.png`` (probabilities on a fixed
    0..1 scale, comparable across slides and classes) and ``<slide_id>.geojson`` (``prob_<class>`` measurements,
    the top class as classification). Returns per slide: slide_id, status, n_tiles, heatmaps, geojson,
    class_share (fraction of tiles per top class); the folder follows :func:`heatmap_cohort`.
    """
    check_heatmap_options(max_size, alpha)
    files = list_feature_files(features)
    require_coords(files)
    slide_paths = slide_map(slides)
    head = BundleHead(bundle, weights=weights)
    classes = head.classes

    def paint(f: Path, out: Path) -> dict:
        sf, probs = head.probs(f)
        sid = sf.slide_id
        layers = [(out / f"{sid}_{safe_name(c)}.png", probs[:, j], c) for j, c in enumerate(classes)]
        style = {"cmap": "RdBu_r", "vmin": 0.0, "vmax": 1.0}
        pngs = paint_slide(sid, sf.attrs, sf.coords, layers, slide_paths, max_size, alpha, **style)
        top = [classes[int(i)] for i in probs.argmax(1)] if len(probs) else []
        geo = tiles_geojson(
            sf.coords,
            sf.tile_side,
            {f"prob_{c}": probs[:, j] for j, c in enumerate(classes)},
            out / f"{sid}.geojson",
            classification=top,
            class_names=classes,
        )
        share = {c: (sum(t == c for t in top) / len(top)) if top else 0.0 for c in classes}
        return {"slide_id": sid, "n_tiles": len(sf.coords), "heatmaps": pngs, "geojson": geo, "class_share": share}

    request = {
        "bundle": head.manifest.get("manifest_sha256") or head.manifest.get("sha256"),
        "max_size": max_size,
        "alpha": alpha,
    }
    return heatmap_cohort(out, request, files, paint, skip_errors, overwrite)

"""A small, real slide quality-control task for ``pathotune demo``, cut from vendored HistoQC images.

Three classes of 32 px tiles from low-magnification H&E slide thumbnails: ``pen`` (marker ink),
``tissue`` and ``background`` (empty glass). The images and pen masks are HistoQC's own
(Clear BSD licence, see ``pathotune/assets/histoqc/SOURCE.md``), so the task is real pixels, is
shipped with the package and needs no download.

Split scheme (no leakage between splits). Tiles of one slide are strongly correlated, and a
per-image split is impossible with three pen images because nearly all pen tiles come from the
black-pen image. So each pen image is cut into horizontal bands of tile rows, top to bottom:
``test`` (first 20 % of rows), ``val`` (next 20 %), ``train`` (last 60 %). The tile row on each
band boundary is dropped, so tiles of different splits never share or touch an image region. The
top-first order for val/test was chosen by inspection: the green loop lies in the upper half of
its slide and the red strokes run down the left edge, so this order gives every split red, green
and black ink, tissue and glass. The four stain-template images hold only tissue and are assigned
whole (template1-2 train, template3 val, template4 test), which also makes val/test tissue carry a
stain style unseen in training.

Groups. Every tile names its region as its group (``<image>:band<b>`` for a band of a pen image, the template
name for a template), so intervals resample regions, not tiles. The fixed split has 4 test regions, too few
for an interval. ``split_seed`` draws other splits: each pen image is cut into ``SEEDED_BANDS`` equal bands
of tile rows, a seeded shuffle gives one band of each image to test, one to val and the rest to train (the
tile row on a boundary between bands of different splits is dropped), and another gives one template to test,
one to val and two to train; every split keeps red, green and black ink.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from ..report.io import atomic_dir
from .types import SPLITS

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = [
    "BACKGROUND_MAX",
    "CLASSES",
    "DEFAULT_MAX_PER_CLASS",
    "DEMO_TASK",
    "INK_MAX",
    "PEN_MIN",
    "PEN_SPLIT_BANDS",
    "SPLITS",
    "TEMPLATE_SPLITS",
    "TISSUE_MIN",
    "asset_dir",
    "build_slide_qc_tiles",
    "ink_mask",
    "tint_mask",
    "tissue_mask",
]

DEMO_TASK: dict = dict(
    name="slide quality control",
    # HistoQC does not document the organ of these slides; name none rather than guess.
    organ="tissue",
    stain="H&E",
    classes=("background", "pen", "tissue"),
    description="Tiles from slide thumbnails: pen ink marks, tissue, or empty glass.",
)

CLASSES: tuple[str, ...] = DEMO_TASK["classes"]
PEN_IMAGES: tuple[str, ...] = ("pen_red", "pen_green", "pen_black")
TEMPLATE_SPLITS: dict[str, str] = {
    "template1": "train",
    "template2": "train",
    "template3": "val",
    "template4": "test",
}
# Bands of tile rows, top to bottom, as (split, fraction of rows); see the module docstring.
PEN_SPLIT_BANDS: tuple[tuple[str, float], ...] = (("test", 0.2), ("val", 0.2), ("train", 0.6))
SEEDED_BANDS = 5  # bands per pen image when a split_seed draws the split
# About 240 / 90 / 90 tiles: enough to show learning, small enough to train in seconds on a CPU.
DEFAULT_MAX_PER_CLASS: dict[str, int] = {"train": 80, "val": 30, "test": 30}

# Pen ink strokes on these ~1k px thumbnails are 8-15 px wide, narrower than a 32 px tile: a
# stroke crossing a tile covers roughly 25-45 % of it. At 0.5 nearly all green-ink tiles would be
# lost (5 of 806) and only overlapping strokes would count; 0.25 keeps tiles where ink is
# plainly visible, while tiles with a little ink (0 < fraction < 0.25) are dropped as ambiguous.
PEN_MIN = 0.25
TISSUE_MIN = 0.5
BACKGROUND_MAX = 0.1
GREY_MAX = 215  # tissue is darker than bright glass ...
SATURATION_MIN = 15  # ... and coloured, unlike grey glass edges and dust (HSV S on 0-255)
# HistoQC's masks miss some ink (red hatching, a blue dot, black specks, brown margin dye); a
# non-pen tile with more than 1 % ink-coloured pixels is dropped rather than risk a wrong label.
INK_MAX = 0.01
# Ink has a soft blurred rim (about 12 px on the black stroke) that the masks leave out, so a tile
# only counts as free of pen when no mask pixel lies within half a tile of it.
PEN_MARGIN_FRACTION = 0.5
# Glass has HSV saturation 0-2; pale, sparse tissue (fat, loose stroma) is brighter than the
# tissue grey cut but still tinted. Background needs under 5 % tinted pixels, so such faint
# tissue is dropped instead of being called empty glass.
TINT_MAX = 0.05

_MARKER = ".slide_qc_complete.json"
_BUILDER_VERSION = 3  # bump when tiling, labelling or splitting changes, so old builds are redone


@dataclass(frozen=True)
class _Tile:
    source: str
    row: int
    col: int
    x: int
    y: int
    label: str
    split: str
    group: str


def asset_dir() -> Traversable:
    """The vendored HistoQC folder, found through the package so it works from a wheel too."""
    return files("pathotune") / "assets/histoqc"


def _load(name: str, mode: str) -> Image.Image:
    with (asset_dir() / name).open("rb") as fh:
        img = Image.open(fh)
        img.load()
    return img.convert(mode)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that look like stained tissue: darker than glass and not grey (HistoQC-style test)."""
    img = Image.fromarray(rgb)
    grey = np.asarray(img.convert("L"))
    sat = np.asarray(img.convert("HSV"))[..., 1]
    return (grey < GREY_MAX) & (sat > SATURATION_MIN)


def tint_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels with any colour at all (HSV saturation above the tissue cut), however pale."""
    return np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1] > SATURATION_MIN


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels coloured like ink or dye rather than H&E, to catch ink the HistoQC masks miss.

    Hues are PIL's 0-255 scale. H&E is pink to purple; orange, yellow, green and blue (about
    14-270 degrees) do not occur in it; red ink is far more saturated than eosin (S > 120 versus
    < 100 on these thumbnails); black ink is much darker (V < 80) than any tissue at this
    magnification. Only used on the slide thumbnails: at the templates' higher magnification,
    nuclei are dark and bluish and would trip it.
    """
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).astype(np.int16)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    not_he = (s > 40) & (h >= 10) & (h <= 190)
    red = (s > 120) & ((h >= 236) | (h <= 8))
    return not_he | red | (v < 80)


def _tile_means(mask: np.ndarray, tile: int) -> np.ndarray:
    """Fraction of True pixels in each whole tile of a regular grid (partial edge tiles are cut)."""
    rows, cols = mask.shape[0] // tile, mask.shape[1] // tile
    m = mask[: rows * tile, : cols * tile].reshape(rows, tile, cols, tile)
    return m.mean(axis=(1, 3))


def _near_any(mask: np.ndarray, tile: int, margin: int) -> np.ndarray:
    """Per grid tile: is any mask pixel inside the tile grown by ``margin`` on every side?"""
    rows, cols = mask.shape[0] // tile, mask.shape[1] // tile
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    y0 = np.clip(np.arange(rows) * tile - margin, 0, mask.shape[0])[:, None]
    y1 = np.clip((np.arange(rows) + 1) * tile + margin, 0, mask.shape[0])[:, None]
    x0 = np.clip(np.arange(cols) * tile - margin, 0, mask.shape[1])[None, :]
    x1 = np.clip((np.arange(cols) + 1) * tile + margin, 0, mask.shape[1])[None, :]
    return (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]) > 0


def _label(pen: float, pen_near: bool, tissue: float, tint: float, ink: float) -> str | None:
    """The class of a tile, or None when it is ambiguous and must not be used."""
    if pen >= PEN_MIN:
        return "pen"
    if pen > 0 or pen_near or ink > INK_MAX:
        return None
    if tissue >= TISSUE_MIN:
        return "tissue"
    if tissue < BACKGROUND_MAX and tint < TINT_MAX:
        return "background"
    return None


def _band_plan(split_seed: int | None, image_index: int) -> list[tuple[str, float]]:
    """(split, fraction of rows) per band, top to bottom: PEN_SPLIT_BANDS, or a seeded draw of SEEDED_BANDS."""
    if split_seed is None:
        return list(PEN_SPLIT_BANDS)
    order = ["test", "val"] + ["train"] * (SEEDED_BANDS - 2)
    perm = np.random.default_rng([split_seed, image_index]).permutation(SEEDED_BANDS)
    return [(order[i], 1.0 / SEEDED_BANDS) for i in perm]


def _band_split(row: int, n_rows: int, plan: list[tuple[str, float]] | None = None) -> tuple[str, int] | None:
    """(split, band index) of a tile row; None for the row on a boundary between bands of different splits."""
    plan = plan or list(PEN_SPLIT_BANDS)
    edges, acc = [], 0.0
    for _, frac in plan[:-1]:
        acc += frac
        edges.append(round(acc * n_rows))
    band = sum(row > e for e in edges)
    if row in edges and plan[band][0] != plan[band + 1][0]:
        return None
    return plan[band][0], band


def _template_splits(split_seed: int | None) -> dict[str, str]:
    """Template -> split: TEMPLATE_SPLITS, or a seeded draw of one test, one val and two train."""
    if split_seed is None:
        return dict(TEMPLATE_SPLITS)
    order = ["test", "val", "train", "train"]
    perm = np.random.default_rng([split_seed, len(PEN_IMAGES)]).permutation(len(order))
    return {name: order[i] for name, i in zip(TEMPLATE_SPLITS, perm, strict=True)}


def _candidate_tiles(tile: int, split_seed: int | None = None) -> tuple[list[_Tile], dict[str, np.ndarray]]:
    """Every labelled, split-assigned tile of every image, with the RGB arrays to cut them from."""
    tiles: list[_Tile] = []
    images: dict[str, np.ndarray] = {}
    for image_index, name in enumerate(PEN_IMAGES):
        plan = _band_plan(split_seed, image_index)
        rgb = np.asarray(_load(f"{name}.png", "RGB"))
        mask_img = _load(f"{name}_mask.png", "L")
        if mask_img.size != (rgb.shape[1], rgb.shape[0]):
            mask_img = mask_img.resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.NEAREST)
        images[name] = rgb
        mask = np.asarray(mask_img) > 0
        pen = _tile_means(mask, tile)
        near = _near_any(mask, tile, round(tile * PEN_MARGIN_FRACTION))
        tis = _tile_means(tissue_mask(rgb), tile)
        tint = _tile_means(tint_mask(rgb), tile)
        ink = _tile_means(ink_mask(rgb), tile)
        n_rows, n_cols = pen.shape
        for r in range(n_rows):
            where = _band_split(r, n_rows, plan)
            if where is None:
                continue
            split, band = where
            for c in range(n_cols):
                rc = (r, c)
                label = _label(float(pen[rc]), bool(near[rc]), float(tis[rc]), float(tint[rc]), float(ink[rc]))
                if label is not None:
                    tiles.append(_Tile(name, r, c, c * tile, r * tile, label, split, f"{name}:band{band}"))
    for name, split in _template_splits(split_seed).items():
        rgb = np.asarray(_load(f"{name}.png", "RGB"))
        images[name] = rgb
        tis = _tile_means(tissue_mask(rgb), tile)
        for r, c in zip(*np.nonzero(tis >= TISSUE_MIN), strict=True):
            tiles.append(_Tile(name, int(r), int(c), int(c) * tile, int(r) * tile, "tissue", split, name))
    return tiles, images


def _subsample(tiles: list[_Tile], caps: Mapping[str, int | None], seed: int) -> list[_Tile]:
    """Seeded cap per split and class, taking tiles round-robin over source images.

    Round-robin keeps the plentiful black-pen and glass tiles from crowding out the red and green
    ink and the thumbnail tissue, so each class keeps the variety of all its sources.
    """
    rng = np.random.default_rng(seed)
    kept: list[_Tile] = []
    for split in SPLITS:
        for cls in CLASSES:
            by_source: dict[str, list[_Tile]] = {}
            for t in tiles:
                if t.split == split and t.label == cls:
                    by_source.setdefault(t.source, []).append(t)
            queues = []
            for source in sorted(by_source):
                group = by_source[source]
                queues.append([group[i] for i in rng.permutation(len(group))])
            cap = caps[split]
            limit = sum(len(q) for q in queues) if cap is None else cap
            taken: list[_Tile] = []
            depth = 0
            while len(taken) < limit and any(depth < len(q) for q in queues):
                for q in queues:
                    if depth < len(q) and len(taken) < limit:
                        taken.append(q[depth])
                depth += 1
            kept.extend(taken)
    return kept


def _resolve_caps(max_per_class: Mapping[str, int | None] | None) -> dict[str, int | None]:
    caps: dict[str, int | None] = dict(DEFAULT_MAX_PER_CLASS)
    for key, value in (max_per_class or {}).items():
        if key not in SPLITS:
            raise ConfigError(f"max_per_class: unknown split {key!r}; use keys from {SPLITS}.")
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"max_per_class[{key!r}] = {value!r}: give a positive integer, or None for no cap.")
        caps[key] = value
    return caps


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _provenance(counts: dict[str, dict[str, int]], params: dict) -> str:
    vendored = (asset_dir() / "SOURCE.md").read_text(encoding="utf-8")
    return (
        "# Slide quality-control demo tiles\n\n"
        "Built by `pathotune.data.demo.build_slide_qc_tiles` with parameters "
        f"`{json.dumps(params, sort_keys=True)}`.\n"
        f"Each tile is an unmodified {params['tile']} px crop of one vendored image; `manifest.csv` gives "
        "its source image and the pixel position (x, y) of its top-left corner. The labels come from "
        "HistoQC's pen masks and a tissue test; the split is by disjoint image bands (see the module "
        "docstring of `pathotune.data.demo`).\n\n"
        f"Counts per split and class: `{json.dumps(counts)}`.\n\n"
        "The images are covered by the Clear BSD licence in `LICENSE.txt` (copied here).\n\n"
        "---\n\n" + vendored
    )


def _write(dest: Path, tiles: list[_Tile], images: dict[str, np.ndarray], tile: int, params: dict) -> dict:
    counts = {s: dict.fromkeys(CLASSES, 0) for s in SPLITS}
    for split in SPLITS:
        for cls in CLASSES:
            (dest / split / cls).mkdir(parents=True)
    rows = []
    for t in sorted(tiles, key=lambda t: (SPLITS.index(t.split), t.label, t.source, t.row, t.col)):
        rel = f"{t.split}/{t.label}/{t.source}_{t.row}_{t.col}.png"
        crop = images[t.source][t.y : t.y + tile, t.x : t.x + tile]
        Image.fromarray(crop).save(dest / rel)
        rows.append((rel, t.label, t.split, t.source, t.x, t.y, t.group))
        counts[t.split][t.label] += 1
    with open(dest / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(("path", "label", "split", "source_image", "x", "y", "group"))
        writer.writerows(rows)
    (dest / "LICENSE.txt").write_bytes((asset_dir() / "LICENSE.txt").read_bytes())
    (dest / "SOURCE.md").write_text(_provenance(counts, params), encoding="utf-8")
    # The marker goes last: a folder holding it is complete.
    (dest / _MARKER).write_text(json.dumps({"params": params, "counts": counts}, indent=1, sort_keys=True))
    return counts


def build_slide_qc_tiles(
    out_dir: Path,
    tile: int = 32,
    seed: int = 0,
    max_per_class: dict | None = None,
    split_seed: int | None = None,
) -> dict:
    """Cut the demo tiles into ``out_dir/{split}/{class}/<image>_<row>_<col>.png`` and return counts.

    ``max_per_class`` maps a split to the most tiles kept per class (None: no cap); missing splits
    use ``DEFAULT_MAX_PER_CLASS`` (80 / 30 / 30, about 240 / 90 / 90 tiles). ``split_seed``: draw the regions
    of each split (module docstring) instead of the fixed bands. Also writes ``manifest.csv``
    (path,label,split,source_image,x,y,group: read it as ``--data`` to keep the groups), ``SOURCE.md`` and
    ``LICENSE.txt``.

    The folder is built in a temporary sibling and renamed into place, so a crash never leaves a
    half-built ``out_dir``; a complete build made with the same parameters is reused untouched.
    Returns ``{split: {class: n}}``.
    """
    if not isinstance(tile, int) or isinstance(tile, bool) or not 8 <= tile <= 256:
        raise ConfigError(f"tile = {tile!r}: give an integer size in pixels between 8 and 256.")
    out_dir = Path(out_dir)
    caps = _resolve_caps(max_per_class)
    if split_seed is not None and (not isinstance(split_seed, int) or isinstance(split_seed, bool) or split_seed < 0):
        raise ConfigError(f"split_seed = {split_seed!r}: give an integer >= 0, or None for the fixed bands.")
    params = {"version": _BUILDER_VERSION, "tile": tile, "seed": int(seed), "max_per_class": caps}
    if split_seed is not None:
        params["split_seed"] = split_seed

    done = _read_marker(out_dir)
    if done is not None and done.get("params") == params:
        return done["counts"]
    if done is None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} exists and is not a demo tile folder; give a new or empty folder.")

    tiles, images = _candidate_tiles(tile, split_seed)
    tiles = _subsample(tiles, caps, seed)

    try:
        with atomic_dir(out_dir) as tmp:  # an empty folder or a stale build of ours (checked above) is replaced
            counts = _write(tmp, tiles, images, tile, params)
    except OSError:
        raced = _read_marker(out_dir)  # another process finished first
        if raced is None or raced.get("params") != params:
            raise
        counts = raced["counts"]
    return counts

"""Nucleus classification on real H&E from the histolytics 0.3.0 wheel (layout ``histolytics-hgsc``).

histolytics (BSD-3-Clause, Copyright (c) 2024-2025 HautaniemiLab, https://github.com/HautaniemiLab/histolytics)
ships two 1500x1500 px H&E crops of high-grade serous ovarian carcinoma (~0.5 um/px, one slide) with
segmented, typed nuclei: ``hgsc_nest.jpg`` + ``hgsc_nest.parquet`` (1295 nuclei, mostly tumour nest) and
``hgsc_stromal_he.jpg`` + ``hgsc_stromal_cells.parquet`` (423 nuclei, mostly stroma).  Parquet columns:
``geometry`` (WKB polygon in pixel coordinates, x = column, y = row) and ``class_name``.  Each nucleus becomes
a ``crop`` x ``crop`` RGB tile whose centre pixel (``crop // 2``) is the pixel holding the polygon centroid;
nuclei whose window leaves the image are skipped.

Splits are spatial, never by random tile: neighbouring tiles share pixels and tissue context, so a random
split would leak.  Each image is cut into a grid of blocks (``SPLIT_TABLE``: rows top to bottom, columns left
to right, boundaries at ``size * i // n``) and whole blocks go to one split.  A nucleus whose window crosses
or touches an inner block boundary is dropped, so windows of different blocks are at least 2 px apart and
windows of different splits never overlap or touch.

How the table was chosen (3x3 blocks of 500 px per image, crop 48): all 3^9 x 3^9 assignments were scored
on the per-block class counts; among those giving val and test each 18-22% of the tiles and train at least
half of every class, the table maximises the smallest share any class has in val or test (18.4%).
Neoplastic nuclei are nearly all in the nest image, so its blocks carry that class; the stromal image adds
connective tissue and its few inflammatory/neoplastic nuclei.  Resulting tiles (crop 48, 1373 in all):

    split  connective  inflammatory  neoplastic  total
    train         378           297         125    800  (58%)
    val           110           110          53    273  (20%)
    test          110           132          58    300  (22%)

Both images come from one slide, so scores measure within-slide generalisation only.

Groups: a tile's block (``<image>:r<row>c<col>``), so intervals resample blocks, not nuclei. The fixed split
has 3 test blocks, too few for an interval; ``split_seed`` draws group k-fold splits (``group_kfold_split``)
over a finer grid (``blocks`` per side, default 6: 250 px, holding the 3x3 boundaries), dropping the windows
that cross a fine boundary.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...backbones.bundled import cache_dir
from ...errors import ConfigError, DataError, one_line
from ...report.io import atomic_dir
from ..images import list_images
from ..splits import build_source, group_kfold_split
from ..types import SPLITS, PatchSource
from .base import Layout

CLASSES: tuple[str, ...] = ("connective", "inflammatory", "neoplastic")
VERSION = "0.3.0"
WHEEL_NAME = f"histolytics-{VERSION}-py3-none-any.whl"
DATA_DIR = "histolytics/data"
# image stem -> (image file, nuclei file)
IMAGES: dict[str, tuple[str, str]] = {
    "hgsc_nest": ("hgsc_nest.jpg", "hgsc_nest.parquet"),
    "hgsc_stromal": ("hgsc_stromal_he.jpg", "hgsc_stromal_cells.parquet"),
}
FILES: tuple[str, ...] = tuple(f for pair in IMAGES.values() for f in pair)
SplitTable = Mapping[str, Sequence[Sequence[str]]]
SPLIT_TABLE: dict[str, tuple[tuple[str, ...], ...]] = {  # fmt: skip
    "hgsc_nest": (("train", "val", "train"), ("test", "train", "train"), ("train", "test", "val")),
    "hgsc_stromal": (("test", "train", "train"), ("train", "train", "train"), ("train", "val", "val")),
}
# Bump when tiling or splitting changes, so builds made by older code are redone (2: group column, image sizes).
SPLIT_VERSION = "2"
FINE_BLOCKS = 6  # blocks per side for seeded splits: 250 px on these 1500 px images, aligned with the 3x3 grid
STAMP = "build.json"
GET = f"pip download histolytics=={VERSION} --no-deps -d DIR"


@dataclass(frozen=True)
class HgscFiles:
    """The four source files' bytes and where they came from (a wheel or a folder)."""

    origin: Path
    blobs: dict[str, bytes]

    def sha256(self) -> dict[str, str]:
        return {name: hashlib.sha256(self.blobs[name]).hexdigest() for name in FILES}


def _missing(where: object, what: str) -> DataError:
    return DataError(f"{where}: {what}; run `{GET}` then pass layout:histolytics-hgsc:DIR")


def _read_wheel(wheel: Path) -> HgscFiles:
    """Read the four members straight from the zip; nothing else in it is touched."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            absent = [f for f in FILES if f"{DATA_DIR}/{f}" not in names]
            if absent:
                raise _missing(wheel, f"no {DATA_DIR}/{absent[0]} in this wheel")
            return HgscFiles(wheel, {f: zf.read(f"{DATA_DIR}/{f}") for f in FILES})
    except (OSError, zipfile.BadZipFile) as e:
        raise _missing(wheel, f"not a readable wheel ({one_line(e)})") from None


def find_hgsc_files(path: str | Path | None) -> HgscFiles:
    """Locate and read the four HGSC files.

    ``path`` may be the wheel, a folder holding it, a folder with ``histolytics/data/``, or a folder with
    the four files; empty means an installed ``histolytics`` package (found without importing it).
    """
    if not path:
        spec = importlib.util.find_spec("histolytics")
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            raise _missing("histolytics-hgsc", "no path given and no installed histolytics package")
        folder = Path(locations[0]) / "data"
    else:
        folder = Path(path).expanduser()
        if folder.is_file():
            return _read_wheel(folder)
        if not folder.is_dir():
            raise _missing(folder, "no such file or folder")
        if not (folder / FILES[0]).is_file() and (folder / DATA_DIR / FILES[0]).is_file():
            folder = folder / DATA_DIR
        elif not (folder / FILES[0]).is_file():
            wheels = sorted(folder.glob("histolytics-*.whl"), key=lambda p: (p.name != WHEEL_NAME, p.name))
            if wheels:
                return _read_wheel(wheels[0])
    absent = [f for f in FILES if not (folder / f).is_file()]
    if absent:
        raise _missing(folder, f"no {absent[0]} (nor a {WHEEL_NAME}) here")
    return HgscFiles(folder, {f: (folder / f).read_bytes() for f in FILES})


def _geo() -> tuple[Any, Any]:
    # pyarrow and shapely are the optional "hgsc" extra: imported here, so the rest of pathotune runs without them.
    try:
        import pyarrow.parquet as pq
        import shapely
    except ImportError as e:
        raise ConfigError(
            f'layout histolytics-hgsc needs pyarrow and shapely ({e.name} is missing); pip install "pathotune[hgsc]"'
        ) from None
    return pq, shapely


def _nuclei(blob: bytes, name: str) -> tuple[np.ndarray, list[str]]:
    """Centroid pixel (x, y) per nucleus (-1 where the geometry is empty) and its class name."""
    pq, shapely = _geo()
    try:
        table = pq.read_table(io.BytesIO(blob))
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{name}: cannot read the parquet file ({one_line(e)})") from None
    for col in ("geometry", "class_name"):
        if col not in table.column_names:
            raise DataError(f"{name}: no column '{col}'; this is not a histolytics nuclei file")
    try:
        geoms = shapely.from_wkb(table.column("geometry").to_pylist())
    except Exception as e:  # shapely.errors.GEOSException and friends
        raise DataError(f"{name}: bad WKB geometry ({one_line(e)})") from None
    xy = np.full((len(geoms), 2), -1, dtype=np.int64)  # empty geometries fall off the image below
    ok = ~shapely.is_empty(geoms)
    xy[ok] = np.floor(shapely.get_coordinates(shapely.centroid(geoms[ok]))).astype(np.int64)
    classes = [str(c) for c in table.column("class_name").to_pylist()]
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown:
        raise DataError(f"{name}: class_name {unknown[0]!r} is not one of {', '.join(CLASSES)}")
    return xy, classes


def _bounds(size: int, n: int) -> list[int]:
    return [size * i // n for i in range(n + 1)]


def _block(start: int, end: int, bounds: Sequence[int]) -> int | None:
    """Block holding pixels [start, end), which must not cross or touch an inner boundary; else None."""
    last = len(bounds) - 2
    for i in range(last + 1):
        lo = bounds[i] + (i > 0)
        hi = bounds[i + 1] - (i < last)
        if lo <= start and end <= hi:
            return i
    return None


def window_block(n_rows: int, n_cols: int, width: int, height: int, x0: int, y0: int, crop: int):
    """(row, col) of the block of an n_rows x n_cols grid holding the window at (x0, y0); None when it leaves the
    image or crosses or touches an inner boundary."""
    if x0 < 0 or y0 < 0 or x0 + crop > width or y0 + crop > height:
        return None
    col = _block(x0, x0 + crop, _bounds(width, n_cols))
    row = _block(y0, y0 + crop, _bounds(height, n_rows))
    return None if col is None or row is None else (row, col)


def assign_split(rows: Sequence[Sequence[str]], width: int, height: int, x0: int, y0: int, crop: int) -> str | None:
    """Split of the window with top-left (x0, y0), from the block grid ``rows``; None when it is dropped."""
    block = window_block(len(rows), len(rows[0]), width, height, x0, y0, crop)
    return None if block is None else rows[block[0]][block[1]]


def _check_table(table: SplitTable) -> dict[str, list[list[str]]]:
    out = {}
    for image in IMAGES:
        rows = [list(r) for r in table.get(image, ())]
        if not rows or any(len(r) != len(rows[0]) or not r for r in rows):
            raise ConfigError(f"split table for {image} must be a non-empty grid of equal-length rows")
        bad = sorted({s for r in rows for s in r} - set(SPLITS))
        if bad:
            raise ConfigError(f"split table for {image} names {bad[0]!r}; use {', '.join(SPLITS)}")
        out[image] = rows
    return out


def _stamp(files: HgscFiles, crop: int, table: dict[str, list[list[str]]]) -> dict[str, Any]:
    return {"crop": crop, "split_version": SPLIT_VERSION, "table": table, "sha256": files.sha256()}


def _read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_fresh(folder: Path, stamp: dict[str, Any]) -> dict[str, Any] | None:
    found = _read_stamp(folder)
    return None if found is None or any(found.get(k) != v for k, v in stamp.items()) else found


def _source_md(result: dict[str, Any]) -> str:
    crop, counts = result["crop"], result["counts"]
    grid = "\n".join(f"- {image}: " + " / ".join(" ".join(r) for r in rows) for image, rows in result["table"].items())
    table = "\n".join(f"| {s} | " + " | ".join(str(counts[s][c]) for c in CLASSES) + " |" for s in SPLITS)
    return f"""# histolytics-hgsc nucleus tiles

Source: histolytics {VERSION} wheel (`{GET}`), files {", ".join(f"{DATA_DIR}/{f}" for f in FILES)}
(sha256 in {STAMP}). Project: https://github.com/HautaniemiLab/histolytics. Licence: BSD-3-Clause, Copyright (c)
2024-2025, HautaniemiLab (full text in the wheel's histolytics-{VERSION}.dist-info/licenses/LICENSE); these
tiles are derived from that data.

Tiles: {crop}x{crop} px RGB PNG, one per nucleus, centre pixel ({crop // 2}, {crop // 2}) = the pixel holding
the polygon centroid; nuclei whose window leaves the image are skipped. manifest.csv gives path, label, split,
image, the centre pixel x (column), y (row) in the source image, and the tile's block (its group).

Split (version {SPLIT_VERSION}): spatial, never by random tile. Each image is cut into the block grid below
(rows top to bottom, columns left to right, boundaries at size*i//n); whole blocks go to one split, and nuclei
whose window crosses or touches an inner block boundary are dropped, so windows of different splits never
overlap or touch. The table was fixed by exhaustive search on per-block class counts (see
pathotune/data/layouts/hgsc.py). Both images come from one slide: scores measure within-slide generalisation only.

{grid}

| split | {" | ".join(CLASSES)} |
|---|---|---|---|
{table}
"""


def _write_tiles(files: HgscFiles, dest: Path, crop: int, table: dict[str, list[list[str]]]) -> dict[str, Any]:
    half = crop // 2
    counts = {s: dict.fromkeys(CLASSES, 0) for s in SPLITS}
    skipped = {"outside": 0, "boundary": 0}
    rows: list[list[Any]] = []
    sizes: dict[str, list[int]] = {}
    for split in SPLITS:
        for cls in CLASSES:
            (dest / split / cls).mkdir(parents=True)
    for image, (img_name, nuc_name) in IMAGES.items():
        try:
            with Image.open(io.BytesIO(files.blobs[img_name])) as im:
                pixels = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DataError(f"{files.origin}: cannot decode {img_name} ({one_line(e)})") from None
        height, width = pixels.shape[:2]
        sizes[image] = [width, height]
        xy, classes = _nuclei(files.blobs[nuc_name], f"{files.origin}:{nuc_name}")
        for idx, ((x, y), cls) in enumerate(zip(xy.tolist(), classes, strict=True)):
            x0, y0 = x - half, y - half
            if x0 < 0 or y0 < 0 or x0 + crop > width or y0 + crop > height:
                skipped["outside"] += 1
                continue
            grid = table[image]
            block = window_block(len(grid), len(grid[0]), width, height, x0, y0, crop)
            if block is None:
                skipped["boundary"] += 1
                continue
            split = grid[block[0]][block[1]]
            rel = f"{split}/{cls}/{image}_{idx}.png"
            Image.fromarray(pixels[y0 : y0 + crop, x0 : x0 + crop]).save(dest / rel)
            rows.append([rel, cls, split, image, x, y, f"{image}:r{block[0]}c{block[1]}"])
            counts[split][cls] += 1
    with (dest / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "image", "x", "y", "group"])
        writer.writerows(rows)
    return {"tiles": len(rows), "counts": counts, "skipped": skipped, "sizes": sizes}


def build_hgsc_tiles(
    source_path: str | Path | None, out_dir: str | Path, crop: int = 48, table: SplitTable = SPLIT_TABLE
) -> dict[str, Any]:
    """Write nucleus tiles to ``out_dir/<split>/<class>/<image>_<idx>.png`` + manifest.csv + SOURCE.md.

    The build goes to a temp folder beside ``out_dir`` and is moved in whole (``report.io.atomic_dir``), so
    readers never see half a build; a finished build with the same crop, split table and source hashes is
    reused as is.
    Returns the stamp: parameters, tile counts per split and class, skipped nuclei, and ``reused``.
    """
    if not isinstance(crop, int) or crop < 2:
        raise ConfigError(f"crop={crop!r} must be an integer >= 2 (pixels)")
    grid = _check_table(table)
    _geo()  # fail on missing extras before touching any file
    files = find_hgsc_files(source_path)
    out = Path(out_dir).expanduser()
    stamp = _stamp(files, crop, grid)
    found = _is_fresh(out, stamp)
    if found is not None:
        return {**found, "reused": True}
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _read_stamp(out) is None)):
        raise DataError(f"{out} exists and is not a histolytics-hgsc build; pick another folder or remove it")
    started = time.perf_counter()
    try:
        with atomic_dir(out) as tmp:  # an empty folder or a stale build at ``out`` is replaced
            result = {**stamp, **_write_tiles(files, tmp, crop, grid)}
            result["seconds"] = round(time.perf_counter() - started, 2)
            (tmp / "SOURCE.md").write_text(_source_md(result), encoding="utf-8")
            (tmp / STAMP).write_text(json.dumps(result, indent=1), encoding="utf-8")
    except OSError as e:
        found = _is_fresh(out, stamp)  # another process finished the same build first
        if found is not None:
            return {**found, "reused": True}
        raise DataError(f"cannot write tiles to {out}: {one_line(e)}; pick a writable folder") from e
    return {**result, "reused": False}


def default_cache(crop: int) -> Path:
    """Same cache root as the bundled weights ($PATHOTUNE_CACHE or ~/.cache/pathotune)."""
    return cache_dir() / "hgsc" / f"crop{crop}"


def read_histolytics_hgsc(
    root: Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    crop: int = 48,
    cache: str | Path | None = None,
    split_seed: int | None = None,
    blocks: int = FINE_BLOCKS,
) -> PatchSource:
    """HGSC nuclei as 3-class tiles grouped by block: the fixed split of ``SPLIT_TABLE`` (fractions ignored: random
    val/test tiles would neighbour train ones), or with ``split_seed`` a group k-fold over ``blocks`` x ``blocks``
    blocks with the fractions. ``root``: see :func:`find_hgsc_files`; tiles are built once into ``cache``."""
    out = Path(cache).expanduser() if cache is not None else default_cache(crop)
    built = build_hgsc_tiles(root, out, crop=crop)
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    origin = f"histolytics-hgsc:{root}"
    if split_seed is None:
        items = [
            (p, c, s, rows[f"{s}/{c}/{p.name}"]["group"])
            for s in SPLITS
            for c in CLASSES
            for p in list_images(out / s / c)
        ]
        return build_source(items, origin, 0.0, 0.0, seed, classes=CLASSES)
    if not isinstance(blocks, int) or blocks < 1 or any(blocks % len(t) for t in SPLIT_TABLE.values()):
        raise ConfigError(f"blocks={blocks!r} must be a positive multiple of 3, so its grid holds the 3x3 one")
    half = crop // 2
    kept = []
    for rel, r in sorted(rows.items()):
        width, height = built["sizes"][r["image"]]
        block = window_block(blocks, blocks, width, height, int(r["x"]) - half, int(r["y"]) - half, crop)
        if block is not None:
            kept.append((out / rel, r["label"], f"{r['image']}:r{block[0]}c{block[1]}"))
    parts = group_kfold_split(
        [g for _, _, g in kept], [CLASSES.index(c) for _, c, _ in kept], val_fraction, test_fraction, split_seed, origin
    )
    items = [(kept[i][0], kept[i][1], split, kept[i][2]) for split, idx in parts.items() for i in idx]
    return build_source(items, origin, 0.0, 0.0, seed, classes=CLASSES)


LAYOUT = Layout(
    "histolytics-hgsc",
    "histolytics 0.3.0 wheel (or its data folder): HGSC H&E nucleus tiles, 3 cell classes, spatial split",
    read_histolytics_hgsc,
    accepts_file=True,
)

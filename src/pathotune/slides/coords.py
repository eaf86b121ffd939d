"""Tile coordinates made by TRIDENT or CLAM, so features can be extracted on exactly the tiles another pipeline
chose (to compare models on the same tiles, or to reuse a cohort's patching).

Both store a dataset ``coords`` (N, 2) of level-0 top-left (x, y) corners; they differ in how they say a tile's
size, which this module turns into one answer, the tile side in level-0 pixels:

- TRIDENT, ``<slide>_patches.h5`` under ``patches/``: attributes ``patch_size`` (pixels at the target
  magnification) and ``patch_size_level0`` (the same side at level 0), besides ``overlap``,
  ``level0_width``/``level0_height`` (checked against the slide), ``level0_magnification``,
  ``target_magnification``;
- CLAM, ``patches/<slide>.h5``: ``patch_size`` pixels read at pyramid level ``patch_level``, whose downsample is
  the ``downsample`` attribute when present, else the slide's own.

The attributes sit on the ``coords`` dataset (older files: on the file); both places are read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import DataError, one_line
from ..features.foreign import trident_coords_attrs
from ..report.io import atomic_path
from .discover import slide_id
from .reader import SlideReader
from .tiling import TilePlan

__all__ = [
    "COORDS_SUFFIXES",
    "PATCHES_SUFFIX",
    "PatchCoords",
    "coords_files",
    "match_coords",
    "read_patch_coords",
    "write_patch_coords",
]

PATCHES_SUFFIX = "_patches.h5"
COORDS_SUFFIXES = (PATCHES_SUFFIX, ".h5")  # TRIDENT's name first: "a_patches.h5" is slide "a", not "a_patches"


@dataclass(frozen=True)
class PatchCoords:
    """One slide's tiles from another tool.

    tool: ``trident`` or ``clam``.
    coords: (N, 2) int64 level-0 top-left (x, y) of each tile.
    tile_size: the tile's side in the pixels that tool's model saw (TRIDENT's patch_size at the target
        magnification; CLAM's patch_size at its patch_level).
    tile_size_level0: the same side in level-0 pixels.
    overlap: pixels shared by neighbouring tiles, in tile pixels (0 when the file does not say).
    """

    path: Path
    tool: str
    coords: np.ndarray
    tile_size: int
    tile_size_level0: float
    overlap: int

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _stem(name: str) -> str | None:
    for suffix in COORDS_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def coords_files(folder: str | Path) -> dict[str, Path]:
    """Slide id -> coords file in ``folder`` or its ``patches/`` subfolder (TRIDENT's and CLAM's layout), matched
    by stem with a ``_patches`` suffix stripped; a slide with two files there is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"coords folder {folder} not found; pass the folder of TRIDENT or CLAM patch .h5 files")
    found: dict[str, Path] = {}
    for d in (folder, folder / "patches"):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            sid = _stem(p.name)
            if sid is None or p.name.startswith(".") or not p.is_file():
                continue
            if sid in found:
                raise DataError(
                    f"coords files {found[sid]} and {p} both belong to slide '{sid}'; keep one of them in {folder}"
                )
            found[sid] = p
    return found


def _attrs(f: h5py.File) -> dict[str, Any]:
    """The coords dataset's attributes over the file's (older writers put them on the file)."""
    out = {str(k): v for k, v in f.attrs.items()}
    out.update({str(k): v for k, v in f["coords"].attrs.items()})
    return out


def _number(path: Path, attrs: Mapping[str, Any], key: str) -> float | None:
    if key not in attrs:
        return None
    value = np.asarray(attrs[key]).reshape(-1)
    try:
        number = float(value.astype(np.float64).mean()) if value.size else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        shown = np.asarray(attrs[key]).tolist()
        raise DataError(f"coords file {path}: attribute {key}={shown!r} is not a number >= 0; re-create it")
    return number


def read_patch_coords(path: str | Path, reader: SlideReader) -> PatchCoords:
    """The tiles of ``path`` (TRIDENT or CLAM) for the slide open in ``reader``, checked against that slide."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise DataError(f"coords file {path} has no 'coords' dataset; pass TRIDENT or CLAM patch files")
            attrs = _attrs(f)
            raw = np.asarray(f["coords"][()])
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DataError(f"coords file {path} is not a readable HDF5 file ({one_line(e, 200)}); re-create it") from None
    if raw.size == 0:
        raw = raw.reshape(0, 2)
    if raw.ndim != 2 or raw.shape[1] != 2 or not np.issubdtype(raw.dtype, np.number):
        raise DataError(f"coords file {path}: 'coords' must be (N, 2) numbers (x, y), got {raw.shape} {raw.dtype}")
    if not np.isfinite(raw).all():
        raise DataError(f"coords file {path}: 'coords' holds NaN or infinite values; re-create it")
    coords = np.round(raw).astype(np.int64)
    unique, first = np.unique(coords, axis=0, return_index=True) if len(coords) else (coords, np.zeros(0, int))
    if len(unique) != len(coords):  # a tile listed twice would weigh twice in a bag: kept once, and said so
        print(f"note: coords file {path} lists {len(coords) - len(unique)} tile(s) more than once; each is kept once")
        coords = coords[np.sort(first)]

    width, height = reader.dimensions
    size = _number(path, attrs, "patch_size")
    if not size:
        raise DataError(f"coords file {path} has no patch_size attribute > 0; it is not a TRIDENT or CLAM patch file")
    side0 = _number(path, attrs, "patch_size_level0")
    if side0 is not None:
        tool = "trident"
        w0, h0 = _number(path, attrs, "level0_width"), _number(path, attrs, "level0_height")
        if w0 is not None and h0 is not None and (int(w0), int(h0)) != (width, height):
            raise DataError(
                f"coords file {path} was made for a {int(w0)}x{int(h0)} slide but {reader.path} is {width}x{height}; "
                "pass the coords made from this slide"
            )
    else:
        level = _number(path, attrs, "patch_level")
        if level is None:
            raise DataError(
                f"coords file {path} has neither TRIDENT's patch_size_level0 nor CLAM's patch_level attribute; "
                "re-create it with TRIDENT or CLAM"
            )
        tool = "clam"
        downsample = _number(path, attrs, "downsample")
        if downsample is None:
            if int(level) >= reader.level_count:
                raise DataError(
                    f"coords file {path} reads at patch_level {int(level)} but {reader.path} has "
                    f"{reader.level_count} level(s); pass the coords made from this slide"
                )
            downsample = reader.level_downsamples[int(level)]
        side0 = size * downsample
    if not side0:
        raise DataError(f"coords file {path} gives a tile side of 0 level-0 pixels; re-create it")
    overlap = int(_number(path, attrs, "overlap") or 0)
    if overlap >= size:
        raise DataError(f"coords file {path}: overlap {overlap} is not below patch_size {int(size)}; re-create it")
    if len(coords) and ((coords < 0).any() or (coords[:, 0] >= width).any() or (coords[:, 1] >= height).any()):
        x, y = coords.max(axis=0)
        raise DataError(
            f"coords file {path} has tiles starting at up to ({x}, {y}), outside the {width}x{height} slide "
            f"{reader.path}; pass the coords made from this slide"
        )
    return PatchCoords(path, tool, coords, int(size), float(side0), overlap)


def match_coords(slides: list[Path], folder: str | Path) -> dict[Path, Path]:
    """Each slide's coords file in ``folder`` (see :func:`coords_files`); a slide without one is an error."""
    files = coords_files(folder)
    out = {}
    for s in slides:
        sid = slide_id(s)
        if sid not in files:
            raise DataError(
                f"slide '{sid}' has no coords file in {folder} (looked for {sid}_patches.h5 or {sid}.h5, also under "
                "patches/); pass the TRIDENT or CLAM output made from these slides"
            )
        out[s] = files[sid]
    return out


def write_patch_coords(path: str | Path, plan: TilePlan, overlap: int) -> Path:
    """``<slide_id>_patches.h5`` as TRIDENT writes it: ``coords`` (N, 2) int64 level-0 corners with TRIDENT's
    attributes (so ``slides extract --coords`` and TRIDENT itself read it), plus ``tissue`` (N,) float32, each
    tile's tissue fraction. Written under a temporary name and renamed."""
    path = Path(path)
    attrs = {
        "mpp": plan.slide_mpp,
        "target_mpp": plan.target_mpp,
        "dimensions": plan.dimensions,
        "tile_size": plan.tile_size,
        "tile_size_level0": plan.tile_size_level0,
        "overlap": overlap,
        "slide_id": slide_id(plan.slide),
    }
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        coords = f.create_dataset("coords", data=np.ascontiguousarray(plan.coords, dtype=np.int64).reshape(-1, 2))
        coords.attrs.update(trident_coords_attrs(attrs, path.parent))
        f.create_dataset("tissue", data=np.ascontiguousarray(plan.tissue, dtype=np.float32))
    return path

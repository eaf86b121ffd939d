"""Feature files of other tools (TRIDENT, CLAM) read as PathoTune's own, and TRIDENT's coords attributes for ours.

The layout is told from the file itself, never from a flag:

- ``pathotune``: root attributes (:data:`.h5.ATTRIBUTES`); ``coords`` also carries TRIDENT's attributes, so
  TRIDENT's slide encoders (which read ``coords.attrs['patch_size_level0']``) take our files as they are;
- ``trident``: ``features`` and ``coords`` (level-0 x, y), no root attributes, ``coords`` attributes
  ``patch_size`` (target pixels), ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``overlap``, ``level0_width``, ``level0_height`` (and ``name``, ``savetodir``); ``features`` may name its
  ``encoder``;
- ``clam``: CLAM's ``h5_files/``: ``features`` float32 and ``coords`` int32 (level-0 x, y) with no attributes at
  all; where ``coords`` carries the attributes of CLAM's patch files (``patch_size``, ``patch_level``,
  ``downsample``) they are used. With nothing recorded, the tile side is the step of the coordinate grid (CLAM's
  default step is the patch size);
- ``pt``: CLAM's ``pt_files/``: one plain (N, D) float tensor per slide, read with ``weights_only=True``; it holds
  no coordinates, so it trains and predicts but paints no heat map.

Magnification and microns per pixel follow TRIDENT's convention, ``mpp = 10 / magnification``: 20x is 0.5 um/px,
40x is 0.25 um/px. Like TRIDENT, PathoTune records a magnification as its scanner bucket (5, 10, 20, 40, 60, 80)
when ``10 / mpp`` is within 5% of one (a 0.2527 mpp slide is 40x), and the exact ``10 / mpp`` otherwise;
``patch_size_level0`` always holds the exact level-0 tile side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, one_line

__all__ = [
    "CLAM",
    "PATHOTUNE",
    "PT",
    "PT_SUFFIX",
    "TRIDENT",
    "foreign_attrs",
    "grid_step",
    "layout_of",
    "magnification",
    "trident_magnification",
    "mpp_of",
    "read_pt_features",
    "trident_coords_attrs",
]

PATHOTUNE, TRIDENT, CLAM, PT = "pathotune", "trident", "clam", "pt"
PT_SUFFIX = ".pt"
# The coords attributes TRIDENT writes (coords_to_h5) and its loaders read; all of them on our files too.
TRIDENT_COORDS_KEYS: tuple[str, ...] = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "level0_width",
    "level0_height",
)


def magnification(mpp: float | None) -> float | None:
    """Objective magnification of ``mpp`` microns per pixel (TRIDENT: ``10 / mpp``); None when unknown."""
    if mpp is None or not math.isfinite(float(mpp)) or float(mpp) <= 0:
        return None
    return 10.0 / float(mpp)


# TRIDENT's magnification buckets (its slides report 80, 60, 40, 20, 10 or 5 from their mpp).
STANDARD_MAGNIFICATIONS = (5, 10, 20, 40, 60, 80)
BUCKET_TOLERANCE = 0.05


def trident_magnification(mpp: float | None) -> float | int | None:
    """The magnification recorded in TRIDENT's attributes for ``mpp``: a standard bucket (an int) when ``10 /
    mpp`` lies within 5% of one (a 0.499 mpp slide is 20, not 20.04), else ``10 / mpp`` as it is."""
    mag = magnification(mpp)
    if mag is None:
        return None
    for standard in STANDARD_MAGNIFICATIONS:
        if abs(mag - standard) <= BUCKET_TOLERANCE * standard:
            return standard
    return mag


def mpp_of(mag: Any) -> float | None:
    """Microns per pixel at magnification ``mag`` (``10 / mag``); None for a missing or unusable value."""
    try:
        value = float(mag)
    except (TypeError, ValueError):
        return None
    return 10.0 / value if math.isfinite(value) and value > 0 else None


def trident_coords_attrs(attrs: Mapping[str, Any], folder: str | os.PathLike[str]) -> dict[str, Any]:
    """TRIDENT's ``coords`` attributes for a PathoTune feature file with root attributes ``attrs``.

    ``patch_size`` is the tile side in target pixels and ``patch_size_level0`` in level-0 pixels (rounded to an
    integer, as TRIDENT stores it); magnifications are TRIDENT's integer buckets where ``10 / mpp`` is within 5%
    of one, else ``10 / mpp`` (:func:`trident_magnification`; NaN when the slide's mpp is unknown; the target is
    the slide's own at native resolution); ``overlap`` is in target pixels, as TRIDENT's.
    """
    level0 = trident_magnification(attrs.get("mpp"))
    target = trident_magnification(attrs.get("target_mpp")) if attrs.get("target_mpp") is not None else level0
    width, height = (int(v) for v in attrs["dimensions"])
    return {
        "patch_size": int(attrs["tile_size"]),
        "patch_size_level0": int(round(float(attrs["tile_size_level0"]))),
        "level0_magnification": float("nan") if level0 is None else level0,
        "target_magnification": float("nan") if target is None else target,
        "overlap": int(attrs["overlap"]),
        "level0_width": width,
        "level0_height": height,
        "name": str(attrs["slide_id"]),
        "savetodir": str(folder),
    }


def layout_of(root: Mapping[str, Any], coords: Mapping[str, Any]) -> str:
    """Which tool wrote an h5 feature file, from its root and ``coords`` attributes (as plain Python)."""
    if "pathotune_version" in root:
        return PATHOTUNE
    if "patch_size_level0" in coords:
        return TRIDENT
    if root:
        return PATHOTUNE  # hand-made files that record some of our attributes
    return CLAM


def grid_step(coords: np.ndarray) -> int | None:
    """The smallest positive step between distinct x (or y) coordinates: the tile pitch; None for one tile."""
    steps = [np.diff(np.unique(np.asarray(coords)[:, axis])) for axis in (0, 1)]
    positive = np.concatenate([s[s > 0] for s in steps]) if len(coords) else np.zeros(0)
    return int(positive.min()) if positive.size else None


def _number(value: Any) -> float | None:
    """An attribute as a finite float, or None (missing, TRIDENT's 'None' string, NaN)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def foreign_attrs(
    layout: str,
    path: Path,
    coords_attrs: Mapping[str, Any],
    features_attrs: Mapping[str, Any],
    read_coords: Callable[[], np.ndarray],
) -> dict[str, Any]:
    """PathoTune attribute names for a TRIDENT or CLAM file, from what it records (attributes already plain
    Python): ``tile_size``, ``tile_size_level0``, ``overlap``, ``mpp``/``target_mpp`` (``10 / magnification``),
    ``dimensions``, ``slide_id``, ``backbone`` (TRIDENT's encoder name) and ``source_format``.

    ``read_coords`` is called only where the tile side must come from the grid; ``tile_size_level0`` is left out
    where nothing gives it (a CLAM file of a single tile, no attributes).
    """
    out: dict[str, Any] = {"source_format": layout, "slide_id": path.stem}
    encoder = features_attrs.get("encoder")
    if isinstance(encoder, str) and encoder and encoder != "None":
        out["backbone"] = encoder
    size = _number(coords_attrs.get("patch_size"))
    if size is not None:
        out["tile_size"] = int(size)
    side = _number(coords_attrs.get("patch_size_level0"))
    if layout == TRIDENT:
        overlap = _number(coords_attrs.get("overlap"))
        if overlap is not None:
            out["overlap"] = int(overlap)
        level0, target = (
            mpp_of(coords_attrs.get("level0_magnification")),
            mpp_of(coords_attrs.get("target_magnification")),
        )
        out["mpp"], out["target_mpp"] = level0, target
        width, height = _number(coords_attrs.get("level0_width")), _number(coords_attrs.get("level0_height"))
        if width is not None and height is not None:
            out["dimensions"] = [int(width), int(height)]
    elif size is not None and _number(coords_attrs.get("patch_level")) is not None:
        # CLAM's patch files: patch_size at patch_level, whose downsample (x, y) they record beside it
        level = int(_number(coords_attrs.get("patch_level")) or 0)
        downsample = coords_attrs.get("downsample")
        factor = _number(downsample[0] if isinstance(downsample, list) and downsample else downsample)
        if level == 0:
            side = size
        elif factor is not None:
            side = size * factor
    if side is None:
        step = grid_step(read_coords())
        side = None if step is None else float(step)
    if side is not None:
        out["tile_size_level0"] = float(side)
    return out


def read_pt_features(path: str | os.PathLike[str], mmap: bool = False) -> torch.Tensor:
    """A ``.pt`` feature file (CLAM's ``pt_files``): a plain (N, D) floating tensor, loaded without running any
    pickled code (``weights_only=True``; ``mmap`` reads only its header where only the shape is needed)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"slide feature file {p} not found; extract features for this slide first")
    try:
        value = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for files it cannot take
        if mmap and isinstance(e, RuntimeError):
            return read_pt_features(p, mmap=False)  # files of the legacy (non-zip) format cannot be memory-mapped
        if "unsupported global" in str(e).lower():  # pickled objects: a numpy array (TRIDENT's .pt), a dict...
            raise DataError(
                f"slide feature file {p} is not a plain tensor (loading it would run pickled code); save it with "
                "torch.save(torch.from_numpy(features), path) as CLAM does, or pass the .h5 features"
            ) from None
        raise DataError(
            f"slide feature file {p} is not a readable torch file ({one_line(e, 160)}); re-extract it"
        ) from None
    if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point():
        kind = (
            f"a {tuple(value.shape)} {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        )
        raise DataError(f"slide feature file {p} holds {kind}, not an (N, D) float tensor; pass CLAM's pt_files")
    return value

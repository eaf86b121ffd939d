"""Tiny pyramidal TIFFs made from real histology, so slide tests run in seconds without downloading slides.

Pyramids are written as separate top-level tiled pages (level 0 first, then each 2x reduction marked as a
reduced-resolution page): that is the "generic tiled TIFF" layout both OpenSlide and tiffslide read as a
multi-level slide. (tifffile's SubIFD pyramids are read by tiffslide only; OpenSlide sees one level.)
Compression is lossless deflate so tests can compare pixels exactly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import tifffile

from pathotune.slides import sample_slide

# Dense tissue in the vendored CMU slide (level-0 x, y); found from its saturation map, see test_slides.
CMU_TISSUE_XY = (950, 1900)
GLASS_RGB = (242, 241, 244)


@lru_cache(maxsize=1)
def cmu_rgb() -> np.ndarray:
    """Level 0 of the vendored CC0 Aperio slide as an (H, W, 3) uint8 array (H&E skin, 2967x2220)."""
    arr = tifffile.imread(sample_slide(), key=0)
    arr.setflags(write=False)
    return arr


def cmu_crop(x: int, y: int, width: int, height: int) -> np.ndarray:
    """A copy of a level-0 region of the CMU slide."""
    region = cmu_rgb()[y : y + height, x : x + width]
    if region.shape[:2] != (height, width):
        raise ValueError(f"crop {width}x{height} at ({x}, {y}) leaves the 2220x2967 CMU slide")
    return region.copy()


def tissue_and_glass(height: int = 512, width: int = 1024, seed: int = 0) -> np.ndarray:
    """Left half real H&E tissue (dense CMU region), right half near-white glass with slight sensor noise."""
    half = width // 2
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:, :half] = cmu_crop(CMU_TISSUE_XY[0], CMU_TISSUE_XY[1], half, height)
    noise = np.random.default_rng(seed).normal(0.0, 1.5, size=(height, width - half, 3))
    out[:, half:] = np.clip(np.asarray(GLASS_RGB, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return out


def pyramid_levels(rgb: np.ndarray, levels: int = 3) -> list[np.ndarray]:
    """Level 0 and successive 2x2-mean reductions (odd edges dropped), as a scanner pyramid would hold."""
    out = [np.ascontiguousarray(rgb, dtype=np.uint8)]
    for _ in range(1, levels):
        prev = out[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        if h == 0 or w == 0:
            raise ValueError(f"image {rgb.shape[:2]} is too small for {levels} levels")
        blocks = prev[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).astype(np.float64)
        out.append(np.round(blocks.mean(axis=(1, 3))).astype(np.uint8))
    return out


def write_pyramid_tiff(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float | None,
    levels: int = 3,
    tile: int = 64,
    bigtiff: bool = False,
    subifds: bool = False,
) -> list[np.ndarray]:
    """Write a tiled, lossless pyramidal TIFF and return the level arrays it holds.

    ``mpp`` goes into XResolution/YResolution (pixels per centimetre, scaled per level); None writes
    unitless resolution tags, i.e. a slide without mpp. ``subifds`` stores the reductions as SubIFDs of
    level 0 instead of top-level pages (the OME/bfconvert layout).
    """
    arrays = pyramid_levels(rgb, levels)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw:
        for k, arr in enumerate(arrays):
            extra: dict = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * 2**k)
                extra = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            if subifds and k == 0:
                extra["subifds"] = levels - 1
            tw.write(
                arr,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if k else 0,
                metadata=None,
                **extra,
            )
    return arrays


def truncate(path: str | Path, fraction: float) -> None:
    """Cut a file to ``fraction`` of its length, like an interrupted copy or download."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])

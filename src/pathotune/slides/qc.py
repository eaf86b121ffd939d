"""A quality-control picture per slide: the thumbnail with the tissue outline and the kept tiles drawn on it.

One glance shows whether the mask missed faint tissue, kept pen marks or glass, or the grid sits at the wrong
scale, which is cheaper than finding out after feature extraction.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .reader import SlideReader
from .tiling import TilePlan

__all__ = ["MASK_COLOUR", "TILE_COLOUR", "qc_thumbnail"]

MASK_COLOUR = (0, 200, 0)
TILE_COLOUR = (0, 90, 255)


def _outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Boundary pixels of the mask resized to ``size`` (w, h), two pixels wide so it shows on large slides."""
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    inner = ndimage.binary_erosion(resized, iterations=2, border_value=1)
    return resized & ~inner


def qc_thumbnail(reader: SlideReader, plan: TilePlan, path: str | Path, max_size: int = 1024) -> Path:
    """Write the QC PNG to ``path`` atomically (temp file in the same folder, then rename) and return the path.

    Readers of the folder never see a half-written PNG, even if the process dies mid-write.
    """
    path = Path(path)
    thumb = reader.thumbnail(max_size)
    tw, th = thumb.size
    width, height = reader.dimensions
    sx, sy = width / tw, height / th

    pixels = np.array(thumb)
    pixels[_outline(plan.mask, (tw, th))] = MASK_COLOUR
    img = Image.fromarray(pixels)
    draw = ImageDraw.Draw(img)
    side = plan.tile_size_level0
    for x, y in plan.coords.tolist():
        x0, y0 = x / sx, y / sy
        x1, y1 = (x + side) / sx, (y + side) / sy
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=TILE_COLOUR, width=1)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

"""Image files and pixels, once for the whole package: which files count as images, and any image as 8-bit RGB."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, one_line

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})

# Errors PIL and h5py raise for unreadable, corrupt or truncated data.
READ_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    KeyError,
    IndexError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def is_image(path: Path) -> bool:
    """A visible (not dot-named) entry with an image suffix that is not a folder. It need not be a regular file:
    a FIFO, a device or a broken link named like an image is listed too, so the scan reports it instead of
    skipping it without a word (or blocking on it)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not _hidden(path.name) and not path.is_dir()


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted so that splits are reproducible across machines.

    One rule for hidden names: files and folders whose name starts with '.' (.DS_Store, ._ AppleDouble files,
    .ipynb_checkpoints/, a half-built .tmp folder) are skipped with everything inside them. Only names below
    ``folder`` count, so a dataset under ``~/.cache`` is read. Symlinked files are followed, symlinked folders
    are not entered. Entries that are not regular files are listed (see :func:`is_image`) for the scan to refuse.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        found += [p for p in (Path(dirpath) / f for f in filenames) if is_image(p)]
    return sorted(found)


def scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth gray to 8 bits by rescaling, not clipping (clipping turns 16-bit scans white)."""
    if mode.startswith("I;16"):
        return (arr.astype(np.float64) / 257.0).round().astype(np.uint8)
    a = arr.astype(np.float64)
    if mode == "F":
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if lo >= 0.0 and hi <= 1.0:
            return (a * 255.0).round().astype(np.uint8)
        return np.zeros_like(a, dtype=np.uint8) if hi <= lo else ((a - lo) / (hi - lo) * 255.0).round().astype(np.uint8)
    # mode "I": 32-bit container, usually holding 8- or 16-bit data (16-bit PNGs open like this).
    hi = float(a.max()) if a.size else 0.0
    if hi <= 255:
        return np.clip(a, 0, 255).astype(np.uint8)
    if hi <= 65535:
        return (np.clip(a, 0, 65535) / 257.0).round().astype(np.uint8)
    lo = float(a.min())
    return ((a - lo) / (hi - lo) * 255.0).round().astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, the one conversion for patches and slides alike.

    - RGB comes back as the same object (no copy);
    - transparency (RGBA, LA, PA, RGBa, La, or a palette with a transparent colour) is composited on white, the
      colour of empty glass, never dropped to black;
    - 16-bit and 32-bit gray (I;16*, I) and float (F) are rescaled to 8 bits, not clipped (clipping turns a
      16-bit scan white); float in [0, 1] maps to 0..255, other float ranges are stretched min..max;
    - every other mode (L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX...) goes through PIL's own conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = scale_to_uint8(np.asarray(img), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image fully (truncation shows up here, not mid-training) and return it as 8-bit RGB."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img).copy()
    except READ_ERRORS as e:
        raise DataError(
            f"cannot read image {path}: {one_line(e)}; replace or remove the file (or skip bad files)"
        ) from None

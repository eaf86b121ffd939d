"""Tissue versus glass on a slide thumbnail, so tiling skips empty background.

H&E (and most IHC) tissue is coloured while glass is near-grey, so Otsu on HSV saturation separates them on
almost any scanner without tuning; morphology then turns the pixel threshold into solid tissue regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2gray, rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk, opening

from ..errors import ConfigError
from .reader import to_rgb

__all__ = ["CHANNELS", "METHODS", "TissueConfig", "remove_small_pieces", "rgb_array", "tissue_mask"]

METHODS = ("otsu", "fixed")
CHANNELS = ("saturation", "darkness")


@dataclass(frozen=True)
class TissueConfig:
    """Tissue-mask settings; radii are in mask (thumbnail) pixels, areas are fractions of the whole thumbnail.

    method: ``otsu`` picks the threshold per slide; ``fixed`` uses ``threshold``.
    channel: ``saturation`` (HSV S, for stained tissue) or ``darkness`` (1 - grey level, for unstained or
        grey images).
    threshold: a fixed cut on the channel's 0..1 scale; when given it wins over Otsu.
    min_threshold: Otsu never cuts below this, so a blank slide (glass and noise only) yields an empty mask
        instead of a split of the noise.
    close_radius: closing joins nearby tissue fragments and bridges pale gaps inside tissue.
    open_radius: opening removes dust and single-pixel specks.
    fill_holes: fill holes enclosed by tissue (nuclei-poor or pale areas inside a section).
    max_hole_frac: holes larger than this stay open (real gaps such as a lumen or torn tissue); None fills all.
    min_area_frac: tissue pieces smaller than this are dropped (debris, dirt, labels' edges).
    """

    method: str = "otsu"
    channel: str = "saturation"
    threshold: float | None = None
    min_threshold: float = 0.05
    close_radius: int = 2
    open_radius: int = 1
    fill_holes: bool = True
    max_hole_frac: float | None = 0.02
    min_area_frac: float = 0.0005

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"tissue method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if self.channel not in CHANNELS:
            raise ConfigError(f"tissue channel {self.channel!r} is unknown; use one of {', '.join(CHANNELS)}")
        if self.method == "fixed" and self.threshold is None:
            raise ConfigError("tissue method 'fixed' needs a threshold (0..1 on the chosen channel)")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"tissue threshold must lie in 0..1, got {self.threshold}")
        if self.close_radius < 0 or self.open_radius < 0:
            raise ConfigError("tissue close_radius and open_radius must be >= 0")
        for name in ("min_area_frac", "max_hole_frac"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"tissue {name} must lie in 0..1, got {value}")


def rgb_array(thumbnail: Image.Image | np.ndarray) -> np.ndarray:
    """A thumbnail (PIL image, or an HxW, HxWx3 or HxWx4 array) as an HxWx3 RGB array."""
    if isinstance(thumbnail, Image.Image):
        return np.asarray(to_rgb(thumbnail))
    arr = np.asarray(thumbnail)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail must be HxWx3 RGB (or HxWx4 RGBA), got shape {arr.shape}")
    if arr.shape[2] == 4:
        return np.asarray(Image.fromarray(arr.astype(np.uint8), "RGBA").convert("RGB"))
    return arr


def remove_small_pieces(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """The mask without its 8-connected pieces smaller than ``min_pixels``."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def _fill(mask: np.ndarray, max_hole_pixels: float | None) -> np.ndarray:
    filled = ndimage.binary_fill_holes(mask)
    if max_hole_pixels is None:
        return filled
    holes, n = ndimage.label(filled & ~mask)
    if n == 0:
        return filled
    sizes = np.bincount(holes.ravel())
    big = sizes > max_hole_pixels
    big[0] = False
    return filled & ~big[holes]


def tissue_mask(
    thumbnail: Image.Image | np.ndarray,
    method: str = TissueConfig.method,
    channel: str = TissueConfig.channel,
    min_area_frac: float = TissueConfig.min_area_frac,
    close_radius: int = TissueConfig.close_radius,
    fill_holes: bool = TissueConfig.fill_holes,
    threshold: float | None = TissueConfig.threshold,
    min_threshold: float = TissueConfig.min_threshold,
    open_radius: int = TissueConfig.open_radius,
    max_hole_frac: float | None = TissueConfig.max_hole_frac,
) -> np.ndarray:
    """Boolean HxW mask (True = tissue) of an RGB thumbnail; ``tissue_mask(img, **asdict(cfg))`` applies a config."""
    cfg = TissueConfig(
        method=method,
        channel=channel,
        threshold=threshold,
        min_threshold=min_threshold,
        close_radius=close_radius,
        open_radius=open_radius,
        fill_holes=fill_holes,
        max_hole_frac=max_hole_frac,
        min_area_frac=min_area_frac,
    )
    rgb = rgb_array(thumbnail)
    if rgb.size == 0:
        raise ValueError("thumbnail is empty")
    values = rgb2hsv(rgb)[..., 1] if cfg.channel == "saturation" else 1.0 - rgb2gray(rgb)
    if cfg.threshold is not None:
        cut = cfg.threshold
    else:
        lo, hi = float(values.min()), float(values.max())
        cut = hi if lo == hi else float(threshold_otsu(values))
        cut = max(cut, cfg.min_threshold)
    mask = values > cut
    if cfg.close_radius > 0:
        mask = closing(mask, disk(cfg.close_radius)).astype(bool)
    if cfg.open_radius > 0:
        mask = opening(mask, disk(cfg.open_radius)).astype(bool)
    if cfg.fill_holes:
        hole_limit = None if cfg.max_hole_frac is None else cfg.max_hole_frac * mask.size
        mask = _fill(mask, hole_limit)
    if cfg.min_area_frac > 0:
        mask = remove_small_pieces(mask, cfg.min_area_frac * mask.size)
    return np.ascontiguousarray(mask, dtype=bool)

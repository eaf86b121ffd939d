"""Artifacts beside the tissue: pen marks, blur and folds, flagged by HistoQC-style rules on the mask's thumbnail.

Every rule reads the RGB thumbnail the tissue mask is computed on (``mask_size``) and returns a boolean mask on
the same grid, so a flag is written, drawn and measured under tiles exactly as the tissue is. The rules and
their defaults come from published tools, adapted where the thumbnail's scale differs from theirs:

- **pen** (anywhere on the slide: ink on glass is common): red, green and blue ink by the RGB colour ranges of
  deep-histopath's pen filters (the rows histolab 0.7 keeps); black ink by HistoQC's dark threshold (grey below
  0.15, LightDarkModule) among near-grey pixels (the darkest H&E pixels, nuclei, are purple, not grey), read at
  HistoQC's scale as the fold rule is (below). HistoQC's own PenMarkingModule classifies colours with a Gaussian
  naive Bayes fitted to 25 example colours; ``benchmarks/pen_qc.py`` measures both on HistoQC's pen thumbnails.
- **blur** (within tissue): HistoQC's BlurDetectionModule measure, the magnitude of the grey image's Laplacian
  averaged by a Gaussian: little fine detail means out of focus. HistoQC cuts it at a fixed value on a 2.5x
  thumbnail; the mask grid's microns per pixel vary with slide size, so the cut here is a fraction of the
  slide's own median over tissue (as Otsu finds tissue relative to the slide's glass). A slide blurred all over
  is therefore not flagged, and blur is only seen where it shows at the thumbnail's scale.
- **fold** (within tissue): HistoQC's dark-tissue rule (LightDarkModule ``darktissue``: grey below 0.15). HistoQC
  reads it at 1.25x (8 µm per pixel), so when the slide's mpp says the mask grid is finer, the grey level is
  first averaged over about 8 µm and single dark nuclei do not count. Overlapping layers multiply the light they
  let through, so a pleat of dense tissue turns this dark; a double layer of pale stroma stays lighter and
  needs a higher ``fold_threshold``.

Ink is not blur (it is flat), and coloured ink is not a fold; glass in holes of the tissue mask (grey 0.9 and
above, HistoQC's bright cut) is neither. Each mask loses pieces smaller than ``min_area_frac`` of the
thumbnail, as the tissue mask does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2gray, rgb2hsv
from skimage.filters import laplace

from ..errors import ConfigError
from ..report.io import atomic_path
from .geojson import tissue_geojson
from .tissue import remove_small_pieces, rgb_array

__all__ = [
    "ARTIFACTS",
    "ARTIFACT_CLASSES",
    "ArtifactConfig",
    "artifact_masks",
    "blur_mask",
    "coloured_ink",
    "drop_settings",
    "fold_mask",
    "ink_mask",
    "paint_artifacts",
    "parse_kinds",
    "pen_mask",
    "tissue_shares",
    "write_artifacts",
]

ARTIFACTS = ("pen", "blur", "fold")
# QuPath classes of the GeoJSON, and the colours the QC thumbnail paints them in (tissue is green, tiles blue).
ARTIFACT_CLASSES = {
    "pen": {"name": "Pen", "color": [255, 0, 255]},
    "blur": {"name": "Blur", "color": [0, 215, 230]},
    "fold": {"name": "Fold", "color": [255, 140, 0]},
}

# Ink colour ranges of deep-histopath's pen filters (Apache-2.0), the rows histolab 0.7 keeps: a pixel is ink of
# a colour when its (R, G, B) passes the three comparisons of any row; +1 means above the row's value, -1 below.
_INK_RANGES: dict[str, tuple[tuple[int, int, int], tuple[tuple[int, int, int], ...]]] = {
    "red": (
        (1, -1, -1),
        ((150, 80, 90), (110, 20, 30), (185, 65, 105), (195, 85, 125))
        + ((220, 115, 145), (125, 40, 70), (100, 50, 65), (85, 25, 45)),
    ),
    "green": (
        (-1, 1, 1),
        ((150, 160, 140), (70, 110, 110), (45, 115, 100), (30, 75, 60), (195, 220, 210))
        + ((225, 230, 225), (170, 210, 200), (20, 30, 20), (50, 60, 40), (30, 50, 35))
        + ((65, 70, 60), (100, 110, 105), (165, 180, 180), (140, 140, 150), (185, 195, 195)),
    ),
    "blue": (
        (-1, -1, 1),
        ((60, 120, 190), (120, 170, 200), (175, 210, 230), (145, 180, 210), (37, 95, 160), (30, 65, 130))
        + ((130, 155, 180), (40, 35, 85), (30, 20, 65), (90, 90, 140), (60, 60, 120), (110, 110, 175)),
    ),
}


def parse_kinds(text: str, option: str) -> tuple[str, ...]:
    """``"pen,blur"`` -> ``("pen", "blur")`` in :data:`ARTIFACTS` order; ``"all"`` is every kind, ``"none"`` or
    ``""`` none. ``option`` names the flag in the error."""
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if words in ([], ["none"]):
        return ()
    if words == ["all"]:
        return ARTIFACTS
    unknown = [w for w in words if w not in ARTIFACTS]
    if unknown:
        raise ConfigError(
            f"{option} {text!r}: unknown artifact {unknown[0]!r}; give a comma-separated list of "
            f"{', '.join(ARTIFACTS)}, or all, or none"
        )
    return tuple(k for k in ARTIFACTS if k in words)


@dataclass(frozen=True)
class ArtifactConfig:
    """Which artifact rules run, their thresholds, and which flags drop tiles. Sigmas are in mask pixels.

    kinds: the rules that run (any of :data:`ARTIFACTS`); their masks are written and drawn.
    drop: kinds whose flagged tiles leave the tile plan (each must be in ``kinds``).
    max_fraction: a tile is dropped when more than this fraction of it is flagged by a kind in ``drop``.
    pen_dark: black ink is grey below this (HistoQC's LightDarkModule dark threshold, 0.15) ...
    pen_chroma: ... and nearly grey: max - min of RGB (0..1) at most this (1 lifts the condition). Black ink
        sits under 0.09 on HistoQC's black-pen thumbnail; the darkest H&E pixels (nuclei) are purple, 0.09-0.2.
    blur_sigma: Gaussian sigma of the |Laplacian| average (HistoQC's module default is 7 px on its 2.5x
        thumbnail; 4 keeps a flag within a few mask pixels of the blurred area).
    blur_threshold: tissue is blurred where that average falls below this fraction of its median over the
        slide's tissue (a Gaussian blur of sigma 2 px brings it under a tenth).
    fold_threshold: tissue darker than this grey level is a fold (HistoQC's darktissue threshold, 0.15).
    fold_sigma: Gaussian sigma of the grey-level average the fold rule reads, at least.
    work_um: the dark rules (black ink, fold) read the image averaged over a box of about this many microns
        when the mask grid's microns per pixel are known: HistoQC's 1.25x, 8 µm per pixel, the scale its 0.15
        holds at. On a finer grid (a small slide, a large mask_size) single dark nuclei would count otherwise.
    min_area_frac: pieces of any mask smaller than this fraction of the thumbnail are dropped (HistoQC keeps pen
        pieces of 100 px and more on its thumbnails of about 1000 x 1000: 1e-4).
    """

    kinds: tuple[str, ...] = ARTIFACTS
    drop: tuple[str, ...] = ()
    max_fraction: float = 0.25
    pen_dark: float = 0.15
    pen_chroma: float = 0.1
    blur_sigma: float = 4.0
    blur_threshold: float = 0.2
    fold_threshold: float = 0.15
    fold_sigma: float = 1.0
    work_um: float = 8.0
    min_area_frac: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("kinds", "drop"):
            unknown = [k for k in getattr(self, name) if k not in ARTIFACTS]
            if unknown:
                raise ConfigError(f"artifact {name} {unknown[0]!r} is unknown; use {', '.join(ARTIFACTS)}")
        missing = [k for k in self.drop if k not in self.kinds]
        if missing:
            raise ConfigError(
                f"--drop-artifacts {missing[0]} needs the {missing[0]} flag computed; add it to --qc "
                f"(now: {','.join(self.kinds) or 'none'})"
            )
        checks = (
            ("max_fraction", "--max-artifact", 0.0, 1.0, True),
            ("pen_dark", None, 0.0, 1.0, False),
            ("pen_chroma", None, 0.0, 1.0, False),
            ("blur_threshold", "--blur-threshold", 0.0, 1.0, False),
            ("fold_threshold", "--fold-threshold", 0.0, 1.0, False),
            ("min_area_frac", None, 0.0, 1.0, False),
        )
        for name, flag, lo, hi, open_top in checks:
            value = getattr(self, name)
            inside = np.isfinite(value) and lo <= value and (value < hi if open_top else value <= hi)
            if not inside:
                where = f" ({flag})" if flag else ""
                top = f"below {hi:g}" if open_top else f"at most {hi:g}"
                raise ConfigError(f"artifact {name}{where} must lie between {lo:g} and {top}, got {value}")
        for name in ("blur_sigma", "fold_sigma", "work_um"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ConfigError(f"artifact {name} must be a positive number, got {value}")

    def dropped(self, fractions: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """(n,) bool: the tiles with more than ``max_fraction`` of their area flagged by a kind in ``drop``."""
        out = np.zeros(n, dtype=bool)
        for kind in self.drop:
            out |= np.asarray(fractions[kind]) > self.max_fraction
        return out


# -- the rules --------------------------------------------------------------------------------------------------
def coloured_ink(rgb: np.ndarray) -> np.ndarray:
    """Pixels in deep-histopath's red, green or blue ink ranges."""
    px = rgb_array(rgb).astype(np.int16)
    channels = [px[..., c] for c in range(3)]
    out = np.zeros(px.shape[:2], dtype=bool)
    for signs, rows in _INK_RANGES.values():
        for row in rows:
            hit = np.ones_like(out)
            for value, limit, sign in zip(channels, row, signs, strict=True):
                hit &= value > limit if sign > 0 else value < limit
            out |= hit
    return out


def _work_sigma(cfg: ArtifactConfig, mask_mpp: float | None) -> float:
    """Gaussian sigma (mask pixels) with the spread of a ``work_um`` box (its width / sqrt(12)); 0 without mpp."""
    return 0.0 if mask_mpp is None else cfg.work_um / np.sqrt(12) / mask_mpp


def ink_mask(rgb: np.ndarray, cfg: ArtifactConfig | None = None, mask_mpp: float | None = None) -> np.ndarray:
    """Pixels of ink colour: :func:`coloured_ink`, or darker than ``pen_dark`` and nearly grey (black ink), the
    latter read at ``work_um`` when ``mask_mpp`` (microns per pixel of this grid) is given."""
    cfg = cfg or ArtifactConfig()
    rgb = rgb_array(rgb)
    sigma = _work_sigma(cfg, mask_mpp)
    dark = rgb if sigma < 0.5 else ndimage.gaussian_filter(rgb.astype(np.float64), (sigma, sigma, 0)) / 255
    hsv = rgb2hsv(dark)
    chroma = hsv[..., 1] * hsv[..., 2]  # (max - min), 0..1
    return coloured_ink(rgb) | ((rgb2gray(dark) < cfg.pen_dark) & (chroma <= cfg.pen_chroma))


def _min_pixels(mask: np.ndarray, cfg: ArtifactConfig) -> float:
    return cfg.min_area_frac * mask.size


def pen_mask(rgb: np.ndarray, cfg: ArtifactConfig | None = None, mask_mpp: float | None = None) -> np.ndarray:
    """Pen marks anywhere on the slide: :func:`ink_mask` without pieces under ``min_area_frac``."""
    cfg = cfg or ArtifactConfig()
    ink = ink_mask(rgb, cfg, mask_mpp)
    return remove_small_pieces(ink, _min_pixels(ink, cfg))


def _judged(rgb: np.ndarray, tissue: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """The tissue a blur or fold rule judges: no ``excluded`` (ink) pixels, and no glass by HistoQC's bright
    cut (grey 0.9 and above; LightDarkModule), so the glass of holes the tissue mask filled is not taken for
    flat, blurred tissue."""
    return np.asarray(tissue, dtype=bool) & (rgb2gray(rgb) < 0.9) & ~excluded


def _mean_within(values: np.ndarray, region: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted mean of ``values`` over ``region`` only (normalised convolution), so a tissue edge
    is not averaged with the glass beside it."""
    weight = region.astype(np.float64)
    num = ndimage.gaussian_filter(values * weight, sigma, mode="nearest")
    den = ndimage.gaussian_filter(weight, sigma, mode="nearest")
    return num / np.maximum(den, 1e-12)


def blur_mask(
    rgb: np.ndarray, tissue: np.ndarray, cfg: ArtifactConfig | None = None, ink: np.ndarray | None = None
) -> np.ndarray:
    """Out-of-focus tissue: the averaged |Laplacian| of the grey image below ``blur_threshold`` times its
    median over the tissue. Ink (``ink``, default :func:`ink_mask`) is flat, so it is left out."""
    cfg = cfg or ArtifactConfig()
    rgb = rgb_array(rgb)
    region = _judged(rgb, tissue, ink_mask(rgb, cfg) if ink is None else ink)
    if not region.any():
        return np.zeros(region.shape, dtype=bool)
    detail = _mean_within(np.abs(laplace(rgb2gray(rgb))), region, cfg.blur_sigma)
    flagged = region & (detail < cfg.blur_threshold * float(np.median(detail[region])))
    return remove_small_pieces(flagged, _min_pixels(flagged, cfg))


def fold_mask(
    rgb: np.ndarray,
    tissue: np.ndarray,
    cfg: ArtifactConfig | None = None,
    coloured: np.ndarray | None = None,
    mask_mpp: float | None = None,
) -> np.ndarray:
    """Folded (overlapping) tissue: the averaged grey level below ``fold_threshold``. Coloured ink
    (``coloured``, default :func:`coloured_ink`) is left out; near-black tissue and black ink look alike, so a
    black stroke over tissue is flagged as both. ``mask_mpp`` (microns per pixel of this grid) widens the
    average to ``work_um``."""
    cfg = cfg or ArtifactConfig()
    rgb = rgb_array(rgb)
    region = _judged(rgb, tissue, coloured_ink(rgb) if coloured is None else coloured)
    if not region.any():
        return np.zeros(region.shape, dtype=bool)
    sigma = max(cfg.fold_sigma, _work_sigma(cfg, mask_mpp))
    dark = _mean_within(rgb2gray(rgb), region, sigma) < cfg.fold_threshold
    return remove_small_pieces(region & dark, _min_pixels(region, cfg))


def artifact_masks(
    thumbnail: Image.Image | np.ndarray, tissue: np.ndarray, cfg: ArtifactConfig, mask_mpp: float | None = None
) -> dict[str, np.ndarray]:
    """The mask of every kind in ``cfg.kinds`` on the tissue mask's grid (the thumbnail is resized to it when
    the two differ, e.g. for a tissue mask read from GeoJSON); ``mask_mpp``: microns per pixel of that grid,
    when the slide's mpp is known."""
    if not cfg.kinds:
        return {}
    tissue = np.asarray(tissue, dtype=bool)
    h, w = tissue.shape
    img = thumbnail if isinstance(thumbnail, Image.Image) else Image.fromarray(rgb_array(thumbnail).astype(np.uint8))
    if img.size != (w, h):
        img = img.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    rgb = rgb_array(img)
    coloured = coloured_ink(rgb)
    ink = ink_mask(rgb, cfg, mask_mpp)
    rules = {
        "pen": lambda: remove_small_pieces(ink, _min_pixels(ink, cfg)),
        "blur": lambda: blur_mask(rgb, tissue, cfg, ink),
        "fold": lambda: fold_mask(rgb, tissue, cfg, coloured, mask_mpp),
    }
    return {kind: np.ascontiguousarray(rules[kind](), dtype=bool) for kind in cfg.kinds}


# -- what they look like and where they go --------------------------------------------------------------------
def tissue_shares(masks: Mapping[str, np.ndarray], tissue: np.ndarray) -> dict[str, float]:
    """The fraction of the tissue each mask covers (pen counted over tissue too, where it costs tiles)."""
    tissue = np.asarray(tissue, dtype=bool)
    area = max(int(tissue.sum()), 1)
    return {kind: float((m & tissue).sum() / area) for kind, m in masks.items()}


def paint_artifacts(pixels: np.ndarray, masks: Mapping[str, np.ndarray], alpha: float = 0.5) -> np.ndarray:
    """``pixels`` (H, W, 3 uint8) with each mask, resized to it, blended in its class colour."""
    out = np.array(pixels, dtype=np.float64)
    h, w = out.shape[:2]
    for kind, mask in masks.items():
        big = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
        sel = np.asarray(big) > 0
        out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(ARTIFACT_CLASSES[kind]["color"], dtype=np.float64)
    return np.round(out).astype(np.uint8)


def write_artifacts(
    masks: Mapping[str, np.ndarray], dimensions: tuple[int, int], out: str | Path, slide_id: str
) -> list[Path]:
    """Write ``<slide_id>_<kind>.png`` (the binary mask at mask resolution, 0/255) and ``<slide_id>_<kind>.geojson``
    (QuPath annotations of that class in level-0 pixels) for each mask, atomically; return the paths."""
    out = Path(out)
    written: list[Path] = []
    for kind, mask in masks.items():
        png = out / f"{slide_id}_{kind}.png"
        with atomic_path(png) as tmp:
            Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(tmp, format="PNG")
        geo = tissue_geojson(mask, dimensions, out / f"{slide_id}_{kind}.geojson", ARTIFACT_CLASSES[kind], kind)
        written += [png, geo]
    return written


def drop_settings(cfg: ArtifactConfig | None) -> dict | None:
    """The settings that decided which tiles the artifact flags dropped, for a feature file's record; None when
    no kind drops tiles."""
    if cfg is None or not cfg.drop:
        return None
    return {k: v for k, v in asdict(cfg).items() if k != "kinds"}

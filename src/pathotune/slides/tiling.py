"""Plan a grid of tiles at a physical resolution (microns per pixel), then read them one by one.

A plan keeps every coordinate at LEVEL 0, so it is independent of the pyramid it was planned on and can be
stored (e.g. next to features in HDF5) and replayed. Tiles are read from the coarsest pyramid level that is
still at least as fine as the target, then shrunk to ``tile_size`` only when that level does not match exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from .artifacts import ArtifactConfig, artifact_masks
from .reader import LEVEL_TOLERANCE, SlideReader, require_mpp
from .tissue import TissueConfig, tissue_mask

__all__ = [
    "DEFAULT_TARGET_MPP",
    "TilePlan",
    "TilingConfig",
    "iter_tiles",
    "mask_fractions",
    "mpp_for_magnification",
    "plan_from_coords",
    "plan_tiles",
    "read_tile",
    "resolve_target_mpp",
]

DEFAULT_TARGET_MPP = 0.5


def mpp_for_magnification(mag: float) -> float:
    """Microns per pixel of an objective magnification, by the convention scanners and TRIDENT/CLAM share:
    mpp = 10 / mag (40x = 0.25, 20x = 0.5, 10x = 1.0 µm/px)."""
    if not (math.isfinite(mag) and mag > 0):
        raise ConfigError(f"magnification must be a positive number (e.g. 20 for 20x), got {mag}")
    return 10.0 / mag


def resolve_target_mpp(
    target_mpp: float | None, mag: float | None, default: float | None = DEFAULT_TARGET_MPP
) -> float | None:
    """The tile resolution from at most one of ``target_mpp`` and ``mag`` (through :func:`mpp_for_magnification`),
    else ``default``."""
    if target_mpp is not None and mag is not None:
        raise ConfigError(
            f"--target-mpp {target_mpp:g} and --mag {mag:g} both set the tile resolution; pass one of them"
        )
    if mag is not None:
        return mpp_for_magnification(mag)
    return default if target_mpp is None else target_mpp


@dataclass(frozen=True)
class TilingConfig:
    """How to cut a slide into tiles.

    target_mpp: microns per pixel of the tiles; None tiles level 0 at the slide's native resolution.
    tile_size: tile side in target pixels (what the model sees).
    overlap: target pixels shared by neighbouring tiles; the stride is ``tile_size - overlap``.
    min_tissue: keep a tile when at least this fraction of it is tissue in the mask (0 keeps every tile).
    mask_size: longer side of the thumbnail the tissue mask is computed on, when no mask is given.
    """

    target_mpp: float | None = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue: float = 0.5
    mask_size: int = 1024

    def __post_init__(self) -> None:
        if self.target_mpp is not None and not (math.isfinite(self.target_mpp) and self.target_mpp > 0):
            raise ConfigError(
                f"target_mpp must be a positive number of microns per pixel (or None), got {self.target_mpp}"
            )
        if self.tile_size < 1:
            raise ConfigError(f"tile_size must be >= 1, got {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ConfigError(f"overlap must lie in 0..tile_size-1 ({self.tile_size - 1}), got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min_tissue must lie in 0..1, got {self.min_tissue}")
        if self.mask_size < 1:
            raise ConfigError(f"mask_size must be >= 1, got {self.mask_size}")


@dataclass
class TilePlan:
    """The kept tiles of one slide and everything needed to read them again.

    level / downsample: pyramid level read from and its downsample relative to level 0.
    scale: level-0 pixels per target pixel (target_mpp / slide_mpp; 1.0 at native resolution).
    read_size: square side read at ``level``; resized to ``tile_size`` when the two differ.
    coords: (N, 2) int64 top-left (x, y) of each kept tile in level-0 pixels.
    tissue: (N,) float32 tissue fraction of each kept tile, from ``mask``.
    mask / mask_scale: the tissue mask and level-0 pixels per mask pixel along (x, y).
    n_candidates: grid positions before tissue filtering.
    artifacts: kind -> artifact mask on the tissue mask's grid (:mod:`.artifacts`), for the kinds computed.
    artifact_fractions: kind -> (N,) float32 fraction of each kept tile flagged by that kind.
    n_dropped: tiles with enough tissue that the artifact flags removed (``ArtifactConfig.drop``).
    """

    slide: str
    dimensions: tuple[int, int]
    level: int
    downsample: float
    scale: float
    read_size: int
    tile_size: int
    stride: int
    target_mpp: float | None
    slide_mpp: float | None
    coords: np.ndarray
    tissue: np.ndarray
    mask: np.ndarray
    mask_scale: tuple[float, float]
    min_tissue: float
    n_candidates: int
    artifacts: dict[str, np.ndarray] = field(default_factory=dict)
    artifact_fractions: dict[str, np.ndarray] = field(default_factory=dict)
    n_dropped: int = 0

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def tile_size_level0(self) -> float:
        """Side of one tile in level-0 pixels."""
        return self.tile_size * self.scale

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.tile_size


def _grid(level_extent: int, read_size: int, stride_level: float) -> np.ndarray:
    """Tile starts in level pixels: a regular grid, snapped to whole level pixels, that stays inside the level."""
    if level_extent < read_size:
        return np.zeros(0, dtype=np.int64)
    n = math.floor((level_extent - read_size) / stride_level + 1e-9) + 1
    starts = np.round(np.arange(n) * stride_level).astype(np.int64)
    return starts[starts + read_size <= level_extent]


def mask_fractions(mask: np.ndarray, coords: np.ndarray, side: float, scale: tuple[float, float]) -> np.ndarray:
    """Mean of a mask (tissue, an artifact) under each tile, through a summed-area table (one pass however many
    tiles); ``scale`` is level-0 pixels per mask pixel along (x, y)."""
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float32)
    mh, mw = mask.shape
    sat = np.zeros((mh + 1, mw + 1), dtype=np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    sx, sy = scale
    x0 = np.clip(np.round(coords[:, 0] / sx), 0, mw - 1).astype(np.int64)
    y0 = np.clip(np.round(coords[:, 1] / sy), 0, mh - 1).astype(np.int64)
    x1 = np.clip(np.round((coords[:, 0] + side) / sx), x0 + 1, mw).astype(np.int64)
    y1 = np.clip(np.round((coords[:, 1] + side) / sy), y0 + 1, mh).astype(np.int64)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (inside / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def plan_tiles(
    reader: SlideReader,
    cfg: TilingConfig | None = None,
    mask: np.ndarray | None = None,
    tissue: TissueConfig | None = None,
    artifacts: ArtifactConfig | None = None,
) -> TilePlan:
    """Grid the slide at ``cfg.target_mpp`` and keep tiles with enough tissue.

    ``mask`` is a boolean tissue mask covering the whole slide at any scale (e.g. from an earlier run or a
    manual annotation); without one it is computed from a ``cfg.mask_size`` thumbnail with ``tissue``.
    ``artifacts`` flags pen, blur and folds on that thumbnail and drops the tiles its ``drop`` kinds cover.
    """
    cfg = cfg or TilingConfig()
    width, height = reader.dimensions
    slide_mpp = reader.mpp
    if cfg.target_mpp is None:
        scale = 1.0
    else:
        slide_mpp = require_mpp(reader)
        scale = cfg.target_mpp / slide_mpp
        if scale < 1.0 - LEVEL_TOLERANCE:
            raise DataError(
                f"target mpp {cfg.target_mpp:g} is finer than slide {reader.path}'s level 0 ({slide_mpp:g} mpp) "
                f"and would need upsampling; use a target mpp of {slide_mpp:g} or more (or none for native)"
            )
    level = reader.best_level_for_downsample(scale)
    ds = reader.level_downsamples[level]
    read_size = max(1, round(cfg.tile_size * scale / ds))
    stride_level = (cfg.tile_size - cfg.overlap) * scale / ds
    lw, lh = reader.level_dimensions[level]
    xs, ys = _grid(lw, read_size, stride_level), _grid(lh, read_size, stride_level)
    if len(xs) == 0 or len(ys) == 0:
        raise DataError(
            f"slide {reader.path} ({width}x{height} px at level 0) is smaller than one {cfg.tile_size} px tile "
            f"({cfg.tile_size * scale:.0f} level-0 px); lower tile_size or target_mpp"
        )
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # row-major order: tiles run left to right, then down
    level_xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    coords = np.round(level_xy * ds).astype(np.int64)
    return _kept(reader, cfg, coords, scale, level, read_size, slide_mpp, mask, tissue, artifacts)


def _kept(
    reader: SlideReader,
    cfg: TilingConfig,
    coords: np.ndarray,
    scale: float,
    level: int,
    read_size: int,
    slide_mpp: float | None,
    mask: np.ndarray | None,
    tissue: TissueConfig | None,
    artifacts: ArtifactConfig | None = None,
) -> TilePlan:
    """The plan of the candidate tiles ``coords`` that have at least ``cfg.min_tissue`` tissue in the mask and,
    with ``artifacts``, no more than its ``max_fraction`` flagged by a kind it drops."""
    width, height = reader.dimensions
    thumb = None
    if mask is None:
        thumb = reader.thumbnail(cfg.mask_size)
        mask = tissue_mask(thumb, **asdict(tissue or TissueConfig()))
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"tissue mask must be a non-empty 2-D array, got shape {mask.shape}")
    mask = mask.astype(bool, copy=False)
    mask_scale = (width / mask.shape[1], height / mask.shape[0])
    side = cfg.tile_size * scale
    fractions = mask_fractions(mask, coords, side, mask_scale)
    keep = fractions >= cfg.min_tissue
    flags: dict[str, np.ndarray] = {}
    flagged: dict[str, np.ndarray] = {}
    drop = np.zeros(len(coords), dtype=bool)
    if artifacts is not None and artifacts.kinds:
        mask_mpp = None if slide_mpp is None else slide_mpp * (mask_scale[0] + mask_scale[1]) / 2
        flags = artifact_masks(reader.thumbnail(cfg.mask_size) if thumb is None else thumb, mask, artifacts, mask_mpp)
        flagged = {kind: mask_fractions(m, coords, side, mask_scale) for kind, m in flags.items()}
        drop = keep & artifacts.dropped(flagged, len(coords))
        keep &= ~drop
    return TilePlan(
        slide=str(reader.path),
        dimensions=(width, height),
        level=level,
        downsample=reader.level_downsamples[level],
        scale=scale,
        read_size=read_size,
        tile_size=cfg.tile_size,
        stride=cfg.tile_size - cfg.overlap,
        target_mpp=cfg.target_mpp,
        slide_mpp=slide_mpp,
        coords=coords[keep],
        tissue=fractions[keep],
        mask=mask,
        mask_scale=mask_scale,
        min_tissue=cfg.min_tissue,
        n_candidates=int(len(coords)),
        artifacts=flags,
        artifact_fractions={kind: f[keep] for kind, f in flagged.items()},
        n_dropped=int(drop.sum()),
    )


def plan_from_coords(
    reader: SlideReader,
    coords: np.ndarray,
    tile_size_level0: float,
    cfg: TilingConfig,
    mask: np.ndarray | None = None,
    tissue: TissueConfig | None = None,
    artifacts: ArtifactConfig | None = None,
) -> TilePlan:
    """A plan over given level-0 tile corners (another tool's tiles) instead of a grid.

    ``cfg.tile_size`` is the tile side in output pixels and ``tile_size_level0`` the same side at level 0, which
    fixes the scale; ``cfg.target_mpp`` is only recorded. Tiles are read, like grid tiles, from the coarsest
    level still at least as fine as that scale. ``cfg.min_tissue`` filters them by the mask as it filters a grid
    (0 keeps every one), and ``artifacts`` drops tiles as on a grid.
    """
    if not (math.isfinite(tile_size_level0) and tile_size_level0 > 0):
        raise ConfigError(f"tile_size_level0 must be a positive number, got {tile_size_level0}")
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    scale = tile_size_level0 / cfg.tile_size
    level = reader.best_level_for_downsample(scale)
    read_size = max(1, round(tile_size_level0 / reader.level_downsamples[level]))
    return _kept(reader, cfg, coords, scale, level, read_size, reader.mpp, mask, tissue, artifacts)


def read_tile(reader: SlideReader, plan: TilePlan, i: int) -> Image.Image:
    """Tile ``i`` of the plan as a ``tile_size`` RGB image."""
    if reader.dimensions != plan.dimensions:
        raise ValueError(f"plan was made for a {plan.dimensions} slide ({plan.slide}), not {reader.dimensions}")
    x, y = (int(v) for v in plan.coords[i])
    img = reader.read_region((x, y), plan.level, (plan.read_size, plan.read_size))
    if plan.needs_resize:
        img = img.resize((plan.tile_size, plan.tile_size), Image.Resampling.LANCZOS)
    return img


def iter_tiles(reader: SlideReader, plan: TilePlan) -> Iterator[tuple[tuple[int, int], Image.Image]]:
    """(level-0 (x, y), tile) for every kept tile, in plan order."""
    for i in range(len(plan)):
        x, y = (int(v) for v in plan.coords[i])
        yield (x, y), read_tile(reader, plan, i)

"""Whole-slide images: open any slide behind one reader, find tissue and artifacts (pen, blur, folds), plan tiles at
a physical scale, draw QC.

Feature extraction (``slides.extract``), its model factory (``slides.extractor``) and heat maps
(``slides.heatmap``) load models and are imported from their modules.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from .artifacts import ARTIFACTS, ArtifactConfig, artifact_masks
from .discover import SLIDE_EXTENSIONS, find_slides, slide_id
from .qc import qc_thumbnail, tile_slides
from .reader import (
    BACKENDS,
    DicomReader,
    ImageReader,
    OpenSlideReader,
    SlideReader,
    TiffSlideReader,
    open_slide,
    require_mpp,
    to_rgb,
)
from .tiling import TilePlan, TilingConfig, iter_tiles, plan_tiles, read_tile
from .tissue import TissueConfig, tissue_mask


def sample_slide() -> Path:
    """The vendored CC0 Aperio SVS (H&E skin, 2220x2967 at 0.499 mpp, 20x); see assets/slides/SOURCE.md."""
    return Path(str(files("pathotune") / "assets" / "slides" / "cmu_small_region.svs"))


__all__ = [
    "ARTIFACTS",
    "BACKENDS",
    "SLIDE_EXTENSIONS",
    "ArtifactConfig",
    "DicomReader",
    "ImageReader",
    "OpenSlideReader",
    "SlideReader",
    "TiffSlideReader",
    "TilePlan",
    "TilingConfig",
    "TissueConfig",
    "artifact_masks",
    "find_slides",
    "iter_tiles",
    "open_slide",
    "plan_tiles",
    "qc_thumbnail",
    "read_tile",
    "require_mpp",
    "sample_slide",
    "slide_id",
    "tile_slides",
    "tissue_mask",
    "to_rgb",
]

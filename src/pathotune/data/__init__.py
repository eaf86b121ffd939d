"""Patch-level data, in layers: types, images, splits, readers (folders, CSV), published layouts, the dispatcher
:func:`load_source`; then validation, transforms, the Dataset and the demo task.

Other packages import from here only, never from the submodules.
"""

from __future__ import annotations

from .dataset import PatchDataset, read_h5
from .demo import DEMO_TASK, build_slide_qc_tiles
from .images import IMAGE_EXTENSIONS, is_image, list_images, load_rgb, to_rgb
from .layouts import LAYOUTS, Layout, get_layout, list_layouts
from .sources import load_source
from .transforms import HEDJitter, RandomRot90, build_transforms
from .types import SPLITS, H5Ref, PatchSource, Sample, sort_class_names
from .validate import BadFile, ScanReport, check_source, quiet_native_stderr, scan

__all__ = [
    "DEMO_TASK",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "SPLITS",
    "BadFile",
    "H5Ref",
    "HEDJitter",
    "Layout",
    "PatchDataset",
    "PatchSource",
    "RandomRot90",
    "Sample",
    "ScanReport",
    "build_slide_qc_tiles",
    "build_transforms",
    "check_source",
    "get_layout",
    "is_image",
    "list_images",
    "list_layouts",
    "load_rgb",
    "load_source",
    "quiet_native_stderr",
    "read_h5",
    "scan",
    "sort_class_names",
    "to_rgb",
]

"""Patch-level data: sources (folders, CSV, published layouts), validation, transforms and the Dataset."""

from __future__ import annotations

from .dataset import PatchDataset, load_rgb, read_h5, to_rgb
from .layouts import LAYOUTS, Layout, get_layout, list_layouts
from .sources import IMAGE_EXTENSIONS, SPLITS, H5Ref, PatchSource, Sample, load_source
from .transforms import HEDJitter, RandomRot90, build_transforms
from .validate import BadFile, ScanReport, check_source, scan

__all__ = [
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
    "build_transforms",
    "check_source",
    "get_layout",
    "list_layouts",
    "load_rgb",
    "load_source",
    "read_h5",
    "scan",
    "to_rgb",
]

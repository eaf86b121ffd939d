"""PatchCamelyon (Veeling et al. 2018): 96x96 patches in HDF5, normal vs tumor; images stay in the files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ...errors import DataError, one_line
from ..splits import carve
from ..types import H5Ref, PatchSource, Sample
from .base import Layout

PCAM_CLASSES = ("normal", "tumor")
# published split name -> ours
PCAM_SPLITS = {"train": "train", "valid": "val", "test": "test"}


def pcam_file(root: Path, split: str, kind: str) -> Path:
    """The published file name, e.g. camelyonpatch_level_2_split_valid_y.h5."""
    return root / f"camelyonpatch_level_2_split_{split}_{kind}.h5"


def _pcam_labels(x_path: Path, y_path: Path) -> list[int]:
    try:
        with h5py.File(y_path, "r") as fy, h5py.File(x_path, "r") as fx:
            if "y" not in fy:
                raise DataError(f"{y_path}: no dataset 'y'; it is not a PatchCamelyon label file")
            if "x" not in fx:
                raise DataError(f"{x_path}: no dataset 'x'; it is not a PatchCamelyon image file")
            y = np.asarray(fy["y"][...]).reshape(-1)
            n_x = fx["x"].shape[0]
            if fx["x"].ndim != 4 or fx["x"].shape[-1] != 3:
                raise DataError(f"{x_path}: dataset 'x' has shape {fx['x'].shape}, expected (N, H, W, 3)")
    except OSError as e:
        raise DataError(f"{x_path.parent}: cannot open PatchCamelyon HDF5 files ({one_line(e)})") from None
    if n_x != len(y):
        raise DataError(f"{x_path}: {n_x} images but {y_path.name} has {len(y)} labels; re-download both files")
    bad = set(np.unique(y).tolist()) - {0, 1}
    if bad:
        raise DataError(f"{y_path}: labels {sorted(bad)} are not 0/1; it is not a PatchCamelyon label file")
    return [int(v) for v in y]


def read_pcam(root: Path, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0) -> PatchSource:
    """camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5; images stay in the files, read lazily."""
    samples: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for published, split in PCAM_SPLITS.items():
        x_path, y_path = pcam_file(root, published, "x"), pcam_file(root, published, "y")
        present = [p for p in (x_path, y_path) if p.is_file()]
        if not present:
            gz = [p for p in (x_path, y_path) if p.with_name(p.name + ".gz").is_file()]
            if gz:
                raise DataError(f"{gz[0]}.gz is still compressed; run gunzip on the .h5.gz files in {root}")
            if published == "train":
                raise DataError(f"{root}: no {x_path.name}; download PatchCamelyon's .h5 files into this folder")
            continue
        if len(present) == 1:
            missing = y_path if present[0] == x_path else x_path
            raise DataError(f"{root}: {present[0].name} is there but {missing.name} is missing; download it")
        labels = _pcam_labels(x_path, y_path)
        samples[split] = [Sample(H5Ref(x_path, i), y, split) for i, y in enumerate(labels)]
    src = PatchSource(list(PCAM_CLASSES), samples, f"pcam:{root}")
    return carve(src, val_fraction, test_fraction, seed)


LAYOUT = Layout("pcam", "PatchCamelyon .h5 files, normal vs tumor 96x96 patches", read_pcam)

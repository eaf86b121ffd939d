"""NCT-CRC-HE-100K (train) + CRC-VAL-HE-7K (test), Kather et al. 2019: 9 colorectal tissue classes, .tif tiles."""

from __future__ import annotations

from pathlib import Path

from ...errors import DataError
from ..splits import build_source, carve
from ..types import PatchSource
from .base import Layout, class_dir_items, first_dir

NCT_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
NCT_TRAIN_DIRS = ("NCT-CRC-HE-100K", "NCT-CRC-HE-100K-NONORM")
NCT_TEST_DIRS = ("CRC-VAL-HE-7K",)


def read_nct_crc_he(
    root: Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    train_dir: str | None = None,
) -> PatchSource:
    """NCT-CRC-HE-100K as train and CRC-VAL-HE-7K as test (9 tissue classes, .tif tiles).

    ``root`` holds the unpacked folders; ``train_dir`` picks e.g. the NONORM variant.  A root that is
    itself a folder of the 9 class folders is read as train only.
    """
    if train_dir is not None:
        train = root / train_dir
        if not train.is_dir():
            raise DataError(f"{root}: no folder {train_dir}/; unpack NCT-CRC-HE-100K there or drop train_dir")
    else:
        train = first_dir(root, NCT_TRAIN_DIRS)
    test = first_dir(root, NCT_TEST_DIRS)
    if train is None and any((root / c).is_dir() for c in NCT_CLASSES):
        train = root
    if train is None:
        raise DataError(
            f"{root}: no {' or '.join(NCT_TRAIN_DIRS)} folder; unpack NCT-CRC-HE-100K.zip (and CRC-VAL-HE-7K.zip) there"
        )
    items = class_dir_items(train, NCT_CLASSES, "train")
    if not items:
        raise DataError(f"{train}: none of the class folders {', '.join(NCT_CLASSES)} holds images; re-unpack it")
    if test is not None:
        items += class_dir_items(test, NCT_CLASSES, "test")
    src = build_source(items, f"nct-crc-he:{root}", 0.0, 0.0, seed, classes=NCT_CLASSES)
    return carve(src, val_fraction, test_fraction, seed)


LAYOUT = Layout(
    "nct-crc-he",
    "NCT-CRC-HE-100K (train) + CRC-VAL-HE-7K (test), 9 colorectal tissue classes",
    read_nct_crc_he,
)

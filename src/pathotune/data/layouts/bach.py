"""BACH / ICIAR 2018 microscopy photos: 4 breast classes, no published labelled test split."""

from __future__ import annotations

import csv
from pathlib import Path

from ...errors import DataError
from ..splits import Item, build_source
from ..types import PatchSource
from .base import Layout, class_dir_items

BACH_CLASSES = ("Benign", "InSitu", "Invasive", "Normal")
BACH_CSV = "microscopy_ground_truth.csv"


def _bach_photos(root: Path) -> Path:
    for cand in (root / "ICIAR2018_BACH_Challenge" / "Photos", root / "Photos", root):
        if any((cand / c).is_dir() for c in BACH_CLASSES):
            return cand
    raise DataError(
        f"{root}: no ICIAR2018_BACH_Challenge/Photos/{{{','.join(BACH_CLASSES)}}}/ folders; unpack the BACH zip there"
    )


def _bach_check_csv(photos: Path, items: list[Item]) -> None:
    """The ground-truth CSV (no header: name,label) must agree with the class folders."""
    csv_path = photos / BACH_CSV
    folder_label = {Path(k).name: c for k, c, _ in items if isinstance(k, Path)}
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if r and any(x.strip() for x in r)]
    for line, row in enumerate(rows, start=1):
        if len(row) < 2:
            raise DataError(f"{csv_path}: line {line} should be <image name>,<label>; fix or delete the row")
        name, label = row[0].strip(), row[1].strip()
        if label not in BACH_CLASSES:
            if line == 1:
                continue  # a header row added by hand
            raise DataError(f"{csv_path}: line {line} has label '{label}', not one of {', '.join(BACH_CLASSES)}")
        if name not in folder_label:
            raise DataError(f"{csv_path}: lists {name}, which is not under {photos}/{label}/; re-unpack the photos")
        if folder_label[name] != label:
            raise DataError(
                f"{csv_path}: {name} is labelled {label} but sits in {folder_label[name]}/; "
                "move the file or fix the CSV"
            )


def read_bach(root: Path, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0) -> PatchSource:
    """ICIAR2018_BACH_Challenge/Photos/<class>/*.tif, checked against microscopy_ground_truth.csv if present.

    BACH publishes no labelled test split, so val/test are stratified, seeded fractions.
    """
    photos = _bach_photos(root)
    items = class_dir_items(photos, BACH_CLASSES, None)
    if not items:
        raise DataError(f"{photos}: the class folders hold no images; re-unpack the BACH photos")
    if (photos / BACH_CSV).is_file():
        _bach_check_csv(photos, items)
    return build_source(items, f"bach:{root}", val_fraction, test_fraction, seed, classes=BACH_CLASSES)


LAYOUT = Layout("bach", "BACH/ICIAR2018 microscopy photos, 4 breast classes", read_bach)

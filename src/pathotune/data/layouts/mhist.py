"""MHIST (Wei et al. 2021): colorectal polyps, hyperplastic (HP) vs sessile serrated (SSA), 7 annotators."""

from __future__ import annotations

import csv
from pathlib import Path

from ...errors import ConfigError, DataError
from ..splits import Item, build_source, carve
from ..types import PatchSource
from .base import Layout

MHIST_CLASSES = ("HP", "SSA")
MHIST_COLUMNS = {
    "image": "Image Name",
    "label": "Majority Vote Label",
    "ssa_votes": "Number of Annotators who Selected SSA (Out of 7)",
    "partition": "Partition",
}


def read_mhist(
    root: Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    min_agreement: int | None = None,
) -> PatchSource:
    """images/ + annotations.csv; the CSV's Partition gives train/test, val is carved from train.

    ``min_agreement`` (4..7) keeps only images where at least that many of the 7 annotators agree with
    the majority label, for the published easy/hard analyses.
    """
    csv_path, images = root / "annotations.csv", root / "images"
    if not csv_path.is_file():
        raise DataError(f"{root}: no annotations.csv; put MHIST's annotations.csv next to its images/ folder")
    if not images.is_dir():
        raise DataError(f"{root}: no images/ folder; unzip MHIST's images.zip into {images}")
    if min_agreement is not None and not 4 <= min_agreement <= 7:
        raise ConfigError(f"min_agreement={min_agreement} is outside 4..7 (annotators agreeing out of 7)")
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = {(h or "").strip(): h for h in (reader.fieldnames or [])}
        needed = ["image", "label", "partition"] + (["ssa_votes"] if min_agreement is not None else [])
        for key in needed:
            if MHIST_COLUMNS[key] not in header:
                raise DataError(
                    f"{csv_path}: missing column '{MHIST_COLUMNS[key]}'; this is not MHIST's annotations.csv"
                )
        rows = list(reader)
    col = {k: header.get(v) for k, v in MHIST_COLUMNS.items()}
    items: list[Item] = []
    for line, row in enumerate(rows, start=2):
        name = (row.get(col["image"]) or "").strip()
        label = (row.get(col["label"]) or "").strip()
        part = (row.get(col["partition"]) or "").strip().lower()
        if not name:
            continue
        if label not in MHIST_CLASSES:
            raise DataError(f"{csv_path}: line {line} has label '{label}'; expected HP or SSA")
        if part not in ("train", "test"):
            raise DataError(f"{csv_path}: line {line} has Partition '{part}'; expected train or test")
        if min_agreement is not None:
            try:
                ssa = int((row.get(col["ssa_votes"]) or "").strip())
            except ValueError:
                raise DataError(f"{csv_path}: line {line} has no integer SSA vote count") from None
            if max(ssa, 7 - ssa) < min_agreement:
                continue
        items.append((images / name, label, part))
    if not items:
        raise DataError(f"{csv_path}: no usable rows; check the file (or lower min_agreement)")
    src = build_source(items, f"mhist:{root}", 0.0, 0.0, seed, classes=MHIST_CLASSES)
    return carve(src, val_fraction, test_fraction, seed)


LAYOUT = Layout("mhist", "MHIST images/ + annotations.csv, HP vs SSA polyps", read_mhist)

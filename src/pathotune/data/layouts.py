"""Readers for the on-disk layouts of published pathology patch datasets, exactly as they unpack.

Each reader turns the unpacked download into a :class:`PatchSource` with the dataset's own splits where
it has them (filling the rest with a stratified, seeded share of train), so users need no manifest.
"""

from __future__ import annotations

import csv
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .hgsc import read_histolytics_hgsc
from .sources import (
    H5Ref,
    PatchSource,
    Sample,
    build_source,
    carve,
    check_fractions,
    group_split,
    list_images,
)

Item = tuple[Path | H5Ref, str, str | None]
Reader = Callable[..., PatchSource]


@dataclass(frozen=True)
class Layout:
    """A published layout: a name for ``layout:<name>:<path>``, what it expects, and its reader."""

    name: str
    description: str
    reader: Reader
    accepts_file: bool = False  # the root may be a single file (e.g. a wheel) rather than a folder

    @property
    def options(self) -> tuple[str, ...]:
        """Extra keyword options the reader accepts beyond root/fractions/seed."""
        params = inspect.signature(self.reader).parameters
        return tuple(p for p in params if p not in {"root", "val_fraction", "test_fraction", "seed"})

    def read(
        self,
        root: str | Path,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        seed: int = 0,
        **options: Any,
    ) -> PatchSource:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise ConfigError(f"layout '{self.name}' has no option(s) {unknown}; allowed: {allowed}")
        check_fractions(val_fraction, test_fraction)
        root = Path(root).expanduser()
        if not root.is_dir() and not (self.accepts_file and root.is_file()):
            raise DataError(f"layout '{self.name}': {root} is not a folder; pass the folder the download unpacked into")
        return self.reader(root, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, **options)


def _first_dir(root: Path, candidates: Sequence[str]) -> Path | None:
    for c in candidates:
        p = root / c
        if p.is_dir():
            return p
    return None


def _class_dir_items(folder: Path, classes: Sequence[str], split: str | None) -> list[Item]:
    return [(p, c, split) for c in classes if (folder / c).is_dir() for p in list_images(folder / c)]


# ---------------------------------------------------------------------------------------------------------
# NCT-CRC-HE-100K (train) + CRC-VAL-HE-7K (test), Kather et al. 2019

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
        train = _first_dir(root, NCT_TRAIN_DIRS)
    test = _first_dir(root, NCT_TEST_DIRS)
    if train is None and any((root / c).is_dir() for c in NCT_CLASSES):
        train = root
    if train is None:
        raise DataError(
            f"{root}: no {' or '.join(NCT_TRAIN_DIRS)} folder; unpack NCT-CRC-HE-100K.zip (and CRC-VAL-HE-7K.zip) there"
        )
    items = _class_dir_items(train, NCT_CLASSES, "train")
    if not items:
        raise DataError(f"{train}: none of the class folders {', '.join(NCT_CLASSES)} holds images; re-unpack it")
    if test is not None:
        items += _class_dir_items(test, NCT_CLASSES, "test")
    src = build_source(items, f"nct-crc-he:{root}", 0.0, 0.0, seed, classes=NCT_CLASSES)
    return carve(src, val_fraction, test_fraction, seed)


# ---------------------------------------------------------------------------------------------------------
# PatchCamelyon (Veeling et al. 2018): 96x96 patches in HDF5

PCAM_CLASSES = ("normal", "tumor")
PCAM_SPLITS = {"train": "train", "valid": "val", "test": "test"}


def pcam_file(root: Path, split: str, kind: str) -> Path:
    """The published file name, e.g. camelyonpatch_level_2_split_valid_y.h5."""
    return root / f"camelyonpatch_level_2_split_{split}_{kind}.h5"


def _pcam_labels(x_path: Path, y_path: Path) -> list[int]:
    import h5py
    import numpy as np

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
        raise DataError(f"{x_path.parent}: cannot open PatchCamelyon HDF5 files ({' '.join(str(e).split())})") from None
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


# ---------------------------------------------------------------------------------------------------------
# BACH / ICIAR 2018 microscopy photos

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
    items = _class_dir_items(photos, BACH_CLASSES, None)
    if not items:
        raise DataError(f"{photos}: the class folders hold no images; re-unpack the BACH photos")
    if (photos / BACH_CSV).is_file():
        _bach_check_csv(photos, items)
    return build_source(items, f"bach:{root}", val_fraction, test_fraction, seed, classes=BACH_CLASSES)


# ---------------------------------------------------------------------------------------------------------
# MHIST (Wei et al. 2021): colorectal polyps HP vs SSA

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


# ---------------------------------------------------------------------------------------------------------
# BreakHis (Spanhol et al. 2016): breast tumour photos at 4 magnifications, 82 patients

BREAKHIS_SUBTYPES = {
    "benign": ("adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma"),
    "malignant": ("ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma"),
}
BREAKHIS_MAGNIFICATIONS = ("40X", "100X", "200X", "400X")


def _breast_dir(root: Path) -> Path:
    for base in (root, root / "BreaKHis_v1", root / "BreaKHis_v1" / "BreaKHis_v1"):
        for cand in (base / "histology_slides" / "breast", base / "breast"):
            if (cand / "benign").is_dir() or (cand / "malignant").is_dir():
                return cand
    raise DataError(
        f"{root}: no BreaKHis_v1/histology_slides/breast/{{benign,malignant}}/; unpack BreaKHis_v1.tar.gz there"
    )


def _magnifications(value: str | Sequence[str] | None) -> set[str]:
    if value is None:
        return set(BREAKHIS_MAGNIFICATIONS)
    values = [value] if isinstance(value, str) else list(value)
    out = set()
    for v in values:
        m = str(v).strip().upper().rstrip("X") + "X"
        if m not in BREAKHIS_MAGNIFICATIONS:
            raise ConfigError(f"magnification '{v}' is not one of {', '.join(BREAKHIS_MAGNIFICATIONS)}")
        out.add(m)
    return out


def breakhis_patient(folder_name: str) -> str:
    """Patient id from a folder like SOB_M_DC_14-13412 -> '14-13412'.

    The subtype code is dropped on purpose: patient 13412 appears under two malignant subtypes and must
    still land in a single split.
    """
    return folder_name.rsplit("_", 1)[-1]


def read_breakhis(
    root: Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    subtypes: bool = False,
    magnification: str | Sequence[str] | None = None,
) -> PatchSource:
    """BreaKHis_v1/histology_slides/breast/<class>/SOB/<subtype>/<patient>/<mag>/*.png, split by patient.

    Labels are benign/malignant, or the 8 subtypes with ``subtypes=True``; ``magnification`` keeps only
    e.g. '40X' (or a list).  No patient appears in two splits, so scores are not inflated by leakage.
    """
    breast = _breast_dir(root)
    mags = _magnifications(magnification)
    keys: list[Path] = []
    names: list[str] = []
    patients: list[str] = []
    for tumour, subtype_names in BREAKHIS_SUBTYPES.items():
        sob = breast / tumour / "SOB"
        if not sob.is_dir():
            continue
        for sub_dir in sorted(p for p in sob.iterdir() if p.is_dir()):
            if sub_dir.name not in subtype_names:
                raise DataError(
                    f"{sub_dir}: unknown {tumour} subtype folder; expected one of {', '.join(subtype_names)}"
                )
            for patient_dir in sorted(p for p in sub_dir.iterdir() if p.is_dir()):
                for mag_dir in sorted(p for p in patient_dir.iterdir() if p.is_dir()):
                    if mag_dir.name.upper() not in mags:
                        continue
                    for img in list_images(mag_dir):
                        keys.append(img)
                        names.append(sub_dir.name if subtypes else tumour)
                        patients.append(breakhis_patient(patient_dir.name))
    if not keys:
        raise DataError(f"{breast}: no images at magnification(s) {', '.join(sorted(mags))}; check the folder")
    classes = sorted(s for v in BREAKHIS_SUBTYPES.values() for s in v) if subtypes else sorted(BREAKHIS_SUBTYPES)
    index = {c: i for i, c in enumerate(classes)}
    parts = group_split(patients, [index[n] for n in names], val_fraction, test_fraction, seed)
    items: list[Item] = [(keys[i], names[i], split) for split, idx in parts.items() for i in idx]
    return build_source(items, f"breakhis:{root}", 0.0, 0.0, seed, classes=classes)


# ---------------------------------------------------------------------------------------------------------

LAYOUTS: dict[str, Layout] = {
    "nct-crc-he": Layout(
        "nct-crc-he",
        "NCT-CRC-HE-100K (train) + CRC-VAL-HE-7K (test), 9 colorectal tissue classes",
        read_nct_crc_he,
    ),
    "pcam": Layout("pcam", "PatchCamelyon .h5 files, normal vs tumor 96x96 patches", read_pcam),
    "bach": Layout("bach", "BACH/ICIAR2018 microscopy photos, 4 breast classes", read_bach),
    "mhist": Layout("mhist", "MHIST images/ + annotations.csv, HP vs SSA polyps", read_mhist),
    "breakhis": Layout(
        "breakhis", "BreaKHis_v1 breast photos, benign/malignant or 8 subtypes, patient split", read_breakhis
    ),
    "histolytics-hgsc": Layout(
        "histolytics-hgsc",
        "histolytics 0.3.0 wheel (or its data folder): HGSC H&E nucleus tiles, 3 cell classes, spatial split",
        read_histolytics_hgsc,
        accepts_file=True,
    ),
}


def list_layouts() -> list[str]:
    """Names accepted by ``layout:<name>:<path>`` and ``load_source(..., layout=<name>)``."""
    return sorted(LAYOUTS)


def get_layout(name: str) -> Layout:
    try:
        return LAYOUTS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dataset layout '{name}'; known layouts: {', '.join(list_layouts())}") from None

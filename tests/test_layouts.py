"""Published dataset layouts, each on a tiny fixture written exactly as the real download unpacks."""

from __future__ import annotations

import csv
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pathotune.data import LAYOUTS, H5Ref, PatchDataset, get_layout, list_layouts, load_source, scan
from pathotune.data.layouts.bach import BACH_CLASSES
from pathotune.data.layouts.breakhis import BREAKHIS_SUBTYPES, breakhis_patient
from pathotune.data.layouts.nct_crc_he import NCT_CLASSES
from pathotune.errors import ConfigError, DataError


def write_img(path: Path, color: tuple[int, int, int] = (190, 90, 160)) -> Path:
    """An 8x8 tile; the format follows the suffix, as in the real datasets (.tif, .png). One pixel depends on the
    path, so that distinct files are never byte-identical copies (the scan refuses copies across splits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (8, 8), color)
    im.putpixel((7, 7), tuple(zlib.crc32(str(path).encode()).to_bytes(4, "big")[:3]))
    im.save(path)
    return path


def test_registry_lists_every_layout() -> None:
    assert list_layouts() == ["bach", "breakhis", "histolytics-hgsc", "mhist", "nct-crc-he", "pcam"]
    assert set(LAYOUTS) == set(list_layouts())
    assert get_layout("BreakHis") is LAYOUTS["breakhis"]
    assert LAYOUTS["breakhis"].options == ("subtypes", "magnification")
    with pytest.raises(ConfigError, match="no option"):
        get_layout("pcam").read(".", subtypes=True)


# --------------------------------------------------------------------------------------------- NCT-CRC-HE


def nct_fixture(root: Path, train_name: str = "NCT-CRC-HE-100K") -> Path:
    for cls in NCT_CLASSES:
        for i in range(2):
            write_img(root / train_name / cls / f"{cls}-AAAWMSFI{i}.tif")
        write_img(root / "CRC-VAL-HE-7K" / cls / f"{cls}-TCGA-{cls}.tif")
    return root


def test_nct_crc_he_train_and_test_folders(tmp_path: Path) -> None:
    src = load_source(f"layout:nct-crc-he:{nct_fixture(tmp_path)}", val_fraction=0.5, seed=0)
    assert src.classes == list(NCT_CLASSES)
    assert src.counts() == {"train": [1] * 9, "val": [1] * 9, "test": [1] * 9}
    for s in src.all_samples():
        assert s.path_or_key.parent.name == NCT_CLASSES[s.label]
        expected = "CRC-VAL-HE-7K" if s.split == "test" else "NCT-CRC-HE-100K"
        assert s.path_or_key.parent.parent.name == expected
    assert scan(src).ok


def test_nct_crc_he_nonorm_variant_and_missing_folder(tmp_path: Path) -> None:
    nct_fixture(tmp_path, "NCT-CRC-HE-100K-NONORM")
    src = load_source(tmp_path, layout="nct-crc-he", val_fraction=0.5)
    assert {s.path_or_key.parts[-3] for s in src.split("train")} == {"NCT-CRC-HE-100K-NONORM"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="NCT-CRC-HE-100K.*unpack"):
        load_source(f"layout:nct-crc-he:{tmp_path / 'empty'}")


# --------------------------------------------------------------------------------------------- PCam


def pcam_fixture(root: Path, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = {}
    for split, n in sizes.items():
        y = np.array([i % 2 for i in range(n)], dtype=np.uint8).reshape(n, 1, 1, 1)
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f["x"] = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f["y"] = y
        labels[split] = y.reshape(-1)
    return labels


def test_pcam_reads_labels_and_images_lazily(tmp_path: Path) -> None:
    labels = pcam_fixture(tmp_path, {"train": 6, "valid": 4, "test": 2})
    src = load_source(f"layout:pcam:{tmp_path}")
    assert src.classes == ["normal", "tumor"]
    assert [len(src.split(s)) for s in ("train", "val", "test")] == [6, 4, 2]
    for split, published in (("train", "train"), ("val", "valid"), ("test", "test")):
        for s in src.split(split):
            assert isinstance(s.path_or_key, H5Ref)
            assert s.path_or_key.file.name == f"camelyonpatch_level_2_split_{published}_x.h5"
            assert s.label == labels[published][s.path_or_key.index]

    sample = src.split("val")[3]
    img, label, _ = PatchDataset([sample])[0]
    with h5py.File(sample.path_or_key.file) as f:
        expected = torch.from_numpy(f["x"][3]).permute(2, 0, 1)
    assert img.shape == (3, 96, 96) and label == 1
    assert torch.equal((img * 255).round().to(torch.uint8), expected)
    assert scan(src).ok


def test_pcam_without_valid_carves_val_and_explains_gz(tmp_path: Path) -> None:
    pcam_fixture(tmp_path, {"train": 10})
    src = load_source(tmp_path, layout="pcam", val_fraction=0.2)
    assert src.counts() == {"train": [4, 4], "val": [1, 1], "test": [0, 0]}

    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "camelyonpatch_level_2_split_train_x.h5.gz").write_bytes(b"")
    with pytest.raises(DataError, match="gunzip"):
        load_source(f"layout:pcam:{gz}")
    (tmp_path / "camelyonpatch_level_2_split_valid_x.h5").write_bytes(b"")
    with pytest.raises(DataError, match="camelyonpatch_level_2_split_valid_y.h5 is missing"):
        load_source(f"layout:pcam:{tmp_path}")


# --------------------------------------------------------------------------------------------- BACH


def bach_fixture(root: Path, with_csv: bool = True) -> Path:
    photos = root / "ICIAR2018_BACH_Challenge" / "Photos"
    prefix = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}
    rows = []
    for cls in BACH_CLASSES:
        for i in range(1, 3):
            name = f"{prefix[cls]}{i:03d}.tif"
            write_img(photos / cls / name)
            rows.append(f"{name},{cls}")
    if with_csv:
        (photos / "microscopy_ground_truth.csv").write_text("\n".join(rows) + "\n")
    return photos


def test_bach_photos_with_ground_truth_csv(tmp_path: Path) -> None:
    bach_fixture(tmp_path)
    src = load_source(f"layout:bach:{tmp_path}", val_fraction=0.5, seed=2)
    assert src.classes == ["Benign", "InSitu", "Invasive", "Normal"]
    assert src.counts() == {"train": [1] * 4, "val": [1] * 4, "test": [0] * 4}
    assert all(s.path_or_key.parent.name == src.classes[s.label] for s in src.all_samples())
    same = load_source(f"layout:bach:{tmp_path}", val_fraction=0.5, seed=2)
    assert same.samples == src.samples


def test_bach_csv_disagreeing_with_folders_is_an_error(tmp_path: Path) -> None:
    photos = bach_fixture(tmp_path)
    gt = photos / "microscopy_ground_truth.csv"
    gt.write_text(gt.read_text().replace("b001.tif,Benign", "b001.tif,Normal"))
    with pytest.raises(
        DataError, match=r"microscopy_ground_truth\.csv: b001\.tif is labelled Normal but sits in Benign/"
    ):
        load_source(f"layout:bach:{tmp_path}", val_fraction=0.5)


def test_bach_without_csv_uses_folders(tmp_path: Path) -> None:
    photos = bach_fixture(tmp_path, with_csv=False)
    src = load_source(photos, layout="bach", val_fraction=0.5)
    assert len(src) == 8


# --------------------------------------------------------------------------------------------- MHIST


MHIST_HEADER = [
    "Image Name",
    "Majority Vote Label",
    "Number of Annotators who Selected SSA (Out of 7)",
    "Partition",
]


def mhist_fixture(root: Path) -> list[list[str]]:
    # (name, label, SSA votes, partition): 4 HP + 4 SSA in train, 1 + 1 in test
    rows = []
    for i in range(10):
        label = "HP" if i % 2 == 0 else "SSA"
        votes = str([0, 7, 3, 4, 1, 6, 2, 5, 0, 7][i])
        rows.append([f"MHIST_{i:03d}.png", label, votes, "train" if i < 8 else "test"])
        write_img(root / "images" / rows[-1][0])
    with (root / "annotations.csv").open("w", newline="") as f:
        csv.writer(f).writerows([MHIST_HEADER, *rows])
    return rows


def test_mhist_partition_labels_and_agreement_filter(tmp_path: Path) -> None:
    rows = mhist_fixture(tmp_path)
    src = load_source(f"layout:mhist:{tmp_path}", val_fraction=0.25, seed=1)
    assert src.classes == ["HP", "SSA"]
    assert src.counts() == {"train": [3, 3], "val": [1, 1], "test": [1, 1]}
    expected = {tmp_path / "images" / r[0]: (r[1], "test" if r[3] == "test" else "trainval") for r in rows}
    for s in src.all_samples():
        label, part = expected[s.path_or_key]
        assert src.classes[s.label] == label
        assert (s.split == "test") == (part == "test")

    strict = load_source(tmp_path, layout="mhist", val_fraction=0.0, min_agreement=6)
    names = {s.path_or_key.name for s in strict.all_samples()}
    assert names == {f"MHIST_{i:03d}.png" for i in (0, 1, 4, 5, 8, 9)}


def test_mhist_missing_column_names_csv_and_column(tmp_path: Path) -> None:
    mhist_fixture(tmp_path)
    text = (tmp_path / "annotations.csv").read_text().replace("Partition", "Fold")
    (tmp_path / "annotations.csv").write_text(text)
    with pytest.raises(DataError, match=r"annotations\.csv: missing column 'Partition'"):
        load_source(f"layout:mhist:{tmp_path}")


# --------------------------------------------------------------------------------------------- BreakHis

# (tumour class, subtype, subtype code, patient folder id); 14-13412 sits under two subtypes, as in the
# real dataset, and must still land in a single split.
BREAKHIS_PATIENTS = [
    ("benign", "adenosis", "A", "14-22549AB"),
    ("benign", "adenosis", "A", "14-29960CD"),
    ("benign", "fibroadenoma", "F", "14-9133"),
    ("benign", "tubular_adenoma", "TA", "14-3411F"),
    ("malignant", "ductal_carcinoma", "DC", "14-13412"),
    ("malignant", "ductal_carcinoma", "DC", "14-2523"),
    ("malignant", "lobular_carcinoma", "LC", "14-13412"),
    ("malignant", "mucinous_carcinoma", "MC", "14-10147"),
]


def breakhis_fixture(root: Path) -> Path:
    breast = root / "BreaKHis_v1" / "histology_slides" / "breast"
    for tumour, subtype, code, pid in BREAKHIS_PATIENTS:
        t = tumour[0].upper()
        for mag in ("40X", "100X"):
            for i in range(1, 3):
                name = f"SOB_{t}_{code}-{pid}-{mag[:-1]}-{i:03d}.png"
                write_img(breast / tumour / "SOB" / subtype / f"SOB_{t}_{code}_{pid}" / mag / name)
    return root


def _patient_of(path: Path) -> str:
    return breakhis_patient(path.parents[1].name)


def test_breakhis_binary_labels_and_patient_split(tmp_path: Path) -> None:
    breakhis_fixture(tmp_path)
    src = load_source(f"layout:breakhis:{tmp_path}", val_fraction=0.25, test_fraction=0.25, seed=0)
    assert src.classes == ["benign", "malignant"]
    assert len(src) == 8 * 4
    for s in src.all_samples():
        assert s.path_or_key.parts[-6] == src.classes[s.label]
    patients = {split: {_patient_of(s.path_or_key) for s in src.split(split)} for split in ("train", "val", "test")}
    assert all(patients[split] for split in patients)
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"])
    assert not patients["val"] & patients["test"]
    assert sum(len(p) for p in patients.values()) == 7  # 8 folders, 7 patients

    again = load_source(f"layout:breakhis:{tmp_path}", val_fraction=0.25, test_fraction=0.25, seed=0)
    assert again.samples == src.samples
    splits = {
        seed: load_source(tmp_path, layout="breakhis", val_fraction=0.25, test_fraction=0.25, seed=seed).samples
        for seed in range(1, 4)
    }
    assert any(v != src.samples for v in splits.values())


@pytest.mark.filterwarnings("ignore:.*labels not seen in train")  # few patients per subtype here
def test_breakhis_subtypes_and_magnification(tmp_path: Path) -> None:
    breakhis_fixture(tmp_path)
    src = load_source(tmp_path, layout="breakhis", val_fraction=0.2, subtypes=True, magnification="40x")
    assert src.classes == sorted(s for v in BREAKHIS_SUBTYPES.values() for s in v)
    assert len(src) == 8 * 2
    for s in src.all_samples():
        assert s.path_or_key.parent.name == "40X"
        assert s.path_or_key.parts[-4] == src.classes[s.label]
    assert set(src.empty_classes()) >= {"phyllodes_tumor", "papillary_carcinoma"}

    both = load_source(tmp_path, layout="breakhis", val_fraction=0.2, magnification=["40X", "100"])
    assert len(both) == 8 * 4
    with pytest.raises(ConfigError, match="magnification '60X'"):
        load_source(tmp_path, layout="breakhis", magnification="60X")
    with pytest.raises(DataError, match="histology_slides/breast"):
        load_source(f"layout:breakhis:{tmp_path / 'BreaKHis_v1' / 'histology_slides' / 'breast' / 'benign'}")

"""BreakHis (Spanhol et al. 2016): breast tumour photos at 4 magnifications from 82 patients, split by patient."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ...errors import ConfigError, DataError
from ..images import list_images
from ..splits import Item, build_source, group_split
from ..types import PatchSource, sort_class_names
from .base import Layout

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
    labels = [s for v in BREAKHIS_SUBTYPES.values() for s in v] if subtypes else list(BREAKHIS_SUBTYPES)
    classes = sort_class_names(labels)
    index = {c: i for i, c in enumerate(classes)}
    parts = group_split(patients, [index[n] for n in names], val_fraction, test_fraction, seed)
    items: list[Item] = [(keys[i], names[i], split, patients[i]) for split, idx in parts.items() for i in idx]
    return build_source(items, f"breakhis:{root}", 0.0, 0.0, seed, classes=classes)


LAYOUT = Layout("breakhis", "BreaKHis_v1 breast photos, benign/malignant or 8 subtypes, patient split", read_breakhis)

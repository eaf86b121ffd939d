"""Which slides a run reads: a folder (searched recursively), one slide, or a CSV listing them.

A slide is a file, or a folder holding a DICOM WSI series (its instances are one slide, not one each). Ids are
file stems and DICOM folder names. A CSV may give each slide its resolution in an ``mpp`` column (as TRIDENT's
slide lists do), for slides whose files lack it or state it wrongly.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from ..errors import DataError
from .reader import SLIDE_EXTENSIONS, is_dicom_file

__all__ = ["SLIDE_EXTENSIONS", "find_slides", "listed_slides", "slide_id", "unique_ids"]

PATH_COLUMNS = ("slide_path", "path", "wsi")  # "wsi": TRIDENT's slide list
MPP_COLUMN = "mpp"

# Hamamatsu VMS/VMU slides keep their image data in sibling JPEGs, which are not slides of their own.
_VMS_COMPANIONS = (".jpg", ".jpeg")


def slide_id(path: str | Path) -> str:
    """A slide's id is its file stem, or a DICOM folder's name: the name its features, heatmaps and labels rows
    go by."""
    path = Path(path)
    return Path(os.path.abspath(path)).name if path.is_dir() else path.stem  # abspath: "." has a name too


def _slides_in_folder(folder: Path) -> list[Path]:
    """Slide files by extension, and each folder that holds DICOM files as one slide (DICOM files often have no
    extension, so files of any other name are sniffed for the DICM marker)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(n for n in filenames if not n.startswith("."))
        has_vms = any(Path(n).suffix.lower() in (".vms", ".vmu") for n in names)
        slides, dicom = [], False
        for name in names:
            ext = Path(name).suffix.lower()
            if ext in SLIDE_EXTENSIONS:
                if not (has_vms and ext in _VMS_COMPANIONS):
                    slides.append(Path(dirpath) / name)
            elif not dicom:
                dicom = is_dicom_file(Path(dirpath) / name)  # DICOM files are sniffed only once per folder
        found.extend([Path(dirpath), *slides] if dicom else slides)
    return found


def _dicom_series(path: Path) -> Path:
    """A DICOM instance stands for its series, the folder it lies in."""
    return path.parent if path.is_file() and is_dicom_file(path) else path


def _mpp_cell(path: Path, line: int, value: str) -> float | None:
    if not value.strip():
        return None
    try:
        mpp = float(value)
    except ValueError:
        mpp = math.nan
    if not (math.isfinite(mpp) and mpp > 0):
        raise DataError(
            f"slide list {path} line {line}: mpp {value.strip()!r} is not a positive number of microns per pixel; "
            "fix it or leave the cell empty"
        )
    return mpp


def _slides_in_csv(path: Path) -> list[tuple[Path, float | None]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read slide list {path}: {e}") from None
    columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else []) if c}
    key = next((columns[c] for c in PATH_COLUMNS if c in columns), None)
    if key is None:
        raise DataError(f"slide list {path} needs a 'slide_path' (or 'path', 'wsi') column; it has {sorted(columns)}")
    mpp_key = columns.get(MPP_COLUMN)
    out = []
    lines: dict[Path, int] = {}
    for i, row in enumerate(rows, start=2):
        value = (row.get(key) or "").strip()
        if not value:
            raise DataError(f"slide list {path} line {i} has an empty '{key}'")
        p = Path(value).expanduser()
        mpp = _mpp_cell(path, i, row.get(mpp_key) or "") if mpp_key else None
        slide = _dicom_series(p if p.is_absolute() else path.parent / p)
        if slide in lines:  # which row would count? Its mpp or its place may differ: the list must say once
            raise DataError(
                f"slide list {path} names slide {slide} on lines {lines[slide]} and {i}; keep one row per slide"
            )
        lines[slide] = i
        out.append((slide, mpp))
    return out


def listed_slides(source: str | Path) -> list[tuple[Path, float | None]]:
    """(slide, mpp) for every slide of ``source`` (see :func:`find_slides`); mpp comes from a CSV's ``mpp``
    column and is None where the CSV leaves it empty or has no such column, and for folders and single slides."""
    source = Path(source)
    if source.is_dir():
        found = [(p, None) for p in _slides_in_folder(source)]
        if not found:
            raise DataError(
                f"no slides in {source}; slide extensions are {' '.join(SLIDE_EXTENSIONS)}, and a folder of DICOM "
                "files is one slide"
            )
    elif source.is_file() and source.suffix.lower() == ".csv":
        found = _slides_in_csv(source)
        if not found:
            raise DataError(f"slide list {source} has no rows")
    elif source.is_file():
        found = [(_dicom_series(source), None)]
    else:
        raise DataError(f"slides {source} not found; pass a folder of slides, a slide, or a CSV with slide_path")
    mpps = dict(found)
    return [(p, mpps[p]) for p in unique_ids([p for p, _ in found])]


def find_slides(source: str | Path) -> list[Path]:
    """Slides from a folder (searched recursively for slide extensions and DICOM series folders) or a CSV with a
    slide_path (or path, wsi) column.

    CSV paths may be relative to the CSV's folder; a DICOM folder, or any one of its files, names a DICOM slide.
    Slide ids (file stems, DICOM folder names) must be unique, since each names one output file.
    """
    return [p for p, _ in listed_slides(source)]


def unique_ids(slides: list[Path]) -> list[Path]:
    """``slides`` in order without repeats; two paths with one id fail, since an id names one output."""
    seen: dict[str, Path] = {}
    for p in map(Path, slides):
        sid = slide_id(p)
        if sid in seen and seen[sid] != p:
            raise DataError(
                f"slides {seen[sid]} and {p} share the id '{sid}' (file stem or DICOM folder name), so their outputs "
                "would collide; rename one or list them in separate runs"
            )
        seen[sid] = p
    return list(seen.values())

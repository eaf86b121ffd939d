"""Which slides a run reads: a folder (searched recursively), one slide, or a CSV listing them; ids are file stems."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import DataError

__all__ = ["SLIDE_EXTENSIONS", "find_slides", "slide_id", "unique_ids"]

SLIDE_EXTENSIONS = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".svslide",
    ".bif",
    ".vms",
    ".vmu",
    ".png",
    ".jpg",
    ".jpeg",
)
# Hamamatsu VMS/VMU slides keep their image data in sibling JPEGs, which are not slides of their own.
_VMS_COMPANIONS = (".jpg", ".jpeg")


def slide_id(path: str | Path) -> str:
    """A slide's id is its file stem: the name its features, heatmaps and labels rows go by."""
    return Path(path).stem


def _slides_in_folder(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = [n for n in filenames if not n.startswith(".")]
        has_vms = any(Path(n).suffix.lower() in (".vms", ".vmu") for n in names)
        for name in sorted(names):
            ext = Path(name).suffix.lower()
            if ext in SLIDE_EXTENSIONS and not (has_vms and ext in _VMS_COMPANIONS):
                found.append(Path(dirpath) / name)
    return found


def _slides_in_csv(path: Path) -> list[Path]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read slide list {path}: {e}") from None
    columns = {c.strip().lower(): c for c in (rows[0].keys() if rows else []) if c}
    key = columns.get("slide_path") or columns.get("path")
    if key is None:
        raise DataError(f"slide list {path} needs a 'slide_path' (or 'path') column; it has {sorted(columns)}")
    out = []
    for i, row in enumerate(rows, start=2):
        value = (row.get(key) or "").strip()
        if not value:
            raise DataError(f"slide list {path} line {i} has an empty '{key}'")
        p = Path(value).expanduser()
        out.append(p if p.is_absolute() else path.parent / p)
    return out


def find_slides(source: str | Path) -> list[Path]:
    """Slides from a folder (searched recursively for slide extensions) or a CSV with a slide_path/path column.

    CSV paths may be relative to the CSV's folder. Slide ids (file stems) must be unique, since each names
    one output file.
    """
    source = Path(source)
    if source.is_dir():
        slides = _slides_in_folder(source)
        if not slides:
            raise DataError(f"no slides in {source}; slide extensions are {' '.join(SLIDE_EXTENSIONS)}")
    elif source.is_file() and source.suffix.lower() == ".csv":
        slides = _slides_in_csv(source)
        if not slides:
            raise DataError(f"slide list {source} has no rows")
    elif source.is_file():
        slides = [source]
    else:
        raise DataError(f"slides {source} not found; pass a folder of slides, a slide, or a CSV with slide_path")
    return unique_ids(slides)


def unique_ids(slides: list[Path]) -> list[Path]:
    """``slides`` in order without repeats; two paths with one id (file stem) fail, since an id names one output."""
    seen: dict[str, Path] = {}
    for p in map(Path, slides):
        sid = slide_id(p)
        if sid in seen and seen[sid] != p:
            raise DataError(
                f"slides {seen[sid]} and {p} share the id '{sid}' (file stem), so their outputs would collide; "
                "rename one or list them in separate runs"
            )
        seen[sid] = p
    return list(seen.values())

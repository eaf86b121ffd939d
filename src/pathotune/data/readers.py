"""The generic readers: a tree of class folders (optionally under split folders), or a CSV manifest."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

from ..errors import DataError, one_line
from .images import IMAGE_EXTENSIONS, is_image, list_images
from .splits import Item, build_source, carve, check_fractions
from .types import PatchSource, sort_class_names

# Folder and CSV split names that people actually use, mapped to ours.
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in _subdirs(root):
        split = SPLIT_ALIASES.get(d.name.lower())
        if split is not None:
            if split in found:
                raise DataError(f"{root}: both {found[split].name}/ and {d.name}/ name the {split} split; keep one")
            found[split] = d
    return found


def read_folder(root: Path, val_fraction: float, test_fraction: float, seed: int) -> PatchSource:
    """train/<class>/ (+ val/, test/) folders, or plain <class>/ folders split stratified by fraction."""
    check_fractions(val_fraction, test_fraction)
    splits = _split_dirs(root)
    items: list[Item] = []
    if "train" in splits:
        class_names: set[str] = set()
        for split, d in splits.items():
            for cdir in _subdirs(d):
                class_names.add(cdir.name)
                items.extend((p, cdir.name, split) for p in list_images(cdir))
        loose = [p.name for d in splits.values() for p in d.iterdir() if is_image(p)]
        if loose:
            raise DataError(
                f"{root}: images directly inside a split folder (e.g. {loose[0]}); move them into <split>/<class>/"
            )
        src = build_source(items, str(root), 0.0, 0.0, seed, classes=sort_class_names(class_names))
        return carve(src, val_fraction, test_fraction, seed)
    class_dirs = _subdirs(root)
    for cdir in class_dirs:
        items.extend((p, cdir.name, None) for p in list_images(cdir))
    if not items:
        raise DataError(
            f"{root}: no images ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) in class folders; "
            "expected <class>/<image> or train/<class>/<image>"
        )
    names = sort_class_names(d.name for d in class_dirs)
    return build_source(items, str(root), val_fraction, test_fraction, seed, classes=names)


def read_csv(csv_path: Path, val_fraction: float, test_fraction: float, seed: int) -> PatchSource:
    """A manifest with columns path,label (+ optional split and group); other columns are ignored.

    Relative paths resolve against the CSV's folder so a dataset folder with its manifest can be moved.
    Rows without a split are split stratified by fraction (by group when the manifest names groups); a manifest
    whose rows all carry a split keeps it. ``group`` names the slide, patient or region a row belongs to: splits
    keep a group whole and intervals resample groups.
    """
    check_fractions(val_fraction, test_fraction)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = {(h or "").strip().lower(): h for h in (reader.fieldnames or [])}
            for col in ("path", "label"):
                if col not in header:
                    raise DataError(
                        f"{csv_path}: missing required column '{col}' "
                        f"(found: {', '.join(header) or 'none'}); "
                        "the manifest needs a header row with path,label[,split]"
                    )
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read the CSV manifest ({one_line(e)}); check the file") from None
    base = csv_path.parent
    split_col = header.get("split")
    group_col = header.get("group")
    items: list[Item] = []
    lines: list[int] = []
    for line, row in enumerate(rows, start=2):
        path_v = (row.get(header["path"]) or "").strip()
        label_v = (row.get(header["label"]) or "").strip()
        split_v = (row.get(split_col) or "").strip() if split_col else ""
        if not path_v and not label_v and not split_v:
            continue
        if not path_v or not label_v:
            missing = "path" if not path_v else "label"
            raise DataError(f"{csv_path}: line {line} has an empty '{missing}'; fill it in or delete the row")
        split: str | None = None
        if split_v:
            split = SPLIT_ALIASES.get(split_v.lower())
            if split is None:
                raise DataError(
                    f"{csv_path}: line {line} has split '{split_v}'; use train, val or test (or leave it empty)"
                )
        p = Path(path_v).expanduser()
        group = ((row.get(group_col) or "").strip() or None) if group_col else None
        items.append((p if p.is_absolute() else base / p, label_v, split, group))
        lines.append(line)
    if not items:
        raise DataError(f"{csv_path}: the manifest has no rows; add path,label rows")
    return build_source(_drop_repeated_rows(csv_path, items, lines), str(csv_path), val_fraction, test_fraction, seed)


def _drop_repeated_rows(csv_path: Path, items: list[Item], lines: list[int]) -> list[Item]:
    """Rows naming the same file: identical ones are dropped with a warning (they would count twice, or land in
    two splits when splits are carved); the same file under two labels or in two splits is an error."""
    first: dict[Path, tuple[int, str, str | None]] = {}
    kept: list[Item] = []
    dropped: list[tuple[int, int]] = []
    for item, line in zip(items, lines, strict=True):
        path, label, split = item[:3]
        key = Path(os.path.normpath(path))
        if key not in first:
            first[key] = (line, label, split)
            kept.append(item)
            continue
        line0, label0, split0 = first[key]
        if label != label0:
            raise DataError(
                f"{csv_path}: {path} is listed with label '{label0}' (line {line0}) and '{label}' (line {line}); "
                "keep one row per file"
            )
        if split != split0:
            raise DataError(
                f"{csv_path}: {path} is listed in split {split0 or '(carved)'} (line {line0}) and "
                f"{split or '(carved)'} (line {line}), a leak between splits; keep one row per file"
            )
        dropped.append((line, line0))
    if dropped:
        warnings.warn(
            f"{csv_path}: dropped {len(dropped)} repeated row(s) naming a file already listed (first: line "
            f"{dropped[0][0]} repeats line {dropped[0][1]}), so that each image counts once",
            stacklevel=3,
        )
    return kept

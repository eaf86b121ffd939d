"""Slide label tables (``slide_id,label[,split|fold]``) and the folds they ask for."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from ..data import SPLITS
from ..errors import ConfigError, DataError
from ..features import slide_feature_files
from .bags import missing_message

__all__ = ["FoldPlan", "SlideLabel", "SlideLabels", "plan_folds", "read_slide_labels"]


@dataclass(frozen=True)
class SlideLabel:
    """One row of a labels CSV."""

    slide_id: str
    label: str
    split: str | None = None
    fold: int | None = None


@dataclass
class SlideLabels:
    """Rows of a labels CSV with their sorted classes; ``mode`` says how folds are defined.

    ``mode`` is 'split' (a train/val/test column), 'fold' (a given fold column) or 'kfold' (neither).
    """

    path: Path
    rows: list[SlideLabel]
    classes: list[str]
    mode: str
    columns: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[SlideLabel]:
        return iter(self.rows)

    def __getitem__(self, i: int) -> SlideLabel:
        return self.rows[i]

    @property
    def slide_ids(self) -> list[str]:
        return [r.slide_id for r in self.rows]

    @property
    def targets(self) -> np.ndarray:
        """Class indices into ``classes``."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[r.label] for r in self.rows], dtype=np.int64)


def _class_key(label: str) -> tuple[int, float, str]:
    """Numeric labels in numeric order ('2' before '10'), the rest alphabetically after them."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def read_slide_labels(
    csv_path: str | os.PathLike[str], features_dir: str | os.PathLike[str] | None = None
) -> SlideLabels:
    """Read and validate ``slide_id,label[,split|fold]``; with ``features_dir`` every slide needs its feature file.

    Extra columns are ignored. Classes are the sorted distinct labels; at least two are needed.
    """
    p = Path(csv_path)
    if not p.is_file():
        raise DataError(f"labels file {p} not found; give a CSV with columns slide_id,label[,split|fold]")
    try:
        with open(p, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            raw = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"labels file {p} is not a readable CSV ({e}); save it as UTF-8 CSV") from None
    for needed in ("slide_id", "label"):
        if needed not in columns:
            raise DataError(
                f"labels file {p} has no column '{needed}'; expected slide_id,label[,split|fold], found {columns}"
            )
    if "split" in columns and "fold" in columns:
        raise DataError(f"labels file {p} has both 'split' and 'fold' columns; keep one of them")
    mode = "split" if "split" in columns else "fold" if "fold" in columns else "kfold"
    rows: list[SlideLabel] = []
    seen: set[str] = set()
    for line, r in enumerate(raw, start=2):
        if not r["slide_id"] or not r["label"]:
            raise DataError(f"labels file {p} line {line}: empty slide_id or label; fill it in or drop the row")
        if r["slide_id"] in seen:
            raise DataError(f"labels file {p} line {line}: slide id '{r['slide_id']}' is listed twice; keep one row")
        seen.add(r["slide_id"])
        split = fold = None
        if mode == "split":
            split = r["split"].lower()
            if split not in SPLITS:
                raise DataError(f"labels file {p} line {line}: split '{r['split']}' is not one of {list(SPLITS)}")
        elif mode == "fold":
            try:
                fold = int(r["fold"])
            except ValueError:
                raise DataError(f"labels file {p} line {line}: fold '{r['fold']}' is not an integer") from None
        rows.append(SlideLabel(r["slide_id"], r["label"], split, fold))
    if not rows:
        raise DataError(f"labels file {p} has no rows; list one slide per line")
    classes = sorted({r.label for r in rows}, key=_class_key)
    if len(classes) < 2:
        raise DataError(f"labels file {p} has a single class {classes}; MIL classification needs at least two")
    if features_dir is not None:
        found = slide_feature_files(features_dir)
        missing = [r.slide_id for r in rows if r.slide_id not in found]
        if missing:
            raise DataError(f"labels file {p}: " + missing_message(str(features_dir), missing))
    return SlideLabels(path=p, rows=rows, classes=classes, mode=mode, columns=columns)


@dataclass
class FoldPlan:
    """Row indices (into the labels table) of one fold's train, validation and test parts."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _carve_val(pool: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Stratified (train, val) split of ``pool``; classes with one slide stay in train."""
    val: list[int] = []
    for c in np.unique(y[pool]):
        members = rng.permutation(pool[y[pool] == c])
        if members.size >= 2:
            val.extend(members[: max(1, round(fraction * members.size))].tolist())
    val_idx = np.array(sorted(val), dtype=np.int64)
    return np.setdiff1d(pool, val_idx), val_idx


def plan_folds(table: SlideLabels, folds: int, val_fraction: float, seed: int) -> list[FoldPlan]:
    """The folds the labels CSV asks for (split column, fold column, or stratified k-fold), seeded."""
    y = table.targets
    rng = np.random.default_rng(seed)
    plans: list[FoldPlan] = []
    if table.mode == "split":
        splits = np.array([r.split for r in table.rows])
        train, val, test = (np.flatnonzero(splits == s) for s in ("train", "val", "test"))
        for part, name in ((train, "train"), (test, "test")):
            if part.size == 0:
                raise DataError(f"labels file {table.path}: the split column has no '{name}' rows; add some")
        if val.size == 0:
            train, val = _carve_val(train, y, val_fraction, rng)
        plans.append(FoldPlan("fold_0", train, val, test))
    elif table.mode == "fold":
        fold_ids = np.array([r.fold for r in table.rows])
        values = sorted(set(fold_ids.tolist()))
        if len(values) < 2:
            raise DataError(f"labels file {table.path}: the fold column has one value {values}; give at least two")
        for v in values:
            train, val = _carve_val(np.flatnonzero(fold_ids != v), y, val_fraction, rng)
            plans.append(FoldPlan(f"fold_{v}", train, val, np.flatnonzero(fold_ids == v)))
    else:
        counts = np.bincount(y, minlength=len(table.classes))
        small = [f"{table.classes[c]} ({counts[c]})" for c in range(len(counts)) if counts[c] < folds]
        if small:
            raise ConfigError(
                f"folds={folds} but class(es) {', '.join(small)} have fewer slides than folds; lower folds"
            )
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for k, (pool, test) in enumerate(skf.split(np.zeros(len(y)), y)):
            train, val = _carve_val(pool, y, val_fraction, rng)
            plans.append(FoldPlan(f"fold_{k}", train, val, test))
    for plan in plans:
        if plan.val.size == 0 or plan.train.size == 0:
            raise DataError(
                f"labels file {table.path}: {plan.name} leaves no slides for training or validation; add slides"
            )
    return plans

"""Groups (slide, patient, region) on samples: read from manifests, kept whole by splits, drawn by split seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import write_dataset

from pathotune.data import load_source
from pathotune.data.splits import balanced_group_folds, group_kfold_split
from pathotune.errors import DataError


def _manifest(tmp_path: Path, n_groups: int = 10, per_group: int = 4) -> Path:
    root = write_dataset(tmp_path / "imgs", {"train": n_groups * per_group // 3 + 1})
    files = sorted((root / "train").rglob("*.png"))
    lines = ["path,label,group"]
    for i, f in enumerate(files[: n_groups * per_group]):
        lines.append(f"{f},{f.parent.name},slide{i % n_groups}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.csv"


def test_csv_group_column_keeps_groups_whole_when_carving(tmp_path: Path) -> None:
    src = load_source(_manifest(tmp_path), val_fraction=0.3, test_fraction=0.2)
    assert src.has_groups()
    where = {}
    for s in src.all_samples():
        assert where.setdefault(s.group, s.split) == s.split  # a slide never spans two splits
    assert {s.split for s in src.all_samples()} == {"train", "val", "test"}


def test_split_seed_resplits_by_group_and_moves_with_the_seed(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    draws = []
    for split_seed in range(5):
        src = load_source(m, val_fraction=0.2, test_fraction=0.2, split_seed=split_seed)
        tests = set(src.groups("test"))
        for s in src.all_samples():
            assert (s.group in tests) == (s.split == "test")
        draws.append(tests)
    assert set().union(*draws) == {f"slide{i}" for i in range(10)}  # 5 folds: every slide tested once
    assert sum(len(d) for d in draws) == 10
    assert load_source(m, 0.2, 0.2, split_seed=7).split("test") != load_source(m, 0.2, 0.2, split_seed=2).split("test")
    # No group column: every image is its own group, split stratified by the same folds.
    plain = load_source(tmp_path / "imgs" / "train", val_fraction=0.2, test_fraction=0.2, split_seed=0)
    assert not plain.has_groups() and all(len(plain.split(n)) for n in ("train", "val", "test"))


def test_too_few_groups_for_the_folds_is_one_line(tmp_path: Path) -> None:
    m = _manifest(tmp_path, n_groups=3, per_group=4)
    with pytest.raises(DataError, match=r"cannot draw a test split of 0.2 by group: 3 groups cannot fill 5 folds"):
        load_source(m, val_fraction=0.2, test_fraction=0.2, split_seed=0)


def test_balanced_folds_spread_each_class() -> None:
    rng = np.random.default_rng(0)
    groups = [f"g{i // 10}" for i in range(400)]
    labels = [int(x) for x in rng.integers(0, 3, 400)]
    folds = balanced_group_folds(groups, labels, 5, seed=0)
    per_fold = np.zeros((5, 3))
    for g, y in zip(groups, labels, strict=True):
        per_fold[folds[g], y] += 1
    share = per_fold / per_fold.sum(0)
    assert np.abs(share - 0.2).max() < 0.08 and set(folds.values()) == set(range(5))
    assert balanced_group_folds(groups, labels, 5, seed=1) != folds
    parts = group_kfold_split(groups, labels, 0.2, 0.0, split_seed=0)
    assert parts["test"] == [] and len(parts["val"]) + len(parts["train"]) == 400

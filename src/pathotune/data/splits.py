"""Split algorithms shared by every reader: fraction checks, stratified and group (patient) splits, carving,
and the group k-fold re-split that ``--split-seed`` draws.

All are seeded and reproducible; the sklearn errors for classes too small to stratify become a DataError that
names the data and the fraction to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from ..errors import ConfigError, DataError, one_line
from .types import SPLITS, H5Ref, PatchSource, Sample, sort_class_names

# (image file or HDF5 reference, class name, split or None for "carve it"[, group]): what readers hand to
# build_source. The optional fourth element names the sample's group (slide, patient, region block).
Item = tuple[Path | H5Ref, str, str | None] | tuple[Path | H5Ref, str, str | None, str | None]


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject fractions that would leave no training data, before any file is touched."""
    for key, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ConfigError(f"{key}={f} is outside [0, 1); use e.g. 0.2")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data; lower them"
        )


def stratified_split(
    labels: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    origin: str,
) -> dict[str, list[int]]:
    """Indices per split, stratified by label and reproducible for a given seed.

    Raises DataError (not sklearn's ValueError) when a class is too small to stratify, so the user learns
    which data and which fraction to change.
    """
    check_fractions(val_fraction, test_fraction)
    rest = list(range(len(labels)))
    out = {"train": rest, "val": [], "test": []}
    for name, key, frac in (
        ("test", "test_fraction", test_fraction),
        ("val", "val_fraction", val_fraction / (1.0 - test_fraction)),
    ):
        if frac <= 0 or not rest:
            continue
        try:
            keep, taken = train_test_split(rest, test_size=frac, stratify=[labels[i] for i in rest], random_state=seed)
        except ValueError as e:
            raise DataError(
                f"{origin}: cannot carve a stratified {name} split ({key}) from {len(rest)} images: "
                f"{one_line(e)}; add images to small classes, change {key}, or give explicit splits"
            ) from None
        rest = sorted(keep)
        out[name] = sorted(taken)
    out["train"] = rest
    return out


def group_split(
    groups: Sequence[str],
    labels: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[int]]:
    """Indices per split with every group (patient) in exactly one split, seeded.

    Groups are stratified by their first sample's label when there are enough groups per class; with too
    few groups stratification is impossible and a plain seeded shuffle of groups is used instead.
    """
    check_fractions(val_fraction, test_fraction)
    group_label: dict[str, int] = {}
    for g, y in zip(groups, labels, strict=True):
        group_label.setdefault(g, y)
    rest = sorted(group_label)
    chosen: dict[str, list[str]] = {"val": [], "test": []}
    for name, frac in (("test", test_fraction), ("val", val_fraction / (1.0 - test_fraction))):
        if frac <= 0 or len(rest) < 2:
            continue
        try:
            keep, taken = train_test_split(
                rest, test_size=frac, stratify=[group_label[g] for g in rest], random_state=seed
            )
        except ValueError:
            keep, taken = train_test_split(rest, test_size=frac, random_state=seed)
        rest = sorted(keep)
        chosen[name] = sorted(taken)
    where = {g: "train" for g in rest}
    where.update({g: "val" for g in chosen["val"]})
    where.update({g: "test" for g in chosen["test"]})
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, g in enumerate(groups):
        out[where[g]].append(i)
    return out


def build_source(
    items: Sequence[Item],
    origin: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    classes: Sequence[str] | None = None,
) -> PatchSource:
    """Turn (key, class name, split or None) triples into a source.

    Items without a split are divided between train/val/test by a stratified, seeded split; splits that
    are given are kept as they are.  ``classes`` fixes the class list (published layouts), otherwise the
    names seen are ordered by :func:`sort_class_names`.
    """
    check_fractions(val_fraction, test_fraction)
    names = list(classes) if classes is not None else sort_class_names(item[1] for item in items)
    index = {c: i for i, c in enumerate(names)}
    samples: dict[str, list[Sample]] = {n: [] for n in SPLITS}
    free: list[tuple[Path | H5Ref, int, str | None]] = []
    for item in items:
        key, cls, split = item[:3]
        group = item[3] if len(item) > 3 else None
        if cls not in index:
            raise DataError(f"{origin}: class '{cls}' of {key} is not one of {names}; check the data layout")
        if split is None:
            free.append((key, index[cls], group))
        else:
            samples[split].append(Sample(key, index[cls], split, group))
    if free:
        given = {n for n in SPLITS if samples[n]}
        # A split that already exists is never carved again from the unassigned items.
        vf = 0.0 if "val" in given else val_fraction
        tf = 0.0 if "test" in given else test_fraction
        if any(g is not None for _, _, g in free):  # named groups stay whole
            groups = [g if g is not None else str(k) for k, _, g in free]
            parts = group_split(groups, [y for _, y, _ in free], vf, tf, seed)
        else:
            parts = stratified_split([y for _, y, _ in free], vf, tf, seed, origin)
        for name, idx in parts.items():
            samples[name].extend(Sample(free[i][0], free[i][1], name, free[i][2]) for i in idx)
    return PatchSource(names, samples, origin)


def carve(source: PatchSource, val_fraction: float, test_fraction: float, seed: int) -> PatchSource:
    """Fill missing val/test splits with a stratified, seeded share of train (used when only train exists)."""
    vf = 0.0 if source.samples["val"] else val_fraction
    tf = 0.0 if source.samples["test"] else test_fraction
    if vf == 0 and tf == 0:
        return source
    train = source.samples["train"]
    parts = stratified_split([s.label for s in train], vf, tf, seed, source.origin)
    samples = {n: list(source.samples[n]) for n in SPLITS}
    samples["train"] = []
    for name, idx in parts.items():
        samples[name].extend(Sample(train[i].path_or_key, train[i].label, name, train[i].group) for i in idx)
    return PatchSource(list(source.classes), samples, source.origin)


def balanced_group_folds(groups: Sequence[str], labels: Sequence[int], k: int, seed: int) -> dict[str, int]:
    """Each group's fold (0..k-1): groups in a seeded random order, each put where its class counts fit best.

    sklearn's StratifiedGroupKFold orders groups by the spread of their class counts, so its folds hardly move
    with the seed; repeated splits need a partition that does. Greedy: a group goes to the fold whose per-class
    counts, scaled by the class totals, grow least in squared load (ties to the fold with fewer samples).
    """
    names = sorted(set(groups))
    if len(names) < k:
        raise ValueError(f"{len(names)} groups cannot fill {k} folds")
    classes = sorted(set(labels))
    col = {c: i for i, c in enumerate(classes)}
    row = {g: i for i, g in enumerate(names)}
    counts = np.zeros((len(names), len(classes)))
    for g, y in zip(groups, labels, strict=True):
        counts[row[g], col[y]] += 1
    scale = 1.0 / np.maximum(counts.sum(0), 1.0)
    load = np.zeros((k, len(classes)))
    sizes = np.zeros(k)
    rng = np.random.default_rng(seed)
    out: dict[str, int] = {}
    for i in rng.permutation(len(names)):
        grown = (((load + counts[i]) * scale) ** 2).sum(1) - ((load * scale) ** 2).sum(1)
        empty = sizes == 0
        if empty.any():  # every fold gets a group before any gets two
            grown = np.where(empty, grown, np.inf)
        fold = int(np.lexsort((sizes, grown))[0])
        load[fold] += counts[i]
        sizes[fold] += counts[i].sum()
        out[names[i]] = fold
    return out


def group_kfold_split(
    groups: Sequence[str],
    labels: Sequence[int],
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    origin: str = "data",
) -> dict[str, list[int]]:
    """Indices per split from a group k-fold: every group in one split, class counts balanced across folds.

    Test is fold ``split_seed % k`` of a k = round(1 / test_fraction) fold partition drawn with seed
    ``split_seed // k``, so split seeds 0..k-1 are the folds of one group k-fold (each group tested once) and
    larger seeds start another partition. Validation is one fold of the remaining groups, k = round((1 - test) /
    val), drawn with ``split_seed``.
    """
    check_fractions(val_fraction, test_fraction)
    if split_seed < 0:
        raise ConfigError(f"split_seed={split_seed} must be >= 0")
    rest = list(range(len(groups)))
    test: list[int] = []
    val: list[int] = []
    if test_fraction > 0:
        k = max(2, round(1 / test_fraction))
        test, rest = _one_fold(
            groups, labels, rest, k, split_seed % k, split_seed // k, f"test split of {test_fraction:g}", origin
        )
    if val_fraction > 0:
        k = max(2, round((1 - test_fraction) / val_fraction))
        val, rest = _one_fold(groups, labels, rest, k, 0, split_seed, f"val split of {val_fraction:g}", origin)
    return {"train": rest, "val": val, "test": test}


def _one_fold(
    groups: Sequence[str], labels: Sequence[int], rest: list[int], k: int, fold: int, seed: int, what: str, origin: str
) -> tuple[list[int], list[int]]:
    """(indices in fold ``fold`` of a k-fold group partition of ``rest``, the others)."""
    try:
        folds = balanced_group_folds([groups[i] for i in rest], [labels[i] for i in rest], k, seed)
    except ValueError as e:
        raise DataError(
            f"{origin}: cannot draw a {what} by group: {e}; give finer groups (e.g. smaller region blocks) or "
            "lower the fraction"
        ) from None
    return [i for i in rest if folds[groups[i]] == fold], [i for i in rest if folds[groups[i]] != fold]


def resplit(source: PatchSource, val_fraction: float, test_fraction: float, split_seed: int) -> PatchSource:
    """Pool every split of ``source`` and draw train/val/test again by group (:func:`group_kfold_split`).

    Samples without a group are their own group, so data without groups is re-split image by image.
    """
    pool = source.all_samples()
    parts = group_kfold_split(
        [s.unit for s in pool], [s.label for s in pool], val_fraction, test_fraction, split_seed, source.origin
    )
    samples = {
        name: [Sample(pool[i].path_or_key, pool[i].label, name, pool[i].group) for i in idx]
        for name, idx in parts.items()
    }
    return PatchSource(list(source.classes), samples, source.origin)

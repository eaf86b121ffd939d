"""Split algorithms shared by every reader: fraction checks, stratified and group (patient) splits, carving.

All are seeded and reproducible; the sklearn errors for classes too small to stratify become a DataError that
names the data and the fraction to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sklearn.model_selection import train_test_split

from ..errors import ConfigError, DataError, one_line
from .types import SPLITS, H5Ref, PatchSource, Sample, sort_class_names

# (image file or HDF5 reference, class name, split or None for "carve it"): what readers hand to build_source.
Item = tuple[Path | H5Ref, str, str | None]


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
    names = list(classes) if classes is not None else sort_class_names(c for _, c, _ in items)
    index = {c: i for i, c in enumerate(names)}
    samples: dict[str, list[Sample]] = {n: [] for n in SPLITS}
    free: list[tuple[Path | H5Ref, int]] = []
    for key, cls, split in items:
        if cls not in index:
            raise DataError(f"{origin}: class '{cls}' of {key} is not one of {names}; check the data layout")
        if split is None:
            free.append((key, index[cls]))
        else:
            samples[split].append(Sample(key, index[cls], split))
    if free:
        given = {n for n in SPLITS if samples[n]}
        # A split that already exists is never carved again from the unassigned items.
        vf = 0.0 if "val" in given else val_fraction
        tf = 0.0 if "test" in given else test_fraction
        parts = stratified_split([y for _, y in free], vf, tf, seed, origin)
        for name, idx in parts.items():
            samples[name].extend(Sample(free[i][0], free[i][1], name) for i in idx)
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
        samples[name].extend(Sample(train[i].path_or_key, train[i].label, name) for i in idx)
    return PatchSource(list(source.classes), samples, source.origin)

"""Where patch images come from: a class list plus labelled samples per split, whatever the on-disk form.

Everything downstream (scanning, datasets, training) sees only a :class:`PatchSource`, so folder trees,
CSV manifests and published dataset layouts all end up as the same object.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
LAYOUT_PREFIX = "layout:"

# Folder and CSV split names that people actually use, mapped to ours.
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class H5Ref:
    """One image inside an HDF5 file (PatchCamelyon): kept as a reference so nothing is read up front."""

    file: Path
    index: int
    dataset: str = "x"

    def __str__(self) -> str:
        return f"{self.file}[{self.dataset}][{self.index}]"


@dataclass(frozen=True)
class Sample:
    """One labelled patch; ``path_or_key`` is an image file or an :class:`H5Ref`."""

    path_or_key: Path | H5Ref
    label: int
    split: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.label < 0:
            raise ValueError(f"label must be >= 0, got {self.label}")


@dataclass
class PatchSource:
    """Class names (index = label) and the samples of each split; ``origin`` names the data in messages."""

    classes: list[str]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    origin: str = "<memory>"

    def __post_init__(self) -> None:
        unknown = set(self.samples) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; allowed: {SPLITS}")
        for name in SPLITS:
            self.samples.setdefault(name, [])
        for name, items in self.samples.items():
            for s in items:
                if s.split != name or s.label >= len(self.classes):
                    raise ValueError(f"sample {s} does not belong in split {name!r} of {len(self.classes)} classes")

    def split(self, name: str) -> list[Sample]:
        """Samples of one split ('train', 'val' or 'test'); empty when the data has none."""
        if name not in SPLITS:
            raise ConfigError(f"unknown split '{name}'; use one of {', '.join(SPLITS)}")
        return self.samples[name]

    def all_samples(self) -> list[Sample]:
        return [s for name in SPLITS for s in self.samples[name]]

    def __len__(self) -> int:
        return sum(len(v) for v in self.samples.values())

    def counts(self) -> dict[str, list[int]]:
        """Per split, the number of samples of each class (in class order)."""
        out = {}
        for name in SPLITS:
            c = Counter(s.label for s in self.samples[name])
            out[name] = [c.get(i, 0) for i in range(len(self.classes))]
        return out

    def empty_classes(self) -> list[str]:
        """Classes with no training sample: the head could never learn them."""
        train = self.counts()["train"]
        return [c for c, n in zip(self.classes, train, strict=True) if n == 0]

    def unseen_labels(self) -> dict[str, list[str]]:
        """Per val/test split, classes present there but absent from train (their scores mean nothing)."""
        seen = {s.label for s in self.samples["train"]}
        out: dict[str, list[str]] = {}
        for name in ("val", "test"):
            extra = sorted({s.label for s in self.samples[name]} - seen)
            if extra:
                out[name] = [self.classes[i] for i in extra]
        return out

    def without(self, keys: Iterable[Path | H5Ref]) -> PatchSource:
        """A copy lacking the samples whose ``path_or_key`` is in ``keys`` (used to skip bad files)."""
        drop = set(keys)
        kept = {n: [s for s in v if s.path_or_key not in drop] for n, v in self.samples.items()}
        return PatchSource(list(self.classes), kept, self.origin)

    def summary(self) -> str:
        """One line: origin, classes and split sizes."""
        sizes = ", ".join(f"{n} {len(self.samples[n])}" for n in SPLITS if self.samples[n])
        return f"{self.origin}: {len(self.classes)} classes, {sizes or 'no samples'}"


# ---------------------------------------------------------------------------------------------------------
# Splitting helpers (also used by the published layouts)


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject fractions that would leave no training data, before any file is touched."""
    for key, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ConfigError(f"{key}={f} is outside [0, 1); use e.g. 0.2")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data; lower them"
        )


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


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
    from sklearn.model_selection import train_test_split

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
                f"{_one_line(e)}; add images to small classes, change {key}, or give explicit splits"
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
    from sklearn.model_selection import train_test_split

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


def sort_class_names(names: Iterable[str]) -> list[str]:
    """Sorted class names; numerically when every name is an integer, so '10' comes after '2'."""
    names = set(names)
    if names and all(n.strip().lstrip("-").isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def build_source(
    items: Sequence[tuple[Path | H5Ref, str, str | None]],
    origin: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    classes: Sequence[str] | None = None,
) -> PatchSource:
    """Turn (key, class name, split or None) triples into a source.

    Items without a split are divided between train/val/test by a stratified, seeded split; splits that
    are given are kept as they are.  ``classes`` fixes the class list (published layouts), otherwise the
    sorted names seen are used.
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


# ---------------------------------------------------------------------------------------------------------
# Generic readers


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted so that splits are reproducible across machines."""
    return sorted(p for p in folder.rglob("*") if is_image(p))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_dirs(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in _subdirs(root):
        split = _SPLIT_ALIASES.get(d.name.lower())
        if split is not None:
            if split in found:
                raise DataError(f"{root}: both {found[split].name}/ and {d.name}/ name the {split} split; keep one")
            found[split] = d
    return found


def read_folder(root: Path, val_fraction: float, test_fraction: float, seed: int) -> PatchSource:
    """train/<class>/ (+ val/, test/) folders, or plain <class>/ folders split stratified by fraction."""
    check_fractions(val_fraction, test_fraction)
    splits = _split_dirs(root)
    items: list[tuple[Path | H5Ref, str, str | None]] = []
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
    """A manifest with columns path,label (+ optional split); other columns are ignored.

    Relative paths resolve against the CSV's folder so a dataset folder with its manifest can be moved.
    Rows without a split are split stratified by fraction; a manifest whose rows all carry a split keeps it.
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
        raise DataError(f"{csv_path}: cannot read the CSV manifest ({_one_line(e)}); check the file") from None
    base = csv_path.parent
    split_col = header.get("split")
    items: list[tuple[Path | H5Ref, str, str | None]] = []
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
            split = _SPLIT_ALIASES.get(split_v.lower())
            if split is None:
                raise DataError(
                    f"{csv_path}: line {line} has split '{split_v}'; use train, val or test (or leave it empty)"
                )
        p = Path(path_v).expanduser()
        items.append((p if p.is_absolute() else base / p, label_v, split))
        lines.append(line)
    if not items:
        raise DataError(f"{csv_path}: the manifest has no rows; add path,label rows")
    return build_source(_drop_repeated_rows(csv_path, items, lines), str(csv_path), val_fraction, test_fraction, seed)


def _drop_repeated_rows(csv_path: Path, items: list, lines: list[int]) -> list:
    """Rows naming the same file: identical ones are dropped with a warning (they would count twice, or land in
    two splits when splits are carved); the same file under two labels or in two splits is an error."""
    first: dict[Path, tuple[int, str, str | None]] = {}
    kept, dropped = [], []
    for (path, label, split), line in zip(items, lines, strict=True):
        key = Path(os.path.normpath(path))
        if key not in first:
            first[key] = (line, label, split)
            kept.append((path, label, split))
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


def _warn_unseen(source: PatchSource) -> None:
    unseen = source.unseen_labels()
    if unseen:
        parts = "; ".join(f"{split}: {', '.join(names)}" for split, names in unseen.items())
        warnings.warn(
            f"{source.origin}: labels not seen in train ({parts}); add training images for them",
            stacklevel=3,
        )


def load_source(
    data: str | Path,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    layout: str | None = None,
    **layout_options: Any,
) -> PatchSource:
    """Read a patch dataset from a folder, a CSV manifest or a published layout.

    ``data`` may be ``layout:<name>:<path>``; ``layout=`` does the same for a plain path.  Fractions only
    apply to splits the data does not define itself.  Labels in val/test that train lacks are reported
    with a warning (and by :func:`pathotune.data.validate.scan`).
    """
    check_fractions(val_fraction, test_fraction)
    text = str(data)
    if text.startswith(LAYOUT_PREFIX):
        parts = text[len(LAYOUT_PREFIX) :].split(":", 1)
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ConfigError(f"data '{text}' is not of the form layout:<name>:<path>")
        if layout is not None and layout != parts[0]:
            raise ConfigError(f"data '{text}' names layout '{parts[0]}' but layout='{layout}' was passed; keep one")
        layout, text = parts
    path = Path(text).expanduser()
    if not path.exists():
        raise DataError(
            f"data path {path} does not exist; pass a folder of class folders, a CSV manifest or layout:<name>:<path>"
        )
    if layout is not None:
        from .layouts import get_layout

        source = get_layout(layout).read(
            path, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, **layout_options
        )
    elif layout_options:
        raise ConfigError(f"options {sorted(layout_options)} only apply to published layouts; pass layout=<name>")
    elif path.is_dir():
        source = read_folder(path, val_fraction, test_fraction, seed)
    elif path.suffix.lower() == ".csv":
        source = read_csv(path, val_fraction, test_fraction, seed)
    else:
        raise DataError(f"data path {path} is neither a folder nor a .csv manifest; pass one of those")
    _warn_unseen(source)
    return source

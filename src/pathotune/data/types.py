"""What every reader produces: labelled samples per split in a :class:`PatchSource`, and the split names.

Everything downstream (scanning, datasets, training) sees only a :class:`PatchSource`, so folder trees, CSV
manifests and published dataset layouts all end up as the same object. A label is an index into
``PatchSource.classes``, whose order :func:`sort_class_names` fixes wherever the data does not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "val", "test")


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
    """One labelled patch; ``path_or_key`` is an image file or an :class:`H5Ref`.

    ``group`` names what the patch is not independent of: its slide, patient or region block. Splits keep a
    group whole, and confidence intervals resample groups, not patches. None: the patch is its own group.
    """

    path_or_key: Path | H5Ref
    label: int
    split: str
    group: str | None = None

    @property
    def unit(self) -> str:
        """The resampling unit: the group, else the patch itself."""
        return self.group if self.group is not None else str(self.path_or_key)

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

    def groups(self, name: str) -> list[str]:
        """The resampling unit of every sample of a split (:attr:`Sample.unit`), in order."""
        return [s.unit for s in self.split(name)]

    def has_groups(self) -> bool:
        """Whether the data names groups (slides, patients, regions) rather than leaving each patch alone."""
        return any(s.group is not None for s in self.all_samples())

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


def sort_class_names(names: Iterable[str]) -> list[str]:
    """The one class order of the data package: sorted, numerically when every name is an integer ('2' < '10').

    Used wherever the data does not fix its own class list (folders, CSV manifests, BreakHis); a class's label
    is its index here, so this order is part of every trained bundle.
    """
    names = set(names)
    if names and all(n.strip().lstrip("-").isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)

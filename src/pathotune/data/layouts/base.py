"""What every published layout is: a :class:`Layout` (name, description, reader), and helpers readers share."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError, DataError
from ..images import list_images
from ..splits import Item, check_fractions, resplit
from ..types import PatchSource

Reader = Callable[..., PatchSource]


@dataclass(frozen=True)
class Layout:
    """A published layout: a name for ``layout:<name>:<path>``, what it expects, and its reader."""

    name: str
    description: str
    reader: Reader
    accepts_file: bool = False  # the root may be a single file (e.g. a wheel) rather than a folder

    @property
    def options(self) -> tuple[str, ...]:
        """Extra keyword options the reader accepts beyond root/fractions/seed."""
        params = inspect.signature(self.reader).parameters
        return tuple(p for p in params if p not in {"root", "val_fraction", "test_fraction", "seed", "split_seed"})

    @property
    def own_split_seed(self) -> bool:
        """Whether the reader draws seeded splits itself (finer groups than its published split)."""
        return "split_seed" in inspect.signature(self.reader).parameters

    def read(
        self,
        root: str | Path,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        seed: int = 0,
        split_seed: int | None = None,
        **options: Any,
    ) -> PatchSource:
        """The layout's splits; with ``split_seed``, a group k-fold re-split (the reader's own, if it has one)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise ConfigError(f"layout '{self.name}' has no option(s) {unknown}; allowed: {allowed}")
        check_fractions(val_fraction, test_fraction)
        root = Path(root).expanduser()
        if not root.is_dir() and not (self.accepts_file and root.is_file()):
            raise DataError(f"layout '{self.name}': {root} is not a folder; pass the folder the download unpacked into")
        if self.own_split_seed:
            options["split_seed"] = split_seed
        source = self.reader(root, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, **options)
        if split_seed is not None and not self.own_split_seed:
            source = resplit(source, val_fraction, test_fraction, split_seed)
        return source


def first_dir(root: Path, candidates: Sequence[str]) -> Path | None:
    """The first of ``root/<candidate>`` that is a folder."""
    for c in candidates:
        p = root / c
        if p.is_dir():
            return p
    return None


def class_dir_items(folder: Path, classes: Sequence[str], split: str | None) -> list[Item]:
    """(image, class, split) for the images of each ``folder/<class>/`` that exists."""
    return [(p, c, split) for c in classes if (folder / c).is_dir() for p in list_images(folder / c)]

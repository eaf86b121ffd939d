"""Where patch images come from: one entry point, :func:`load_source`, for every on-disk form.

A folder of class folders or a CSV manifest goes to :mod:`.readers`, ``layout:<name>:<path>`` (or ``layout=``) to
the published layout of that name in :mod:`.layouts`; each returns a :class:`~pathotune.data.types.PatchSource`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .layouts import get_layout
from .readers import read_csv, read_folder
from .splits import check_fractions, resplit
from .types import H5Ref, PatchSource

# H5Ref is re-exported for engine/fewshot.py, which imports it from here; new code imports it from pathotune.data.
__all__ = ["LAYOUT_PREFIX", "H5Ref", "load_source"]

LAYOUT_PREFIX = "layout:"


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
    split_seed: int | None = None,
    **layout_options: Any,
) -> PatchSource:
    """Read a patch dataset from a folder, a CSV manifest or a published layout.

    ``data`` may be ``layout:<name>:<path>``; ``layout=`` does the same for a plain path.  Fractions only
    apply to splits the data does not define itself, carved with ``seed``. ``split_seed`` instead pools every
    split and draws train/val/test again by group with the fractions (:func:`pathotune.data.splits.resplit`;
    layouts with finer groups than their published split draw their own). Labels in val/test that train lacks
    are reported with a warning (and by :func:`pathotune.data.validate.scan`).
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
        source = get_layout(layout).read(
            path, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, split_seed=split_seed,
            **layout_options,
        )  # fmt: skip
    elif layout_options:
        raise ConfigError(f"options {sorted(layout_options)} only apply to published layouts; pass layout=<name>")
    elif path.is_dir():
        source = read_folder(path, val_fraction, test_fraction, seed)
    elif path.suffix.lower() == ".csv":
        source = read_csv(path, val_fraction, test_fraction, seed)
    else:
        raise DataError(f"data path {path} is neither a folder nor a .csv manifest; pass one of those")
    if split_seed is not None and layout is None:
        source = resplit(source, val_fraction, test_fraction, split_seed)
    _warn_unseen(source)
    return source

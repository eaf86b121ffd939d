"""Slide feature files (one ``<slide_id>.h5`` per slide) and slide label tables for MIL training.

A feature file holds ``coords`` (N, 2) level-0 top-left tile corners, ``features`` (N, D) and attributes
describing the extractor (``backbone``, ``bundle_fingerprint``, ``feature_dim``, ``mpp``, ``target_mpp``,
``tile_size``, ``level``, ``slide_path``, ``n_tiles``). Bags from different extractors live in different
feature spaces, so mixing them is refused before any training starts.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = [
    "COMPAT_KEYS",
    "FeatureBagDataset",
    "SlideLabel",
    "SlideLabels",
    "check_feature_compatibility",
    "extractor_mismatch",
    "feature_path",
    "list_feature_files",
    "read_feature_attrs",
    "read_slide_features",
    "read_slide_labels",
]

# Attributes that must agree across slides (and between a trained model and the slides it scores); the
# weights' fingerprint is compared too where both files record it.
COMPAT_KEYS: tuple[str, ...] = ("backbone", "feature_dim", "bundle_fingerprint")
OPTIONAL_COMPAT_KEYS: tuple[str, ...] = ("backbone_fingerprint",)
# Attributes that describe one slide, never the extractor, even when a cohort has a single slide.
PER_SLIDE_KEYS: frozenset[str] = frozenset({"slide_path", "slide_id", "n_tiles", "n_candidates", "dimensions"})
SPLITS: tuple[str, ...] = ("train", "val", "test")
_MAX_LISTED = 5


def _py(value: Any) -> Any:
    """HDF5 attribute values (numpy scalars, arrays, bytes) as plain Python values for JSON and comparison."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _py(value.item())
    if isinstance(value, float) and value != value:
        return None  # the extractor stores None (e.g. native-resolution target_mpp) as NaN
    return value


def _open_error(path: Path, e: BaseException) -> DataError:
    detail = " ".join(str(e).split()) or type(e).__name__
    return DataError(f"slide feature file {path} is not a readable HDF5 file ({detail}); re-extract this slide")


def _header(f: Any, path: Path) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Attributes plus the checked shapes of an open file, without reading the feature matrix."""
    for name in ("features", "coords"):
        if name not in f:
            raise DataError(
                f"slide feature file {path} has no dataset '{name}'; it needs 'coords' (N,2) and 'features' (N,D)"
            )
    shape = tuple(f["features"].shape)
    cshape = tuple(f["coords"].shape)
    if len(shape) != 2 or shape[1] == 0:
        raise DataError(f"slide feature file {path}: 'features' must be an (N, D) matrix, got shape {shape}")
    if shape[0] == 0:
        raise DataError(
            f"slide feature file {path} has no tiles (no tissue found); drop the slide from the labels CSV "
            "or re-extract it with looser tissue settings"
        )
    if cshape != (shape[0], 2):
        raise DataError(f"slide feature file {path}: 'coords' has shape {cshape}, expected ({shape[0]}, 2)")
    attrs = {str(k): _py(v) for k, v in f.attrs.items()}
    declared = attrs.get("feature_dim")
    if declared is not None and int(declared) != shape[1]:
        raise DataError(
            f"slide feature file {path}: attribute feature_dim={declared} but 'features' has {shape[1]} columns; "
            "re-extract this slide"
        )
    attrs["feature_dim"] = int(shape[1])
    attrs.setdefault("bundle_fingerprint", "")
    return attrs, shape


def read_feature_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A file's attributes (``feature_dim`` from the data's shape) without loading the features."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise DataError(f"slide feature file {p} not found; extract features for this slide first")
    try:
        with h5py.File(p, "r") as f:
            attrs, shape = _header(f, p)
    except DataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise _open_error(p, e) from None
    attrs["n_tiles"] = int(shape[0])
    return attrs


def read_slide_features(path: str | os.PathLike[str]) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
    """``(features float32 (N, D), coords int64 (N, 2), attrs)`` of one slide, checked for shape and NaNs.

    The file format belongs to ``slides.extract``; this adds what a MIL bag needs (tiles, finite values).
    """
    from ..slides.extract import read_slide_features as read_h5

    p = Path(path)
    attrs = read_feature_attrs(p)
    sf = read_h5(p)
    if not np.isfinite(sf.features).all():
        raise DataError(f"slide feature file {p}: 'features' contains NaN or infinite values; re-extract this slide")
    return torch.from_numpy(sf.features), sf.coords, attrs


def feature_path(features_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """Where the feature file of ``slide_id`` lives."""
    return Path(features_dir) / f"{slide_id}.h5"


def list_feature_files(features: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """A directory's ``*.h5`` files (sorted) or an explicit list of files, failing on an empty selection."""
    if isinstance(features, (str, os.PathLike)):
        root = Path(features)
        if root.is_dir():
            files = sorted(root.glob("*.h5"))
            if not files:
                raise DataError(f"no slide feature files (*.h5) in {root}; extract slide features first")
            return files
        return [root]
    files = [Path(f) for f in features]
    if not files:
        raise DataError("no slide feature files given; pass a folder of <slide_id>.h5 files or a list of them")
    return files


def extractor_mismatch(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first extractor attribute on which two files' attributes disagree, or None."""
    for key in COMPAT_KEYS:
        if a.get(key) != b.get(key):
            return key
    for key in OPTIONAL_COMPAT_KEYS:
        if key in a and key in b and a[key] != b[key]:
            return key
    return None


def check_feature_compatibility(paths: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
    """Attributes every file agrees on (the extractor's settings); mixed extractors fail naming two files."""
    if not paths:
        raise DataError("no slide feature files to check")
    first = Path(paths[0])
    ref = read_feature_attrs(first)
    shared = {k: v for k, v in ref.items() if k not in PER_SLIDE_KEYS}
    for p in paths[1:]:
        attrs = read_feature_attrs(p)
        key = extractor_mismatch(ref, attrs)
        if key is not None:
            raise DataError(
                f"slide features {first} and {Path(p)} come from different extractors ({key} "
                f"{ref.get(key)!r} vs {attrs.get(key)!r}); re-extract all slides with one backbone and bundle"
            )
        shared = {k: v for k, v in shared.items() if k in attrs and attrs[k] == v}
    return shared


class FeatureBagDataset(Dataset):
    """One bag per slide: ``(features (N, D), label, index)``, read from ``<features_dir>/<slide_id>.h5``.

    Bags read are kept in memory until ``cache_mb`` is used up (0 turns caching off): training revisits every
    bag each epoch, and a cohort's bags can be far larger than memory, so the cache is bounded, not total.
    Construction checks that every file exists and that all come from one extractor (``attrs`` holds theirs).
    """

    def __init__(
        self,
        features_dir: str | os.PathLike[str],
        slide_ids: Sequence[str],
        labels: Sequence[int],
        cache_mb: float = 0.0,
    ) -> None:
        if len(slide_ids) != len(labels):
            raise ValueError(f"got {len(slide_ids)} slide ids but {len(labels)} labels")
        self.slide_ids = [str(s) for s in slide_ids]
        self.labels = [int(y) for y in labels]
        self.paths = [feature_path(features_dir, s) for s in self.slide_ids]
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise DataError(_missing_message(f"feature folder {features_dir}", [p.stem for p in missing]))
        self.attrs = check_feature_compatibility(self.paths) if self.paths else {}
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_left = int(cache_mb * 2**20)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        feats = self._cache.get(i)
        if feats is None:
            feats, _, _ = read_slide_features(self.paths[i])
            size = feats.numel() * feats.element_size()
            if size <= self._cache_left:
                self._cache[i] = feats
                self._cache_left -= size
        return feats, self.labels[i], i

    def read(self, i: int) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
        """Features, coords and attributes of bag ``i`` (for heat maps)."""
        return read_slide_features(self.paths[i])


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


def _missing_message(where: str, ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_MAX_LISTED]) + (", ..." if len(ids) > _MAX_LISTED else "")
    return (
        f"{len(ids)} slide id(s) have no feature file <slide_id>.h5 in {where}: {shown}; extract them or drop the rows"
    )


def read_slide_labels(
    csv_path: str | os.PathLike[str], features_dir: str | os.PathLike[str] | None = None
) -> SlideLabels:
    """Read and validate ``slide_id,label[,split|fold]``; with ``features_dir`` every slide needs its h5.

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
        missing = [r.slide_id for r in rows if not feature_path(features_dir, r.slide_id).is_file()]
        if missing:
            raise DataError(f"labels file {p}: " + _missing_message(str(features_dir), missing))
    return SlideLabels(path=p, rows=rows, classes=classes, mode=mode, columns=columns)

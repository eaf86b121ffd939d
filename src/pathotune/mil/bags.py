"""Feature bags for MIL: one bag per slide, read through the feature-file contract in :mod:`pathotune.features`.

A bag needs at least one tile and finite values; bags from different extractors live in different feature
spaces, so a set of bags from two extractors is refused before any training starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..features import check_feature_compatibility, slide_feature_files
from ..features import read_slide_features as read_features

__all__ = ["BagSubset", "FeatureBagDataset", "missing_message", "read_slide_features"]

_MAX_LISTED = 5


def read_slide_features(path: str | os.PathLike[str]) -> tuple[torch.Tensor, np.ndarray | None, dict[str, Any]]:
    """``(features float32 (N, D), coords int64 (N, 2), attrs)`` of one slide as a bag: at least one tile, finite
    values (:func:`pathotune.features.read_slide_features` with ``bag=True``); coords None for a ``.pt`` file."""
    sf = read_features(path, bag=True)
    return torch.from_numpy(sf.features), sf.coords, sf.attrs


def missing_message(where: str, ids: Sequence[str]) -> str:
    """How many slide ids lack a feature file in ``where``, naming the first few."""
    shown = ", ".join(ids[:_MAX_LISTED]) + (", ..." if len(ids) > _MAX_LISTED else "")
    return (
        f"{len(ids)} slide id(s) have no feature file <slide_id>.h5 (or .pt) in {where}: {shown}; "
        "extract them or drop the rows"
    )


class FeatureBagDataset(Dataset):
    """One bag per slide: ``(features (N, D), label, index)``, read from ``<features_dir>/<slide_id>.h5`` (or the
    ``.pt`` and CLAM folders :func:`pathotune.features.list_feature_files` finds there).

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
        found = slide_feature_files(features_dir)
        missing = [s for s in self.slide_ids if s not in found]
        if missing:
            raise DataError(missing_message(f"feature folder {features_dir}", missing))
        self.paths = [found[s] for s in self.slide_ids]
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

    def read(self, i: int) -> tuple[torch.Tensor, np.ndarray | None, dict[str, Any]]:
        """Features, coords and attributes of bag ``i`` (for heat maps)."""
        return read_slide_features(self.paths[i])


class BagSubset(Dataset):
    """Rows ``rows`` of a FeatureBagDataset; training bags may be subsampled to ``max_tiles`` random tiles."""

    def __init__(self, base: FeatureBagDataset, rows: np.ndarray, max_tiles: int | None = None, seed: int = 0):
        self.base, self.rows, self.max_tiles = base, [int(r) for r in rows], max_tiles
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def labels(self) -> list[int]:
        return [self.base.labels[r] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        feats, label, _ = self.base[self.rows[i]]
        if self.max_tiles is not None and feats.shape[0] > self.max_tiles:
            keep = torch.randperm(feats.shape[0], generator=self.generator)[: self.max_tiles]
            feats = feats[keep.sort().values]
        return feats, label, i

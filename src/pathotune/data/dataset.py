"""The torch Dataset over a list of samples, and reading one patch out of an HDF5 array.

Image files are decoded by :func:`pathotune.data.images.load_rgb`; both paths end in 8-bit RGB.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError, one_line
from .images import READ_ERRORS, load_rgb, scale_to_uint8, to_rgb
from .types import H5Ref, PatchSource, Sample


class H5Cache:
    """Open HDF5 files once per process: h5py handles cannot cross a fork, so each worker opens its own."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._files: dict[Path, Any] = {}

    def get(self, path: Path) -> Any:
        if self._pid != os.getpid():
            self._files = {}  # inherited handles belong to the parent process; never touch them
            self._pid = os.getpid()
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = h5py.File(path, "r")
        return f

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files = {}


def read_h5(ref: H5Ref, cache: H5Cache | None = None) -> Image.Image:
    """One patch from an HDF5 image array as RGB; DataError names the file and index when it fails."""
    own = cache is None
    cache = cache or H5Cache()
    try:
        ds = cache.get(ref.file)[ref.dataset]
        if not 0 <= ref.index < ds.shape[0]:
            raise IndexError(f"index {ref.index} outside 0..{ds.shape[0] - 1}")
        arr = np.asarray(ds[ref.index])
    except READ_ERRORS as e:
        raise DataError(f"cannot read {ref}: {one_line(e)}; re-download the file") from None
    finally:
        if own:
            cache.close()
    if arr.dtype != np.uint8:
        arr = scale_to_uint8(arr, "I;16" if arr.dtype == np.uint16 else "F")
    return Image.fromarray(arr).convert("RGB") if arr.ndim == 3 else to_rgb(Image.fromarray(arr))


class PatchDataset(Dataset):
    """(image tensor, label, index) per sample; the index lets evaluation map predictions back to files.

    With ``seed``, a sample's random augmentation depends only on (seed, epoch, index): not on which worker,
    rank or resumed process draws it, so a run resumed mid-epoch or spread over GPUs sees the same batches.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], Any] | None = None,
        seed: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.epoch = 0  # set by the training loop before each epoch
        self._h5 = H5Cache()

    @classmethod
    def from_source(
        cls, source: PatchSource, split: str, transform: Callable[[Image.Image], Any] | None = None
    ) -> PatchDataset:
        return cls(source.split(split), transform)

    @property
    def labels(self) -> list[int]:
        """All labels without touching any image (for class weights and samplers)."""
        return [s.label for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        key = self.samples[index].path_or_key
        if isinstance(key, H5Ref):
            return read_h5(key, self._h5)
        return load_rgb(key)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        img = self.load(index)
        if self.transform is not None and self.seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF)
                out = self.transform(img)
        elif self.transform is not None:
            out = self.transform(img)
        else:
            out = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return out, self.samples[index].label, index

    def __getstate__(self) -> dict[str, Any]:
        # Open h5py handles do not pickle; workers get a fresh cache and open files on first use.
        state = self.__dict__.copy()
        state["_h5"] = H5Cache()
        return state

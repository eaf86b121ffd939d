"""The tiles of one slide as a Dataset: decoded to uint8 in DataLoader workers, normalised on the model's device.

Slide readers wrap C handles that cannot be pickled or shared across a fork, so the dataset carries only the
slide's path and plan and opens a reader in each process that reads from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from ..core.runtime import collate, guarded
from ..errors import ConfigError
from .reader import SlideReader, open_slide
from .tiling import TilePlan, read_tile

__all__ = ["SlideTileDataset", "TileTransform", "default_num_workers", "tile_loader"]


class TileTransform:
    """Tile -> model input, split in two so the cheap-to-ship part runs in the workers.

    ``to_uint8`` (in DataLoader workers) turns a tile into a (3, S, S) uint8 tensor at the model's input size,
    resizing with antialiasing when the tile is another size; ``normalize`` (on the model's device, a whole
    batch at once) scales to [0, 1] and applies the backbone's mean/std. Shipping uint8 moves a quarter of the
    bytes float32 would between processes. ``__call__`` does both for one tile, for reference use.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], image_size: int) -> None:
        if image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        self.mean, self.std, self.image_size = tuple(mean), tuple(std), int(image_size)

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        t = F.pil_to_tensor(img if img.mode == "RGB" else img.convert("RGB"))
        if t.shape[-2:] != (self.image_size, self.image_size):
            t = F.resize(t, [self.image_size, self.image_size], antialias=True)
        return t

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(img)[None])[0]


class SlideTileDataset(Dataset):
    """The tiles of one plan (or the plan's tiles ``indices``, in order) as (tensor, plan index); each process
    opens its own reader on first use."""

    def __init__(
        self,
        slide_path: str | Path,
        plan: TilePlan,
        transform: Callable[[Image.Image], torch.Tensor],
        mpp: float | None = None,
        backend: str = "auto",
        indices: Sequence[int] | None = None,
    ) -> None:
        self.slide_path = Path(slide_path)
        self.plan, self.transform, self.mpp, self.backend = plan, transform, mpp, backend
        self.indices = list(range(len(plan))) if indices is None else [int(i) for i in indices]
        self._reader: SlideReader | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def reader(self) -> SlideReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = open_slide(self.slide_path, mpp=self.mpp, backend=self.backend)
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = self.indices[j]
        return self.transform(read_tile(self.reader(), self.plan, i)), i

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"], state["_pid"] = None, None
        return state

    def close(self) -> None:
        if self._reader is not None and self._pid == os.getpid():
            self._reader.close()
        self._reader, self._pid = None, None


def default_num_workers(device: torch.device | str = "cpu") -> int:
    """Tile-decoding processes: min(4, usable CPUs) beside an accelerator. When the model runs on the CPU, only
    the cores its threads leave free: workers on the model's own cores cost more than inline decoding saves (on
    2 cores, 2 workers took the tile loop from 0.98x to 0.79x of the raw forward: BENCHMARKS.md §3)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    if torch.device(device).type == "cpu":
        cpus -= torch.get_num_threads()
    return max(0, min(4, cpus))


def tile_loader(dataset: SlideTileDataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """Batches of tiles in plan order (tile indices are contiguous and in order), decoded by ``num_workers``
    processes; with a single batch there are none, since starting a pool would cost more than it saves.

    A worker's PathoTuneError (a truncated slide...) comes back as that error, on one line.
    """
    workers = num_workers if len(dataset) > batch_size else 0
    return DataLoader(
        guarded(dataset) if workers else dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        collate_fn=collate,
    )

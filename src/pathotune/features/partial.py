"""A slide's features in chunks while it is being extracted, so an interrupted extraction resumes inside the slide.

A gigapixel slide holds tens of thousands of tiles, an hour of CPU; losing all of it to a ``kill -9`` near the
end is not acceptable. While a slide runs, every ``chunk`` tiles (a multiple of the batch size, so a resumed
slide is cut into the same batches and gives the same numbers bit for bit) are saved as one ``.npy`` file in the
hidden folder ``.<slide_id>.partial/``, each written under a temporary name and renamed. ``key.json`` holds what
the chunks belong to: the request (extractor, tiling), the tile plan's digest and the feature width. A rerun
with the same key computes only the chunks that are missing; any other key discards them. Once every chunk is
there, the slide's ``<slide_id>.h5`` is written from them (:func:`.h5.write_feature_file`) and the folder goes.

Chunks are read with ``allow_pickle=False``: loading never runs pickled code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..report.io import atomic_path, atomic_write_json, to_jsonable

__all__ = ["PartialFeatures", "partial_dir", "plan_digest"]


def partial_dir(out_dir: str | Path, slide_id: str) -> Path:
    return Path(out_dir) / f".{slide_id}.partial"


def plan_digest(coords: np.ndarray, tissue: np.ndarray) -> str:
    """A digest of a tile plan, so chunks are only ever joined to the plan they were computed on."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(coords, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(tissue, dtype=np.float32).tobytes())
    return h.hexdigest()


class PartialFeatures:
    """The chunks of one slide's features on disk (see the module docstring)."""

    def __init__(self, out_dir: str | Path, slide_id: str, n_tiles: int, dim: int, chunk: int, key: Mapping) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.folder = partial_dir(out_dir, slide_id)
        self.n, self.dim, self.chunk = int(n_tiles), int(dim), int(chunk)
        self.key = to_jsonable({**key, "n_tiles": self.n, "feature_dim": self.dim, "chunk": self.chunk})
        self._buffer: np.ndarray | None = None
        self._buffer_chunk = -1
        self._filled = 0

    # -- what is there -------------------------------------------------------------------------------------------
    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk)

    def _path(self, k: int) -> Path:
        return self.folder / f"chunk_{k:06d}.npy"

    def _rows(self, k: int) -> int:
        return min(self.chunk, self.n - k * self.chunk)

    def open(self) -> list[int]:
        """Start or resume: keep the chunks of an earlier run with the same key, drop anything else; returns the
        indices of the chunks still to compute."""
        try:
            same = json.loads((self.folder / "key.json").read_text(encoding="utf-8")) == self.key
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            atomic_write_json(self.folder / "key.json", self.key)
        return [k for k in range(self.n_chunks) if not self._complete(k)]

    def _complete(self, k: int) -> bool:
        try:
            block = np.load(self._path(k), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return False
        return block.shape == (self._rows(k), self.dim) and block.dtype == np.float32

    def pending_tiles(self, todo: list[int]) -> np.ndarray:
        """The tile indices of the chunks ``todo``, in order."""
        parts = [np.arange(k * self.chunk, k * self.chunk + self._rows(k)) for k in todo]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # -- writing -------------------------------------------------------------------------------------------------
    def add(self, start: int, block: np.ndarray) -> None:
        """Rows ``start .. start + len(block)`` (in tile order); a chunk is saved as soon as it is full."""
        block = np.asarray(block, dtype=np.float32)
        i = 0
        while i < len(block):
            row = start + i
            k = row // self.chunk
            if k != self._buffer_chunk:
                self._buffer = np.empty((self._rows(k), self.dim), dtype=np.float32)
                self._buffer_chunk, self._filled = k, 0
            offset = row - k * self.chunk
            take = min(len(block) - i, self._rows(k) - offset)
            assert self._buffer is not None
            self._buffer[offset : offset + take] = block[i : i + take]
            self._filled += take
            i += take
            if self._filled == self._rows(k):
                with atomic_path(self._path(k)) as tmp, open(tmp, "wb") as f:
                    np.save(f, self._buffer, allow_pickle=False)
                self._buffer, self._buffer_chunk = None, -1

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(start row, rows)`` of every chunk, in order (all must be complete)."""
        for k in range(self.n_chunks):
            yield k * self.chunk, np.load(self._path(k), allow_pickle=False)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        done = sum(self._complete(k) for k in range(self.n_chunks))
        return {"chunks": self.n_chunks, "done": done}

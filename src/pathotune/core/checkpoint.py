"""Epoch checkpoints: trainable tensors, optimizer, scheduler, RNG states. Atomic, and read without pickles."""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import PathoTuneError, write_error
from ..report import atomic_path


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary name and rename, so a killed run never leaves a checkpoint that looks complete.

    ``atomic_path`` turns an OSError into an OutputError naming ``path``; torch.save reports a full disk as a
    RuntimeError ("unexpected pos"), turned into the same error here.
    """
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except RuntimeError as e:
        cause: BaseException = e
        if _disk_full(path.parent, state):
            cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise write_error(path, cause) from e


def _disk_full(folder: Path, state) -> bool:
    """Whether ``folder``'s file system has less room than the tensors of ``state`` need."""

    def nbytes(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(nbytes(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(nbytes(v) for v in x)
        return 0

    try:
        return shutil.disk_usage(folder).free < nbytes(state) + (1 << 16)
    except OSError:
        return False


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PathoTuneError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); pass --overwrite to start over (or delete it)"
        ) from e

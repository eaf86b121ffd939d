"""Epoch checkpoints: trainable tensors, optimizer, scheduler, RNG states. Atomic, and read without pickles."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import PathoTuneError


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
    """Write to a temporary name and rename, so a killed run never leaves a checkpoint that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PathoTuneError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to start over") from e

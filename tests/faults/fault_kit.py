"""Shared pieces of the fault corpus (imported by conftest.py and the corpus): the base run's layout, the
training command every case starts from, tmpfs mounts for the disk-full and read-only cases, and the file hashes
that show nothing changed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

SPLITS = {"train": 4, "val": 2, "test": 2}  # 3 classes x 8 = 24 images of 32 px


@dataclass(frozen=True)
class Base:
    """Shared, never written by a case: the data, the config and a finished 2-step pathotune run."""

    root: Path
    tiles: Path
    cfg: Path
    run: Path


def base_train_args(base: Base, out: Path | str, *extra: str | os.PathLike) -> list:
    """The training command every case starts from (2 steps, the tiny config, no augmentation, CPU)."""
    steps = [] if {"--steps", "--epochs"} & {str(e) for e in extra} else ["--steps", "2"]
    return [
        "train",
        "--data",
        base.tiles,
        "--config",
        base.cfg,
        "--out",
        out,
        *steps,
        "--quiet",
        "--augment",
        "none",
        "--accelerator",
        "cpu",
        *extra,
    ]


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", read_only: bool = False, fill: bool = False):
    """A tmpfs at ``path`` for the block; ``fill``: written full (a ballast file), so that any write fails."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        if fill:
            with open(path / "ballast.bin", "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def sha_tree(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots``, by path: equal before and after means nothing changed or was lost."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out

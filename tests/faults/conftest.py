"""Fixtures of the fault corpus: one tiny dataset and one tiny finished run, built once per session and copied
into each case's own folder; whether tmpfs can be mounted here."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from fault_kit import SPLITS, Base
from helpers import write_config, write_dataset


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Base:
    from pathotune.engine.config import load_config
    from pathotune.engine.run import train_run

    root = tmp_path_factory.mktemp("fault_base")
    tiles = write_dataset(root / "tiles", SPLITS)
    cfg = write_config(root / "cfg.yaml", bootstrap=0)
    run = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The same settings as fault_kit.base_train_args, so a copy of this run resumes under them.
        config = load_config(
            cfg, data=str(tiles), out=str(run), steps=2, augment="none", accelerator="cpu", method="pathotune"
        )
        train_run(config, progress=False)
    finally:
        torch.set_num_threads(threads)
    return Base(root, tiles, cfg, run)


@pytest.fixture(scope="session")
def can_mount() -> str | None:
    """None when tmpfs can be mounted here (root or CAP_SYS_ADMIN), else why not."""
    if not sys.platform.startswith("linux"):
        return "tmpfs mounts need Linux"
    if shutil.which("mount") is None:
        return "no mount command"
    probe = Path(tempfile.mkdtemp(prefix="pathotune_mount_probe_"))
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True, text=True
        )
        if done.returncode != 0:
            return f"cannot mount tmpfs here ({done.stderr.strip() or 'needs root or CAP_SYS_ADMIN'})"
        subprocess.run(["umount", str(probe)], check=False, capture_output=True)
        return None
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()

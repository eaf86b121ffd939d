"""Tiny on-disk datasets, configs and CLI runners shared by the engine and CLI tests."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

PATHOTUNE = str(Path(sys.executable).with_name("pathotune"))
# The tiny ViT every fast test builds: a timm architecture at embed dim 32, three blocks, 32 px inputs.
TINY_NAME = "vit_small_patch16_224"
TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2}
TINY2 = {**TINY, "depth": 2}  # two blocks, where a test needs no third
IMG = 32
CLASSES = ("blue", "green", "red")
COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 200)}
TINY_CONFIG = {
    "backbone": TINY_NAME,
    "backbone_kwargs": TINY2,
    "image_size": 32,
    "batch_size": 8,
}


def write_image(
    path: Path, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 32, noise_sd: float = 30.0
) -> None:
    noise = rng.normal(0.0, noise_sd, (size, size, 3))
    pixels = np.clip(np.asarray(colour, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_dataset(root: Path, per_class: Mapping[str, int], seed: int = 0, noise_sd: float = 30.0) -> Path:
    """``root/<split>/<class>/<i>.png`` for every split in ``per_class`` (images per class), 3 colour classes."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for cls in CLASSES:
            for i in range(n):
                write_image(root / split / cls / f"{split}_{cls}_{i}.png", COLOURS[cls], rng, noise_sd=noise_sd)
    return root


def count_images(root: Path, split: str) -> int:
    return sum(1 for _ in (root / split).rglob("*.png"))


def write_config(path: Path, **overrides: object) -> Path:
    path.write_text(yaml.safe_dump({**TINY_CONFIG, **overrides}, sort_keys=False))
    return path


def cli_env() -> dict[str, str]:
    """A wide, plain terminal (rich wraps table cells at 80 columns) and no network."""
    # in-process Fabric runs may have exported PL_GLOBAL_SEED and friends; a fresh process should not inherit
    # them (nor any distributed rendezvous variables)
    drop = ("PL_", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        {
            "COLUMNS": "250",
            "NO_COLOR": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore",
            # One BLAS/OpenMP thread per process: on 2 shared cores, torch's default threads oversubscribe and
            # a tiny epoch takes seconds instead of ~0.1 s.
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
    )
    return env


def cli_cmd(*args: str | os.PathLike) -> list[str]:
    return [PATHOTUNE, *(str(a) for a in args)]


def run_cli_subprocess(*args: str | os.PathLike, timeout: float = 180, cwd: Path | None = None):
    return subprocess.run(
        cli_cmd(*args), capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=cwd, check=False
    )


def run_main(monkeypatch, capsys, *args: str | os.PathLike) -> tuple[int, str, str]:
    """Run the console entry point in-process (argv patched); returns (exit code, stdout, stderr)."""
    import pytest

    from pathotune.cli import common
    from pathotune.cli.main import main

    monkeypatch.setattr(sys, "argv", ["pathotune", *(str(a) for a in args)])
    monkeypatch.setattr(common.console, "_width", 250)  # rich wraps table cells at 80 columns otherwise
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else int(code)), captured.out, captured.err


def randomize(module):
    """Random values in every parameter (x 0.3), so norms, biases, layer scales and queries all matter to the
    outputs of a converted checkpoint; returns the module in eval mode."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module.eval()


def one_line_error(err: str) -> str:
    """The single line a user error prints; fails if there is more than one non-empty stderr line."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def read_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def read_log(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def read_predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def numeric_rows(rows: Sequence[Mapping[str, str]], drop: Sequence[str] = ("seconds",)) -> list[dict[str, float]]:
    """CSV rows as floats; an empty cell (no train loss at step 0) becomes NaN."""
    return [{k: float(v) if v != "" else float("nan") for k, v in r.items() if k not in drop} for r in rows]


def assert_rows_close(a: Sequence[Mapping[str, float]], b: Sequence[Mapping[str, float]], tol: float) -> None:
    assert len(a) == len(b), f"{len(a)} rows vs {len(b)}"
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        assert ra.keys() == rb.keys()
        for k in ra:
            both_nan = ra[k] != ra[k] and rb[k] != rb[k]
            assert both_nan or abs(ra[k] - rb[k]) <= tol, f"row {i} column {k}: {ra[k]} vs {rb[k]}"


def toy_slide(path: Path, feats: np.ndarray, coords: np.ndarray | None = None, **attrs) -> Path:
    """A small slide feature file in our layout (toy backbone), with ``attrs`` over the defaults."""
    import h5py

    n = feats.shape[0]
    coords = np.stack([np.arange(n) * 224, np.zeros(n)], axis=1) if coords is None else coords
    base = {"backbone": "toy", "bundle_fingerprint": "", "feature_dim": feats.shape[1], "mpp": 0.25}
    base.update({"target_mpp": 0.5, "tile_size": 224, "slide_path": f"/slides/{path.stem}.svs", **attrs})
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["coords"] = np.asarray(coords, dtype=np.int64)
        f["features"] = feats
        for k, v in base.items():
            f.attrs[k] = v
    return path


def pooled(model, x):
    """A PathoTuneModel's pooled pre-logits features, as timm spells it."""
    return model.forward_head(model.forward_features(x), pre_logits=True)

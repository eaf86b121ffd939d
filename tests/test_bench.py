"""The benchmark harness: grid cells, resume without recomputation, summary maths, BENCHMARKS.md merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from pathotune import ConfigError
from pathotune.engine import bench


def tiny_data(root):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for c, col in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(col) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype("uint8")
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    data = tiny_data(tmp / "data")
    cfg_path = tmp / "grid.yaml"
    (tmp / "BENCHMARKS.md").write_text("# Benchmarks\n\nHand-written notes stay.\n")
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "backbone": "vit_small_patch16_224",
                "image_size": 32,
                "datasets": {"colours": {"data": str(data)}},
                "methods": ["linear", "vpt-deep"],
                "seeds": [0, 1],
                "common": {
                    "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
                    "batch_size": 8,
                    "epochs": 2,
                    "bootstrap": 0,
                    "augment": "none",
                },
                "overrides": {"linear": {"epochs": 5}},
                "runs_dir": str(tmp / "runs"),
                "output": str(tmp / "BENCHMARKS.md"),
            }
        )
    )
    cfg = bench.load_bench_config(cfg_path)
    summary = bench.run_bench(cfg, str(cfg_path), progress=False)
    return tmp, cfg, cfg_path, summary


def test_grid_runs_every_cell_and_summarises(grid):
    tmp, cfg, _, summary = grid
    for method in ("linear", "vpt-deep"):
        for seed in (0, 1):
            m = json.loads((tmp / "runs" / "tiny" / "colours" / method / f"seed_{seed}" / "metrics.json").read_text())
            assert m["method"] == method and m["seed"] == seed
            assert m["peak_memory_mb"] > 0
    results = {}
    for method in ("linear", "vpt-deep"):
        runs = [
            json.loads((tmp / "runs" / "tiny" / "colours" / method / f"seed_{s}" / "metrics.json").read_text())
            for s in (0, 1)
        ]
        results[("colours", method)] = runs
    rows = bench.summarise(results)
    for row, method in zip(rows, ("linear", "vpt-deep"), strict=True):
        vals = [r["balanced_accuracy"] for r in results[("colours", method)]]
        assert row["balanced_accuracy"]["mean"] == pytest.approx(np.mean(vals))
        assert row["balanced_accuracy"]["std"] == pytest.approx(np.std(vals, ddof=1))
    text = (tmp / "BENCHMARKS.md").read_text()
    assert text.startswith("# Benchmarks\n\nHand-written notes stay.")
    assert "<!-- bench:tiny:start -->" in text and "| vpt-deep |" in text
    assert f"pathotune bench --config {tmp / 'grid.yaml'}" in text
    assert (tmp / "benchmarks" / "figures" / "tiny_colours_accuracy_vs_params.png").is_file()
    assert summary.is_file()


def test_rerun_recomputes_nothing_and_replaces_its_section(grid, monkeypatch):
    tmp, cfg, cfg_path, _ = grid

    def refuse(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(bench, "run_cell", refuse)
    bench.run_bench(cfg, str(cfg_path), progress=False)
    text = (tmp / "BENCHMARKS.md").read_text()
    assert text.count("<!-- bench:tiny:start -->") == 1


def test_config_errors(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "datasets": {"d": {"data": "x"}}, "methods": ["vpt-huge"]}))
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['vpt-huge'\]"):
        bench.load_bench_config(p)
    p.write_text(yaml.safe_dump({"name": "x", "datasets": {"d": {"data": "x"}}, "methods": ["linear"],
                                 "overrides": {"full": {"lr": 1}}}))
    with pytest.raises(ConfigError, match="overrides for methods not in the grid"):
        bench.load_bench_config(p)
    p.write_text(yaml.safe_dump({"name": "x", "datasets": {}, "methods": ["linear"], "sedes": [1]}))
    with pytest.raises(ConfigError, match="sedes"):
        bench.load_bench_config(p)

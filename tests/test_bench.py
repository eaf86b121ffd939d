"""The benchmark harness: grid cells, resume without recomputation, summary maths, BENCHMARKS.md merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from helpers import TINY2
from PIL import Image

from pathotune import ConfigError
from pathotune.engine import bench
from pathotune.errors import OutputError


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
                    "backbone_kwargs": TINY2,
                    "batch_size": 8,
                    "steps": 2,
                    "bootstrap": 0,
                    "augment": "none",
                },
                "overrides": {"vpt-deep": {"lr": 0.01}},
                "comparisons": [["vpt-deep", "linear"]],
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
    assert "L-BFGS logistic-regression probe on standardized features, C=" in text and "head from the probe" in text
    assert "Model selection" in text and "validation data only" in text and "Machine: " in text
    # The paired comparison is computed from the cells' predictions over both seeds.
    assert "#### Paired comparisons" in text and "| vpt-deep | linear |" in text
    (row,) = json.loads((tmp / "runs" / "tiny" / "comparisons.json").read_text())
    assert row["n_seeds"] == 2 and row["n_images"] == 8
    assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    assert row["verdict"] in ("better", "worse", "inconclusive")
    per_seed = [
        results[("colours", "vpt-deep")][i]["balanced_accuracy"]
        - results[("colours", "linear")][i]["balanced_accuracy"]
        for i in (0, 1)
    ]
    assert row["per_seed"] == pytest.approx(per_seed)


def test_rerun_recomputes_nothing_and_replaces_its_section(grid, monkeypatch):
    tmp, cfg, cfg_path, _ = grid

    def refuse(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(bench, "run_cell", refuse)
    bench.run_bench(cfg, str(cfg_path), progress=False)
    text = (tmp / "BENCHMARKS.md").read_text()
    assert text.count("<!-- bench:tiny:start -->") == 1


def test_a_lost_section_marker_is_refused_not_appended_twice(grid, monkeypatch):
    """A BENCHMARKS.md whose section lost one marker (a hand edit) is left as it is, with a one-line error."""
    tmp, cfg, cfg_path, _ = grid
    monkeypatch.setattr(bench, "run_cell", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    path = tmp / "BENCHMARKS.md"
    whole = path.read_text()
    edited = whole.replace("<!-- bench:tiny:start -->\n", "")
    path.write_text(edited)
    try:
        with pytest.raises(OutputError, match=r"BENCHMARKS.md: the marker <!-- bench:tiny:start --> is missing"):
            bench.run_bench(cfg, str(cfg_path), progress=False, train=False)
        assert path.read_text() == edited
    finally:
        path.write_text(whole)  # the grid fixture is shared with the tests below


def test_report_only_trains_nothing_and_names_missing_cells(grid, monkeypatch):
    tmp, cfg, cfg_path, _ = grid

    def refuse(*a, **k):
        raise AssertionError("--report-only trained a cell")

    monkeypatch.setattr(bench, "run_cell", refuse)
    wider = cfg.model_copy(update={"seeds": [0, 1, 2]})
    bench.run_bench(wider, str(cfg_path), progress=False, train=False)
    text = (tmp / "BENCHMARKS.md").read_text()
    assert "Not run (2 cells;" in text
    assert "colours/linear (seed 2); colours/vpt-deep (seed 2)." in text
    assert not (tmp / "runs" / "tiny" / "colours" / "linear" / "seed_2").exists()
    (row,) = json.loads((tmp / "runs" / "tiny" / "comparisons.json").read_text())
    assert row["n_seeds"] == 2  # the finished seeds only
    bench.run_bench(cfg, str(cfg_path), progress=False, train=False)  # the whole grid again: nothing missing
    assert "Not run" not in (tmp / "BENCHMARKS.md").read_text()


def test_only_trains_the_named_methods_and_refuses_unknown_ones(grid, monkeypatch):
    tmp, cfg, cfg_path, _ = grid
    tried = []

    class Stop(Exception):
        pass

    def record(cell, cell_dir):
        tried.append(cell_dir.relative_to(tmp / "runs" / "tiny").as_posix())
        raise Stop

    monkeypatch.setattr(bench, "run_cell", record)
    wider = cfg.model_copy(update={"seeds": [0, 1, 2]})
    with pytest.raises(Stop):  # linear seed 2 comes first in the grid and is passed over
        bench.run_bench(wider, str(cfg_path), progress=False, only=["vpt-deep"])
    assert tried == ["colours/vpt-deep/seed_2"]
    with pytest.raises(ConfigError, match=r"--only 'vpt-huge' is not a method of grid 'tiny'"):
        bench.run_bench(wider, str(cfg_path), progress=False, only=["vpt-huge"])
    with pytest.raises(ConfigError, match=r"--splits 3 is not a split of grid 'tiny'"):
        bench.run_bench(wider, str(cfg_path), progress=False, splits=[3])


def test_config_errors(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "datasets": {"d": {"data": "x"}}, "methods": ["vpt-huge"]}))
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['vpt-huge'\]"):
        bench.load_bench_config(p)
    p.write_text(
        yaml.safe_dump(
            {"name": "x", "datasets": {"d": {"data": "x"}}, "methods": ["linear"], "overrides": {"full": {"lr": 1}}}
        )
    )
    with pytest.raises(ConfigError, match="overrides for methods not in the grid"):
        bench.load_bench_config(p)
    p.write_text(yaml.safe_dump({"name": "x", "datasets": {}, "methods": ["linear"], "sedes": [1]}))
    with pytest.raises(ConfigError, match="sedes"):
        bench.load_bench_config(p)


# ---------------------------------------------------------------------------------------------------------
# Variants, paired comparisons and the few-shot protocol. Cells here train in-process (same YAML path as the
# CLI, no interpreter start-up per cell) to keep the file fast; the grid fixture above covers child processes.

TINY = {
    "backbone_kwargs": TINY2,
    "batch_size": 8,
    "steps": 2,
    "bootstrap": 0,
    "augment": "none",
}


def in_process(cell: dict, cell_dir):
    """Stand-in for ``run_cell``: the same cell.yaml, read by the CLI's loader, trained in this process."""
    from pathotune.engine.config import load_config
    from pathotune.engine.run import train_run

    cell_dir.mkdir(parents=True, exist_ok=True)
    path = cell_dir / "cell.yaml"
    path.write_text(yaml.safe_dump(cell, sort_keys=False))
    return train_run(load_config(path), progress=False)


def write_config(tmp, **keys):
    base = {
        "name": "tiny",
        "backbone": "vit_small_patch16_224",
        "image_size": 32,
        "seeds": [0],
        "common": TINY,
        "runs_dir": str(tmp / "runs"),
        "output": str(tmp / "BENCHMARKS.md"),
    }
    p = tmp / "grid.yaml"
    p.write_text(yaml.safe_dump({**base, **keys}))
    return p


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("colours") / "data")


def test_variant_cell_runs_with_its_keys(colours, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_cell", in_process)
    name = "linear (refit on train+val)"
    p = write_config(
        tmp_path,
        datasets={"colours": {"data": str(colours), "task": {"name": "colour swatches", "organ": "paint"}}},
        methods=[name],
        variants={name: {"method": "linear", "probe_refit": True, "task": {"organ": "ink"}}},
    )
    cfg = bench.load_bench_config(p)
    bench.run_bench(cfg, str(p), progress=False)
    cell_dir = tmp_path / "runs" / "tiny" / "colours" / "linear-refit-on-train+val" / "seed_0"
    cell = yaml.safe_load((cell_dir / "cell.yaml").read_text())
    assert cell["method"] == "linear" and cell["probe_refit"] is True
    assert cell["task"] == {"name": "colour swatches", "organ": "ink"}  # merged key by key, the variant's wins
    assert cell["batch_size"] == 8  # common still applies
    m = json.loads((cell_dir / "metrics.json").read_text())
    assert m["method"] == "linear" and m["probe"]["refit"] is True
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert f"| {name} |" in text and "refit on train+val" in text


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"methods": ["ctl"], "variants": {"ctl": {"method": "vpt-huge"}}}, r"variants\.ctl\.method.*vpt-huge"),
        ({"methods": ["ctl"], "variants": {"ctl": {"lr": 0.1}}}, r"variants\.ctl\.method' is missing"),
        (
            {"methods": ["ctl"], "variants": {"ctl": {"method": "linear", "probe_refitt": True}}},
            r"variants\.ctl\.probe_refitt",
        ),
        (
            {"methods": ["ctl"], "variants": {"ctl": {"method": "text", "task": {"txt": ""}}}},
            r"variants\.ctl\.task\.txt",
        ),
        ({"methods": ["ctl"], "variants": {"ctl": {"method": "linear", "seed": 3}}}, r"variants\.ctl\.seed"),
        ({"methods": ["linear"], "variants": {"linear": {"method": "text"}}}, "has a method's name"),
        ({"methods": ["ctrl"], "variants": {"ctl": {"method": "linear"}}}, r"unknown method\(s\) \['ctrl'\]"),
        ({"methods": ["linear"], "common": {"lrr": 1}}, r"common\.lrr"),
        ({"methods": ["linear"], "comparisons": [["linear", "text"]]}, r"comparisons\.0.*'text' is not in methods"),
        ({"methods": ["a b", "a-b"], "variants": {n: {"method": "linear"} for n in ("a b", "a-b")}}, "run folder"),
        ({"methods": [], "fewshot": {"methods": ["linear"], "shots": [0]}}, r"fewshot\.shots"),
        ({"methods": []}, "at least one method"),
    ],
)
def test_variant_and_section_config_errors(tmp_path, keys, match):
    p = write_config(tmp_path, datasets={"d": {"data": "x"}}, **keys)
    with pytest.raises(ConfigError, match=match) as info:
        bench.load_bench_config(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_paired_bootstrap_known_cases():
    from sklearn.metrics import balanced_accuracy_score

    from pathotune.engine.compare import compare_runs, paired_bootstrap

    y = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
    pred = np.array([0, 1, 1, 0, 2, 2, 0, 1, 1, 0])
    same = paired_bootstrap(y, np.stack([pred, pred]), np.stack([pred, pred]), n_resamples=200)
    assert same.mean == 0 and (same.ci_low, same.ci_high) == (0, 0) and same.verdict == "inconclusive"
    wrong = (y + 1) % 3
    better = paired_bootstrap(y, np.stack([y, y]), np.stack([wrong, wrong]), n_resamples=200)
    assert better.mean == pytest.approx(1.0) and better.ci_low > 0 and better.verdict == "better"
    assert paired_bootstrap(y, wrong, y, n_resamples=200).verdict == "worse"
    rng = np.random.default_rng(0)
    m = np.where(rng.random((3, 10)) < 0.7, y, rng.integers(0, 3, (3, 10)))
    b = np.where(rng.random((3, 10)) < 0.7, y, rng.integers(0, 3, (3, 10)))
    r = paired_bootstrap(y, m, b)
    expected = [balanced_accuracy_score(y, m[i]) - balanced_accuracy_score(y, b[i]) for i in range(3)]
    assert r.per_seed == pytest.approx(expected) and r.mean == pytest.approx(np.mean(expected))
    assert r.ci_low <= r.mean <= r.ci_high and r.n_resamples == 2000
    assert paired_bootstrap(y, m, b) == r  # fixed bootstrap seed: reproducible
    # Rows are matched by path, whatever their order in each predictions.csv.
    names = ["a", "b", "c"]
    runs_m = {0: {f"t{i}": (names[y[i]], names[m[0, i]]) for i in range(10)}}
    runs_b = {0: {f"t{i}": (names[y[i]], names[b[0, i]]) for i in reversed(range(10))}}
    diff, note = compare_runs(runs_m, runs_b)
    assert diff.per_seed == pytest.approx(expected[:1]) and note["seeds"] == [0]


def test_fewshot_sampling(colours, tmp_path):
    from pathotune.data import load_source
    from pathotune.engine.fewshot import manifest_csv, sample_episode, t_interval

    source = load_source(colours)
    ep = sample_episode(source, 2, 0, seed=0)
    for split in ("train", "val"):
        labels = [s.label for s in ep.split(split)]
        assert sorted(labels) == [0, 0, 1, 1]
        assert {s.path_or_key for s in ep.split(split)} <= {s.path_or_key for s in source.split(split)}
    assert not {s.path_or_key for s in ep.split("train")} & {s.path_or_key for s in ep.split("val")}
    assert ep.split("test") == source.split("test") and not ep.notes
    assert sample_episode(source, 2, 0, seed=0) == ep  # deterministic
    draws = {tuple(s.path_or_key for s in sample_episode(source, 2, e).split("train")) for e in range(4)}
    assert len(draws) > 1  # episodes differ
    big = sample_episode(source, 5, 0)  # val has 4 per class: all taken, and said so
    assert len(big.split("train")) == 10 and len(big.split("val")) == 8
    assert len(big.notes) == 2 and all("val" in n and "took all" in n for n in big.notes)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(manifest_csv(ep, source.classes))
    back = load_source(manifest, val_fraction=0.0, test_fraction=0.0)
    assert back.classes == source.classes
    assert {n: len(back.split(n)) for n in ("train", "val", "test")} == {"train": 4, "val": 4, "test": 8}
    assert all(s.path_or_key.is_absolute() for s in back.all_samples())
    ci = t_interval([0.5, 0.7, 0.6])
    assert ci["mean"] == pytest.approx(0.6) and ci["n"] == 3
    assert ci["high"] - ci["mean"] == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert t_interval([0.5])["low"] is None


def test_fewshot_grid_end_to_end(colours, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_cell", in_process)
    p = write_config(
        tmp_path,
        datasets={"colours": {"data": str(colours)}},
        methods=[],
        fewshot={"shots": [1, 2], "episodes": 2, "methods": ["linear"], "seed": 0},
    )
    cfg = bench.load_bench_config(p)
    bench.run_bench(cfg, str(p), progress=False)
    root = tmp_path / "runs" / "tiny" / "colours" / "_fewshot"
    for k in (1, 2):
        for e in (0, 1):
            folder = root / f"k{k}" / f"episode_{e}"
            rows = (folder / "manifest.csv").read_text().splitlines()
            assert rows[0] == "path,label,split,group" and len(rows) == 1 + 4 * k + 8
            cell = yaml.safe_load((folder / "linear" / "cell.yaml").read_text())
            assert cell["data"] == str(folder / "manifest.csv") and cell["seed"] == e
            assert cell["val_fraction"] == 0 and cell["test_fraction"] == 0
            m = json.loads((folder / "linear" / "metrics.json").read_text())
            assert m["n_train"] == 2 * k and m["n_val"] == 2 * k and m["n_test"] == 8
    summary = json.loads((tmp_path / "runs" / "tiny" / "fewshot.json").read_text())["colours"]
    assert {(r["method"], r["shots"], r["n"]) for r in summary["rows"]} == {("linear", 1, 2), ("linear", 2, 2)}
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "#### Few-shot" in text and "| method | k=1 | k=2 | episodes |" in text and "t-interval" in text
    assert (tmp_path / "benchmarks" / "figures" / "tiny_colours_fewshot.png").is_file()

    def refuse(*a, **k):
        raise AssertionError("a finished few-shot cell was recomputed")

    monkeypatch.setattr(bench, "run_cell", refuse)
    bench.run_bench(cfg, str(p), progress=False)


def test_hierarchical_bootstrap_over_splits_groups_and_seeds():
    from pathotune.engine.compare import SplitPairs, compare_runs, paired_bootstrap_splits

    rng = np.random.default_rng(0)
    splits = []
    for s in range(5):
        y = rng.integers(0, 3, 40)
        m = np.where(rng.random((2, 40)) < 0.8, y, (y + 1) % 3)
        b = np.where(rng.random((2, 40)) < 0.6, y, (y + 1) % 3)
        splits.append(SplitPairs(y, m, b, [f"s{s}g{i % 8}" for i in range(40)]))
    r = paired_bootstrap_splits(splits, n_resamples=500)
    assert r.n_splits == 5 and r.n_groups == 40 and r.unit == "group" and r.note is None
    assert r.mean == pytest.approx(np.mean(r.per_split)) and r.ci_low < r.mean < r.ci_high and r.verdict == "better"
    few = paired_bootstrap_splits(splits[:3], n_resamples=100)
    assert few.ci_low is None and few.verdict == "no interval" and few.note.startswith("too few splits")
    one = paired_bootstrap_splits(splits[:1], n_resamples=100)  # one split of 8 test groups: groups are the unit
    assert one.note is None and one.n_groups == 8
    # compare_runs takes split -> seed -> predictions, matching rows by path within each split
    names = ["a", "b", "c"]
    method = {s: {0: {f"s{s}/{i}": (names[p.labels[i]], names[p.method[0, i]], p.groups[i]) for i in range(40)}}
              for s, p in enumerate(splits)}  # fmt: skip
    base = {s: {0: {f"s{s}/{i}": (names[p.labels[i]], names[p.baseline[0, i]], p.groups[i]) for i in range(40)}}
            for s, p in enumerate(splits)}  # fmt: skip
    diff, note = compare_runs(method, base, n_resamples=200)
    assert note["splits"] == [0, 1, 2, 3, 4] and diff.n_splits == 5 and diff.unit == "group"


def test_split_axis_strongest_baseline_and_tta_rows(colours, tmp_path, monkeypatch):
    """Cells over split seeds; '+tta' rows from cells trained with tta; the strongest probe chosen per split on
    validation; the comparison names which one it took."""
    monkeypatch.setattr(bench, "run_cell", in_process)
    data = tmp_path / "m.csv"
    files = sorted(colours.rglob("*.png"))
    data.write_text("path,label,group\n" + "".join(f"{f},{f.parent.name},g{i % 8}\n" for i, f in enumerate(files)))
    p = write_config(
        tmp_path,
        datasets={"colours": {"data": str(data), "val_fraction": 0.25, "test_fraction": 0.25}},
        methods=["linear", "linear (raw)", "vpt-deep"],
        splits=[0, 1],
        variants={"linear (raw)": {"method": "linear", "probe": {"features": "raw"}}},
        overrides={"linear": {"tta": True}},
        strongest={"strongest probe": ["linear", "linear +tta", "linear (raw)"]},
        comparisons=[["vpt-deep", "strongest probe"], ["linear +tta", "linear"]],
    )
    cfg = bench.load_bench_config(p)
    bench.run_bench(cfg, str(p), progress=False)
    root = tmp_path / "runs" / "tiny" / "colours"
    for split in (0, 1):
        m = json.loads((root / "linear" / f"split_{split}" / "seed_0" / "metrics.json").read_text())
        assert m["split_seed"] == split and m["tta"] and m["val_score"] is not None
        assert (root / "linear" / f"split_{split}" / "seed_0" / "predictions_tta.csv").is_file()
    picks = json.loads((tmp_path / "runs" / "tiny" / "strongest.json").read_text())["colours"]["strongest probe"]
    assert set(picks) == {"0", "1"} and all(
        v["member"] in ("linear", "linear +tta", "linear (raw)") for v in picks.values()
    )
    rows = json.loads((tmp_path / "runs" / "tiny" / "comparisons.json").read_text())
    assert rows[0]["chosen"] == {k: v["member"] for k, v in picks.items()} and rows[0]["n_splits"] == 2
    assert (
        rows[0]["verdict"] == "no interval" and rows[0]["note"] == "too few splits for an interval (2 splits; 5 needed)"
    )
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| linear +tta |" in text and "#### Strongest baselines" in text and "too few splits" in text
    plan = bench.plan_bench(cfg, str(p))
    assert "6 cells" in plan and "grid    colours/linear: 2 cells, 2 finished" in plan

"""Benchmark grids: methods x datasets x seeds through the same engine, resumable, summarised in markdown.

Each cell runs in its own process (`pathotune train --config cell.yaml`), so its peak memory is its own and a
crash of one cell never takes the grid down. A cell whose metrics.json exists is never recomputed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ConfigError, PathoTuneError
from ..methods import list_methods
from .metrics import aggregate_seeds

BENCH_KEYS = ("balanced_accuracy", "macro_f1", "auroc")
BUILTIN_DATA = ("slide_qc",)


class DatasetEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str  # a path accepted by --data, or builtin:<name>
    task: dict = Field(default_factory=dict)
    val_fraction: float = 0.2
    test_fraction: float = 0.0


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    backbone: str = "dinov2_vits14"
    weights: str | None = None
    image_size: int | None = None
    datasets: dict[str, DatasetEntry]
    methods: list[str]
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    common: dict = Field(default_factory=dict)  # TrainConfig keys for every cell
    overrides: dict[str, dict] = Field(default_factory=dict)  # method -> TrainConfig keys (its recipe)
    runs_dir: str = "runs/bench"
    output: str = "BENCHMARKS.md"
    note: str = ""


def load_bench_config(path: str | Path) -> BenchConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"benchmark config {p} not found")
    try:
        cfg = BenchConfig(**(yaml.safe_load(p.read_text()) or {}))
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{p}: key '{'.'.join(map(str, err['loc']))}': {err['msg']}") from None
    unknown = sorted(set(cfg.methods) - set(list_methods()))
    if unknown:
        raise ConfigError(f"{p}: unknown method(s) {unknown}; use {list_methods()}")
    stray = sorted(set(cfg.overrides) - set(cfg.methods))
    if stray:
        raise ConfigError(f"{p}: overrides for methods not in the grid: {stray}")
    return cfg


def resolve_data(entry: DatasetEntry, root: Path) -> str:
    if not entry.data.startswith("builtin:"):
        return entry.data
    name = entry.data.split(":", 1)[1]
    if name not in BUILTIN_DATA:
        raise ConfigError(f"unknown builtin dataset '{name}'; available: {list(BUILTIN_DATA)}")
    from ..data.demo import build_slide_qc_tiles

    out = root / "data" / name
    build_slide_qc_tiles(out)
    return str(out)


def cell_config(cfg: BenchConfig, dataset: str, data: str, method: str, seed: int, out: Path) -> dict:
    entry = cfg.datasets[dataset]
    cell = {
        "data": data,
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "image_size": cfg.image_size,
        "method": method,
        "seed": seed,
        "val_fraction": entry.val_fraction,
        "test_fraction": entry.test_fraction,
        "out": str(out),
        **cfg.common,
        **cfg.overrides.get(method, {}),
    }
    if entry.task:
        cell["task"] = entry.task
    return {k: v for k, v in cell.items() if v is not None}


def run_cell(cell: dict, cell_dir: Path) -> dict:
    """Train one cell in a child process; record its own peak resident memory."""
    import json

    cell_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = cell_dir / "cell.yaml"
    cfg_path.write_text(yaml.safe_dump(cell, sort_keys=False))
    cmd = [sys.executable, "-m", "pathotune.cli.main", "train", "--config", str(cfg_path), "--quiet"]
    t0 = time.perf_counter()
    with open(cell_dir / "train.log", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = (cell_dir / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise PathoTuneError(f"benchmark cell {cell_dir} failed (exit {code}): {tail[0]}; see {cell_dir}/train.log")
    metrics = json.loads((cell_dir / "metrics.json").read_text())
    metrics["cell_seconds"] = time.perf_counter() - t0
    if "peak_memory_mb" not in metrics or metrics["peak_memory_mb"] is None:
        metrics["peak_memory_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return metrics


def run_bench(cfg: BenchConfig, config_path: str, progress: bool = True) -> Path:
    """Run (or resume) every cell, then write the markdown summary and the plot."""
    import json

    from tqdm.auto import tqdm

    root = Path(cfg.runs_dir) / cfg.name
    cells = [(d, m, s) for d in cfg.datasets for m in cfg.methods for s in cfg.seeds]
    results: dict[tuple[str, str], list[dict]] = {}
    data_paths = {d: resolve_data(e, root) for d, e in cfg.datasets.items()}
    bar = tqdm(cells, desc="benchmark cells", disable=not progress)
    for dataset, method, seed in bar:
        cell_dir = root / dataset / method / f"seed_{seed}"
        bar.set_postfix_str(f"{dataset}/{method}/seed {seed}")
        done = cell_dir / "metrics.json"
        if done.is_file():
            metrics = json.loads(done.read_text())
        else:
            cell = cell_config(cfg, dataset, data_paths[dataset], method, seed, cell_dir)
            metrics = run_cell(cell, cell_dir)
            from ..report import atomic_write_json

            atomic_write_json(done, metrics)
        results.setdefault((dataset, method), []).append(metrics)
    seconds = sum(r.get("cell_seconds") or r["train_seconds"] for runs in results.values() for r in runs)
    return write_summary(cfg, config_path, results, seconds)


def summarise(results: dict[tuple[str, str], list[dict]]) -> list[dict]:
    rows = []
    for (dataset, method), runs in results.items():
        agg = aggregate_seeds(runs, list(BENCH_KEYS))
        first = runs[0]
        rows.append(
            {
                "dataset": dataset,
                "method": method,
                **{k: agg[k] for k in BENCH_KEYS},
                "trainable_params": first["trainable_params"],
                "pct_of_backbone": first["trainable_percent_of_backbone"],
                # Head-only cells train on cached features: their epochs never touch the backbone.
                "train_img_s": None
                if first["recipe"].get("cached_features")
                else sum(r["train_images_per_second"] for r in runs) / len(runs),
                "infer_img_s": _mean([r.get("inference_images_per_second") for r in runs]),
                "peak_mem_mb": max(r.get("peak_memory_mb") or 0.0 for r in runs),
                "recipe": _recipe(first),
                "seeds": len(runs),
            }
        )
    return rows


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _recipe(m: dict) -> str:
    r = m["recipe"]
    extra = ", cached features" if r.get("cached_features") else ""
    return (
        f"lr {r['lr']:g}/head {r['head_lr']:g}, wd {r['weight_decay']:g}, ≤{r['epochs']} ep "
        f"(early stop on val {r['monitor']}, patience {r['patience']}){extra}"
    )


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def write_summary(cfg: BenchConfig, config_path: str, results: dict, seconds: float) -> Path:
    from ..report import atomic_write_text, markdown_table, plot_metric_vs_params

    rows = summarise(results)
    fig_dir = Path(cfg.output).parent / "benchmarks" / "figures"
    sections = []
    for dataset in cfg.datasets:
        drows = [r for r in rows if r["dataset"] == dataset]
        fig = plot_metric_vs_params(
            drows, fig_dir / f"{cfg.name}_{dataset}_accuracy_vs_params.png", title=f"{dataset}: balanced accuracy"
        )
        table = markdown_table(
            drows,
            [
                "method",
                *BENCH_KEYS,
                "trainable_params",
                "pct_of_backbone",
                "train_img_s",
                "infer_img_s",
                "peak_mem_mb",
                "seeds",
            ],
        )
        recipes = markdown_table([{"method": r["method"], "recipe": r["recipe"]} for r in drows])
        rel = os.path.relpath(fig, Path(cfg.output).parent)
        sections.append(f"### {dataset}\n\n{table}\n\n![accuracy vs trainable parameters]({rel})\n\n{recipes}\n")
    text = (
        f"## {cfg.name}\n\n"
        + (f"{cfg.note}\n\n" if cfg.note else "")
        + f"Backbone `{cfg.backbone}` at {cfg.image_size or 'its native'} px, seeds {cfg.seeds}; "
        "mean ± std over seeds; balanced accuracy, macro-F1 and AUROC on the test split. `pct_of_backbone` is "
        "trainable parameters as % of the backbone's. Throughputs are means over seeds; cells that train a head on "
        "cached features show no training or inference throughput (their backbone runs once per image). "
        "Peak memory is the training process's peak resident set "
        "(CPU) or peak CUDA allocation (GPU). Model selection uses validation data only.\n\n"
        f"Command: `pathotune bench --config {config_path}` (the cells took {seconds / 60:.0f} min in all).\n"
        f"Machine: {machine_line()}.\n\n" + "\n".join(sections)
    )
    out = Path(cfg.runs_dir) / cfg.name / "summary.md"
    atomic_write_text(out, text)
    _merge_into(Path(cfg.output), cfg.name, text)
    return out


def _merge_into(path: Path, name: str, section: str) -> None:
    """Replace this benchmark's section in BENCHMARKS.md (between markers), keeping everything else."""
    from ..report import atomic_write_text

    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{section}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)

"""Benchmark grids: methods x datasets x seeds through the same engine, resumable, summarised in markdown.

Each cell runs in its own process (`pathotune train --config cell.yaml`), so its peak memory is its own and a
crash of one cell never takes the grid down. A cell whose metrics.json exists is never recomputed.

Besides plain methods a grid can hold named variants (a method plus config keys, e.g. a control with empty task
text), paired comparisons with a bootstrap interval (engine/compare.py) and a few-shot protocol
(engine/fewshot.py) whose episode cells resume like grid cells.

About 440 lines on purpose: running the cells and writing their section are one report read top to bottom; the
grid's config (bench_config.py) and the statistics (compare.py, fewshot.py) live in their own modules.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import yaml

from ..data import load_source
from ..errors import PathoTuneError
from ..report import (
    atomic_write_json,
    atomic_write_text,
    markdown_table,
    merge_section,
    plot_metric_vs_params,
    progress_bar,
    trainable_percent,
)
from ..report.plots import plot_fewshot_curves
from .bench_config import (
    BENCH_KEYS,
    FEWSHOT_DIR,
    BenchConfig,
    cell_config,
    fewshot_cell_config,
    load_bench_config,
    resolve_data,
    slug,
)
from .compare import N_RESAMPLES, compare_runs, read_predictions
from .fewshot import fewshot_table, manifest_csv, sample_episode, summarise_fewshot
from .metrics import aggregate_seeds

__all__ = ["BenchConfig", "load_bench_config", "run_bench", "run_cell", "summarise"]


def run_cell(cell: dict, cell_dir: Path) -> dict:
    """Train one cell in a child process; record its own peak resident memory."""
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


def _run_or_load(make_cell: Callable[[], dict], cell_dir: Path) -> dict:
    """A finished cell's metrics, else train it (through the module's ``run_cell``) and record them."""

    done = cell_dir / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    metrics = run_cell(make_cell(), cell_dir)
    atomic_write_json(done, metrics)
    return metrics


def grid_cell_dir(root: Path, dataset: str, name: str, seed: int) -> Path:
    return root / dataset / slug(name) / f"seed_{seed}"


def episode_dir(root: Path, dataset: str, k: int, episode: int) -> Path:
    return root / dataset / FEWSHOT_DIR / f"k{k}" / f"episode_{episode}"


def prepare_fewshot(cfg: BenchConfig, root: Path, data_paths: dict[str, str]) -> dict[tuple[str, int, int], dict]:
    """Draw every episode and write its manifest once (kept on reruns, so finished cells keep their data).

    Returns (dataset, k, episode) -> {manifest, notes}; draws are deterministic, so notes are the same on reruns.
    """

    fs = cfg.fewshot
    if fs is None:
        return {}
    out: dict[tuple[str, int, int], dict] = {}
    for dataset in fs.datasets or list(cfg.datasets):
        entry = cfg.datasets[dataset]
        source = load_source(
            data_paths[dataset], val_fraction=entry.val_fraction, test_fraction=entry.test_fraction, seed=fs.seed
        )
        for k in fs.shots:
            for e in range(fs.episodes):
                ep = sample_episode(source, k, e, seed=fs.seed)
                folder = episode_dir(root, dataset, k, e)
                manifest = folder / "manifest.csv"
                if not manifest.is_file():
                    atomic_write_text(manifest, manifest_csv(ep, source.classes))
                    counts = {s: len(ep.split(s)) for s in ("train", "val", "test")}
                    atomic_write_json(folder / "episode.json", {"k": k, "episode": e, "seed": fs.seed, **counts})
                out[(dataset, k, e)] = {"manifest": manifest, "notes": ep.notes}
    return out


def run_bench(cfg: BenchConfig, config_path: str, progress: bool = True, train: bool = True) -> Path:
    """Run (or resume) every grid and few-shot cell, then write the markdown summary and the plots.

    With ``train=False`` nothing trains: the summary covers the finished cells and names the missing ones, so a
    long grid can be reported while (or after) it runs in pieces.
    """

    root = Path(cfg.runs_dir) / cfg.name
    data_paths = {d: resolve_data(e, root) for d, e in cfg.datasets.items()}
    episodes = prepare_fewshot(cfg, root, data_paths)
    jobs: list[tuple[tuple, str, Path, Callable[[], dict]]] = []
    for dataset in cfg.datasets:
        for name in cfg.methods:
            for seed in cfg.seeds:
                d = grid_cell_dir(root, dataset, name, seed)
                make = partial(cell_config, cfg, dataset, data_paths[dataset], name, seed, d)
                jobs.append((("grid", dataset, name, seed), f"{dataset}/{name}/seed {seed}", d, make))
    for (dataset, k, e), ep in episodes.items():
        for name in cfg.fewshot.methods if cfg.fewshot else []:
            d = episode_dir(root, dataset, k, e) / slug(name)
            make = partial(fewshot_cell_config, cfg, dataset, ep["manifest"], name, e, d)
            jobs.append((("fewshot", dataset, name, k), f"{dataset}/{name}/{k}-shot/episode {e}", d, make))

    results: dict[tuple[str, str], list[dict]] = {}
    shots: dict[str, dict[tuple[str, int], list[dict]]] = {}
    seconds = 0.0
    missing: list[str] = []
    bar = progress_bar(total=len(jobs), desc="benchmark cells", unit="cell", enabled=progress)
    for key, label, cell_dir, make in jobs:
        bar.set_postfix_str(label)
        if not train and not (cell_dir / "metrics.json").is_file():
            missing.append(label)
            bar.update(1)
            continue
        metrics = _run_or_load(make, cell_dir)
        bar.update(1)
        seconds += metrics.get("cell_seconds") or metrics.get("train_seconds") or 0.0
        if key[0] == "grid":
            results.setdefault((key[1], key[2]), []).append(metrics)
        else:
            shots.setdefault(key[1], {}).setdefault((key[2], key[3]), []).append(metrics)
    bar.close()

    comparisons = run_comparisons(cfg, root)
    fewshot = summarise_fewshot_results(cfg, shots, episodes)
    if comparisons:
        atomic_write_json(root / "comparisons.json", comparisons)
    if fewshot:
        atomic_write_json(root / "fewshot.json", fewshot)
    return write_summary(cfg, config_path, results, seconds, comparisons=comparisons, fewshot=fewshot, missing=missing)


def run_comparisons(cfg: BenchConfig, root: Path) -> list[dict]:
    """Every configured pair on every dataset, from the cells' predictions.csv over the seeds both finished."""

    rows = []
    for dataset in cfg.datasets:
        for method, baseline in cfg.comparisons:
            preds: list[dict[int, dict]] = []
            for name in (method, baseline):
                files = {s: grid_cell_dir(root, dataset, name, s) / "predictions.csv" for s in cfg.seeds}
                preds.append({s: read_predictions(f) for s, f in files.items() if f.is_file()})
            row: dict = {"dataset": dataset, "method": method, "baseline": baseline}
            try:
                diff, note = compare_runs(preds[0], preds[1])
            except PathoTuneError as e:
                row.update({"verdict": "n/a", "error": str(e)})
            else:
                row.update({**diff.to_dict(), **note})
            rows.append(row)
    return rows


def summarise_fewshot_results(
    cfg: BenchConfig, shots: dict[str, dict[tuple[str, int], list[dict]]], episodes: dict
) -> dict[str, dict]:
    """Per dataset: t-interval rows per (method, k), the notes about short classes, and one recipe per method."""

    out: dict[str, dict] = {}
    for dataset, cells in shots.items():
        scores = {key: [m["balanced_accuracy"] for m in runs] for key, runs in cells.items()}
        notes = list(dict.fromkeys(n for (d, _, _), ep in episodes.items() if d == dataset for n in ep["notes"]))
        recipes = {}
        for (method, _), runs in sorted(cells.items(), key=lambda kv: -kv[0][1]):
            recipes.setdefault(method, _recipe(runs[0]))
        out[dataset] = {"rows": summarise_fewshot(scores), "notes": notes, "recipes": recipes}
    return out


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
                "trainable_pct": trainable_percent(first["trainable_params"], first["total_params"]),
                # Head-only cells train on cached features: their steps never touch the backbone.
                "train_img_s": None
                if first["recipe"].get("cached_features")
                else _mean([r.get("train_images_per_second") for r in runs]),
                "infer_img_s": _mean([r.get("inference_images_per_second") for r in runs]),
                "peak_mem_mb": max(r.get("peak_memory_mb") or 0.0 for r in runs),
                "recipe": _recipe(first),
                "per_seed": _per_seed(runs),
                "seeds": len(runs),
            }
        )
    return rows


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _recipe(m: dict) -> str:
    """How the cell trained, from its metrics: the probe's C, or the AdamW step budget and head start."""
    r = m["recipe"]
    extra = ", cached features" if r.get("cached_features") else ""
    if "epochs" in r:  # a cell finished before budgets were counted in steps
        return (
            f"lr {r['lr']:g}/head {r['head_lr']:g}, wd {r['weight_decay']:g}, ≤{r['epochs']} ep "
            f"(early stop on val {r['monitor']}, patience {r['patience']}){extra}"
        )
    if r.get("trainer") == "probe":
        probe = m.get("probe") or {}
        parts = ["L-BFGS logistic-regression probe"]
        if probe.get("C") is not None:
            parts.append(f"C={probe['C']:.3g} chosen on val {r.get('monitor', '')}".rstrip())
        if probe.get("refit"):
            parts.append("refit on train+val")
        if probe.get("converged") is False:
            parts.append("not converged")
        return ", ".join(parts) + extra
    head = {"probe": "head from the probe", "random": "random head"}.get(r.get("head_init") or "", "")
    return (
        f"AdamW lr {r['lr']:g}/head {r['head_lr']:g}, wd {r['weight_decay']:g}, {r.get('steps')} steps, {head}, "
        f"early stop on val {r['monitor']} (patience {r['patience']} evals), batch {r.get('batch_size')}, "
        f"augment {r.get('augment')}{extra}"
    )


def _per_seed(runs: list[dict]) -> str:
    """What varies by seed: the probe's C, or steps run / step kept by validation."""
    parts = []
    for r in runs:
        trainer = r["recipe"].get("trainer")
        if trainer == "probe" and (r.get("probe") or {}).get("C") is not None:
            parts.append(f"C={r['probe']['C']:.3g}")
        elif trainer == "steps" and r.get("steps_run") is not None:
            parts.append(f"{r['steps_run']} run/{r.get('selected_step')} kept")
    return "; ".join(parts) or "—"


def machine_line() -> str:

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3f}"


def comparison_table(rows: list[dict]) -> str:
    """Paired differences: mean, interval, each seed's difference and the verdict."""

    table = []
    for r in rows:
        if r.get("error"):
            table.append({"method": r["method"], "baseline": r["baseline"], "verdict": f"n/a: {r['error']}"})
            continue
        table.append(
            {
                "method": r["method"],
                "baseline": r["baseline"],
                "Δ balanced accuracy": _signed(r["mean"]),
                f"{r['level']:.0%} CI": f"[{_signed(r['ci_low'])}, {_signed(r['ci_high'])}]",
                "per seed": ", ".join(_signed(v) for v in r["per_seed"]),
                "seeds": r["n_seeds"],
                "test images": r["n_images"],
                "verdict": r["verdict"],
            }
        )
    columns = list(dict.fromkeys(k for row in table for k in row))
    return markdown_table(table, columns)


def write_summary(
    cfg: BenchConfig,
    config_path: str,
    results: dict,
    seconds: float,
    comparisons: list[dict] | None = None,
    fewshot: dict[str, dict] | None = None,
    missing: list[str] | None = None,
) -> Path:

    comparisons = comparisons or []
    fewshot = fewshot or {}
    rows = summarise(results)
    out_dir = Path(cfg.output).parent
    fig_dir = out_dir / "benchmarks" / "figures"
    sections = []
    for dataset in cfg.datasets:
        parts = [f"### {dataset}\n"]
        drows = [r for r in rows if r["dataset"] == dataset]
        if drows:
            fig = plot_metric_vs_params(
                drows, fig_dir / f"{cfg.name}_{dataset}_accuracy_vs_params.png", title=f"{dataset}: balanced accuracy"
            )
            table = markdown_table(
                drows,
                [
                    "method",
                    *BENCH_KEYS,
                    "trainable_params",
                    "trainable_pct",
                    "train_img_s",
                    "infer_img_s",
                    "peak_mem_mb",
                    "seeds",
                ],
            )
            recipes = markdown_table([{k: r[k] for k in ("method", "recipe", "per_seed")} for r in drows])
            rel = os.path.relpath(fig, out_dir)
            parts.append(f"{table}\n\n![accuracy vs trainable parameters]({rel})\n\n{recipes}\n")
        crow = [r for r in comparisons if r["dataset"] == dataset]
        if crow:
            parts.append(f"#### Paired comparisons\n\n{comparison_table(crow)}\n")
        fs = fewshot.get(dataset)
        if fs and cfg.fewshot:
            fig = plot_fewshot_curves(
                fs["rows"],
                fig_dir / f"{cfg.name}_{dataset}_fewshot.png",
                title=f"{dataset}: few-shot balanced accuracy",
            )
            rel = os.path.relpath(fig, out_dir)
            recipes = markdown_table([{"method": m, "recipe": r} for m, r in fs["recipes"].items()])
            notes = "".join(f"- {n}\n" for n in fs["notes"])
            parts.append(
                f"#### Few-shot\n\n{fewshot_table(fs['rows'], cfg.fewshot.shots)}\n\n"
                f"![few-shot balanced accuracy]({rel})\n\n{recipes}\n"
                + (f"\nShort classes:\n\n{notes}" if notes else "")
            )
        sections.append("\n".join(parts))
    intro = []
    if cfg.methods:
        intro.append(
            f"Backbone `{cfg.backbone}` at {cfg.image_size or 'its native'} px, seeds {cfg.seeds}; "
            "mean ± std over seeds; balanced accuracy, macro-F1 and AUROC on the test split. `trainable_pct` is "
            "trainable parameters as % of all the model's (frozen backbone included), as everywhere in PathoTune. "
            "Throughputs are means over seeds; cells that train a head "
            "on cached features show no training or inference throughput (their backbone runs once per image). "
            "Peak memory is the training process's peak resident set (CPU) or peak CUDA allocation (GPU). "
            "Model selection (the probe's C, the step kept, the prompt groups kept) uses validation data only; "
            "the test split is scored once."
        )
    else:
        intro.append(f"Backbone `{cfg.backbone}` at {cfg.image_size or 'its native'} px.")
    if comparisons:
        intro.append(
            "Paired comparisons: Δ is the balanced accuracy of the method minus the baseline's, averaged over the "
            f"seeds both finished, with a {N_RESAMPLES}-resample paired bootstrap interval. Each resample draws the "
            "test images (the same draw for every seed and both methods) and the seeds (with replacement), so the "
            "interval covers test-set sampling and the methods' seed-to-seed variation (roughly, with few seeds); "
            "it says nothing about other datasets. The verdict is 'better' or 'worse' only when the whole interval "
            "is on one side of zero, else 'inconclusive'."
        )
    if cfg.fewshot:
        fs_cfg = cfg.fewshot
        intro.append(
            f"Few-shot: for each k in {fs_cfg.shots} and {fs_cfg.episodes} episodes, k tiles per class are drawn "
            "without replacement from the training split and k per class from the validation split (seeded by "
            f"({fs_cfg.seed}, k, episode), the same tiles for every method); the test split is kept whole. Model "
            "selection uses those k validation tiles per class only. Cells show the mean test balanced accuracy over "
            "episodes with a 95% t-interval over episodes; the interval covers episode-to-episode variation (which "
            "tiles were drawn, and the seed), not other datasets."
        )
    text = (
        f"## {cfg.name}\n\n"
        + (f"{cfg.note}\n\n" if cfg.note else "")
        + "\n\n".join(intro)
        + "\n\n"
        + f"Command: `pathotune bench --config {config_path}` (the cells took {seconds / 60:.0f} min in all).\n"
        f"Machine: {machine_line()}.\n\n" + (_missing_note(missing) if missing else "") + "\n".join(sections)
    )
    out = Path(cfg.runs_dir) / cfg.name / "summary.md"
    atomic_write_text(out, text)
    merge_section(Path(cfg.output), f"bench:{cfg.name}", text)
    return out


def _missing_note(missing: list[str]) -> str:
    """The cells a partial report leaves out, so its seed counts and intervals are read for what they are."""
    groups: dict[str, list[str]] = {}
    for label in missing:
        where, which = label.rsplit("/", 1)
        groups.setdefault(where, []).append(which)
    listed = "; ".join(f"{where} ({', '.join(which)})" for where, which in groups.items())
    return (
        f"Not run ({len(missing)} cells; this report covers the finished ones, and the `seeds` column and the "
        f"paired comparisons use the seeds each method finished): {listed}.\n\n"
    )

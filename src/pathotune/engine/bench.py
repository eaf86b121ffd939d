"""Benchmark grids: methods x datasets x splits x seeds through the same engine, resumable, summarised in markdown.

Each cell runs in its own process (`pathotune train --config cell.yaml`), so its peak memory is its own and a
crash of one cell never takes the grid down. A cell whose metrics.json exists is never recomputed.

Besides plain methods a grid can hold named variants (a method plus config keys, e.g. a control with empty task
text), several group k-fold splits of each dataset (``splits``: data variance enters the spread), rows for the
test-time-augmented results of cells trained with ``tta`` (``<name> +tta``), the strongest of several baselines
chosen per split on validation (``strongest``), paired comparisons with a cluster bootstrap interval
(engine/compare.py) and a few-shot protocol (engine/fewshot.py) whose episode cells resume like grid cells.

A report never erases published numbers: with no finished cell it refuses to write (``NothingToReport``), and
the section markers of BENCHMARKS.md are checked before anything is replaced (``report.merge_section``).
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
from ..errors import ConfigError, OutputError, PathoTuneError
from ..report import atomic_write_json, atomic_write_text, check_section, merge_section, progress_bar
from .bench_config import (
    FEWSHOT_DIR,
    TTA_SUFFIX,
    BenchConfig,
    cell_config,
    dataset_methods,
    fewshot_cell_config,
    load_bench_config,
    resolve_data,
    slug,
)
from .bench_report import fewshot_differences, recipe_text, render_summary, summarise
from .compare import compare_runs, read_predictions
from .fewshot import manifest_csv, sample_episode, summarise_fewshot

__all__ = ["BenchConfig", "NothingToReport", "load_bench_config", "plan_bench", "run_bench", "run_cell", "summarise"]


class NothingToReport(OutputError):
    """No cell of the grid has finished: a report would only erase what BENCHMARKS.md already holds."""


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
    metrics["cell_cpu_seconds"] = usage.ru_utime + usage.ru_stime  # comparable across loaded and idle machines
    if "peak_memory_mb" not in metrics or metrics["peak_memory_mb"] is None:
        metrics["peak_memory_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return metrics


def _run_or_load(make_cell: Callable[[], dict], cell_dir: Path, split: int | None) -> dict:
    """A finished cell's metrics, else train it (through the module's ``run_cell``) and record them."""

    done = cell_dir / "metrics.json"
    if done.is_file():
        metrics = json.loads(done.read_text())
    else:
        metrics = run_cell(make_cell(), cell_dir)
        atomic_write_json(done, {**metrics, "bench_split": split})
    metrics["bench_split"] = split
    return metrics


def grid_cell_dir(root: Path, dataset: str, name: str, seed: int, split: int | None = None) -> Path:
    base = root / dataset / slug(name)
    return (base if split is None else base / f"split_{split}") / f"seed_{seed}"


def episode_dir(root: Path, dataset: str, k: int, episode: int) -> Path:
    return root / dataset / FEWSHOT_DIR / f"k{k}" / f"episode_{episode}"


def prepare_fewshot(cfg: BenchConfig, root: Path) -> dict[tuple[str, int, int], dict]:
    """Draw every episode and write its manifest once (kept on reruns, so finished cells keep their data).

    Returns (dataset, k, episode) -> {manifest, notes}; draws are deterministic, so notes are the same on reruns.
    """

    fs = cfg.fewshot
    if fs is None:
        return {}
    out: dict[tuple[str, int, int], dict] = {}
    for dataset in fs.datasets or list(cfg.datasets):
        entry = cfg.datasets[dataset]
        data, _ = resolve_data(entry, root)
        source = load_source(data, val_fraction=entry.val_fraction, test_fraction=entry.test_fraction, seed=fs.seed)
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


def _jobs(cfg: BenchConfig, root: Path, episodes: dict) -> list[tuple[tuple, str, Path, Callable[[], dict]]]:
    """Every grid cell and few-shot cell: (key, label, folder, the cell's config maker)."""
    jobs = []
    for dataset, entry in cfg.datasets.items():
        for split in cfg.splits or [None]:
            where = f"{dataset}/split {split}" if split is not None else dataset
            for name in dataset_methods(cfg, dataset):
                for seed in cfg.seeds:
                    d = grid_cell_dir(root, dataset, name, seed, split)

                    def make(dataset=dataset, entry=entry, split=split, name=name, seed=seed, d=d) -> dict:
                        data, split_seed = resolve_data(entry, root, split)
                        return cell_config(cfg, dataset, data, name, seed, d, split_seed)

                    label = f"{where}/{name}/seed {seed}"
                    jobs.append((("grid", dataset, name, split, seed), label, d, make))
    for (dataset, k, e), ep in episodes.items():
        for name in cfg.fewshot.methods if cfg.fewshot else []:
            d = episode_dir(root, dataset, k, e) / slug(name)
            make = partial(fewshot_cell_config, cfg, dataset, ep["manifest"], name, e, d)
            jobs.append((("fewshot", dataset, name, k, e), f"{dataset}/{name}/{k}-shot/episode {e}", d, make))
    return jobs


def run_bench(
    cfg: BenchConfig,
    config_path: str,
    progress: bool = True,
    train: bool = True,
    only: list[str] | None = None,
    splits: list[int] | None = None,
) -> Path:
    """Run (or resume) every grid and few-shot cell, then write the markdown summary and the plots.

    With ``train=False`` nothing trains: the summary covers the finished cells and names the missing ones, so a
    long grid can be reported while (or after) it runs in pieces. ``only`` (method names) and ``splits`` narrow what
    trains the same way: the most telling cells first, the rest of the grid later, one report over all finished
    cells. With no finished cell at all nothing is written (:class:`NothingToReport`), so an empty report can never
    replace published numbers.
    """

    root = Path(cfg.runs_dir) / cfg.name
    check_section(Path(cfg.output), f"bench:{cfg.name}")  # a damaged page fails before any work
    episodes = prepare_fewshot(cfg, root)
    jobs = _jobs(cfg, root, episodes)
    check_subset(cfg, jobs, only, splits)
    results: dict[tuple[str, str], list[dict]] = {}
    shots: dict[str, dict[tuple[str, int], list[dict]]] = {}
    seconds = 0.0
    missing: list[str] = []
    bar = progress_bar(total=len(jobs), desc="benchmark cells", unit="cell", enabled=progress)
    for key, label, cell_dir, make in jobs:
        bar.set_postfix_str(label)
        trains = train and (only is None or key[2] in only) and (splits is None or key[0] != "grid" or key[3] in splits)
        if not trains and not (cell_dir / "metrics.json").is_file():
            missing.append(label)
            bar.update(1)
            continue
        metrics = _run_or_load(make, cell_dir, key[3] if key[0] == "grid" else None)
        bar.update(1)
        seconds += metrics.get("cell_seconds") or metrics.get("train_seconds") or 0.0
        if key[0] == "grid":
            results.setdefault((key[1], key[2]), []).append(metrics)
            if metrics.get("tta"):
                tta = {**metrics, **metrics["tta"], "val_score": metrics["tta"].get("val_score")}
                results.setdefault((key[1], key[2] + TTA_SUFFIX), []).append(tta)
        else:
            shots.setdefault(key[1], {}).setdefault((key[2], key[3]), []).append({**metrics, "episode": key[4]})
    bar.close()
    if not results and not shots:
        raise NothingToReport(
            f"no cell of grid '{cfg.name}' has finished under {root}; nothing was written (a report now would "
            f"replace what {cfg.output} holds): run the grid, or check runs_dir"
        )
    strongest = choose_strongest(cfg, results)
    comparisons = run_comparisons(cfg, root, strongest)
    fewshot = summarise_fewshot_results(cfg, shots, episodes)
    text = render_summary(cfg, config_path, results, seconds, strongest, comparisons, fewshot, missing, machine_line())
    out = root / "summary.md"
    merge_section(Path(cfg.output), f"bench:{cfg.name}", text)  # checks the markers before anything else is written
    atomic_write_text(out, text)
    if comparisons:
        atomic_write_json(root / "comparisons.json", comparisons)
    if fewshot:
        atomic_write_json(root / "fewshot.json", fewshot)
    if strongest:
        atomic_write_json(root / "strongest.json", strongest)
    return out


def check_subset(cfg: BenchConfig, jobs: list, only: list[str] | None, splits: list[int] | None) -> None:
    """A subset must name methods and splits of this grid: a typo would otherwise train nothing, silently."""
    names = {key[2] for key, *_ in jobs}
    for name in only or []:
        if name not in names:
            raise ConfigError(f"--only '{name}' is not a method of grid '{cfg.name}'; its methods: {sorted(names)}")
    for split in splits or []:
        if split not in (cfg.splits or []):
            raise ConfigError(f"--splits {split} is not a split of grid '{cfg.name}'; its splits: {cfg.splits}")


def _val_score(m: dict) -> float | None:
    return m.get("val_score")


def choose_strongest(cfg: BenchConfig, results: dict[tuple[str, str], list[dict]]) -> dict:
    """Per dataset, name and split: the candidate with the best mean validation score over its seeds (ties to the
    one listed first). Candidates without an honest validation score (fitted on validation) are never chosen."""
    out: dict = {}
    for dataset in cfg.datasets:
        for name, members in cfg.strongest.items():
            picks = {}
            for split in cfg.splits or [None]:
                scored = []
                for rank, member in enumerate(members):
                    runs = [m for m in results.get((dataset, member), []) if m.get("bench_split") == split]
                    vals = [_val_score(m) for m in runs if _val_score(m) is not None]
                    if vals:
                        scored.append((sum(vals) / len(vals), -rank, member))
                if scored:
                    score, _, member = max(scored)
                    picks[str(split)] = {"member": member, "val_score": score}
            out.setdefault(dataset, {})[name] = picks
    return out


def _predictions(root: Path, dataset: str, name: str, seeds, split) -> dict[int, dict]:
    base, file = (name[: -len(TTA_SUFFIX)], "predictions_tta.csv") if name.endswith(TTA_SUFFIX) else (name, "")
    file = file or "predictions.csv"
    found = {s: grid_cell_dir(root, dataset, base, s, split) / file for s in seeds}
    return {s: read_predictions(f) for s, f in found.items() if f.is_file()}


def run_comparisons(cfg: BenchConfig, root: Path, strongest: dict) -> list[dict]:
    """Every configured pair on every dataset, from the cells' predictions over the splits and seeds both have;
    a ``strongest`` baseline is, in each split, the candidate that split's validation chose."""

    rows = []
    for dataset in cfg.datasets:
        ran = dataset_methods(cfg, dataset)

        def runs_here(name: str, ran=ran) -> bool:
            return any(m.removesuffix(TTA_SUFFIX) in ran for m in cfg.strongest.get(name, [name]))

        for method, baseline in cfg.comparisons:
            if not (runs_here(method) and runs_here(baseline)):
                continue  # a pair this dataset does not run
            sides: list[dict] = [{}, {}]
            chosen: dict[str, str] = {}
            for split in cfg.splits or [None]:
                for i, name in enumerate((method, baseline)):
                    if name in cfg.strongest:
                        pick = strongest.get(dataset, {}).get(name, {}).get(str(split))
                        if pick is None:
                            continue
                        chosen[str(split)] = pick["member"]
                        name = pick["member"]
                    runs = _predictions(root, dataset, name, cfg.seeds, split)
                    if runs:
                        sides[i][split] = runs
            row: dict = {"dataset": dataset, "method": method, "baseline": baseline}
            if chosen:
                row["chosen"] = chosen
            try:
                if cfg.splits:
                    diff, note = compare_runs(sides[0], sides[1])
                else:
                    diff, note = compare_runs(sides[0].get(None, {}), sides[1].get(None, {}))
            except PathoTuneError as e:
                row.update({"verdict": "n/a", "error": str(e)})
            else:
                row.update({**diff.to_dict(), **note})
            rows.append(row)
    return rows


def summarise_fewshot_results(
    cfg: BenchConfig, shots: dict[str, dict[tuple[str, int], list[dict]]], episodes: dict
) -> dict[str, dict]:
    """Per dataset: t-interval rows per (method, k), paired differences over episodes, the notes about short
    classes, and one recipe per method."""
    out: dict[str, dict] = {}
    for dataset, cells in shots.items():
        scores = {key: [m["balanced_accuracy"] for m in runs] for key, runs in cells.items()}
        notes = list(dict.fromkeys(n for (d, _, _), ep in episodes.items() if d == dataset for n in ep["notes"]))
        recipes = {}
        for (method, _), runs in sorted(cells.items(), key=lambda kv: -kv[0][1]):
            recipes.setdefault(method, recipe_text(runs[0]))
        pairs = fewshot_differences(cells, cfg.fewshot.comparisons if cfg.fewshot else [])
        out[dataset] = {"rows": summarise_fewshot(scores), "notes": notes, "recipes": recipes, "comparisons": pairs}
    return out


def plan_bench(cfg: BenchConfig, config_path: str) -> str:
    """What ``run_bench`` would do, without training or reporting: the cells per dataset and method, how many have
    finished, and the data each reads (built or checked here, so a config that cannot start fails now)."""
    root = Path(cfg.runs_dir) / cfg.name
    episodes = prepare_fewshot(cfg, root)
    jobs = _jobs(cfg, root, episodes)
    lines = [f"grid {cfg.name} ({config_path}): {len(jobs)} cells under {root}"]
    by_name: dict[tuple[str, str, str], list[Path]] = {}
    for key, _, cell_dir, make in jobs:
        cell = make()  # resolves the data: builtin data is built, a layout's split is drawn below
        if key[0] == "grid":
            load_source(cell["data"], cell["val_fraction"], cell["test_fraction"], split_seed=cell.get("split_seed"))
        by_name.setdefault((key[0], key[1], key[2]), []).append(cell_dir)
    done_s = []
    for (kind, dataset, name), dirs in by_name.items():
        done = [d for d in dirs if (d / "metrics.json").is_file()]
        secs = [json.loads((d / "metrics.json").read_text()).get("cell_seconds") or 0.0 for d in done]
        done_s += secs
        took = f", {sum(secs) / len(secs) / 60:.1f} min per finished cell" if secs else ""
        lines.append(f"  {kind:7s} {dataset}/{name}: {len(dirs)} cells, {len(done)} finished{took}")
    if cfg.fewshot:
        lines.append(f"  few-shot: k in {cfg.fewshot.shots} x {cfg.fewshot.episodes} episodes")
    lines.append(f"finished cells took {sum(done_s) / 3600:.1f} h; nothing was trained or reported (--dry-run)")
    return "\n".join(lines)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )

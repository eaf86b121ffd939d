"""The markdown section a benchmark grid writes: per-dataset tables (mean ± std over splits and seeds), the
strongest baseline chosen per split, paired comparisons with their intervals or the reason there is none, and
the few-shot summary. Everything here reads finished cells' metrics; nothing trains.

A metric a cell cannot define (AUROC on a test split with one class) stays undefined: the tables say
``undefined`` (or how many runs defined it) and list the reason, never a number made up for it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.metrics import MIN_GROUPS, aggregate_seeds
from ..report import markdown_table, plot_metric_vs_params, trainable_percent
from ..report.plots import plot_fewshot_curves
from .bench_config import BENCH_KEYS, TTA_SUFFIX, BenchConfig
from .compare import N_RESAMPLES
from .fewshot import fewshot_table, t_interval

TTA_RECIPE = ", test-time augmentation (8 views)"


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _undefined(runs: list[dict]) -> dict[str, dict]:
    """Per metric that some run left undefined: in how many runs, and why (the runs' own notes)."""
    out = {}
    for key in BENCH_KEYS:
        missing = [r for r in runs if r.get(key) is None]
        if missing:
            reasons = [n for r in missing for n in r.get("notes") or [] if key.split("_")[0] in n.lower()]
            out[key] = {"undefined_in": len(missing), "runs": len(runs), "reasons": list(dict.fromkeys(reasons))}
    return out


def summarise(results: dict[tuple[str, str], list[dict]]) -> list[dict]:
    """One row per (dataset, method): metrics as mean ± std over every finished run (splits x seeds)."""
    rows = []
    for (dataset, method), runs in results.items():
        agg = aggregate_seeds(runs, list(BENCH_KEYS))
        first = runs[0]
        cached = (first.get("recipe") or {}).get("cached_features")
        text = [r["text"]["cosine"] for r in runs if r.get("text")]
        rows.append(
            {
                "dataset": dataset,
                "method": method,
                **{k: agg[k] for k in BENCH_KEYS},
                "val_score": _mean([r.get("val_score") for r in runs]),
                "text_cosine": _mean(text) if text else None,
                "trainable_params": first["trainable_params"],
                "trainable_pct": trainable_percent(first["trainable_params"], first["total_params"]),
                # Head-only cells train on cached features: their steps never touch the backbone.
                "train_img_s": None if cached else _mean([r.get("train_images_per_second") for r in runs]),
                "infer_img_s": _mean([r.get("inference_images_per_second") for r in runs]),
                "peak_mem_mb": max(r.get("peak_memory_mb") or 0.0 for r in runs),
                "recipe": recipe_text(first)
                + (", test-time augmentation (8 views)" if method.endswith(TTA_SUFFIX) else ""),
                "per_run": per_run_text(runs),
                "runs": len(runs),
                "splits": len({r.get("bench_split") for r in runs}),
                "undefined": _undefined(runs),
            }
        )
    return rows


def recipe_text(m: dict) -> str:
    """How the cell trained, from its metrics: the probe's rule and C, or the AdamW budget, start and selection."""
    r = m["recipe"]
    extra = ", cached features" if r.get("cached_features") else ""
    if "epochs" in r:  # a cell finished before budgets were counted in steps
        return (
            f"lr {r['lr']:g}/head {r['head_lr']:g}, wd {r['weight_decay']:g}, ≤{r['epochs']} ep "
            f"(early stop on val {r['monitor']}, patience {r['patience']}){extra}"
        )
    if r.get("trainer") == "probe":
        probe = m.get("probe") or {}
        parts = [f"L-BFGS logistic-regression probe on {probe.get('features', 'standardized')} features"]
        if probe.get("views"):
            parts.append(f"{probe['views']} augmented views per training tile")
        rule = probe.get("rule", "val")
        if probe.get("C") is not None:
            how = {"val": f"chosen on val {r.get('monitor', '')}", "cv": "chosen by cross-validation on train+val",
                   "uni": "UNI's rule", "fixed": "fixed"}.get(rule, rule)  # fmt: skip
            parts.append(f"C={probe['C']:.3g} {how}".rstrip())
        if probe.get("refit") or probe.get("fit_on") == "train+val":
            parts.append("fitted on train+val")
        if probe.get("converged") is False:
            parts.append("not converged")
        return ", ".join(parts) + extra
    head = {"probe": "head from the probe", "random": "random head"}.get(r.get("head_init") or "", "")
    rule = (m.get("selection") or {}).get("rule") or "best"
    return (
        f"AdamW lr {r['lr']:g}/head {r['head_lr']:g}, wd {r['weight_decay']:g}, {r.get('steps')} steps, {head}, "
        f"early stop on val {r['monitor']} (patience {r['patience']} evals), selection '{rule}', batch "
        f"{r.get('batch_size')}, augment {r.get('augment')}{extra}"
    )


def per_run_text(runs: list[dict]) -> str:
    """What varies by run: the probe's C, or steps run / step kept, per split and seed."""
    parts = []
    for r in runs:
        where = f"s{r['bench_split']}/" if r.get("bench_split") is not None else ""
        where += f"{r.get('seed')}: "
        trainer = (r.get("recipe") or {}).get("trainer")
        if trainer == "probe" and (r.get("probe") or {}).get("C") is not None:
            parts.append(f"{where}C={r['probe']['C']:.3g}")
        elif trainer == "steps" and r.get("steps_run") is not None:
            parts.append(f"{where}{r['steps_run']} run/{r.get('selected_step')} kept")
    return "; ".join(parts) or "—"


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3f}"


def comparison_table(rows: list[dict]) -> str:
    """Paired differences: mean, interval (or why there is none), each split's difference and the verdict."""
    table = []
    for r in rows:
        if r.get("error"):
            table.append({"method": r["method"], "baseline": r["baseline"], "verdict": f"n/a: {r['error']}"})
            continue
        chosen = r.get("chosen")
        baseline = r["baseline"] + (f" ({', '.join(sorted(set(chosen.values())))})" if chosen else "")
        ci = r["note"] if r.get("note") else f"[{_signed(r['ci_low'])}, {_signed(r['ci_high'])}]"
        per = r.get("per_split") if r.get("n_splits", 1) > 1 else r["per_seed"]
        table.append(
            {
                "method": r["method"],
                "baseline": baseline,
                "Δ balanced accuracy": _signed(r["mean"]),
                f"{r['level']:.0%} CI": ci,
                "per split" if r.get("n_splits", 1) > 1 else "per seed": ", ".join(_signed(v) for v in per),
                "splits": r.get("n_splits", 1),
                "seeds": r["n_seeds"],
                "test images": r["n_images"],
                f"test {r.get('unit', 'image')}s": r.get("n_groups"),
                "verdict": r["verdict"],
            }
        )
    columns = list(dict.fromkeys(k for row in table for k in row))
    return markdown_table(table, columns)


def strongest_table(picks: Mapping[str, Mapping[str, dict]]) -> str:
    rows = []
    for name, per_split in picks.items():
        for split, pick in per_split.items():
            rows.append({"baseline": name, "split": split, "chosen on validation": pick["member"],
                         "val score": pick["val_score"]})  # fmt: skip
    return markdown_table(rows)


def fewshot_differences(cells: Mapping[tuple[str, int], list[dict]], pairs: Sequence[Sequence[str]]) -> list[dict]:
    """Per pair and k: the mean difference of test balanced accuracy over the episodes both finished, with a
    t-interval over those episodes (episodes are the replicates)."""
    out = []
    for method, baseline in pairs:
        ks = sorted({k for (m, k) in cells if m == method} & {k for (m, k) in cells if m == baseline})
        for k in ks:
            a = {r["episode"]: r["balanced_accuracy"] for r in cells[(method, k)]}
            b = {r["episode"]: r["balanced_accuracy"] for r in cells[(baseline, k)]}
            both = sorted(set(a) & set(b))
            diffs = [a[e] - b[e] for e in both]
            out.append({"method": method, "baseline": baseline, "shots": k, **t_interval(diffs),
                        "above": sum(d > 0 for d in diffs), "below": sum(d < 0 for d in diffs)})  # fmt: skip
    return out


def _fewshot_diff_table(rows: list[dict]) -> str:
    table = []
    for r in rows:
        ci = "—" if r["low"] is None else f"[{_signed(r['low'])}, {_signed(r['high'])}]"
        row = {"method": r["method"], "baseline": r["baseline"], "k": r["shots"], "Δ": _signed(r["mean"])}
        row.update({"95% t-interval": ci, "episodes": r["n"], "above / below": f"{r['above']} / {r['below']}"})
        table.append(row)
    return markdown_table(table)


def _cell(row: dict, key: str):
    """A table cell for a metric: its mean ± std, or 'undefined' (with how many runs defined it)."""
    value = row[key]
    missing = row["undefined"].get(key)
    if value.get("mean") is None:
        return "undefined"
    if missing:
        defined = missing["runs"] - missing["undefined_in"]
        return f"{value['mean']:.3f} ± {value['std']:.3f} ({defined} of {missing['runs']} runs)"
    return value


def _dataset_section(cfg: BenchConfig, dataset: str, rows, out_dir: Path, fig_dir: Path) -> list[str]:
    parts = [f"### {dataset}\n"]
    if not rows:
        return parts
    fig = plot_metric_vs_params(
        [r for r in rows if not r["method"].endswith(TTA_SUFFIX)],
        fig_dir / f"{cfg.name}_{dataset}_accuracy_vs_params.png",
        title=f"{dataset}: balanced accuracy",
    )
    shown = [{**r, **{k: _cell(r, k) for k in BENCH_KEYS}} for r in rows]
    columns = ["method", *BENCH_KEYS, "val_score"]
    if any(r["text_cosine"] is not None for r in rows):
        columns.append("text_cosine")
    columns += ["trainable_params", "trainable_pct", "train_img_s", "infer_img_s", "peak_mem_mb", "splits", "runs"]
    table = markdown_table(shown, columns)
    recipes = markdown_table([{k: r[k] for k in ("method", "recipe", "per_run")} for r in rows])
    rel = os.path.relpath(fig, out_dir)
    parts.append(f"{table}\n\n![accuracy vs trainable parameters]({rel})\n\n{recipes}\n")
    notes = [
        f"- {r['method']}: {key} undefined in {u['undefined_in']} of {u['runs']} runs"
        + (f" ({'; '.join(u['reasons'])})" if u["reasons"] else "")
        for r in rows
        for key, u in r["undefined"].items()
    ]
    if notes:
        parts.append("Undefined metrics:\n\n" + "\n".join(notes) + "\n")
    return parts


def _intro(cfg: BenchConfig, comparisons: list, fewshot: dict) -> list[str]:
    where = (
        f"{len(cfg.splits)} group k-fold splits (split seeds {cfg.splits}) x seeds {cfg.seeds}"
        if cfg.splits
        else f"the data's own split, seeds {cfg.seeds}"
    )
    intro = [
        f"Backbone `{cfg.backbone}` at {cfg.image_size or 'its native'} px, {where}; mean ± std over every run "
        "(splits x seeds); balanced accuracy, macro-F1 and AUROC on each split's test part. `val_score` is the "
        "validation score of the model as kept (empty where validation also fitted it). `trainable_pct` is "
        "trainable parameters as % of all the model's (frozen backbone included). Throughputs are means over runs; "
        "cells that train a head on cached features show no training or inference throughput. Peak memory is the "
        "training process's peak resident set (CPU) or peak CUDA allocation (GPU). Model selection (the probe's C, "
        "the step kept, the prompt groups kept) uses validation data only; the test part is scored once. Rows "
        f"ending in `{TTA_SUFFIX.strip()}` are the same cells scored with the 8 rot90 x flip views averaged."
    ]
    if cfg.strongest:
        intro.append(
            "A `strongest` baseline is, in each split, whichever of its candidates scored best on that split's "
            "validation (mean over seeds); candidates fitted on validation too cannot be chosen."
        )
    if comparisons:
        intro.append(
            "Paired comparisons: Δ is the balanced accuracy of the method minus the baseline's, averaged over seeds "
            f"then splits, with a {N_RESAMPLES}-resample cluster bootstrap: each resample draws the splits, then in "
            "each drawn split its test groups (slides, patients or region blocks; images only where the data names "
            "no groups) and its seeds, one draw for both methods. With fewer than "
            f"{MIN_GROUPS} units at the top level (splits, or test groups of a single split) there is no interval "
            "and the table says so. The verdict is 'better' or 'worse' only when the whole interval is on one side "
            "of zero, else 'inconclusive'. It says nothing about other datasets."
        )
    if cfg.fewshot:
        fs = cfg.fewshot
        intro.append(
            f"Few-shot: for each k in {fs.shots} and {fs.episodes} episodes, k tiles per class are drawn without "
            "replacement from the training split and k per class from the validation split (seeded by "
            f"({fs.seed}, k, episode), the same tiles for every method); the test split is kept whole. Each method "
            "gets those 2k labelled tiles per class and nothing else (how it uses them is in its recipe). Cells show "
            "the mean test balanced accuracy over episodes with a 95% t-interval over episodes."
        )
    return intro


def render_summary(
    cfg: BenchConfig,
    config_path: str,
    results: dict,
    seconds: float,
    strongest: dict,
    comparisons: list[dict],
    fewshot: dict[str, dict],
    missing: list[str],
    machine: str,
) -> str:
    """The grid's markdown section (its figures written beside the output page)."""
    rows = summarise(results)
    out_dir = Path(cfg.output).parent
    fig_dir = out_dir / "benchmarks" / "figures"
    sections = []
    for dataset in cfg.datasets:
        parts = _dataset_section(cfg, dataset, [r for r in rows if r["dataset"] == dataset], out_dir, fig_dir)
        if strongest.get(dataset) and any(strongest[dataset].values()):
            parts.append(
                f"#### Strongest baselines, chosen per split on validation\n\n{strongest_table(strongest[dataset])}\n"
            )
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
            diffs = f"\n{_fewshot_diff_table(fs['comparisons'])}\n" if fs.get("comparisons") else ""
            parts.append(
                f"#### Few-shot\n\n{fewshot_table(fs['rows'], cfg.fewshot.shots)}\n{diffs}\n"
                f"![few-shot balanced accuracy]({rel})\n\n{recipes}\n"
                + (f"\nShort classes:\n\n{notes}" if notes else "")
            )
        sections.append("\n".join(parts))
    intro = _intro(cfg, comparisons, fewshot)
    return (
        f"## {cfg.name}\n\n"
        + (f"{cfg.note}\n\n" if cfg.note else "")
        + "\n\n".join(intro)
        + "\n\n"
        + f"Command: `pathotune bench --config {config_path}` (the cells took {seconds / 60:.0f} min in all).\n"
        f"Machine: {machine}.\n\n" + (_missing_note(missing) if missing else "") + "\n".join(sections)
    )


def _missing_note(missing: list[str]) -> str:
    """The cells a partial report leaves out, so its run counts and intervals are read for what they are."""
    groups: dict[str, list[str]] = {}
    for label in missing:
        where, which = label.rsplit("/", 1)
        groups.setdefault(where, []).append(which)
    listed = "; ".join(f"{where} ({', '.join(which)})" for where, which in groups.items())
    return (
        f"Not run ({len(missing)} cells; this report covers the finished ones, and the `runs` column and the "
        f"paired comparisons use the runs each method finished): {listed}.\n\n"
    )


__all__ = ["comparison_table", "fewshot_differences", "recipe_text", "render_summary", "summarise"]

"""A run's ``report.md``: its metrics, per-class scores, parameters and training, beside its figures."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .io import atomic_write_text, to_jsonable
from .markdown import format_cell, format_params, format_percent, markdown_table, trainable_percent
from .plots import plot_confusion_matrix, plot_training_curves

__all__ = ["write_run_report"]

# Headline metrics in report order, with the names readers expect.
_METRIC_LABELS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro F1",
    "weighted_f1": "Weighted F1",
    "auroc": "AUROC (one-vs-rest macro)",
}


def _metrics_section(metrics: Mapping[str, Any]) -> list[str]:
    ci = metrics.get("ci") or {}
    level = float(metrics.get("ci_level", 0.95))
    ci_column = f"{level:.0%} CI"
    note = metrics.get("ci_note")
    rows = []
    for name, label in _METRIC_LABELS.items():
        if name in metrics:
            row = {"Metric": label, "Value": metrics[name] if metrics[name] is not None else "undefined"}
            if ci:
                row[ci_column] = note or ci.get(name)
            rows.append(row)
    columns = ["Metric", "Value", ci_column] if ci else ["Metric", "Value"]
    lines = ["## Metrics", ""]
    if "n_samples" in metrics:
        lines += [f"Evaluated on {format_cell(metrics['n_samples'])} samples.", ""]
    if ci and metrics.get("ci_unit") == "group":
        lines += [f"Intervals resample the {metrics.get('ci_units')} groups of the evaluated split, not samples.", ""]
    lines += [markdown_table(rows, columns), ""]
    notes = metrics.get("notes") or []
    if notes:
        lines += [f"- {note}" for note in notes] + [""]
    return lines


def _per_class_section(metrics: Mapping[str, Any], class_names: Sequence[str]) -> list[str]:
    per_class = metrics.get("per_class") or {}
    if not per_class:
        return []
    columns = ["Class", "Precision", "Recall", "F1", "Support"]
    rows = []
    for name in class_names:
        scores = per_class.get(str(name), {})
        rows.append(
            {
                "Class": name,
                "Precision": scores.get("precision"),
                "Recall": scores.get("recall"),
                "F1": scores.get("f1"),
                "Support": scores.get("support"),
            }
        )
    return ["## Per-class metrics", "", markdown_table(rows, columns), ""]


def _params_section(metrics: Mapping[str, Any]) -> list[str]:
    trainable, total = metrics.get("trainable_params"), metrics.get("total_params")

    def count(n: Any) -> str | None:
        return None if n is None else f"{format_params(n)} ({format_cell(n)})"

    percent = format_percent(trainable_percent(trainable, total)) if trainable is not None and total else None
    row = {"Trainable": count(trainable), "Total": count(total), "Trainable %": percent}
    return ["## Parameters", "", markdown_table([row]), ""]


def _training_section(metrics: Mapping[str, Any]) -> list[str]:
    """How the run trained and what validation selected: the probe, the budget, the step, the prompt groups."""
    lines: list[str] = []
    probe = metrics.get("probe")
    if probe:
        lines.append(_probe_line(probe))
    budget = metrics.get("budget")
    if budget:
        recipe = metrics.get("recipe", {})
        start = "the probe (LP-FT)" if recipe.get("head_init") == "probe" else "a random head"
        lines.append(
            f"- Budget: {budget['steps']} optimizer steps ({budget['source']}); head started from {start}; "
            f"validation every {budget['eval_every']} steps, step 0 included."
        )
        stop = "stopped early" if metrics.get("stopped_early") else "ran to the end"
        lines.append(
            f"- Ran {metrics.get('steps_run')} steps ({stop}); validation selected step {metrics.get('selected_step')}"
            + (" (the probe itself)." if metrics.get("selected_step") == 0 else ".")
        )
    selection = metrics.get("selection") or {}
    if selection.get("rule") == "significant" and "kept_step" in selection:
        lower = selection.get("best_lower")
        if selection.get("note"):
            bound = "no bound: " + selection["note"]
        elif lower is None:
            bound = "no later step scored higher"
        else:
            bound = f"one-sided lower bound {lower:+.3f}"
        lines.append(
            f"- Selection rule 'significant': best step {selection['best_step']} (gain {selection['best_gain']:+.3f} "
            f"over step 0 on validation, {bound}, max-T paired bootstrap over {selection['units']} "
            f"{selection['unit']}s, alpha {selection['alpha']}); kept step {selection['kept_step']}."
        )
    elif selection.get("rule") == "cv":
        lines.append(
            f"- Selection rule 'cv': {selection.get('folds')}-fold cross-validation over train + validation "
            f"({selection.get('units')} units); kept step {selection.get('kept_step', 0)}"
            + (f" ({selection['note']})." if selection.get("note") else ".")
        )
    groups = metrics.get("prompt_groups")
    if groups:
        lines.append(
            f"- Prompt groups kept on validation: {', '.join(groups['kept']) or 'none'}; "
            f"dropped: {', '.join(groups['dropped']) or 'none'}."
        )
    text = metrics.get("text")
    if text and text.get("control") != "none":
        lines.append(f"- Text control '{text['control']}': cosine to the real text encoding {text['cosine']:.3f}.")
    tta = metrics.get("tta")
    if tta:
        lines.append(
            f"- Test-time augmentation (8 rot90 x flip views averaged): balanced accuracy "
            f"{format_cell(tta.get('balanced_accuracy'))}, macro-F1 {format_cell(tta.get('macro_f1'))}, AUROC "
            f"{format_cell(tta.get('auroc'))}."
        )
    return ["## Training", "", *lines, ""] if lines else []


def _probe_line(probe: Mapping[str, Any]) -> str:
    """How the linear probe was fitted and how its C was set."""
    rule = probe.get("rule", "val")
    fitted = "train + validation" if probe.get("refit") or probe.get("fit_on") == "train+val" else "train"
    views = f", {probe['views']} augmented views per training tile" if probe.get("views") else ""
    how = {
        "val": f"chosen on validation (score {format_cell(probe.get('val_score'))}, loss "
        f"{format_cell(probe.get('val_loss'))}) from {len(probe.get('grid', []))} values",
        "cv": f"chosen by {probe.get('folds')}-fold cross-validation inside train + validation",
        "uni": "fixed by UNI's rule (feature dim x classes / 100)",
        "fixed": "fixed" + (f" ({probe['note']})" if probe.get("note") else ""),
    }.get(rule, rule)
    return (
        f"- Linear probe: logistic regression (L-BFGS, {probe['iterations']} iterations) on "
        f"{probe.get('features', 'standardized')} features{views}, fitted on {fitted}; L2 strength C = "
        f"{probe['C']:.3g} {how}."
    )


def write_run_report(
    run_dir: str | os.PathLike[str],
    metrics: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    config: Mapping[str, Any],
    title: str,
) -> Path:
    """Write ``report.md`` plus ``figures/confusion_matrix.png`` and ``figures/training_curves.png``.

    ``metrics`` is a :func:`~pathotune.core.metrics.classification_metrics` dict, optionally with
    ``ci`` ({name: (low, high)}, level ``ci_level``, default 0.95) and ``trainable_params`` /
    ``total_params``. Values may be numbers or mean ± std dicts. Figures are linked by relative path so
    the run folder can be moved or zipped whole.
    """
    root = Path(run_dir)
    if metrics.get("confusion_matrix") is None:
        raise ValueError("metrics has no 'confusion_matrix'; pass the output of classification_metrics")
    figures = root / "figures"
    cm_png = plot_confusion_matrix(metrics["confusion_matrix"], class_names, figures / "confusion_matrix.png")
    curves_png = plot_training_curves(history, figures / "training_curves.png")
    config_yaml = yaml.safe_dump(to_jsonable(dict(config)), sort_keys=False, allow_unicode=True)
    lines = [f"# {title}", ""]
    lines += _metrics_section(metrics)
    lines += _per_class_section(metrics, class_names)
    lines += _params_section(metrics)
    lines += _training_section(metrics)
    lines += ["## Confusion matrix", "", f"![Confusion matrix]({cm_png.relative_to(root).as_posix()})", ""]
    lines += ["## Training curves", "", f"![Training curves]({curves_png.relative_to(root).as_posix()})", ""]
    lines += ["## Configuration", "", "```yaml", config_yaml.rstrip("\n"), "```", ""]
    return atomic_write_text(root / "report.md", "\n".join(lines))

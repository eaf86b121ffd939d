"""Markdown run reports: one human-readable page per run that links its figures and pins its config."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import OutputError
from .io import atomic_write_text, to_jsonable
from .plots import plot_confusion_matrix, plot_training_curves

DASH = "–"

# Headline metrics in report order, with the names readers expect.
_METRIC_LABELS = {
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro F1",
    "weighted_f1": "Weighted F1",
    "auroc": "AUROC (one-vs-rest macro)",
}


def trainable_percent(trainable: int, total: int) -> float:
    """Trainable parameters as a percentage of all the model's parameters (backbone, prompts and head together).

    The one definition: metrics.json stores it raw as ``trainable_percent``; wherever it is shown it goes through
    :func:`format_percent`.
    """
    return 100.0 * float(trainable) / float(total) if total else 0.0


def format_percent(percent: float) -> str:
    """A percentage as shown in reports and on the console: two decimals, e.g. ``1.51 %``."""
    return f"{percent:.2f} %"


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def format_cell(value: Any, floatfmt: str = ".3f") -> str:
    """One table cell: None/NaN as a dash, ints with separators, floats, mean ± std, [low, high] pairs."""
    if value is None:
        return DASH
    if isinstance(value, Mapping) and "mean" in value and "std" in value:
        if value["mean"] is None:
            return DASH
        return f"{format_cell(value['mean'], floatfmt)} ± {format_cell(value['std'], floatfmt)}"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, Integral):
        return f"{int(value):,}"
    if isinstance(value, Real):
        number = float(value)
        return DASH if math.isnan(number) else format(number, floatfmt)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(v is None or _is_number(v) for v in value):
        if value[0] is None and value[1] is None:
            return DASH
        return f"[{format_cell(value[0], floatfmt)}, {format_cell(value[1], floatfmt)}]"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _numeric_column(rows: Sequence[Mapping[str, Any]], column: str) -> bool:
    """Right-align a column when every filled cell is a number or a mean ± std summary."""
    filled = [row.get(column) for row in rows if row.get(column) is not None]
    return bool(filled) and all(
        _is_number(v) or (isinstance(v, Mapping) and "mean" in v and "std" in v) for v in filled
    )


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".3f"
) -> str:
    """A GitHub-flavoured table (no trailing newline); columns default to keys in first-seen order."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    if not columns:
        return ""
    header = "| " + " | ".join(format_cell(str(c)) for c in columns) + " |"
    rule = "|" + "|".join("---:" if _numeric_column(rows, c) else "---" for c in columns) + "|"
    body = ["| " + " | ".join(format_cell(row.get(c), floatfmt) for c in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def format_params(n: float | None) -> str:
    """Parameter counts at three significant digits: '1.23 M', '45.6 K', '812'."""
    if n is None:
        return DASH
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 999.5:
        return f"{sign}{value:.0f}"
    for scale, unit in ((1e3, "K"), (1e6, "M"), (1e9, "B"), (1e12, "T")):
        rounded = float(f"{value / scale:.3g}")
        if rounded < 1000 or unit == "T":
            decimals = 2 if rounded < 10 else 1 if rounded < 100 else 0
            return f"{sign}{rounded:.{decimals}f} {unit}"
    raise AssertionError("unreachable: the last unit always returns")


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

    ``metrics`` is a :func:`~pathotune.engine.metrics.classification_metrics` dict, optionally with
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


def check_section(path: Path, key: str) -> str:
    """The text of ``path`` (a new page's title when absent), once its ``key`` section markers are sound: both or
    neither, each once, start before end. Anything else (a hand edit) raises OutputError naming the fix."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.is_file() else f"# {path.stem.title()}\n"
    if (start in text) != (end in text):
        lost = start if end in text else end
        raise OutputError(f"{path}: the marker {lost} is missing; put it back around the old section and rerun")
    for marker in (start, end):
        if text.count(marker) > 1:
            raise OutputError(
                f"{path}: the marker {marker} appears {text.count(marker)} times; keep one pair and rerun"
            )
    if start in text and text.index(end) < text.index(start):
        raise OutputError(f"{path}: the marker {end} comes before {start}; put them in order and rerun")
    return text


def merge_section(path: Path, key: str, section: str) -> None:
    """Write ``section`` into the markdown file ``path`` between ``<!-- key:start -->`` and ``<!-- key:end -->``,
    replacing what was there and keeping everything else (appended when absent). Markers that lost their pair,
    repeat or come out of order (a hand edit) are refused, file untouched, rather than written a second time."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{section}\n{end}"
    text = check_section(path, key)
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)

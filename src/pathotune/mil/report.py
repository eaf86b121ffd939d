"""``report.md`` of a MIL run: per-fold table with a mean ± std row, pooled out-of-fold metrics, figures, config."""

from __future__ import annotations

from typing import Any

from ..core.metrics import METRIC_NAMES
from ..report import markdown_table
from .config import MILConfig

__all__ = ["mil_report"]

_MODES = {"split": "the CSV's train/val/test split", "fold": "the CSV's fold column"}


def mil_report(cfg: MILConfig, metrics: dict[str, Any], config_text: str) -> str:
    """The markdown page for a finished run's ``metrics`` (as :func:`train_mil` returns them)."""
    columns = ["fold", "n_train", "n_val", "n_test", "best_epoch", *METRIC_NAMES]
    rows = [{c: r[c] for c in columns} for r in metrics["per_fold"]]
    rows.append({"fold": "mean ± std", **{key: metrics[key] for key in METRIC_NAMES}})
    pooled = metrics["pooled"]
    ci = pooled.get("ci") or {}
    pooled_rows = [{"metric": key, "value": pooled[key], "95% CI": ci.get(key)} for key in METRIC_NAMES]
    attrs = metrics["feature_attrs"]
    kfold = f"stratified {metrics['n_folds']}-fold cross-validation (seed {cfg.seed})"
    mode = _MODES.get(metrics["mode"], kfold)
    lines = [
        f"# MIL {cfg.aggregator} on {attrs.get('backbone', 'unknown backbone')} slide features",
        "",
        f"{metrics['n_slides']} slides, classes {metrics['classes']}; folds from {mode}. Each fold's validation "
        f"slides ({cfg.val_fraction:.0%} of its training slides unless the CSV names them) choose the epoch on "
        f"{cfg.monitor}; test slides are scored once.",
        "",
        "## Per fold (test slides)",
        "",
        markdown_table(rows, columns),
        "",
        *_undefined_lines(metrics),
        "## Pooled out-of-fold predictions",
        "",
        markdown_table(pooled_rows, ["metric", "value", "95% CI"] if ci else ["metric", "value"]),
        "",
        "![Confusion matrix](confusion_matrix.png)",
        "",
        "Training curves: " + ", ".join(f"[{r['fold']}]({r['fold']}/training_curves.png)" for r in metrics["per_fold"]),
        "",
        "## Configuration",
        "",
        "```yaml",
        config_text.rstrip("\n"),
        "```",
        "",
    ]
    return "\n".join(lines)


def _undefined_lines(metrics: dict[str, Any]) -> list[str]:
    """Why a metric is shown as a dash for some fold (one class in its test slides, say)."""
    undefined = metrics.get("undefined") or {}
    if not undefined:
        return []
    lines = ["Undefined metrics (a dash above; the mean is over the folds that define them):", ""]
    lines += [f"- {key}: {'; '.join(reasons)}" for key, reasons in undefined.items()]
    return [*lines, ""]

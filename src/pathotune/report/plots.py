"""Report figures drawn on standalone Agg figures, so plotting never touches pyplot's global state."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io import atomic_path

_DPI = 150
_MAX_ANNOTATED_CLASSES = 25
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # with tab20's colours: 140 distinct methods


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Render with Agg and write the PNG atomically; the figure is garbage once this returns."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return Path(path)


def _no_data(ax: Axes, text: str) -> None:
    """Mark an empty panel instead of failing, so a report can still be written for a partial run."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN entries that should not be drawn."""
    if isinstance(value, Mapping):
        value = value.get("mean")
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def plot_confusion_matrix(
    cm: Any,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Heat map with true classes as rows; normalised rows show per-class recall, with counts alongside."""
    counts = np.asarray(cm, dtype=np.float64)
    n_classes = len(class_names)
    if counts.shape != (n_classes, n_classes):
        raise ValueError(f"confusion matrix shape {counts.shape} does not match {n_classes} class names")
    if normalize:
        rows = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        vmax = 1.0
    else:
        values = counts
        vmax = max(float(counts.max(initial=0.0)), 1.0)
    side = max(4.0, 0.55 * n_classes + 2.5)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(n_classes)
    ax.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    if n_classes <= _MAX_ANNOTATED_CLASSES:
        for i in range(n_classes):
            for j in range(n_classes):
                count = int(counts[i, j])
                text = f"{values[i, j]:.2f}\n({count})" if normalize else f"{count}"
                colour = "white" if values[i, j] > 0.5 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    default = "Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)"
    ax.set_title(title or default)
    return _save(fig, path)


def _x_axis(history: Sequence[Mapping[str, Any]]) -> str:
    """Optimizer steps when the log has them (the engine's unit), else epochs."""
    return "step" if any(_number(row.get("step")) is not None for row in history) else "epoch"


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(x, values) for rows that have a finite ``key``; x is the step (else epoch, else the row index)."""
    axis = _x_axis(history)
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(history):
        value = _number(row.get(key))
        if value is not None:
            x = _number(row.get(axis))
            xs.append(float(i) if x is None else x)
            ys.append(value)
    return xs, ys


def _pick_metric(history: Sequence[Mapping[str, Any]]) -> str | None:
    """Balanced accuracy when logged (the headline metric), otherwise the first numeric val_* key."""
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    candidates = [k for k in keys if k.startswith("val_") and k != "val_loss" and _series(history, k)[0]]
    if "val_balanced_accuracy" in candidates:
        return "val_balanced_accuracy"
    return candidates[0] if candidates else None


def plot_training_curves(
    history: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], metric: str | None = None
) -> Path:
    """Loss curves (left) and one validation metric (right) per evaluation; empty panels say why."""
    fig = Figure(figsize=(10.0, 4.0), layout="constrained")
    ax_loss, ax_metric = fig.subplots(1, 2)
    drawn = False
    for key, marker in (("train_loss", "o"), ("val_loss", "s")):
        xs, ys = _series(history, key)
        if xs:
            ax_loss.plot(xs, ys, marker=marker, markersize=3, label=key.replace("_", " "))
            drawn = True
    if drawn:
        ax_loss.set_xlabel(_x_axis(history))
        ax_loss.set_ylabel("loss")
        ax_loss.set_title("Loss")
        ax_loss.grid(alpha=0.3)
        ax_loss.legend()
    else:
        _no_data(ax_loss, "no loss logged")
    metric = metric or _pick_metric(history)
    xs, ys = _series(history, metric) if metric else ([], [])
    if xs and metric:
        label = metric.replace("_", " ")
        ax_metric.plot(xs, ys, marker="o", markersize=3, color="tab:green", label=label)
        best = int(np.argmax(ys))
        ax_metric.scatter([xs[best]], [ys[best]], color="tab:red", zorder=3, label=f"best {ys[best]:.3f}")
        ax_metric.set_xlabel(_x_axis(history))
        ax_metric.set_ylabel(label)
        ax_metric.set_title(label.capitalize())
        ax_metric.grid(alpha=0.3)
        ax_metric.legend()
    else:
        _no_data(ax_metric, "no validation metric logged")
    return _save(fig, path)


def plot_metric_vs_params(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    x: str = "trainable_params",
    y: str = "balanced_accuracy",
    label: str = "method",
    yerr: str | None = None,
    title: str | None = None,
) -> Path:
    """Accuracy-versus-cost scatter on a log parameter axis, one colour and marker per method, named in a legend
    beside the axes: methods of similar size sit a few pixels apart, where labels written on the points overlap.

    ``y`` may hold plain numbers or ``{'mean', 'std'}`` dicts (as from ``aggregate_seeds``), whose std
    becomes the error bar unless a ``yerr`` key is given. Rows missing ``x`` or ``y`` are skipped.
    """
    points: list[tuple[float, float, float, str]] = []
    for row in rows:
        xv, yv = _number(row.get(x)), _number(row.get(y))
        if xv is None or yv is None:
            continue
        if xv <= 0:
            raise ValueError(f"{x}={xv} cannot go on a log axis (row {row.get(label)!r})")
        raw = row.get(y)
        if yerr:
            err = _number(row.get(yerr))
        else:
            err = _number(raw.get("std")) if isinstance(raw, Mapping) else None
        points.append((xv, yv, err or 0.0, str(row.get(label, ""))))
    fig = Figure(figsize=(9.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if points:
        colours = matplotlib.colormaps["tab20"].colors
        for i, (xv, yv, err, name) in enumerate(points):
            style = {"color": colours[i % len(colours)], "marker": _MARKERS[i % len(_MARKERS)]}
            ax.errorbar([xv], [yv], yerr=[err] if err else None, capsize=3, linestyle="none", label=name, **style)
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.1)
        ax.set_xlabel(x.replace("_", " ") + " (log scale)")
        ax.set_ylabel(y.replace("_", " "))
        ax.grid(alpha=0.3, which="both")
        fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    else:
        _no_data(ax, f"no rows with both {x} and {y}")
    ax.set_title(title or f"{y.replace('_', ' ')} vs {x.replace('_', ' ')}")
    return _save(fig, path)


def plot_fewshot_curves(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    x: str = "shots",
    y: str = "mean",
    label: str = "method",
    title: str | None = None,
    ylabel: str = "balanced accuracy",
) -> Path:
    """Score versus shots per class on a log2 axis, one line per method, with (low, high) interval bars.

    Rows carry ``x``, ``y`` and optional ``low``/``high`` (a single-episode point has none). Methods are nudged
    apart along x by a few percent so overlapping intervals stay readable.
    """
    series: dict[str, list[tuple[float, float, float | None, float | None]]] = {}
    for row in rows:
        xv, yv = _number(row.get(x)), _number(row.get(y))
        if xv is None or yv is None:
            continue
        if xv <= 0:
            raise ValueError(f"{x}={xv} cannot go on a log axis (row {row.get(label)!r})")
        series.setdefault(str(row.get(label, "")), []).append(
            (xv, yv, _number(row.get("low")), _number(row.get("high")))
        )
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    ax = fig.add_subplot()
    if series:
        ticks: set[float] = set()
        for i, (name, points) in enumerate(series.items()):
            points.sort()
            nudge = 2.0 ** (0.04 * (i - (len(series) - 1) / 2))
            xs = [p[0] * nudge for p in points]
            ys = [p[1] for p in points]
            low = [p[1] - p[2] if p[2] is not None else 0.0 for p in points]
            high = [p[3] - p[1] if p[3] is not None else 0.0 for p in points]
            ax.errorbar(xs, ys, yerr=[low, high], marker="o", markersize=4, capsize=3, label=name)
            ticks.update(p[0] for p in points)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), labels=[f"{t:g}" for t in sorted(ticks)])
        ax.minorticks_off()
        ax.set_xlabel(f"{x.replace('_', ' ')} per class (log2 scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        _no_data(ax, f"no rows with both {x} and {y}")
    ax.set_title(title or f"{ylabel} vs {x.replace('_', ' ')}")
    return _save(fig, path)

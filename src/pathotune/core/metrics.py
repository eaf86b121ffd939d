"""Classification metrics, bootstrap confidence intervals and seed aggregation.

Point estimates come straight from scikit-learn so they match what reviewers compute themselves. The
bootstrap evaluates thousands of resamples at once from batched confusion matrices and weighted rank
statistics (sklearn's per-call overhead would make 1000 resamples take seconds); the test-suite checks
those batched values against :func:`classification_metrics` resample by resample.

Intervals resample groups (slides, patients, region blocks: ``Sample.group``), not patches, because patches of
one group are not independent. With fewer than ``MIN_GROUPS`` groups there is no interval, and the result says
so (``interval_note``) instead of printing a narrow one. The resampling is written here rather than through
``scipy.stats.bootstrap``: that function resamples one level of observations and returns NaN when any resample
leaves a metric undefined, whereas these intervals resample groups nested in splits with the seeds beside them
(``compare.py``), draw one set of groups for every metric and both methods of a pair, and drop the resamples
where a metric is undefined (a class missing from the drawn groups), counting them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

METRIC_NAMES: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "auroc")
MIN_GROUPS = 5  # fewer independent units than this: no interval, and the report says so

# Upper bound on resamples x samples held in memory at once by the bootstrap (about 32 MB of int64).
_CHUNK_ELEMS = 4_000_000


def _check_inputs(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Coerce to (int64 labels, float64 scores) and fail early with the shape that is wrong."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must have shape (N={y.shape[0]}, C), got {p.shape}")
    if y.size == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if p.shape[1] < 2:
        raise ValueError(f"probs needs at least 2 class columns, got {p.shape[1]}")
    if y.dtype == np.bool_:
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true has labels outside [0, {p.shape[1] - 1}]: min {y.min()}, max {y.max()}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    return y.astype(np.int64), p


def _auroc(y: np.ndarray, p: np.ndarray, class_names: Sequence[str]) -> tuple[float | None, str | None]:
    """One-vs-rest macro AUROC over the classes present in ``y`` (None when fewer than two are present)."""
    n_classes = p.shape[1]
    present = np.unique(y)
    if present.size < 2:
        only = [class_names[i] for i in present]
        return None, f"AUROC undefined: only class {only} present in y_true"
    if n_classes == 2:
        return float(roc_auc_score(y, p[:, 1])), None
    # Binarising against all C labels and keeping the present columns gives sklearn's OvR macro AUROC on
    # the original (not renormalised) scores; absent columns have no positives, so AUROC is undefined.
    onehot = label_binarize(y, classes=np.arange(n_classes))
    score = float(roc_auc_score(onehot[:, present], p[:, present], average="macro"))
    note = None
    if present.size < n_classes:
        kept = set(present.tolist())
        absent = [class_names[i] for i in range(n_classes) if i not in kept]
        note = (
            f"AUROC is the one-vs-rest mean over the {present.size} of {n_classes} classes present in "
            f"y_true (absent: {absent})"
        )
    return score, note


def classification_metrics(y_true: Any, probs: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """Headline metrics, confusion matrix and per-class scores for one evaluation, as plain Python types.

    Predictions are ``argmax(probs)``. Balanced accuracy and AUROC average over classes present in
    ``y_true``; macro F1 averages over classes present in ``y_true`` or predicted (sklearn's default), so a
    class that is absent and never predicted does not drag it down. Such caveats are listed in ``notes``.
    """
    y, p = _check_inputs(y_true, probs)
    names = [str(c) for c in class_names]
    n_classes = p.shape[1]
    if len(names) != n_classes:
        raise ValueError(f"got {len(names)} class names for {n_classes} probability columns")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    y_pred = p.argmax(axis=1)
    labels = np.arange(n_classes)
    notes: list[str] = []
    absent = [names[i] for i in labels if not np.any(y == i)]
    if absent:
        notes.append(f"classes absent from y_true: {absent}; balanced accuracy averages over the present classes")
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" is expected here and already reported in notes.
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y, y_pred))
    auroc, auroc_note = _auroc(y, p, names)
    if auroc_note:
        notes.append(auroc_note)
    precision, recall, f1, support = precision_recall_fscore_support(y, y_pred, labels=labels, zero_division=0)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    return {
        "n_samples": int(y.size),
        "accuracy": float(accuracy_score(y, y_pred)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(y, y_pred, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y, y_pred, labels=labels, average="weighted", zero_division=0)),
        "auroc": auroc,
        "confusion_matrix": confusion_matrix(y, y_pred, labels=labels).tolist(),
        "per_class": per_class,
        "notes": notes,
    }


def _resample_indices(rng: np.random.Generator, y: np.ndarray, n: int, stratified: bool) -> np.ndarray:
    """(n, N) indices drawn with replacement; stratified keeps every class count fixed per resample."""
    if not stratified:
        return rng.integers(0, y.size, size=(n, y.size))
    idx = np.empty((n, y.size), dtype=np.int64)
    start = 0
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        idx[:, start : start + members.size] = members[rng.integers(0, members.size, size=(n, members.size))]
        start += members.size
    return idx


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with NaN where the denominator is zero (an undefined metric, not a zero one)."""
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def _batched_confusion_metrics(
    y: np.ndarray, y_pred: np.ndarray, idx: np.ndarray, n_classes: int, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Confusion-matrix metrics for every row of ``idx``, matching the sklearn definitions above."""
    n = idx.shape[0]
    cells = n_classes * n_classes
    flat = np.arange(n)[:, None] * cells + y[idx] * n_classes + y_pred[idx]
    cm = np.bincount(flat.ravel(), minlength=n * cells).reshape(n, n_classes, n_classes).astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    total = support.sum(axis=1)
    out: dict[str, np.ndarray] = {}
    if "accuracy" in names:
        out["accuracy"] = tp.sum(axis=1) / total
    if "balanced_accuracy" in names:
        present = support > 0
        recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
        out["balanced_accuracy"] = recall.sum(axis=1) / present.sum(axis=1)
    if "macro_f1" in names or "weighted_f1" in names:
        seen = support + predicted  # 2TP + FP + FN: zero only for classes neither present nor predicted
        f1 = np.divide(2 * tp, seen, out=np.zeros_like(tp), where=seen > 0)
        out["macro_f1"] = f1.sum(axis=1) / (seen > 0).sum(axis=1)
        out["weighted_f1"] = (f1 * support).sum(axis=1) / total
    return out


def _batched_auroc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """OvR macro AUROC per row of ``weights`` (int32 bootstrap multiplicities), NaN where undefined.

    Each class's AUROC is the weighted Mann-Whitney statistic with ties counted as one half, which is the
    area under sklearn's ROC curve; classes without positives or negatives in a resample are skipped.
    Integer arithmetic keeps it exact and several times faster than float64 on (resamples, N) arrays.
    """
    n_classes = p.shape[1]
    columns = [1] if n_classes == 2 else range(n_classes)
    total = np.zeros(weights.shape[0])
    count = np.zeros(weights.shape[0])
    for k in columns:
        order = np.argsort(p[:, k], kind="mergesort")
        scores = p[order, k]
        starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
        w = np.take(weights, order, axis=1)
        pos = w * (y[order] == k)
        neg = w - pos
        if starts.size < scores.size:  # tied scores: pool each tie group so ties count one half
            pos = np.add.reduceat(pos, starts, axis=1)
            neg = np.add.reduceat(neg, starts, axis=1)
        twice_below = 2 * np.cumsum(neg, axis=1) - neg  # 2 * (negatives strictly below) + tied negatives
        num = (pos.astype(np.int64) * twice_below).sum(axis=1)
        den = 2.0 * pos.sum(axis=1, dtype=np.int64) * neg.sum(axis=1, dtype=np.int64)
        auc = _safe_ratio(num, den)
        defined = ~np.isnan(auc)
        total += np.where(defined, auc, 0.0)
        count += defined
    return _safe_ratio(total, count)


def _bootstrap_values(
    y: np.ndarray, p: np.ndarray, metric_names: Sequence[str], idx: np.ndarray
) -> dict[str, np.ndarray]:
    """Metric values for each resample given explicit (n, N) indices; NaN marks an undefined metric."""
    out = _batched_confusion_metrics(y, p.argmax(axis=1), idx, p.shape[1], metric_names)
    if "auroc" in metric_names:
        n, size = idx.shape
        flat = (np.arange(n)[:, None] * size + idx).ravel()
        weights = np.bincount(flat, minlength=n * size).reshape(n, size).astype(np.int32)
        out["auroc"] = _batched_auroc(y, p, weights)
    return {name: out[name] for name in metric_names}


def weighted_metric_values(
    y: np.ndarray, p: np.ndarray, weights: np.ndarray, metric_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Metric values per row of ``weights`` ((R, N) integer multiplicities of the samples); NaN where undefined.

    The same definitions as :func:`classification_metrics`, evaluated for many resamples at once; ``loss`` is
    the weighted mean cross-entropy.
    """
    n_classes = p.shape[1]
    pred = p.argmax(axis=1)
    pair = np.zeros((y.size, n_classes * n_classes))
    pair[np.arange(y.size), y * n_classes + pred] = 1.0
    cm = (weights.astype(np.float64) @ pair).reshape(-1, n_classes, n_classes)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    total = support.sum(axis=1)
    out: dict[str, np.ndarray] = {}
    present = support > 0
    out["accuracy"] = _safe_ratio(tp.sum(axis=1), total)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    out["balanced_accuracy"] = _safe_ratio(recall.sum(axis=1), present.sum(axis=1).astype(np.float64))
    seen = support + predicted
    f1 = np.divide(2 * tp, seen, out=np.zeros_like(tp), where=seen > 0)
    out["macro_f1"] = _safe_ratio(f1.sum(axis=1), (seen > 0).sum(axis=1).astype(np.float64))
    out["weighted_f1"] = _safe_ratio((f1 * support).sum(axis=1), total)
    if "auroc" in metric_names:
        out["auroc"] = _batched_auroc(y, p, weights.astype(np.int32))
    if "loss" in metric_names:
        nll = -np.log(np.clip(p[np.arange(y.size), y], 1e-12, None))
        out["loss"] = _safe_ratio(weights @ nll, weights.sum(axis=1).astype(np.float64))
    return {name: out[name] for name in metric_names}


def resampling_units(groups: Sequence[Any] | None, n: int) -> tuple[np.ndarray, int]:
    """(unit index of each of ``n`` samples, number of units): the groups, or each sample alone without them."""
    if groups is None:
        return np.arange(n), n
    if len(groups) != n:
        raise ValueError(f"got {len(groups)} groups for {n} samples")
    names, unit = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return unit.astype(np.int64), len(names)


def unit_weights(rng: np.random.Generator, unit: np.ndarray, n_units: int, n_resamples: int) -> np.ndarray:
    """(R, N) multiplicities of the samples when ``n_units`` units are drawn with replacement R times."""
    draws = rng.integers(0, n_units, size=(n_resamples, n_units))
    counts = np.bincount((draws + n_units * np.arange(n_resamples)[:, None]).ravel(), minlength=n_resamples * n_units)
    return counts.reshape(n_resamples, n_units)[:, unit]


def interval_note(n_units: int, unit: str = "group", minimum: int = MIN_GROUPS) -> str | None:
    """Why there is no interval (fewer than ``minimum`` independent units), or None when there may be one."""
    if n_units >= minimum:
        return None
    return f"too few {unit}s for an interval ({n_units} {unit}{'s' if n_units != 1 else ''}; {minimum} needed)"


def group_bootstrap_ci(
    y_true: Any,
    probs: Any,
    groups: Sequence[Any] | None,
    metric_names: Sequence[str] = METRIC_NAMES,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Percentile intervals that resample groups (each sample alone when ``groups`` is None).

    Returns ``{"ci": {metric: (low, high) or (None, None)}, "unit": "group"|"image", "units": n, "note": ...}``;
    with fewer than :data:`MIN_GROUPS` units every interval is (None, None) and ``note`` says why. A metric left
    undefined by a resample (a class missing from the drawn groups) skips that resample; ``undefined`` counts them.
    """
    if groups is None:
        return {
            "ci": bootstrap_ci(y_true, probs, metric_names, n=n, seed=seed, alpha=alpha),
            "unit": "image",
            "units": len(y_true),
            "note": None,
            "undefined": {},
        }
    y, p = _check_inputs(y_true, probs)
    unit, n_units = resampling_units(groups, y.size)
    note = interval_note(n_units)
    names = list(metric_names)
    if note is not None:
        return {
            "ci": dict.fromkeys(names, (None, None)),
            "unit": "group",
            "units": n_units,
            "note": note,
            "undefined": {},
        }
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n, _CHUNK_ELEMS // y.size))
    values: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for start in range(0, n, chunk):
        w = unit_weights(rng, unit, n_units, min(chunk, n - start))
        for name, vals in weighted_metric_values(y, p, w, names).items():
            values[name].append(vals)
    ci: dict[str, tuple[float | None, float | None]] = {}
    undefined: dict[str, int] = {}
    for name in names:
        vals = np.concatenate(values[name])
        undefined[name] = int(np.isnan(vals).sum())
        vals = vals[~np.isnan(vals)]
        ci[name] = (
            (None, None) if vals.size == 0 else tuple(float(v) for v in np.quantile(vals, [alpha / 2, 1 - alpha / 2]))
        )
    return {
        "ci": ci,
        "unit": "group",
        "units": n_units,
        "note": None,
        "undefined": {k: v for k, v in undefined.items() if v},
    }


def bootstrap_ci(
    y_true: Any,
    probs: Any,
    metric_names: Sequence[str] = METRIC_NAMES,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
) -> dict[str, tuple[float | None, float | None]]:
    """Percentile bootstrap ``(low, high)`` intervals at level ``1 - alpha``.

    Stratified resampling (the default) keeps each class's count fixed, so balanced accuracy and AUROC
    stay defined in every resample; with plain resampling, resamples where a metric is undefined are
    dropped, and an interval is ``(None, None)`` when no resample defines it.
    """
    names = list(metric_names)
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_NAMES)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    y, p = _check_inputs(y_true, probs)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n, _CHUNK_ELEMS // y.size))
    values: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for start in range(0, n, chunk):
        idx = _resample_indices(rng, y, min(chunk, n - start), stratified)
        for name, vals in _bootstrap_values(y, p, names, idx).items():
            values[name].append(vals)
    intervals: dict[str, tuple[float | None, float | None]] = {}
    for name in names:
        vals = np.concatenate(values[name])
        vals = vals[~np.isnan(vals)]
        if vals.size == 0:
            intervals[name] = (None, None)
        else:
            low, high = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
            intervals[name] = (float(low), float(high))
    return intervals


def aggregate_seeds(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single run) of each key across seeds.

    ``values`` keeps every run's value in order, None included; None values (an undefined AUROC, say) are
    left out of mean and std, which are None when no run defines the key.
    """
    if not runs:
        raise ValueError("aggregate_seeds needs at least one run")
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values: list[float | None] = []
        for i, run in enumerate(runs):
            if key not in run:
                raise KeyError(f"run {i} has no metric {key!r}; it has {sorted(run)}")
            values.append(None if run[key] is None else float(run[key]))
        defined = np.array([v for v in values if v is not None], dtype=np.float64)
        if defined.size == 0:
            mean, std = None, None
        else:
            mean = float(defined.mean())
            std = float(defined.std(ddof=1)) if defined.size > 1 else 0.0
        out[key] = {"mean": mean, "std": std, "values": values}
    return out

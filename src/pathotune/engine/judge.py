"""Judging a trained model: probabilities on a split (optionally with test-time augmentation), metrics with
group-aware intervals, and the validation score that chooses between variants.

Head-only models read cached features; for test-time augmentation they read the features of every view
(``tta.stacked``) and average the head's probabilities. Any other model runs its forward on every view
(``tta.TTAModel``). Either way the views are the same 8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ..core.loop import FitState, predict, sharded_loader
from ..core.metrics import METRIC_NAMES, classification_metrics, group_bootstrap_ci
from ..report import csv_text
from .cached import FeatureSet, HeadOnly, extract_features
from .config import TrainConfig
from .tta import TTAModel, stacked


def split_probs(fabric, module: nn.Module, dataset, cfg: TrainConfig) -> tuple[np.ndarray, float]:
    """(probabilities, mean loss) of ``module`` on every sample of ``dataset``, in order."""
    loader = sharded_loader(fabric, dataset, max(1, cfg.batch_size // fabric.world_size), False, cfg.seed, 0)
    return predict(fabric, module, loader, len(dataset))


def tta_probs(fabric, module: nn.Module, model, dataset, cfg: TrainConfig, progress: bool) -> np.ndarray:
    """Probabilities averaged over the 8 views: through cached view features for a head over features
    (``dataset`` is then the image dataset the features came from), else through the model on every view."""
    if isinstance(module, HeadOnly):
        model.eval().to(fabric.device)
        encode = stacked(model.backbone)
        feats = extract_features(fabric, encode, dataset, cfg.batch_size, cfg.num_workers, "tta features", progress)
        return split_probs(fabric, module, FeatureSet(feats, dataset.labels), cfg)[0]
    return split_probs(fabric, TTAModel(module), dataset, cfg)[0]


def monitored(labels: np.ndarray, probs: np.ndarray, loss: float | None, classes: list[str], monitor: str):
    """The monitored validation score, higher is better (the negated loss for ``loss``); None if undefined."""
    if monitor == "loss":
        return None if loss is None else -float(loss)
    return classification_metrics(labels, probs, classes)[monitor]


def judged(
    labels: np.ndarray, probs: np.ndarray, classes: list[str], groups: list[str] | None, cfg: TrainConfig
) -> dict[str, Any]:
    """Metrics of one evaluation; with ``cfg.bootstrap`` resamples, percentile intervals over ``groups`` (images
    when None) under ``ci``, and ``ci_unit``, ``ci_units`` and ``ci_note`` (why there is none, if so)."""
    metrics = classification_metrics(labels, probs, classes)
    if cfg.bootstrap:
        res = group_bootstrap_ci(labels, probs, groups, METRIC_NAMES, n=cfg.bootstrap, seed=cfg.seed)
        metrics.update({"ci": res["ci"], "ci_unit": res["unit"], "ci_units": res["units"], "ci_note": res["note"]})
        if res["undefined"]:
            metrics["ci_undefined_resamples"] = res["undefined"]
    return metrics


def headline(metrics: dict) -> dict:
    """The summary keys of an evaluation (what a TTA result or a table row carries)."""
    keep = (*METRIC_NAMES, "ci", "ci_unit", "ci_units", "ci_note", "notes", "confusion_matrix")
    return {k: metrics[k] for k in keep if k in metrics}


def predictions_csv(dataset, probs: np.ndarray, class_names: list[str]) -> str:
    """One row per evaluated image: its path, label, predicted class, group (empty: none) and probabilities."""
    rows = []
    for i, row in enumerate(probs):
        sample = dataset.samples[i] if hasattr(dataset, "samples") else None
        path = str(sample.path_or_key) if sample is not None else str(i)
        group = (sample.group or "") if sample is not None else ""
        pred = class_names[int(row.argmax())]
        rows.append([path, class_names[dataset.labels[i]], pred, group, *[f"{p:.6f}" for p in row]])
    return csv_text(rows, ["path", "label", "pred", "group", *[f"prob_{c}" for c in class_names]])


def kept_val_score(state: FitState, selection: dict | None, monitor: str) -> float | None:
    """The validation score of the model as kept, from what selection already scored (no further pass)."""
    if selection and selection.get("candidates"):
        chosen = next(c for c in selection["candidates"] if c["kept"] == selection["kept"])
        return chosen["val_score"]
    row = next((r for r in state.history if r.get("step") == state.best_step and "val_loss" in r), None)
    if row is None or (selection and selection.get("dropped")):  # groups dropped unscored: step 0, the probe
        row = state.history[0] if state.history and "val_loss" in state.history[0] else None
    if row is None:
        return None
    return -row["val_loss"] if monitor == "loss" else row.get(f"val_{monitor}")


__all__ = ["headline", "judged", "kept_val_score", "monitored", "predictions_csv", "split_probs", "tta_probs"]

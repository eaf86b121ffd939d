"""Slide-level MIL training with cross-validation, and the run's outputs.

Folds come from the labels CSV (:func:`.labels.plan_folds`): a ``split`` column (train/val/test) gives one fold,
a ``fold`` column gives its folds, otherwise a seeded stratified k-fold. Inside every fold a stratified, seeded
share of the training slides is held out as validation for early stopping and model selection; the test part
is only scored once, with the selected model. Training runs one bag per step through ``core.loop.fit`` on a
single-process Lightning Fabric from ``core.runtime.make_fabric`` (one device: bags differ in length, and MIL
models are small); test bags go through the shared inference loop (``core.runtime.infer``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from ..core.budget import epoch_budget
from ..core.loop import fit
from ..core.metrics import METRIC_NAMES, aggregate_seeds, bootstrap_ci, classification_metrics
from ..core.runtime import Runtime, infer, make_fabric, make_loggers
from ..errors import note_interrupt
from ..records import staged
from ..report import atomic_write_csv, atomic_write_json, atomic_write_text, plot_confusion_matrix, plot_training_curves
from .aggregators import MILAggregator, create_aggregator
from .bags import BagSubset, FeatureBagDataset
from .config import MILConfig
from .labels import FoldPlan, SlideLabels, plan_folds, read_slide_labels
from .models import FORMAT, FORMAT_VERSION, save_mil_model
from .report import mil_report

__all__ = ["train_mil"]


class _LogitsOnly(nn.Module):
    """``core.loop.fit`` expects ``forward(x) -> logits``; tile scores are not needed while training."""

    def __init__(self, aggregator: MILAggregator) -> None:
        super().__init__()
        self.aggregator = aggregator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregator(x)[0]


def _predict_bags(model: MILAggregator, bags: BagSubset, rt: Runtime) -> np.ndarray:
    model.eval()
    return infer(rt, DataLoader(bags, batch_size=1), lambda x: model(x)[0].softmax(-1)).numpy()


def _fold_meta(
    cfg: MILConfig, kwargs: dict, in_dim: int, table: SlideLabels, bags: FeatureBagDataset, plan: FoldPlan, row: dict
) -> dict[str, Any]:
    """``model.json`` of one fold (see :mod:`.models`)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "aggregator": cfg.aggregator,
        "aggregator_kwargs": kwargs,
        "in_dim": in_dim,
        "classes": table.classes,
        "feature_attrs": bags.attrs,
        "fold": plan.name,
        "best_epoch": row["best_epoch"],
        "monitor": cfg.monitor,
        "metrics": {key: row[key] for key in METRIC_NAMES},
        "slides": {
            part: [table.slide_ids[i] for i in idx]
            for part, idx in (("train", plan.train), ("val", plan.val), ("test", plan.test))
        },
    }


def train_mil(cfg: MILConfig, progress: bool = True) -> dict[str, Any]:
    """Train and score one model per fold into ``cfg.out``; returns the dict written to metrics.json.

    Metrics per fold are on that fold's test slides; ``<metric>`` entries hold mean ± std over folds, and
    ``pooled`` scores all out-of-fold predictions together (with bootstrap CIs). A metric a fold cannot define
    (AUROC on a test split of one class) is None (``null`` in JSON) with the reason in that fold's ``notes`` and in
    ``undefined``, and the mean is over the folds that define it. Runs are reproducible for a seed on CPU.

    ``cfg.out`` is a record (:mod:`pathotune.records`): the run is built in a staging folder and swapped in once
    every fold has finished, so an existing run (MIL or any other) is refused unless ``cfg.overwrite`` and is
    never mixed with the new one (a rerun with fewer folds leaves no old fold behind).
    """
    kwargs = cfg.model_kwargs()
    table = read_slide_labels(cfg.labels, cfg.features)
    bags = FeatureBagDataset(cfg.features, table.slide_ids, table.targets.tolist(), cache_mb=cfg.cache_mb)
    plans = plan_folds(table, cfg.folds, cfg.val_fraction, cfg.seed)
    create_aggregator(cfg.aggregator, int(bags.attrs["feature_dim"]), len(table.classes), **kwargs)  # bad kwargs
    request = {"features": str(cfg.features), "labels": str(cfg.labels), "aggregator": cfg.aggregator}
    with staged(cfg.out, "mil", cfg.overwrite, request) as workdir:
        note_interrupt(
            f"nothing was written to {cfg.out}: the MIL run was built aside and is discarded (it is not resumable); "
            "rerun the same command"
        )
        fabric = make_fabric(
            cfg.accelerator, devices=1, precision="32-true", loggers=make_loggers(cfg.logger, workdir / "logs")
        )
        return _train_folds(cfg, kwargs, table, bags, plans, fabric, workdir, progress)


def _train_folds(
    cfg: MILConfig,
    kwargs: dict,
    table: SlideLabels,
    bags: FeatureBagDataset,
    plans: list[FoldPlan],
    fabric: Any,
    out: Path,
    progress: bool,
) -> dict[str, Any]:
    classes = table.classes
    y = table.targets
    in_dim = int(bags.attrs["feature_dim"])
    rt = Runtime.of(fabric)
    config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    atomic_write_text(out / "config.yaml", config_text)

    per_fold: list[dict[str, Any]] = []
    oof = np.full((len(table), len(classes)), np.nan)
    oof_fold: dict[int, str] = {}
    for k, plan in enumerate(plans):
        fold_dir = out / plan.name
        fold_seed = cfg.seed * 1000 + k
        fabric.seed_everything(fold_seed, verbose=False)
        model = create_aggregator(cfg.aggregator, in_dim, len(classes), **kwargs)
        if progress:
            print(f"{plan.name}: {plan.train.size} train / {plan.val.size} val / {plan.test.size} test slides")
        t0 = time.perf_counter()
        budget = epoch_budget(cfg.epochs, plan.train.size, cfg.warmup_epochs, cfg.patience)
        state = fit(
            fabric,
            _LogitsOnly(model),
            BagSubset(bags, plan.train, cfg.max_tiles, fold_seed),
            BagSubset(bags, plan.val),
            budget,
            cfg.lr,
            cfg.lr,
            cfg.weight_decay,
            1,
            fold_dir / "last.pt",
            fold_seed,
            classes,
            monitor=cfg.monitor,
            progress=progress,
            log_prefix=f"{plan.name}/",
        )
        train_seconds = time.perf_counter() - t0
        (fold_dir / "last.pt").unlink(missing_ok=True)  # resume state; the selected model is saved below
        probs = _predict_bags(model, BagSubset(bags, plan.test), rt)
        oof[plan.test] = probs
        oof_fold.update({int(i): plan.name for i in plan.test})
        m = classification_metrics(y[plan.test], probs, classes)
        row = {
            "fold": plan.name,
            "n_train": int(plan.train.size),
            "n_val": int(plan.val.size),
            "n_test": int(plan.test.size),
            "best_epoch": state.best_step // max(1, plan.train.size),
            "epochs_run": state.step // max(1, plan.train.size),
            **{key: m[key] for key in METRIC_NAMES},
            "confusion_matrix": m["confusion_matrix"],
            "notes": m["notes"],
            "train_seconds": train_seconds,
        }
        per_fold.append(row)
        save_mil_model(fold_dir, model, _fold_meta(cfg, kwargs, in_dim, table, bags, plan, row))
        log_columns = list(state.history[0]) if state.history else []
        atomic_write_csv(fold_dir / "log.csv", [[h.get(c) for c in log_columns] for h in state.history], log_columns)
        curve_metric = None if cfg.monitor == "loss" else f"val_{cfg.monitor}"
        plot_training_curves(state.history, fold_dir / "training_curves.png", metric=curve_metric)

    scored = np.array(sorted(oof_fold), dtype=np.int64)
    pooled = classification_metrics(y[scored], oof[scored], classes)
    if cfg.bootstrap:
        pooled["ci"] = bootstrap_ci(y[scored], oof[scored], METRIC_NAMES, n=cfg.bootstrap, seed=cfg.seed)
    agg = aggregate_seeds(per_fold, METRIC_NAMES)
    metrics: dict[str, Any] = {
        "aggregator": cfg.aggregator,
        "aggregator_kwargs": kwargs,
        "mode": table.mode,
        "n_folds": len(plans),
        "classes": classes,
        "n_slides": len(table),
        "feature_attrs": bags.attrs,
        **{key: agg[key] for key in METRIC_NAMES},
        "undefined": _undefined(per_fold),
        "per_fold": per_fold,
        "pooled": pooled,
    }
    header = ["slide_id", "label", "fold", *[f"prob_{c}" for c in classes]]
    oof_rows = [[table.slide_ids[i], classes[y[i]], oof_fold[int(i)], *[f"{p:.6f}" for p in oof[i]]] for i in scored]
    atomic_write_csv(out / "oof_predictions.csv", oof_rows, header)
    plot_confusion_matrix(
        pooled["confusion_matrix"], classes, out / "confusion_matrix.png", title="Pooled out-of-fold predictions"
    )
    atomic_write_text(out / "report.md", mil_report(cfg, metrics, config_text))
    finalize = getattr(fabric, "loggers", [])
    for logger in finalize:
        logger.finalize("success")
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _undefined(per_fold: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Metric -> the reasons it is undefined in some fold ("fold_2: ..."), for the metrics that are."""
    out: dict[str, list[str]] = {}
    for row in per_fold:
        for key in METRIC_NAMES:
            value = row.get(key)
            if value is None or (isinstance(value, float) and not np.isfinite(value)):
                why = next((n for n in row.get("notes", []) if key.split("_")[0] in n.lower()), "undefined")
                out.setdefault(key, []).append(f"{row['fold']}: {why}")
    return out

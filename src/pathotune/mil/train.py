"""Slide-level MIL training with cross-validation, fold ensembles for prediction, and the run's report.

Folds come from the labels CSV: a ``split`` column (train/val/test) gives one fold, a ``fold`` column gives
its folds, otherwise a seeded stratified k-fold. Inside every fold a stratified, seeded share of the
training slides is held out as validation for early stopping and model selection; the test part is only
scored once, with the selected model. Training runs one bag per step through the engine's ``fit`` on a
single-process Lightning Fabric (one device: bags differ in length, and MIL models are small).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from ..engine.budget import epoch_budget
from ..engine.loop import fit
from ..engine.metrics import METRIC_NAMES, aggregate_seeds, bootstrap_ci, classification_metrics
from ..errors import ConfigError, DataError, WeightsError
from .aggregators import MILAggregator, aggregator_options, create_aggregator, list_aggregators
from .features import (
    FeatureBagDataset,
    SlideLabels,
    extractor_mismatch,
    list_feature_files,
    read_feature_attrs,
    read_slide_features,
    read_slide_labels,
)

__all__ = ["MILConfig", "load_mil_config", "load_mil_model", "plan_folds", "predict_slides", "train_mil"]

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT = "pathotune-mil"
FORMAT_VERSION = 1
SUMMARY_KEYS: tuple[str, ...] = METRIC_NAMES


class MILConfig(BaseModel):
    """One MIL experiment; ``hidden``/``dropout`` override the aggregator's defaults when set."""

    model_config = ConfigDict(extra="forbid")

    features: str
    labels: str
    aggregator: str = "abmil"
    aggregator_kwargs: dict = Field(default_factory=dict)
    hidden: int | None = None
    dropout: float | None = None
    folds: int = 5  # used only when the CSV has neither a split nor a fold column
    val_fraction: float = 0.2
    epochs: int = 20
    warmup_epochs: int = 1
    lr: float = 2e-4
    weight_decay: float = 1e-4
    patience: int = 5
    monitor: Literal["balanced_accuracy", "accuracy", "macro_f1", "auroc", "loss"] = "balanced_accuracy"
    max_tiles: int | None = None  # random tiles per bag and training step; None uses every tile
    cache_mb: float = 4096.0  # bag features kept in memory across epochs and folds; 0 rereads every time
    seed: int = 0
    bootstrap: int = 1000  # resamples for CIs on the pooled out-of-fold predictions; 0 skips them
    accelerator: str = "cpu"
    out: str = "runs/mil"

    @field_validator("aggregator")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in list_aggregators():
            raise ValueError(f"unknown aggregator; choose from {list_aggregators()}")
        return v

    @field_validator("folds")
    @classmethod
    def _two_folds(cls, v: int) -> int:
        if v < 2:
            raise ValueError("must be >= 2")
        return v

    @field_validator("epochs", "patience", "hidden", "max_tiles")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("warmup_epochs", "bootstrap", "cache_mb")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("must be between 0 and 1")
        return v

    def model_kwargs(self) -> dict[str, Any]:
        """Aggregator keyword arguments: ``aggregator_kwargs`` with ``hidden``/``dropout`` applied on top."""
        kw = dict(self.aggregator_kwargs)
        accepted = aggregator_options(self.aggregator)
        for key in ("hidden", "dropout"):
            value = getattr(self, key)
            if value is None:
                continue
            if key not in accepted:
                raise ConfigError(f"aggregator '{self.aggregator}' has no '{key}' option; unset {key}")
            kw[key] = value
        return kw


def load_mil_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> MILConfig:
    """A config from YAML (optional) with non-None overrides on top; bad keys fail on one line."""
    from ..engine.config import build_config

    return build_config(MILConfig, path, **overrides)


@dataclass
class FoldPlan:
    """Row indices (into the labels table) of one fold's train, validation and test parts."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _carve_val(pool: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Stratified (train, val) split of ``pool``; classes with one slide stay in train."""
    val: list[int] = []
    for c in np.unique(y[pool]):
        members = rng.permutation(pool[y[pool] == c])
        if members.size >= 2:
            val.extend(members[: max(1, round(fraction * members.size))].tolist())
    val_idx = np.array(sorted(val), dtype=np.int64)
    return np.setdiff1d(pool, val_idx), val_idx


def plan_folds(table: SlideLabels, folds: int, val_fraction: float, seed: int) -> list[FoldPlan]:
    """The folds the labels CSV asks for (split column, fold column, or stratified k-fold), seeded."""
    from sklearn.model_selection import StratifiedKFold

    y = table.targets
    rng = np.random.default_rng(seed)
    plans: list[FoldPlan] = []
    if table.mode == "split":
        splits = np.array([r.split for r in table.rows])
        train, val, test = (np.flatnonzero(splits == s) for s in ("train", "val", "test"))
        for part, name in ((train, "train"), (test, "test")):
            if part.size == 0:
                raise DataError(f"labels file {table.path}: the split column has no '{name}' rows; add some")
        if val.size == 0:
            train, val = _carve_val(train, y, val_fraction, rng)
        plans.append(FoldPlan("fold_0", train, val, test))
    elif table.mode == "fold":
        fold_ids = np.array([r.fold for r in table.rows])
        values = sorted(set(fold_ids.tolist()))
        if len(values) < 2:
            raise DataError(f"labels file {table.path}: the fold column has one value {values}; give at least two")
        for v in values:
            train, val = _carve_val(np.flatnonzero(fold_ids != v), y, val_fraction, rng)
            plans.append(FoldPlan(f"fold_{v}", train, val, np.flatnonzero(fold_ids == v)))
    else:
        counts = np.bincount(y, minlength=len(table.classes))
        small = [f"{table.classes[c]} ({counts[c]})" for c in range(len(counts)) if counts[c] < folds]
        if small:
            raise ConfigError(
                f"folds={folds} but class(es) {', '.join(small)} have fewer slides than folds; lower folds"
            )
        skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for k, (pool, test) in enumerate(skf.split(np.zeros(len(y)), y)):
            train, val = _carve_val(pool, y, val_fraction, rng)
            plans.append(FoldPlan(f"fold_{k}", train, val, test))
    for plan in plans:
        if plan.val.size == 0 or plan.train.size == 0:
            raise DataError(
                f"labels file {table.path}: {plan.name} leaves no slides for training or validation; add slides"
            )
    return plans


class _Bags(Dataset):
    """A subset of a FeatureBagDataset; training bags may be subsampled to ``max_tiles`` random tiles."""

    def __init__(self, base: FeatureBagDataset, rows: np.ndarray, max_tiles: int | None = None, seed: int = 0):
        self.base, self.rows, self.max_tiles = base, [int(r) for r in rows], max_tiles
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def labels(self) -> list[int]:
        return [self.base.labels[r] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        feats, label, _ = self.base[self.rows[i]]
        if self.max_tiles is not None and feats.shape[0] > self.max_tiles:
            keep = torch.randperm(feats.shape[0], generator=self.generator)[: self.max_tiles]
            feats = feats[keep.sort().values]
        return feats, label, i


class _LogitsOnly(nn.Module):
    """The engine's loop expects ``forward(x) -> logits``; tile scores are not needed while training."""

    def __init__(self, aggregator: MILAggregator) -> None:
        super().__init__()
        self.aggregator = aggregator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregator(x)[0]


@torch.no_grad()
def _predict_bags(model: MILAggregator, bags: Dataset, device: torch.device) -> np.ndarray:
    model.eval()
    probs = [model(bags[i][0].unsqueeze(0).to(device))[0].float().softmax(-1).cpu() for i in range(len(bags))]
    return torch.cat(probs).numpy()


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _save_model(fold_dir: Path, model: MILAggregator, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from ..report import atomic_path, atomic_write_json

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(fold_dir / MODEL_FILE) as tmp:
        save_file(state, str(tmp))
    atomic_write_json(fold_dir / META_FILE, meta)


def _make_fabric(cfg: MILConfig):
    from lightning_fabric import Fabric

    return Fabric(accelerator=cfg.accelerator, devices=1, precision="32-true")


def train_mil(cfg: MILConfig, progress: bool = True) -> dict[str, Any]:
    """Train and score one model per fold into ``cfg.out``; returns the dict written to metrics.json.

    Metrics per fold are on that fold's test slides; ``<metric>`` entries hold mean ± std over folds, and
    ``pooled`` scores all out-of-fold predictions together (with bootstrap CIs). Runs are reproducible
    for a seed on CPU.
    """
    from ..report import atomic_write_json, atomic_write_text, plot_confusion_matrix, plot_training_curves

    out = Path(cfg.out)
    kwargs = cfg.model_kwargs()
    table = read_slide_labels(cfg.labels, cfg.features)
    classes = table.classes
    y = table.targets
    bags = FeatureBagDataset(cfg.features, table.slide_ids, y.tolist(), cache_mb=cfg.cache_mb)
    in_dim = int(bags.attrs["feature_dim"])
    plans = plan_folds(table, cfg.folds, cfg.val_fraction, cfg.seed)
    create_aggregator(cfg.aggregator, in_dim, len(classes), **kwargs)  # fail on bad kwargs before any output
    fabric = _make_fabric(cfg)
    out.mkdir(parents=True, exist_ok=True)
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
            _Bags(bags, plan.train, cfg.max_tiles, fold_seed),
            _Bags(bags, plan.val),
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
        )
        train_seconds = time.perf_counter() - t0
        (fold_dir / "last.pt").unlink(missing_ok=True)  # resume state; the selected model is saved below
        probs = _predict_bags(model, _Bags(bags, plan.test), fabric.device)
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
            **{key: m[key] for key in SUMMARY_KEYS},
            "confusion_matrix": m["confusion_matrix"],
            "notes": m["notes"],
            "train_seconds": train_seconds,
        }
        per_fold.append(row)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "aggregator": cfg.aggregator,
            "aggregator_kwargs": kwargs,
            "in_dim": in_dim,
            "classes": classes,
            "feature_attrs": bags.attrs,
            "fold": plan.name,
            "best_epoch": state.best_step // max(1, plan.train.size),
            "monitor": cfg.monitor,
            "metrics": {key: m[key] for key in SUMMARY_KEYS},
            "slides": {
                part: [table.slide_ids[i] for i in idx]
                for part, idx in (("train", plan.train), ("val", plan.val), ("test", plan.test))
            },
        }
        _save_model(fold_dir, model, meta)
        log_columns = list(state.history[0]) if state.history else []
        log_rows = [[h.get(c) for c in log_columns] for h in state.history]
        atomic_write_text(fold_dir / "log.csv", _csv_text(log_columns, log_rows))
        curve_metric = None if cfg.monitor == "loss" else f"val_{cfg.monitor}"
        plot_training_curves(state.history, fold_dir / "training_curves.png", metric=curve_metric)

    scored = np.array(sorted(oof_fold), dtype=np.int64)
    pooled = classification_metrics(y[scored], oof[scored], classes)
    if cfg.bootstrap:
        pooled["ci"] = bootstrap_ci(y[scored], oof[scored], SUMMARY_KEYS, n=cfg.bootstrap, seed=cfg.seed)
    agg = aggregate_seeds(per_fold, SUMMARY_KEYS)
    metrics: dict[str, Any] = {
        "aggregator": cfg.aggregator,
        "aggregator_kwargs": kwargs,
        "mode": table.mode,
        "n_folds": len(plans),
        "classes": classes,
        "n_slides": len(table),
        "feature_attrs": bags.attrs,
        **{key: agg[key] for key in SUMMARY_KEYS},
        "per_fold": per_fold,
        "pooled": pooled,
    }
    header = ["slide_id", "label", "fold", *[f"prob_{c}" for c in classes]]
    oof_rows = [[table.slide_ids[i], classes[y[i]], oof_fold[int(i)], *[f"{p:.6f}" for p in oof[i]]] for i in scored]
    atomic_write_text(out / "oof_predictions.csv", _csv_text(header, oof_rows))
    plot_confusion_matrix(
        pooled["confusion_matrix"], classes, out / "confusion_matrix.png", title="Pooled out-of-fold predictions"
    )
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", _report(cfg, metrics, config_text))
    return metrics


def _report(cfg: MILConfig, metrics: dict[str, Any], config_text: str) -> str:
    """report.md: per-fold table with a mean ± std row, pooled out-of-fold metrics, figures and config."""
    from ..report import markdown_table

    columns = ["fold", "n_train", "n_val", "n_test", "best_epoch", *SUMMARY_KEYS]
    rows = [{c: r[c] for c in columns} for r in metrics["per_fold"]]
    rows.append({"fold": "mean ± std", **{key: metrics[key] for key in SUMMARY_KEYS}})
    pooled = metrics["pooled"]
    ci = pooled.get("ci") or {}
    pooled_rows = [{"metric": key, "value": pooled[key], "95% CI": ci.get(key)} for key in SUMMARY_KEYS]
    attrs = metrics["feature_attrs"]
    mode = {
        "split": "the CSV's train/val/test split",
        "fold": "the CSV's fold column",
        "kfold": f"stratified {metrics['n_folds']}-fold cross-validation (seed {cfg.seed})",
    }[metrics["mode"]]
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


def _fold_dirs(model_dir: Path) -> list[Path]:
    """``model_dir`` itself when it holds a model, else its ``fold_*`` folders in fold order."""
    if (model_dir / META_FILE).is_file():
        return [model_dir]
    found = [d for d in model_dir.glob("fold_*") if (d / META_FILE).is_file()]

    def order(d: Path) -> tuple[int, str]:
        suffix = d.name[len("fold_") :]
        return (int(suffix), d.name) if suffix.lstrip("-").isdigit() else (0, d.name)

    if not found:
        raise WeightsError(f"no {META_FILE} in {model_dir} or its fold_* folders; point at a train_mil output folder")
    return sorted(found, key=order)


def load_mil_model(fold_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[MILAggregator, dict]:
    """The aggregator saved in ``fold_dir`` (eval mode) and its metadata from model.json."""
    from safetensors.torch import load_file

    d = Path(fold_dir)
    meta_path, weights_path = d / META_FILE, d / MODEL_FILE
    if not meta_path.is_file() or not weights_path.is_file():
        raise WeightsError(f"{d} lacks {META_FILE} or {MODEL_FILE}; point at a fold folder written by train_mil")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{meta_path} is not readable JSON ({e}); retrain this fold") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{meta_path} is not a pathotune MIL model (format {meta.get('format')!r})")
    n_classes = len(meta["classes"])
    model = create_aggregator(meta["aggregator"], int(meta["in_dim"]), n_classes, **meta["aggregator_kwargs"])
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        detail = " ".join(str(e).split())[:200]
        raise WeightsError(f"{weights_path} does not fit {meta['aggregator']} ({detail}); retrain this fold") from None
    return model.to(device).eval(), meta


@torch.no_grad()
def predict_slides(
    model_dir: str | os.PathLike[str],
    features: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Class probabilities and tile scores for each slide feature file (a folder of h5 files or a list).

    Given a run folder, every fold's model scores each slide and the probabilities and tile scores are
    averaged (an ensemble over folds; averaged tile scores still sum to one). Given one fold folder, that
    model alone. Slides must come from the extractor the models were trained on.
    """
    dirs = _fold_dirs(Path(model_dir))
    loaded = [load_mil_model(d, device) for d in dirs]
    classes = loaded[0][1]["classes"]
    ref = loaded[0][1]["feature_attrs"]
    for _, meta in loaded[1:]:
        if meta["classes"] != classes or meta["in_dim"] != loaded[0][1]["in_dim"]:
            raise WeightsError(f"fold models in {model_dir} disagree on classes or input size; retrain the run")
    files = list_feature_files(features)
    for f in files:
        attrs = read_feature_attrs(f)
        key = extractor_mismatch(ref, attrs)
        if key is not None:
            raise DataError(
                f"slide features {f} have {key} {attrs.get(key)!r} but the model in {dirs[0]} was trained on "
                f"{ref.get(key)!r}; extract features with the same backbone and bundle"
            )
    results = []
    for f in files:
        feats, coords, _ = read_slide_features(f)
        x = feats.unsqueeze(0).to(device)
        probs, scores = [], []
        for model, _ in loaded:
            logits, tile_scores = model(x)
            probs.append(logits.float().softmax(-1)[0].cpu())
            scores.append(tile_scores.float()[0].cpu())
        p = torch.stack(probs).mean(0).numpy()
        results.append(
            {
                "slide_id": Path(f).stem,
                "probs": p,
                "pred": classes[int(p.argmax())],
                "classes": list(classes),
                "tile_scores": torch.stack(scores).mean(0).numpy(),
                "coords": coords,
            }
        )
    return results

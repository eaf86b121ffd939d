"""A whole run: data -> model -> fit -> judged on held-out data -> metrics, report, bundle, log."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..backbones import get_backbone_spec
from ..bundle import save_bundle
from ..errors import ConfigError
from ..methods import Recipe, get_method
from ..model import PathoTuneModel, create_model
from ..task import Task
from .config import TrainConfig, dump_config
from .loop import FitState, fit, predict, sharded_loader
from .metrics import aggregate_seeds, bootstrap_ci, classification_metrics

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "auroc")


def make_fabric(cfg: TrainConfig):
    from lightning_fabric import Fabric

    fabric = Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
    )
    fabric.launch()
    return fabric


def resolve_weights(backbone: str, weights: str | None) -> str | None:
    """The bundled weights by default where a package ships them; named FMs need a local file."""
    spec = get_backbone_spec(backbone)
    if weights == "random":
        return None
    if weights is not None:
        return weights
    if spec.bundled:
        return "bundled"
    if spec.family in ("natural", "pathology"):
        raise ConfigError(
            f"backbone '{backbone}' needs --weights: {spec.weights_hint} (or --weights random for a smoke test)"
        )
    return None


def resolve_recipe(cfg: TrainConfig) -> tuple[Recipe, int]:
    base = get_method(cfg.method).recipe
    recipe = Recipe(
        lr=cfg.lr if cfg.lr is not None else base.lr,
        head_lr=cfg.head_lr if cfg.head_lr is not None else base.head_lr,
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else base.weight_decay,
        epochs=cfg.epochs if cfg.epochs is not None else base.epochs,
        warmup_epochs=cfg.warmup_epochs if cfg.warmup_epochs is not None else base.warmup_epochs,
    )
    return recipe, recipe.epochs


def build_task(cfg: TrainConfig, classes: list[str]) -> Task:
    t = cfg.task
    if t.text:
        escaped = t.text.replace("{", "{{").replace("}", "}}")
        return Task(name=t.name, organ=t.organ, stain=t.stain, classes=tuple(classes), template=escaped)
    return Task(name=t.name, organ=t.organ, stain=t.stain, classes=tuple(classes), description=t.description)


class FeatureSet(Dataset):
    """Frozen features computed once, for head-only training (the linear probe trains to convergence fast)."""

    def __init__(self, features: torch.Tensor, labels: list[int]) -> None:
        self.features, self._labels = features, list(labels)

    @property
    def labels(self) -> list[int]:
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int):
        return self.features[i], self._labels[i], i


class HeadOnly(nn.Module):
    def __init__(self, model: PathoTuneModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(features)


@torch.inference_mode()
def extract_features(
    fabric, model: PathoTuneModel, dataset: Dataset, batch_size: int, workers: int, desc: str, progress: bool = True
):
    from tqdm.auto import tqdm

    model.eval().to(fabric.device)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    feats = []
    for x, _, _ in tqdm(loader, desc=desc, disable=not (progress and fabric.is_global_zero), leave=False):
        with fabric.autocast():
            feats.append(model.forward_features(x.to(fabric.device)).float().cpu())
    return torch.cat(feats)


def peak_memory_mb(fabric) -> float:
    """Peak CUDA allocation on GPU; else this process's peak resident set (a cell runs in its own process)."""
    if fabric.device.type == "cuda":
        return torch.cuda.max_memory_allocated(fabric.device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _history_csv(history: list[dict]) -> str:
    if not history:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def _predictions_csv(dataset, probs: np.ndarray, class_names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "pred", *[f"prob_{c}" for c in class_names]])
    samples = getattr(dataset, "samples", None)
    for i, row in enumerate(probs):
        path = str(samples[i].path_or_key) if samples is not None else str(i)
        label = class_names[dataset.labels[i]]
        w.writerow([path, label, class_names[int(row.argmax())], *[f"{p:.6f}" for p in row]])
    return buf.getvalue()


def train_run(cfg: TrainConfig, fabric=None, progress: bool = True) -> dict:
    """Train one seed into ``cfg.out``; returns the metrics written to metrics.json."""
    from ..data import PatchDataset, build_transforms, check_source, load_source
    from ..report import atomic_write_json, atomic_write_text, write_run_report

    fabric = fabric or make_fabric(cfg)
    out = Path(cfg.out)
    fabric.seed_everything(cfg.seed, verbose=False)
    source = load_source(cfg.data, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.seed)
    source, skipped = check_source(source, skip_bad=cfg.skip_bad, progress=progress and fabric.is_global_zero)
    if fabric.is_global_zero and progress:
        print(source.summary())
    if skipped and fabric.is_global_zero:
        print(f"skipped {skipped} unreadable file(s) (--skip-bad)")
    classes = list(source.classes)
    if not source.split("val"):
        raise ConfigError(f"data {cfg.data} has no validation samples; add val/ or raise --val-fraction")
    eval_split = "test" if source.split("test") else "val"

    recipe, epochs = resolve_recipe(cfg)
    model = create_model(
        cfg.backbone,
        cfg.method,
        len(classes),
        task=build_task(cfg, classes),
        weights=resolve_weights(cfg.backbone, cfg.weights),
        img_size=cfg.image_size,
        backbone_kwargs=cfg.backbone_kwargs,
        **cfg.switches,
    )
    if model.provenance.weights is None and fabric.is_global_zero:
        print(f"note: backbone '{cfg.backbone}' is randomly initialised (no --weights); fine for smoke tests only")
    spec = model.backbone.spec
    size = model.backbone.img_size
    train_tf = build_transforms(spec.mean, spec.std, size, train=True, augment=cfg.augment)
    eval_tf = build_transforms(spec.mean, spec.std, size, train=False, augment="none")
    datasets = {
        "train": PatchDataset(source.split("train"), train_tf),
        "val": PatchDataset(source.split("val"), eval_tf),
        eval_split: PatchDataset(source.split(eval_split), eval_tf),
    }
    cached = model.switches.train == "head" and cfg.cache_features and cfg.augment == "none"
    module: nn.Module = model
    if cached:
        feats = {}
        for split in dict.fromkeys(("train", "val", eval_split)):
            ds = PatchDataset(source.split(split), eval_tf)
            f = extract_features(fabric, model, ds, cfg.batch_size, cfg.num_workers, f"features {split}", progress)
            feats[split] = FeatureSet(f, ds.labels)
        fit_sets = feats
        module = HeadOnly(model)
    else:
        fit_sets = datasets

    if fabric.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    t0 = time.perf_counter()
    state: FitState = fit(
        fabric,
        module,
        fit_sets["train"],
        fit_sets["val"],
        recipe,
        epochs,
        cfg.batch_size,
        out / "checkpoints" / "last.pt",
        cfg.seed,
        classes,
        grad_accum=cfg.grad_accum,
        monitor=cfg.monitor,
        patience=cfg.patience,
        workers=0 if cached else cfg.num_workers,
        resume=cfg.resume,
        progress=progress,
    )
    fit_seconds = time.perf_counter() - t0

    eval_set = fit_sets[eval_split]
    loader = sharded_loader(fabric, eval_set, max(1, cfg.batch_size // fabric.world_size), False, cfg.seed, 0)
    t1 = time.perf_counter()
    probs, eval_loss = predict(fabric, module, loader, len(eval_set))
    infer_seconds = time.perf_counter() - t1
    labels = np.asarray(eval_set.labels)
    metrics = classification_metrics(labels, probs, classes)
    if cfg.bootstrap:
        metrics["ci"] = bootstrap_ci(labels, probs, SUMMARY_KEYS, n=cfg.bootstrap, seed=cfg.seed)
    params = model.trainable_parameters()
    backbone_params = sum(p.numel() for p in model.backbone.parameters())
    metrics.update(
        {
            "method": cfg.method,
            "backbone": cfg.backbone,
            "seed": cfg.seed,
            "eval_split": eval_split,
            "eval_loss": eval_loss,
            "n_train": len(datasets["train"]),
            "n_val": len(datasets["val"]),
            "n_test": len(eval_set),
            "trainable_params": params["trainable"],
            "total_params": params["total"],
            "trainable_percent_of_backbone": 100.0 * params["trainable"] / max(1, backbone_params),
            "image_size": size,
            "epochs_run": state.epoch + 1,
            "best_epoch": state.best_epoch,
            "recipe": {
                "lr": recipe.lr,
                "head_lr": recipe.head_lr,
                "weight_decay": recipe.weight_decay,
                "epochs": epochs,
                "warmup_epochs": recipe.warmup_epochs,
                "monitor": cfg.monitor,
                "patience": cfg.patience,
                "cached_features": cached,
            },
            "train_seconds": fit_seconds,
            "train_images_per_second": state.train_images / max(state.train_seconds, 1e-9),
            "inference_images_per_second": (len(eval_set) / max(infer_seconds, 1e-9)) if not cached else None,
            "world_size": fabric.world_size,
            "skipped_files": skipped,
            "peak_memory_mb": peak_memory_mb(fabric),
        }
    )
    if fabric.is_global_zero:
        save_bundle(model, out / "bundle", extra={"metrics": {k: metrics[k] for k in SUMMARY_KEYS}})
        atomic_write_text(out / "log.csv", _history_csv(state.history))
        atomic_write_text(out / "predictions.csv", _predictions_csv(datasets[eval_split], probs, classes))
        atomic_write_json(out / "metrics.json", metrics)
        write_run_report(
            out, metrics, state.history, classes, cfg.model_dump(mode="json"), title=f"{cfg.method} on {cfg.backbone}"
        )
    fabric.barrier()
    return metrics


def train_seeds(cfg: TrainConfig, seeds: list[int], progress: bool = True) -> dict:
    """Repeat a run over seeds (one sub-folder each) and report mean ± std."""
    from ..report import atomic_write_json, atomic_write_text, markdown_table

    if len(seeds) <= 1:
        return train_run(cfg.model_copy(update={"seed": seeds[0] if seeds else cfg.seed}), progress=progress)
    fabric = make_fabric(cfg)
    runs = []
    for s in seeds:
        sub = cfg.model_copy(update={"seed": s, "out": os.path.join(cfg.out, f"seed_{s}")})
        runs.append(train_run(sub, fabric=fabric, progress=progress))
    agg = aggregate_seeds(runs, list(SUMMARY_KEYS))
    summary = {
        "method": cfg.method,
        "backbone": cfg.backbone,
        "seeds": seeds,
        **{k: agg[k] for k in SUMMARY_KEYS},
        "trainable_params": runs[0]["trainable_params"],
        "total_params": runs[0]["total_params"],
        "n_train": runs[0]["n_train"],
        "n_test": runs[0]["n_test"],
        "per_seed": [{k: r[k] for k in ("seed", *SUMMARY_KEYS)} for r in runs],
    }
    if fabric.is_global_zero:
        atomic_write_json(Path(cfg.out) / "metrics.json", summary)
        table = markdown_table([{"metric": k, "mean ± std": agg[k]} for k in SUMMARY_KEYS])
        per_seed = markdown_table(summary["per_seed"])
        atomic_write_text(
            Path(cfg.out) / "report.md",
            f"# {cfg.method} on {cfg.backbone}: {len(seeds)} seeds\n\n{table}\n\n## Per seed\n\n{per_seed}\n\n"
            + "".join(f"- [seed {s}](seed_{s}/report.md)\n" for s in seeds),
        )
    return summary

"""Frozen features computed once: what the probe fits, what head-only methods train on, and what every prompt
method computes at step 0 (its gates shut)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..core import runtime
from ..data import PatchDataset
from ..model import PathoTuneModel
from .config import TrainConfig


class FeatureSet(Dataset):
    """Frozen features computed once, for head-only training (the linear probe trains to convergence fast).

    ``features`` is (N, D), or (N, V, D) for V test-time views of each image (the head averages their
    probabilities). ``groups``: each sample's resampling unit (``Sample.unit``), when known.
    """

    def __init__(self, features: torch.Tensor, labels: list[int], groups: list[str] | None = None) -> None:
        self.features, self._labels = features, list(labels)
        self.groups = groups

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
        if features.ndim == 3:  # test-time views: average their probabilities (returned as log-probabilities)
            return self.model.logits_from_pooled(features).softmax(-1).mean(1).log()
        return self.model.logits_from_pooled(features)

    def param_groups(self, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        return self.model.param_groups(lr, head_lr, weight_decay)


def extract_features(
    fabric, encode, dataset: Dataset, batch_size: int, workers: int, desc: str, progress: bool = True
) -> torch.Tensor:
    """``encode(images)`` over a dataset, in order, on the Fabric device."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    # rank 0 only; a bar on a terminal, periodic lines in a log (report.progress_bar)
    return runtime.infer(runtime.Runtime.of(fabric), loader, encode, progress=progress, desc=desc)


def frozen_features(fabric, model: PathoTuneModel, datasets: dict, cfg: TrainConfig, progress: bool) -> dict:
    """The frozen backbone's pooled features per split: what the probe fits, and what a zero-gated prompted
    model (or LoRA with B = 0, or full fine-tuning before its first step) computes at step 0."""
    model.eval().to(fabric.device)
    out = {}
    for split, ds in datasets.items():
        f = extract_features(fabric, model.backbone, ds, cfg.batch_size, cfg.num_workers, f"features {split}", progress)
        out[split] = FeatureSet(f, ds.labels)
    return out


def augmented_views(fabric, model, samples, train_tf, cfg: TrainConfig, progress: bool) -> torch.Tensor:
    """(N, K, D) frozen features of K = ``cfg.probe.views`` augmented views of every training tile, drawn with the
    training augmentation of the prompt methods (view k is epoch k of the seeded per-sample augmentation)."""
    model.eval().to(fabric.device)
    views = []
    for k in range(cfg.probe.views):
        ds = PatchDataset(samples, train_tf, seed=cfg.seed)
        ds.epoch = k
        views.append(
            extract_features(fabric, model.backbone, ds, cfg.batch_size, cfg.num_workers, f"view {k}", progress)
        )
    return torch.stack(views, dim=1)

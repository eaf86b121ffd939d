"""After training: keep only the prompt groups that help on validation (the rest are removed from the model)."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..model import PathoTuneModel
from .config import TrainConfig
from .loop import predict, sharded_loader
from .metrics import classification_metrics


def select_prompt_groups(fabric, model: PathoTuneModel, val_set: Dataset, cfg: TrainConfig, classes: list[str]):
    """Keep only the prompt groups that help on validation: every subset is judged with the others gated shut.

    Ties on the monitored score go to the lower validation loss, then to fewer groups. Groups left out are
    removed from the model, so the bundle neither stores nor runs them.
    """
    groups = model.groups
    trained = {g: model.gates[g].detach().clone() for g in groups}
    loader = sharded_loader(fabric, val_set, max(1, cfg.batch_size // fabric.world_size), False, cfg.seed, 0)
    labels = np.asarray(val_set.labels)
    candidates = []
    for r in range(len(groups), -1, -1):
        for kept in combinations(groups, r):
            with torch.no_grad():
                for g in groups:
                    model.gates[g].copy_(trained[g] if g in kept else torch.zeros_like(trained[g]))
            probs, loss = predict(fabric, model, loader, len(val_set))
            value = -loss if cfg.monitor == "loss" else classification_metrics(labels, probs, classes)[cfg.monitor]
            candidates.append({"kept": list(kept), "val_score": value, "val_loss": loss})
    best = max(candidates, key=lambda c: (c["val_score"] or -math.inf, -c["val_loss"], -len(c["kept"])))
    with torch.no_grad():
        for g in groups:
            model.gates[g].copy_(trained[g])
    dropped = [g for g in groups if g not in best["kept"]]
    if dropped:
        model.drop_groups(dropped)
    if fabric.is_global_zero:
        print(f"prompt groups kept on validation: {best['kept'] or 'none (the probe)'}; dropped: {dropped or 'none'}")
    return {"kept": best["kept"], "dropped": dropped, "candidates": candidates}

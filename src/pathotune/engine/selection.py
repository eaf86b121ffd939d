"""After training: keep only the prompt groups that help on validation (the rest are removed from the model).

Every subset of the trained groups is scored on validation with the others gated shut. The rule follows the
run's ``selection``:

- ``significant`` (the default): the best subset ``b`` (ties to fewer groups) sets the bar; a subset is
  acceptable when ``b`` is not significantly better than it and it is significantly better than step 0 (the
  probe), both by one-sided paired bootstraps over validation groups (``significance.gain_bounds``); the
  acceptable subset with the fewest groups is kept (then the higher score, then the lower loss). So a group
  stays only when dropping it loses more than the validation noise.
- ``best``: the best score, ties to the lower validation loss, then to fewer groups.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.loop import predict, sharded_loader
from ..core.metrics import classification_metrics
from ..core.significance import gain_bounds
from ..model import PathoTuneModel
from .config import TrainConfig


def _significant_choice(candidates: list[dict], labels, reference, groups, cfg: TrainConfig) -> dict:
    """The rule ``significant`` over scored subsets (module docstring); records its bounds in each candidate."""
    best = max(candidates, key=lambda c: (c["val_score"] or -math.inf, -len(c["kept"]), -c["val_loss"]))
    vs_best = gain_bounds(
        labels, [(best["probs"], c["probs"]) for c in candidates], groups, cfg.monitor, cfg.selection_alpha, False
    )
    vs_probe = gain_bounds(
        labels, [(c["probs"], reference) for c in candidates], groups, cfg.monitor, cfg.selection_alpha, False
    )
    acceptable = []
    for i, c in enumerate(candidates):
        c["below_best_lower"] = None if vs_best.lower is None else vs_best.lower[i]
        c["over_probe_lower"] = None if vs_probe.lower is None else vs_probe.lower[i]
        if not vs_best.significant(i) and vs_probe.significant(i):
            acceptable.append(c)
    pool = acceptable or [best]
    return min(pool, key=lambda c: (len(c["kept"]), -(c["val_score"] or -math.inf), c["val_loss"]))


def select_prompt_groups(
    fabric,
    model: PathoTuneModel,
    val_set: Dataset,
    cfg: TrainConfig,
    classes: list[str],
    reference: np.ndarray | None = None,
    groups: list[str] | None = None,
):
    """Keep only the prompt groups that help on validation: every subset is judged with the others gated shut.

    ``reference``: the validation probabilities at step 0 (the probe), which rule ``significant`` measures gains
    against; ``groups``: the validation samples' resampling units. Groups left out are removed from the model,
    so the bundle neither stores nor runs them.
    """
    names = model.groups
    trained = {g: model.gates[g].detach().clone() for g in names}
    loader = sharded_loader(fabric, val_set, max(1, cfg.batch_size // fabric.world_size), False, cfg.seed, 0)
    labels = np.asarray(val_set.labels)
    candidates = []
    for r in range(len(names), -1, -1):
        for kept in combinations(names, r):
            with torch.no_grad():
                for g in names:
                    model.gates[g].copy_(trained[g] if g in kept else torch.zeros_like(trained[g]))
            probs, loss = predict(fabric, model, loader, len(val_set))
            value = -loss if cfg.monitor == "loss" else classification_metrics(labels, probs, classes)[cfg.monitor]
            candidates.append({"kept": list(kept), "val_score": value, "val_loss": loss, "probs": probs})
    if cfg.selection == "significant" and reference is not None:
        chosen = _significant_choice(candidates, labels, reference, groups, cfg)
    else:
        chosen = max(candidates, key=lambda c: (c["val_score"] or -math.inf, -c["val_loss"], -len(c["kept"])))
    with torch.no_grad():
        for g in names:
            model.gates[g].copy_(trained[g])
    dropped = [g for g in names if g not in chosen["kept"]]
    if dropped:
        model.drop_groups(dropped)
    if fabric.is_global_zero:
        print(f"prompt groups kept on validation: {chosen['kept'] or 'none'}; dropped: {dropped or 'none'}")
    for c in candidates:
        c.pop("probs")
    return {"kept": chosen["kept"], "dropped": dropped, "rule": cfg.selection, "candidates": candidates}


def drop_all_groups(model: PathoTuneModel) -> dict:
    """Step 0 was kept: every gate is shut, so the model is the probe; remove the groups for good."""
    dropped = list(model.groups)
    if dropped:
        model.drop_groups(dropped)
    return {"kept": [], "dropped": dropped, "rule": "significant", "candidates": [], "note": "step 0 kept"}

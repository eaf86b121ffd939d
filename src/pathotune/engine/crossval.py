"""Cross-validated selection (``selection: cv``): on small data, choose the step from every label, not a few.

Train and validation are pooled and cut into k folds that keep groups whole and classes balanced (sklearn's
StratifiedGroupKFold; k is at most the number of groups of the smallest class). For each fold the model starts
afresh from a probe fitted on the other folds, trains the same budget with the same schedule (no early stop),
and is judged on the held-out fold at every evaluation; the held-out predictions of all folds together score
each step. The step kept is the best one if its gain over step 0 beats the noise (``significance.gain_bounds``
over the pooled groups, max-T over the steps), else step 0. The final model starts from the probe fitted on the
whole pool and trains that many steps of the same schedule on all of it. Prompt groups are not pruned here:
pruning would need every subset scored in every fold.

It costs k + 1 trainings, so it is for data too small for a held-out validation split to tell gains from noise
(few-shot episodes, a few dozen images).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import Dataset

from ..core.budget import Budget
from ..core.loop import FitState, fit, load_trainable_state, trainable_state
from ..core.metrics import classification_metrics
from ..core.significance import gain_bounds
from ..data import PatchDataset
from .cached import FeatureSet
from .config import TrainConfig
from .probe import fit_probe

NO_EARLY_STOP = 10**9


def _score(labels: np.ndarray, probs: np.ndarray, classes: list[str], monitor: str) -> float | None:
    if monitor == "loss":
        return float(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())  # -(log loss)
    return classification_metrics(labels, probs, classes)[monitor]


def _probe_head(model, feats: FeatureSet, idx: np.ndarray, units: np.ndarray, classes, cfg: TrainConfig):
    """The probe fitted on ``idx`` of the pool (C by cross-validation inside it, or the configured number)."""
    x = feats.features.numpy()[idx]
    y = np.asarray(feats.labels)[idx]
    c = cfg.probe.c if not isinstance(cfg.probe.c, str) else "cv"
    probe = fit_probe(
        x, y, x[:0], y[:0], classes, cfg.monitor, features=cfg.probe.features, c=c, folds=cfg.probe.folds,
        train_groups=units[idx],
    )  # fmt: skip
    model.head.weight.data.copy_(probe.weight)
    model.head.bias.data.copy_(probe.bias)
    return probe


def cv_select_and_fit(
    fabric, model, pool: list, pool_feats: FeatureSet, train_tf, eval_tf, budget: Budget, recipe, cfg: TrainConfig,
    classes: list[str], ckpt_dir: Path, resume: bool, progress: bool,
) -> tuple[FitState, dict, object]:  # fmt: skip
    """Choose the step by k-fold cross-validation over ``pool`` (train + val samples), then train the final
    model on all of it (module docstring). Returns the final fit state, the selection record and the probe."""
    labels = np.asarray([s.label for s in pool])
    units = np.asarray([s.unit for s in pool])
    per_class = [len(set(units[labels == c])) for c in np.unique(labels)]
    k = min(cfg.selection_folds, *per_class)
    init = trainable_state(model)
    budget = dataclasses.replace(budget, patience=NO_EARLY_STOP)
    record: dict = {"rule": "cv", "folds": k, "units": len(set(units)), "alpha": cfg.selection_alpha}
    kept = 0
    common = dict(grad_accum=cfg.grad_accum, monitor=cfg.monitor, workers=cfg.num_workers, resume=resume,
                  progress=progress)  # fmt: skip
    if k >= 2:
        steps, oof = None, None
        train_all = PatchDataset(pool, train_tf, seed=cfg.seed)
        held_all = PatchDataset(pool, eval_tf)
        for f, (fit_idx, held) in enumerate(StratifiedGroupKFold(n_splits=k).split(labels, labels, units)):
            load_trainable_state(model, init)
            _probe_head(model, pool_feats, fit_idx, units, classes, cfg)
            st = fit(fabric, model, _Fold(train_all, fit_idx), _Fold(held_all, held), budget, recipe.lr,
                     recipe.head_lr, recipe.weight_decay, cfg.batch_size, ckpt_dir / f"fold_{f}.pt", cfg.seed,
                     classes, log_prefix=f"fold_{f}/", **common)  # fmt: skip
            steps = steps or [row["step"] for row in st.history]
            if oof is None:
                oof = np.zeros((len(steps), len(pool), len(classes)))
            for e in range(len(steps)):
                oof[e, held] = st.val_probs[e].double().numpy()
        scores = [
            classification_metrics(labels, p, classes)[cfg.monitor] if cfg.monitor != "loss" else None for p in oof
        ]
        if cfg.monitor == "loss":
            scores = [-float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean()) for p in oof]
        best = max(range(len(steps)), key=lambda e: (scores[e] if scores[e] is not None else -np.inf, -e))
        gains = gain_bounds(labels, [(oof[e], oof[0]) for e in range(1, len(steps))], list(units), cfg.monitor,
                            cfg.selection_alpha, simultaneous=True)  # fmt: skip
        kept = steps[best] if best > 0 and gains.significant(best - 1) else 0
        record.update({"steps": steps, "cv_scores": scores, "best_step": steps[best], "kept_step": kept,
                       "best_gain": gains.gain[best - 1] if best > 0 else 0.0,
                       "best_lower": gains.lower[best - 1] if best > 0 and gains.lower else None,
                       "note": gains.note})  # fmt: skip
    else:
        record["note"] = "a class has fewer than 2 groups: no fold can hold it out, so step 0 (the probe) is kept"
    load_trainable_state(model, init)
    probe = _probe_head(model, pool_feats, np.arange(len(pool)), units, classes, cfg)
    state = FitState(evaluated=True, best_step=0)
    if kept:
        state = fit(fabric, model, PatchDataset(pool, train_tf, seed=cfg.seed), None, budget, recipe.lr,
                    recipe.head_lr, recipe.weight_decay, cfg.batch_size, ckpt_dir / "last.pt", cfg.seed, classes,
                    stop_at=kept, **common)  # fmt: skip
    state.selection = record
    return state, record, probe


class _Fold(Dataset):
    """Some samples of a PatchDataset, indexed 0..n-1 (as the loop expects), with their labels and the epoch
    that seeds augmentation passed through."""

    def __init__(self, dataset: PatchDataset, indices) -> None:
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y, _ = self.dataset[self.indices[i]]
        return x, y, i

    @property
    def labels(self) -> list[int]:
        return [self.dataset.samples[i].label for i in self.indices]

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.dataset.epoch = value

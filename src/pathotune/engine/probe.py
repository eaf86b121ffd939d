"""The linear probe family: multinomial logistic regression fitted to convergence (L-BFGS) on frozen features.

The probe is the baseline every claim is measured against, so it comes in the variants a careful reader would
fit (``ProbeConfig``):

- ``features``: standardised (zero mean, unit variance on the fitting data) or raw;
- ``c``: the inverse L2 strength, chosen on the validation split from a log grid (``val``, optionally refitted
  on train + val with that C), by cross-validation inside train + val and then fitted on both (``cv``: the
  few-shot protocol, where every label counts), fixed by UNI's rule (``uni``), or a fixed number;
- augmentation-matched: the caller may pass the features of K augmented views of every training tile, drawn
  with exactly the training augmentation of the prompt methods.

UNI's evaluation (Chen et al., Nature Medicine 2024; ``uni/downstream/eval_patch_features/linear_probe.py``)
fits its linear probe on raw features with a fixed C = feature dim x number of classes / 100, L-BFGS for at most
1,000 iterations, on the training and validation splits together, without tuning; ``features: raw, c: uni``
is that protocol. The default (standardised, C on validation) is this project's own choice, not UNI's.

The fitted model is folded into one ``nn.Linear``-shaped (weight, bias) pair over raw features, so it can serve
as the head of any method (LP-FT).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from ..core.metrics import classification_metrics
from ..errors import ConfigError
from ..methods import Recipe
from .config import TrainConfig

C_GRID = tuple(float(c) for c in np.logspace(-4, 3, 15))  # inverse L2 strength, 10^-4 .. 10^3
MAX_ITER = 3000
UNI_MAX_ITER = 1000  # UNI's setting
FALLBACK_C = 1.0  # c: cv with a class of fewer than 2 labels cannot cross-validate: this fixed C, said so


@dataclass
class Probe:
    weight: torch.Tensor  # (classes, features), over raw (unstandardised) features
    bias: torch.Tensor  # (classes,)
    C: float
    val_score: float | None  # the monitored score that chose C (validation, or cross-validated); None if fixed
    val_loss: float | None
    refit: bool  # fitted on train + validation
    iterations: int
    converged: bool
    grid: list[dict] = field(default_factory=list)  # C, score and loss of every candidate
    features: str = "standardized"
    rule: str = "val"  # how C was set: val, cv, uni, fixed (or fixed: cv impossible)
    fit_on: str = "train"  # train | train+val
    views: int = 0  # augmented views per training tile (0: the tiles as they are)
    folds: int | None = None  # cross-validation folds (rule cv)
    note: str | None = None

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("weight", "bias"):
            d.pop(k)
        return d


def _scaler(x: np.ndarray, features: str) -> StandardScaler:
    return StandardScaler(with_mean=features == "standardized", with_std=features == "standardized").fit(x)


def _fit(x: np.ndarray, y: np.ndarray, c: float, features: str, clf=None, max_iter: int = MAX_ITER):
    """Standardise (or not), then L-BFGS to convergence; ``clf`` warm-starts from the previous C on the grid."""

    scaler = _scaler(x, features)
    clf = clf or LogisticRegression(max_iter=max_iter, tol=1e-6, warm_start=True)
    clf.set_params(C=c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf.fit(scaler.transform(x), y)
    converged = not any("converge" in str(w.message).lower() for w in caught)
    return scaler, clf, converged


def _fold(scaler, clf, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaler + LogisticRegression -> logits = W x + b on raw features, one row per class."""
    scale = scaler.scale_ if scaler.scale_ is not None else 1.0
    mean = scaler.mean_ if scaler.mean_ is not None else 0.0
    coef = clf.coef_ / scale
    intercept = clf.intercept_ - (clf.coef_ * mean / scale).sum(1)
    w = np.zeros((n_classes, coef.shape[1]))
    b = np.zeros(n_classes)
    classes = clf.classes_.astype(int)
    if len(classes) == 2 and coef.shape[0] == 1:  # binary: sklearn keeps one row, the log-odds of class 1
        w[classes[1]], b[classes[1]] = coef[0], intercept[0]
    else:
        w[classes], b[classes] = coef, intercept
    return torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


def probe_probs(w: torch.Tensor, b: torch.Tensor, x: np.ndarray) -> np.ndarray:
    """Class probabilities of the folded probe on features (N, D), or averaged over views for (N, V, D)."""
    logits = torch.as_tensor(x, dtype=torch.float32) @ w.T + b
    probs = logits.softmax(-1).double()
    return (probs.mean(1) if probs.ndim == 3 else probs).numpy()


def _log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


def _score(probs: np.ndarray, y: np.ndarray, class_names: list[str], monitor: str) -> tuple[float, float]:
    """(monitored score, higher is better; log loss)."""
    loss = _log_loss(probs, y)
    if monitor == "loss":
        return -loss, loss
    value = classification_metrics(y, probs, class_names)[monitor]
    return (-np.inf if value is None else float(value)), loss


def _search(grid, fit_and_score) -> tuple[float, float, float, list[dict]]:
    """Walk the grid strong to weak L2; keep the best score, ties to the lower loss, then to stronger L2."""
    rows, best = [], None
    for c in sorted(grid):
        score, loss, converged = fit_and_score(c)
        rows.append({"C": c, "val_score": score, "val_loss": loss, "converged": converged})
        key = (score, -loss, -c)
        if best is None or key > best[0]:
            best = (key, c, score, loss)
    return best[1], best[2], best[3], rows


def _cv_folds(y: np.ndarray, groups: np.ndarray, folds: int) -> int:
    """Folds that every class can fill (at most its label count, and its group count)."""
    per_class = [min(int((y == c).sum()), len(np.unique(groups[y == c]))) for c in np.unique(y)]
    return min(folds, min(per_class))


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    class_names: list[str],
    monitor: str = "balanced_accuracy",
    refit: bool = False,
    grid: tuple[float, ...] = C_GRID,
    features: str = "standardized",
    c: str | float = "val",
    folds: int = 5,
    train_groups: np.ndarray | None = None,
    val_groups: np.ndarray | None = None,
    views: int = 0,
) -> Probe:
    """Fit the probe as ``c`` says (module docstring); ``train_groups``/``val_groups`` keep rows that belong
    together (the augmented views of one tile, the tiles of one group) in one cross-validation fold."""
    n_classes = len(class_names)
    train_y, val_y = np.asarray(train_y, dtype=int), np.asarray(val_y, dtype=int)
    if len(np.unique(train_y)) < 2:
        raise ConfigError("the linear probe needs at least two classes in the training split")
    if features not in ("standardized", "raw"):
        raise ConfigError(f"probe features '{features}' must be standardized or raw")
    info = {"features": features, "views": views}
    if c == "val":
        clf = None

        def on_val(cand: float):
            nonlocal clf
            scaler, clf, converged = _fit(train_x, train_y, cand, features, clf)
            return (*_score(probe_probs(*_fold(scaler, clf, n_classes), val_x), val_y, class_names, monitor), converged)

        chosen, score, loss, rows = _search(grid, on_val)
        x, y = (np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])) if refit else (train_x, train_y)
        scaler, clf, converged = _fit(x, y, chosen, features)
        w, b = _fold(scaler, clf, n_classes)
        fit_on = "train+val" if refit else "train"
        return Probe(w, b, chosen, score, loss, refit, int(np.max(clf.n_iter_)), converged, rows, rule="val",
                     fit_on=fit_on, **info)  # fmt: skip
    x, y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    if c == "uni":
        chosen = train_x.shape[1] * n_classes / 100
        scaler, clf, converged = _fit(x, y, chosen, features, max_iter=UNI_MAX_ITER)
        w, b = _fold(scaler, clf, n_classes)
        return Probe(w, b, chosen, None, None, True, int(np.max(clf.n_iter_)), converged, rule="uni",
                     fit_on="train+val", **info)  # fmt: skip
    if c == "cv":
        tg = [str(g) for g in train_groups] if train_groups is not None else [f"t{i}" for i in range(len(train_y))]
        vg = [str(g) for g in val_groups] if val_groups is not None else [f"v{i}" for i in range(len(val_y))]
        groups = np.array(tg + vg)
        k = _cv_folds(y, groups, folds)
        if k < 2:
            scaler, clf, converged = _fit(x, y, FALLBACK_C, features)
            w, b = _fold(scaler, clf, n_classes)
            note = f"a class has fewer than 2 labels, so C cannot be cross-validated: C = {FALLBACK_C:g}, fixed"
            return Probe(w, b, FALLBACK_C, None, None, True, int(np.max(clf.n_iter_)), converged, rule="fixed",
                         fit_on="train+val", note=note, **info)  # fmt: skip
        splits = list(StratifiedGroupKFold(n_splits=k).split(x, y, groups))

        def cross_validated(cand: float):
            oof = np.zeros((len(y), n_classes))
            ok = True
            for fit_idx, held in splits:
                scaler, clf, converged = _fit(x[fit_idx], y[fit_idx], cand, features)
                oof[held] = probe_probs(*_fold(scaler, clf, n_classes), x[held])
                ok &= converged
            return (*_score(oof, y, class_names, monitor), ok)

        chosen, score, loss, rows = _search(grid, cross_validated)
        scaler, clf, converged = _fit(x, y, chosen, features)
        w, b = _fold(scaler, clf, n_classes)
        return Probe(w, b, chosen, score, loss, True, int(np.max(clf.n_iter_)), converged, rows, rule="cv",
                     fit_on="train+val", folds=k, **info)  # fmt: skip
    if isinstance(c, str):
        raise ConfigError(f"probe c '{c}' must be val, cv, uni or a number")
    x, y = (x, y) if refit else (train_x, train_y)
    scaler, clf, converged = _fit(x, y, float(c), features)
    w, b = _fold(scaler, clf, n_classes)
    fit_on = "train+val" if refit else "train"
    return Probe(w, b, float(c), None, None, refit, int(np.max(clf.n_iter_)), converged, rule="fixed",
                 fit_on=fit_on, **info)  # fmt: skip


def fit_probe_head(
    model, feats: dict, classes: list[str], monitor: str, refit: bool, probe_cfg=None, train_views=None
) -> Probe:
    """Fit the probe on ``feats`` (split -> FeatureSet) as ``probe_cfg`` (a ProbeConfig) says and make it
    ``model``'s head. ``train_views``: (N, K, D) features of K augmented views of each training tile, fitted in
    place of the plain training features (augmentation-matched)."""
    train = feats["train"].features.numpy()
    train_y = np.asarray(feats["train"].labels)
    groups = getattr(feats["train"], "groups", None)
    groups = np.arange(len(train_y)) if groups is None else np.asarray(groups)
    views = 0
    if train_views is not None:  # the views of one tile stay in one cross-validation fold
        n, views, d = train_views.shape
        train = train_views.reshape(n * views, d).numpy()
        groups, train_y = np.repeat(groups, views), np.repeat(train_y, views)
    kw = {} if probe_cfg is None else {"features": probe_cfg.features, "c": probe_cfg.c, "folds": probe_cfg.folds}
    probe = fit_probe(
        train,
        train_y,
        feats["val"].features.numpy(),
        np.asarray(feats["val"].labels),
        classes,
        monitor=monitor,
        refit=refit,
        train_groups=groups,
        val_groups=getattr(feats["val"], "groups", None),
        views=views,
        **kw,
    )
    with torch.no_grad():
        model.head.weight.copy_(probe.weight)
        model.head.bias.copy_(probe.bias)
    return probe


def check_probe_settings(cfg: TrainConfig, recipe: Recipe) -> None:
    """A trained method chooses its step on validation, so the probe it starts from must not see validation."""
    if recipe.trainer != "steps" or recipe.head_init != "probe" or cfg.selection == "cv":
        return
    if cfg.probe.c in ("cv", "uni"):
        raise ConfigError(
            f"probe.c={cfg.probe.c} fits the starting probe on validation too, so validation could no longer choose "
            f"{cfg.method}'s step; use probe.c: val (or a number), or selection: cv"
        )

"""The strong linear probe: multinomial logistic regression fitted to convergence on frozen features.

This is the baseline every claim is measured against, fitted the way the UNI and CONCH evaluations fit theirs:
L-BFGS to convergence on standardised features, the L2 strength chosen on the validation split from a log grid,
and optionally refitted on train + validation with that strength. The fitted model is folded into one
``nn.Linear``-shaped (weight, bias) pair over raw features, so it can serve as the head of any method (LP-FT).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ..errors import ConfigError
from .metrics import classification_metrics

C_GRID = tuple(float(c) for c in np.logspace(-4, 3, 15))  # inverse L2 strength, 10^-4 .. 10^3
MAX_ITER = 3000


@dataclass
class Probe:
    weight: torch.Tensor  # (classes, features), over raw (unstandardised) features
    bias: torch.Tensor  # (classes,)
    C: float
    val_score: float
    val_loss: float
    refit: bool  # refitted on train + validation with the chosen C
    iterations: int
    converged: bool
    grid: list[dict] = field(default_factory=list)  # C, val score and loss of every candidate

    def summary(self) -> dict:
        d = asdict(self)
        for k in ("weight", "bias"):
            d.pop(k)
        return d


def _fit(x: np.ndarray, y: np.ndarray, c: float, clf=None):
    """Standardise, then L-BFGS to convergence; ``clf`` warm-starts from the previous C on the grid."""

    scaler = StandardScaler().fit(x)
    clf = clf or LogisticRegression(max_iter=MAX_ITER, tol=1e-6, warm_start=True)
    clf.set_params(C=c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clf.fit(scaler.transform(x), y)
    converged = not any("converge" in str(w.message).lower() for w in caught)
    return scaler, clf, converged


def _fold(scaler, clf, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """StandardScaler + LogisticRegression -> logits = W x + b on raw features, one row per class."""
    coef = clf.coef_ / scaler.scale_
    intercept = clf.intercept_ - (clf.coef_ * scaler.mean_ / scaler.scale_).sum(1)
    w = np.zeros((n_classes, coef.shape[1]))
    b = np.zeros(n_classes)
    classes = clf.classes_.astype(int)
    if len(classes) == 2 and coef.shape[0] == 1:  # binary: sklearn keeps one row, the log-odds of class 1
        w[classes[1]], b[classes[1]] = coef[0], intercept[0]
    else:
        w[classes], b[classes] = coef, intercept
    return torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


def _probs(w: torch.Tensor, b: torch.Tensor, x: np.ndarray) -> np.ndarray:
    logits = torch.as_tensor(x, dtype=torch.float32) @ w.T + b
    return logits.softmax(-1).double().numpy()


def _log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean())


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    class_names: list[str],
    monitor: str = "balanced_accuracy",
    refit: bool = False,
    grid: tuple[float, ...] = C_GRID,
) -> Probe:
    """Choose C on validation (``monitor``, ties to the lower validation loss, then to stronger L2)."""
    n_classes = len(class_names)
    train_y, val_y = np.asarray(train_y, dtype=int), np.asarray(val_y, dtype=int)
    if len(np.unique(train_y)) < 2:
        raise ConfigError("the linear probe needs at least two classes in the training split")
    rows, best, clf = [], None, None
    for c in sorted(grid):  # strong to weak L2, each fit warm-started from the last
        scaler, clf, converged = _fit(train_x, train_y, c, clf)
        w, b = _fold(scaler, clf, n_classes)
        probs = _probs(w, b, val_x)
        loss = _log_loss(probs, val_y)
        if monitor == "loss":
            score = -loss
        else:
            value = classification_metrics(val_y, probs, class_names)[monitor]
            score = -np.inf if value is None else float(value)
        rows.append({"C": c, "val_score": score, "val_loss": loss, "converged": converged})
        key = (score, -loss, -c)
        if best is None or key > best[0]:
            best = (key, c, w, b, score, loss, int(np.max(clf.n_iter_)), converged)
    _, c, w, b, score, loss, iters, converged = best
    if refit:
        x, y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
        scaler, clf, converged = _fit(x, y, c)
        w, b = _fold(scaler, clf, n_classes)
        iters = int(np.max(clf.n_iter_))
    return Probe(w, b, c, score, loss, refit, iters, converged, rows)


def fit_probe_head(model, feats: dict, classes: list[str], monitor: str, refit: bool) -> Probe:
    """Fit the strong probe on ``feats`` (split -> FeatureSet; C chosen on val) and make it ``model``'s head."""
    probe = fit_probe(
        feats["train"].features.numpy(),
        np.asarray(feats["train"].labels),
        feats["val"].features.numpy(),
        np.asarray(feats["val"].labels),
        classes,
        monitor=monitor,
        refit=refit,
    )
    with torch.no_grad():
        model.head.weight.copy_(probe.weight)
        model.head.bias.copy_(probe.bias)
    return probe

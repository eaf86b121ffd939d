"""The strong linear probe: converged logistic regression, C chosen on validation, folded into one linear head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pathotune import ConfigError
from pathotune.engine.probe import fit_probe


def blobs(n: int, classes: int, dim: int = 12, seed: int = 0, spread: float = 2.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2.0
    y = np.arange(n) % classes
    x = centres[y] + rng.normal(size=(n, dim)) * spread + 5.0  # off-centre, unscaled: the fold must handle it
    return x * rng.uniform(0.1, 10.0, size=dim), y


@pytest.mark.parametrize("classes", [2, 4])
def test_folded_head_reproduces_sklearn_probabilities(classes):
    x, y = blobs(120, classes)
    xv, yv = blobs(60, classes, seed=1)
    names = [f"c{i}" for i in range(classes)]
    probe = fit_probe(x, y, xv, yv, names, grid=(0.3,))
    scaler = StandardScaler().fit(x)
    ref = LogisticRegression(C=0.3, max_iter=3000, tol=1e-6).fit(scaler.transform(x), y)
    expected = ref.predict_proba(scaler.transform(xv))
    head = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        head.weight.copy_(probe.weight)
        head.bias.copy_(probe.bias)
        got = head(torch.tensor(xv, dtype=torch.float32)).softmax(-1).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert probe.converged and not probe.refit


def test_c_is_chosen_on_validation_and_ties_go_to_lower_loss():
    x, y = blobs(90, 3, spread=4.0)
    xv, yv = blobs(90, 3, seed=2, spread=4.0)
    grid = (1e-4, 1e-2, 1.0, 100.0)
    probe = fit_probe(x, y, xv, yv, ["a", "b", "c"], grid=grid)
    rows = {r["C"]: r for r in probe.grid}
    assert sorted(rows) == sorted(grid)
    best = max(rows.values(), key=lambda r: (r["val_score"], -r["val_loss"], -r["C"]))
    assert best["C"] == probe.C and probe.val_score == best["val_score"]
    assert len({r["val_loss"] for r in rows.values()}) == len(grid)  # the strengths really differ


def test_refit_uses_train_and_validation():
    x, y = blobs(60, 3, spread=4.0)
    xv, yv = blobs(60, 3, seed=3, spread=4.0)
    plain = fit_probe(x, y, xv, yv, ["a", "b", "c"], grid=(0.1, 1.0))
    refit = fit_probe(x, y, xv, yv, ["a", "b", "c"], grid=(0.1, 1.0), refit=True)
    assert refit.refit and refit.C == plain.C
    both = np.concatenate([x, xv])
    scaler = StandardScaler().fit(both)
    ref = LogisticRegression(C=refit.C, max_iter=3000, tol=1e-6).fit(scaler.transform(both), np.concatenate([y, yv]))
    logits = torch.tensor(xv, dtype=torch.float32) @ refit.weight.T + refit.bias
    np.testing.assert_allclose(logits.softmax(-1).numpy(), ref.predict_proba(scaler.transform(xv)), atol=2e-5)
    assert not torch.allclose(plain.weight, refit.weight)


def test_one_class_is_refused():
    x, _ = blobs(20, 2)
    with pytest.raises(ConfigError, match="at least two classes"):
        fit_probe(x, np.zeros(20, dtype=int), x, np.zeros(20, dtype=int), ["a", "b"])


def _sklearn_probs(x, y, c, xv, standardize, max_iter=3000):
    if standardize:
        scaler = StandardScaler().fit(x)
        ref = LogisticRegression(C=c, max_iter=max_iter, tol=1e-6).fit(scaler.transform(x), y)
        return ref.predict_proba(scaler.transform(xv))
    return LogisticRegression(C=c, max_iter=max_iter, tol=1e-6).fit(x, y).predict_proba(xv)


def _head_probs(probe, xv):
    return (torch.tensor(xv, dtype=torch.float32) @ probe.weight.T + probe.bias).softmax(-1).numpy()


def test_raw_features_fold_without_standardising():
    x, y = blobs(90, 3)
    xv, yv = blobs(60, 3, seed=1)
    probe = fit_probe(x / 40, y, xv / 40, yv, ["a", "b", "c"], grid=(0.5,), features="raw")
    assert probe.features == "raw" and probe.rule == "val" and probe.fit_on == "train"
    np.testing.assert_allclose(_head_probs(probe, xv / 40), _sklearn_probs(x / 40, y, 0.5, xv / 40, False), atol=3e-5)


def test_uni_rule_fixes_c_and_fits_train_and_validation():
    """UNI's protocol: C = feature dim x classes / 100, no tuning, fitted on train + val together."""
    x, y = blobs(60, 3, dim=12)
    xv, yv = blobs(60, 3, seed=3, dim=12)
    probe = fit_probe(x / 40, y, xv / 40, yv, ["a", "b", "c"], features="raw", c="uni")
    assert probe.C == 0.36 and probe.rule == "uni" and probe.fit_on == "train+val"
    assert probe.val_score is None  # validation fitted it: it cannot choose between variants
    both, yb = np.concatenate([x, xv]) / 40, np.concatenate([y, yv])
    np.testing.assert_allclose(
        _head_probs(probe, xv / 40), _sklearn_probs(both, yb, 0.36, xv / 40, False, 1000), atol=3e-5
    )


def test_cross_validated_c_uses_every_label_and_falls_back_with_one_per_class():
    x, y = blobs(30, 3, spread=4.0)
    xv, yv = blobs(30, 3, seed=4, spread=4.0)
    grid = (1e-3, 1e-1, 10.0)
    probe = fit_probe(x, y, xv, yv, ["a", "b", "c"], grid=grid, c="cv", folds=5)
    assert probe.rule == "cv" and probe.folds == 5 and probe.fit_on == "train+val" and probe.C in grid
    assert probe.val_score == max(r["val_score"] for r in probe.grid)
    both, yb = np.concatenate([x, xv]), np.concatenate([y, yv])
    np.testing.assert_allclose(_head_probs(probe, xv), _sklearn_probs(both, yb, probe.C, xv, True), atol=3e-5)
    # 1 + 1 labels per class: folds of 2 hold one label per class out each; 1 label per class: no CV possible
    assert fit_probe(x[:3], y[:3], xv[:3], yv[:3], ["a", "b", "c"], grid=grid, c="cv").folds == 2
    alone = fit_probe(x[:3], y[:3], xv[:0], yv[:0], ["a", "b", "c"], grid=grid, c="cv")
    assert alone.rule == "fixed" and alone.C == 1.0 and "fewer than 2 labels" in alone.note


def test_augmented_views_of_one_tile_stay_in_one_fold():
    """The probe on K views per tile: cross-validation groups the views of a tile, so no tile is on both sides."""
    from pathotune.engine.cached import FeatureSet
    from pathotune.engine.probe import fit_probe_head

    x, y = blobs(24, 3, dim=6)
    views = torch.tensor(np.stack([x + 0.01 * k for k in range(4)], axis=1), dtype=torch.float32)  # (24, 4, 6)
    feats = {
        "train": FeatureSet(torch.tensor(x, dtype=torch.float32), list(y)),
        "val": FeatureSet(torch.tensor(x[:6], dtype=torch.float32), list(y[:6])),
    }
    head = torch.nn.Module()
    head.head = torch.nn.Linear(6, 3)
    from pathotune.engine.config import ProbeConfig

    probe = fit_probe_head(head, feats, ["a", "b", "c"], "balanced_accuracy", False, ProbeConfig(), views)
    assert probe.views == 4 and torch.equal(head.head.weight.data, probe.weight)

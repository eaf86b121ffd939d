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

"""Metrics on hand-checkable cases, the batched bootstrap against sklearn, and seed aggregation."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pathotune.core.metrics import (
    METRIC_NAMES,
    _bootstrap_values,
    _resample_indices,
    aggregate_seeds,
    bootstrap_ci,
    classification_metrics,
)


def onehot(pred: list[int], n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[pred]


def noisy_probs(y: np.ndarray, n_classes: int, signal: float, seed: int) -> np.ndarray:
    """Random softmax-like scores that favour the true class by ``signal``."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(n_classes), size=y.size)
    p[np.arange(y.size), y] += signal
    return p / p.sum(axis=1, keepdims=True)


def test_hand_checked_three_class_case() -> None:
    y = np.array([0, 0, 0, 1, 1, 2])
    m = classification_metrics(y, onehot([0, 0, 1, 1, 1, 0], 3), ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["n_samples"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # per-class F1: a = 2/3 (P 2/3, R 2/3), b = 0.8 (P 2/3, R 1), c = 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 0.8) / 6)
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["notes"] == []


def test_confusion_matrix_keeps_all_labels_even_when_unused() -> None:
    m = classification_metrics(np.array([0, 1, 1]), onehot([0, 1, 0], 4), list("abcd"))
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert set(m["per_class"]) == set("abcd")


def test_balanced_accuracy_on_imbalanced_data() -> None:
    y = np.array([0] * 90 + [1] * 10)
    always_zero = classification_metrics(y, onehot([0] * 100, 2), ["neg", "pos"])
    assert always_zero["accuracy"] == pytest.approx(0.9)
    assert always_zero["balanced_accuracy"] == pytest.approx(0.5)
    pred = [0] * 81 + [1] * 9 + [1] * 9 + [0]  # 81/90 and 9/10 correct
    m = classification_metrics(y, onehot(pred, 2), ["neg", "pos"])
    assert m["balanced_accuracy"] == pytest.approx(0.9)
    assert m["confusion_matrix"] == [[81, 9], [1, 9]]


def test_auroc_perfect_reversed_and_binary_positive_column() -> None:
    y = np.array([0, 0, 1, 1])
    good = np.array([[0.9, 0.1], [0.6, 0.4], [0.45, 0.55], [0.2, 0.8]])
    assert classification_metrics(y, good, ["n", "p"])["auroc"] == 1.0
    assert classification_metrics(y, good[:, ::-1], ["n", "p"])["auroc"] == 0.0
    y3 = np.array([0, 1, 2, 0, 1, 2])
    assert classification_metrics(y3, onehot(y3.tolist(), 3) * 0.8 + 0.2 / 3, list("abc"))["auroc"] == 1.0


def test_multiclass_auroc_matches_sklearn_ovr() -> None:
    y = np.random.default_rng(3).integers(0, 4, 200)
    p = noisy_probs(y, 4, 0.3, seed=4)
    expected = roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert classification_metrics(y, p, list("abcd"))["auroc"] == pytest.approx(expected)


def test_auroc_over_present_classes_and_undefined_case() -> None:
    y = np.array([0, 0, 1, 1, 1])
    p = noisy_probs(y, 3, 0.2, seed=0)
    m = classification_metrics(y, p, ["a", "b", "c"])
    per_class = [roc_auc_score(y == k, p[:, k]) for k in (0, 1)]
    assert m["auroc"] == pytest.approx(np.mean(per_class))
    assert any("2 of 3 classes" in note and "'c'" in note for note in m["notes"])
    only_b = np.array([1, 1, 1])
    single = classification_metrics(only_b, noisy_probs(only_b, 3, 0.2, seed=1), list("abc"))
    assert single["auroc"] is None
    assert any("AUROC undefined" in note for note in single["notes"])


@pytest.mark.parametrize(
    ("y", "probs", "names", "match"),
    [
        (np.array([0, 1]), np.eye(2), ["a"], "class names"),
        (np.array([0, 2]), np.eye(2), ["a", "b"], "outside"),
        (np.array([0, 1, 1]), np.eye(2), ["a", "b"], "shape"),
        (np.array([0.0, 1.0]), np.eye(2), ["a", "b"], "integer"),
        (np.array([0, 1]), np.eye(2), ["a", "a"], "unique"),
    ],
)
def test_invalid_inputs_are_rejected(y: np.ndarray, probs: np.ndarray, names: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, probs, names)


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_batched_bootstrap_values_match_sklearn_per_resample(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes - 1, 40)
    y[:2] = n_classes - 1  # a rare class, so plain resampling sometimes drops it
    p = noisy_probs(y, n_classes, 0.1, seed=1).round(1)  # rounding creates tied scores
    idx = _resample_indices(rng, y, 25, stratified=False)
    assert any(len(np.unique(y[row])) < n_classes for row in idx)
    batched = _bootstrap_values(y, p, METRIC_NAMES, idx)
    names = [str(i) for i in range(n_classes)]
    for r in range(idx.shape[0]):
        expected = classification_metrics(y[idx[r]], p[idx[r]], names)
        for name in METRIC_NAMES:
            if expected[name] is None:
                assert np.isnan(batched[name][r])
            else:
                assert batched[name][r] == pytest.approx(expected[name], abs=1e-12), (name, r)


def test_stratified_resamples_keep_class_counts() -> None:
    y = np.array([0] * 7 + [1] * 3 + [2] * 5)
    idx = _resample_indices(np.random.default_rng(0), y, 50, stratified=True)
    counts = np.stack([np.bincount(y[row], minlength=3) for row in idx])
    assert (counts == [7, 3, 5]).all()


def test_bootstrap_ci_contains_point_and_narrows_with_more_data() -> None:
    widths = []
    for size in (200, 4000):
        y = np.random.default_rng(size).integers(0, 3, size)
        p = noisy_probs(y, 3, 0.4, seed=size + 1)
        point = classification_metrics(y, p, list("abc"))
        ci = bootstrap_ci(y, p, METRIC_NAMES, n=500, seed=0)
        for name in METRIC_NAMES:
            low, high = ci[name]
            assert low <= point[name] <= high, (size, name)
        widths.append(ci["balanced_accuracy"][1] - ci["balanced_accuracy"][0])
    assert widths[1] < widths[0] / 2


def test_bootstrap_ci_is_seeded_and_validates() -> None:
    y = np.random.default_rng(0).integers(0, 2, 100)
    p = noisy_probs(y, 2, 0.3, seed=0)
    assert bootstrap_ci(y, p, ["auroc"], n=200, seed=7) == bootstrap_ci(y, p, ["auroc"], n=200, seed=7)
    assert bootstrap_ci(y, p, ["auroc"], n=200, seed=7) != bootstrap_ci(y, p, ["auroc"], n=200, seed=8)
    with pytest.raises(ValueError, match="unknown metric"):
        bootstrap_ci(y, p, ["kappa"])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(y, p, ["accuracy"], alpha=1.5)


def test_bootstrap_ci_undefined_metric_gives_none() -> None:
    y = np.ones(20, dtype=int)
    assert bootstrap_ci(y, noisy_probs(y, 2, 0.3, 0), ["auroc"], n=50)["auroc"] == (None, None)


def test_bootstrap_ci_is_fast_enough() -> None:
    y = np.random.default_rng(0).integers(0, 4, 3000)
    p = noisy_probs(y, 4, 0.2, seed=0)
    start = time.perf_counter()
    ci = bootstrap_ci(y, p, METRIC_NAMES, n=1000)
    assert time.perf_counter() - start < 2.0
    assert set(ci) == set(METRIC_NAMES)


def test_aggregate_seeds_mean_and_sample_std() -> None:
    runs = [{"acc": 0.80, "auroc": 0.9}, {"acc": 0.82, "auroc": None}, {"acc": 0.84, "auroc": 0.7}]
    agg = aggregate_seeds(runs, ["acc", "auroc"])
    assert agg["acc"]["mean"] == pytest.approx(0.82, abs=1e-15)
    assert agg["acc"]["std"] == pytest.approx(0.02, abs=1e-15)
    assert agg["acc"]["values"] == [0.80, 0.82, 0.84]
    assert agg["auroc"]["mean"] == pytest.approx(0.8)
    assert agg["auroc"]["std"] == pytest.approx(np.sqrt(0.02))
    assert agg["auroc"]["values"] == [0.9, None, 0.7]


def test_aggregate_seeds_single_run_and_errors() -> None:
    assert aggregate_seeds([{"acc": 0.5}], ["acc"]) == {"acc": {"mean": 0.5, "std": 0.0, "values": [0.5]}}
    assert aggregate_seeds([{"x": None}], ["x"])["x"] == {"mean": None, "std": None, "values": [None]}
    with pytest.raises(KeyError, match="run 1"):
        aggregate_seeds([{"acc": 0.5}, {}], ["acc"])
    with pytest.raises(ValueError):
        aggregate_seeds([], ["acc"])


def test_weighted_values_match_sklearn_per_resample() -> None:
    from pathotune.core.metrics import weighted_metric_values

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 40)
    p = rng.dirichlet(np.ones(3), 40)
    weights = rng.integers(0, 3, (6, 40))
    weights[:, :3] = 1  # every class present
    got = weighted_metric_values(y, p, weights, ["accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "auroc"])
    for r in range(6):
        idx = np.repeat(np.arange(40), weights[r])
        ref = classification_metrics(y[idx], p[idx], ["a", "b", "c"])
        for name, vals in got.items():
            assert vals[r] == pytest.approx(ref[name], abs=1e-9), name


def test_group_bootstrap_resamples_groups_and_refuses_too_few() -> None:
    from pathotune.core.metrics import MIN_GROUPS, group_bootstrap_ci

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    p = np.where(rng.random((120, 1)) < 0.8, np.eye(2)[y], np.eye(2)[1 - y]) * 0.9 + 0.05
    few = group_bootstrap_ci(y, p, [f"g{i % 3}" for i in range(120)], n=200)
    assert few["units"] == 3 and few["note"] == f"too few groups for an interval (3 groups; {MIN_GROUPS} needed)"
    assert all(v == (None, None) for v in few["ci"].values())
    # Groups that share their errors (each group all right or all wrong): the interval is wider than by image.
    block = np.repeat(np.arange(12), 10)
    right = np.isin(block, rng.choice(12, 9, replace=False))
    q = np.where(right[:, None], np.eye(2)[y], np.eye(2)[1 - y]) * 0.9 + 0.05
    by_group = group_bootstrap_ci(y, q, [f"b{b}" for b in block], n=500)["ci"]["accuracy"]
    by_image = group_bootstrap_ci(y, q, None, n=500)["ci"]["accuracy"]
    assert by_group[1] - by_group[0] > 2 * (by_image[1] - by_image[0])

"""Paired comparisons of two methods on one dataset: balanced-accuracy difference with a bootstrap interval.

Two methods evaluated on the same test images are compared image by image, not by their separate mean ± std:
the paired difference cancels the test-set draw both share, which is most of the noise at small n. The bootstrap
resamples test images (one draw shared by every seed and both methods, so the pairing is kept) and seeds (with
replacement), so the interval reflects test-set sampling and the method's seed-to-seed variation. It says
nothing about other datasets.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import PathoTuneError

N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
_CHUNK_CELLS = 4_000_000  # resamples x images held at once, to bound memory on large test sets


@dataclass(frozen=True)
class PairedDifference:
    """Balanced accuracy of ``method`` minus ``baseline``, averaged over seeds, with its bootstrap interval."""

    mean: float  # mean over seeds of the per-seed difference on the full test set
    ci_low: float
    ci_high: float
    per_seed: list[float]
    n_images: int
    n_seeds: int
    n_resamples: int
    level: float
    verdict: str  # "better" | "worse" | "inconclusive"

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(ci_low: float, ci_high: float) -> str:
    """'better' / 'worse' only when the whole interval is on one side of zero."""
    if ci_low > 0:
        return "better"
    if ci_high < 0:
        return "worse"
    return "inconclusive"


def _balanced_accuracy_diff(weights: np.ndarray, onehot: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Per resample and seed, BA(method) - BA(baseline) with images weighted by their bootstrap counts.

    ``weights`` (R, n), ``onehot`` (n, K) true classes, ``delta`` (S, n) = correct(method) - correct(baseline).
    Classes absent from a resample are left out of its mean, as balanced accuracy leaves out absent classes.
    """
    support = weights @ onehot  # (R, K)
    n_seeds, n = delta.shape
    per_image = (delta[:, :, None] * onehot[None]).transpose(1, 0, 2).reshape(n, -1)  # (n, S*K)
    gained = (weights @ per_image).reshape(len(weights), n_seeds, -1)  # (R, S, K): correct-count differences
    present = support > 0
    recall_diff = np.divide(gained, support[:, None, :], out=np.zeros_like(gained), where=present[:, None, :])
    return recall_diff.sum(axis=2) / np.maximum(present.sum(axis=1), 1)[:, None]


def paired_bootstrap(
    labels: Sequence | np.ndarray,
    method_pred: Sequence | np.ndarray,
    baseline_pred: Sequence | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> PairedDifference:
    """Paired bootstrap of the balanced-accuracy difference over test images and seeds.

    ``labels`` (n,) are the true classes of the shared test images; ``method_pred`` and ``baseline_pred`` are
    (seeds, n) predicted classes (a 1-D array is one seed), rows aligned by image. Each resample draws n image
    indices (the same for every seed and both methods) and the seeds with replacement; the interval is the
    percentile interval of the seed-mean difference.
    """
    y = np.asarray(labels)
    m = np.atleast_2d(np.asarray(method_pred))
    b = np.atleast_2d(np.asarray(baseline_pred))
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    if m.shape != b.shape or m.shape[1] != y.size or m.shape[0] == 0:
        raise ValueError(f"predictions {m.shape} and {b.shape} must both be (seeds, {y.size})")
    if n_resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < level < 1, got {n_resamples}, {level}")
    n, n_seeds = y.size, m.shape[0]
    classes = np.unique(y)
    onehot = (y[:, None] == classes[None, :]).astype(np.float64)
    delta = (m == y).astype(np.float64) - (b == y).astype(np.float64)
    per_seed = _balanced_accuracy_diff(np.ones((1, n)), onehot, delta)[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_CELLS // n))
    stats = []
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(r, n))
        counts = np.bincount((idx + n * np.arange(r)[:, None]).ravel(), minlength=r * n).reshape(r, n)
        diffs = _balanced_accuracy_diff(counts.astype(np.float64), onehot, delta)  # (r, S)
        seeds = rng.integers(0, n_seeds, size=(r, n_seeds))
        stats.append(np.take_along_axis(diffs, seeds, axis=1).mean(axis=1))
    alpha = (1.0 - level) / 2
    low, high = (float(v) for v in np.quantile(np.concatenate(stats), [alpha, 1.0 - alpha]))
    return PairedDifference(
        mean=float(per_seed.mean()),
        ci_low=low,
        ci_high=high,
        per_seed=[float(v) for v in per_seed],
        n_images=n,
        n_seeds=n_seeds,
        n_resamples=n_resamples,
        level=level,
        verdict=verdict(low, high),
    )


def read_predictions(path: str | Path) -> dict[str, tuple[str, str]]:
    """path -> (label, pred) from a run's predictions.csv."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["path"]: (row["label"], row["pred"]) for row in csv.DictReader(fh)}


def compare_runs(
    method_runs: Mapping[int, Mapping[str, tuple[str, str]]],
    baseline_runs: Mapping[int, Mapping[str, tuple[str, str]]],
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[PairedDifference, dict]:
    """Compare two methods over the seeds both have, on the test images every one of those runs scored.

    Runs map seed -> {path: (label, pred)}. Rows are matched by path, so a different row order never matters.
    Returns the difference and a note dict (seeds used, images dropped because not every run had them).
    """
    seeds = sorted(set(method_runs) & set(baseline_runs))
    if not seeds:
        raise PathoTuneError("the two methods share no seed with predictions")
    runs = [r[s] for s in seeds for r in (method_runs, baseline_runs)]
    common = set(runs[0]).intersection(*runs[1:])
    if not common:
        raise PathoTuneError("the runs share no test image (did each seed carve its own test split?)")
    paths = sorted(common)
    labels = [runs[0][p][0] for p in paths]
    for run in runs[1:]:
        if any(run[p][0] != lab for p, lab in zip(paths, labels, strict=True)):
            raise PathoTuneError("the runs disagree on the label of a test image; were they trained on the same data?")
    names = sorted(set(labels) | {run[p][1] for run in runs for p in paths})
    code = {c: i for i, c in enumerate(names)}
    y = np.array([code[lab] for lab in labels])
    m = np.array([[code[method_runs[s][p][1]] for p in paths] for s in seeds])
    b = np.array([[code[baseline_runs[s][p][1]] for p in paths] for s in seeds])
    union = set().union(*runs)
    return paired_bootstrap(y, m, b, n_resamples=n_resamples, seed=seed), {
        "seeds": seeds,
        "images_not_in_every_run": len(union) - len(common),
    }

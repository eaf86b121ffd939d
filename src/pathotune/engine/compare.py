"""Paired comparisons of two methods on one dataset: balanced-accuracy difference with a cluster bootstrap interval.

Two methods evaluated on the same test images are compared image by image, not by their separate mean ± std:
the paired difference cancels the test-set draw both share. Images of one group (slide, patient, region block)
are not independent, so the bootstrap draws groups, never images, and one draw of groups serves both methods.
With several splits of the data it is hierarchical: each resample draws splits with replacement, then within
each drawn split its test groups and its seeds (independently for every drawn copy), and averages the splits'
differences; so the interval covers which data trained the models, which groups tested them, and the seed.
There is no interval with fewer than ``MIN_GROUPS`` units at the top level (splits when there are several, else
the test groups): the result says so instead. It says nothing about other datasets. ``core/metrics.py`` says why this
is written out rather than run through ``scipy.stats.bootstrap``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..core.metrics import MIN_GROUPS, interval_note, resampling_units, unit_weights
from ..errors import PathoTuneError

N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
_CHUNK_CELLS = 4_000_000  # resamples x images held at once, to bound memory on large test sets


@dataclass(frozen=True)
class SplitPairs:
    """One split's test set: true classes (n,), groups (n,) or None (each image alone), and the predicted classes
    of the method and the baseline, (seeds, n), rows paired by seed."""

    labels: np.ndarray
    method: np.ndarray
    baseline: np.ndarray
    groups: Sequence[str] | None = None


@dataclass(frozen=True)
class PairedDifference:
    """Balanced accuracy of ``method`` minus ``baseline``, averaged over seeds then splits, with its interval."""

    mean: float  # mean over splits of the mean over seeds of the difference on the full test set
    ci_low: float | None  # None: no interval (see ``note``)
    ci_high: float | None
    per_seed: list[float]  # every (split, seed) difference, split by split
    n_images: int  # test images over all splits
    n_seeds: int  # seeds per split (the most any split has)
    n_resamples: int
    level: float
    verdict: str  # "better" | "worse" | "inconclusive" | "no interval"
    n_splits: int = 1
    n_groups: int = 0  # test groups over all splits (images when the data names no groups)
    unit: str = "group"
    per_split: list[float] = field(default_factory=list)
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(ci_low: float | None, ci_high: float | None) -> str:
    """'better' / 'worse' only when the whole interval is on one side of zero; 'no interval' without one."""
    if ci_low is None or ci_high is None:
        return "no interval"
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


def _check(pairs: SplitPairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(pairs.labels)
    m, b = np.atleast_2d(np.asarray(pairs.method)), np.atleast_2d(np.asarray(pairs.baseline))
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    if m.shape != b.shape or m.shape[1] != y.size or m.shape[0] == 0:
        raise ValueError(f"predictions {m.shape} and {b.shape} must both be (seeds, {y.size})")
    return y, m, b


class _Split:
    """One split's pieces for the bootstrap: per-image class one-hots, the correctness difference, its units."""

    def __init__(self, pairs: SplitPairs) -> None:
        y, m, b = _check(pairs)
        classes = np.unique(y)
        self.onehot = (y[:, None] == classes[None, :]).astype(np.float64)
        self.delta = (m == y).astype(np.float64) - (b == y).astype(np.float64)
        self.unit, self.n_units = resampling_units(pairs.groups, y.size)
        self.per_seed = _balanced_accuracy_diff(np.ones((1, y.size)), self.onehot, self.delta)[0]

    def resampled(self, rng: np.random.Generator, r: int) -> np.ndarray:
        """(r,) seed-mean differences, each with its own draw of groups and of seeds."""
        weights = unit_weights(rng, self.unit, self.n_units, r).astype(np.float64)
        diffs = _balanced_accuracy_diff(weights, self.onehot, self.delta)  # (r, S)
        seeds = rng.integers(0, diffs.shape[1], size=diffs.shape)
        return np.take_along_axis(diffs, seeds, axis=1).mean(axis=1)


def paired_bootstrap_splits(
    splits: Sequence[SplitPairs],
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> PairedDifference:
    """Hierarchical paired bootstrap over splits, then test groups and seeds within each (module docstring)."""
    if not splits:
        raise ValueError("need at least one split")
    if n_resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < level < 1, got {n_resamples}, {level}")
    parts = [_Split(s) for s in splits]
    per_split = np.array([p.per_seed.mean() for p in parts])
    grouped = any(s.groups is not None for s in splits)
    unit = "group" if grouped else "image"
    n_groups = sum(p.n_units for p in parts)
    note = interval_note(len(parts), "split") if len(parts) > 1 else interval_note(parts[0].n_units, unit)
    low = high = None
    if note is None:
        rng = np.random.default_rng(seed)
        k = len(parts)
        stats = []
        biggest = max(p.delta.shape[1] for p in parts)
        chunk = max(1, min(n_resamples, _CHUNK_CELLS // (biggest * k)))
        for start in range(0, n_resamples, chunk):
            r = min(chunk, n_resamples - start)
            # every split resampled r * k times, so a split drawn twice into one resample gets two draws
            inner = np.stack([p.resampled(rng, r * k).reshape(r, k) for p in parts])  # (splits, r, slots)
            outer = rng.integers(0, k, size=(r, k)) if k > 1 else np.zeros((r, 1), dtype=np.int64)
            stats.append(inner[outer, np.arange(r)[:, None], np.arange(k)[None, :]].mean(axis=1))
        alpha = (1.0 - level) / 2
        low, high = (float(v) for v in np.quantile(np.concatenate(stats), [alpha, 1.0 - alpha]))
    return PairedDifference(
        mean=float(per_split.mean()),
        ci_low=low,
        ci_high=high,
        per_seed=[float(v) for p in parts for v in p.per_seed],
        n_images=sum(p.delta.shape[1] for p in parts),
        n_seeds=max(p.delta.shape[0] for p in parts),
        n_resamples=n_resamples,
        level=level,
        verdict=verdict(low, high),
        n_splits=len(parts),
        n_groups=n_groups,
        unit=unit,
        per_split=[float(v) for v in per_split],
        note=note,
    )


def paired_bootstrap(
    labels: Sequence | np.ndarray,
    method_pred: Sequence | np.ndarray,
    baseline_pred: Sequence | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
    groups: Sequence[str] | None = None,
) -> PairedDifference:
    """One split: ``labels`` (n,), ``method_pred`` and ``baseline_pred`` (seeds, n) predicted classes (a 1-D array
    is one seed), rows aligned by image; ``groups`` (n,) or None (each image its own unit)."""
    pairs = SplitPairs(np.asarray(labels), np.asarray(method_pred), np.asarray(baseline_pred), groups)
    return paired_bootstrap_splits([pairs], n_resamples=n_resamples, seed=seed, level=level)


Prediction = tuple[str, str] | tuple[str, str, str]  # (label, pred[, group]) of one test image


def read_predictions(path) -> dict[str, Prediction]:
    """path -> (label, pred, group) from a run's predictions.csv (group "" when the file has none)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["path"]: (row["label"], row["pred"], row.get("group") or "") for row in csv.DictReader(fh)}


def _split_pairs(
    method_runs: Mapping[int, Mapping[str, Prediction]], baseline_runs: Mapping[int, Mapping[str, Prediction]]
) -> tuple[SplitPairs, list[int], int]:
    """One split's runs (seed -> predictions) as paired arrays over the test images every run scored."""
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
    first = runs[0]
    groups = [first[p][2] if len(first[p]) > 2 and first[p][2] else None for p in paths]
    named = None if all(g is None for g in groups) else [g or p for g, p in zip(groups, paths, strict=True)]
    union = set().union(*runs)
    return SplitPairs(y, m, b, named), seeds, len(union) - len(common)


def compare_runs(
    method_runs: Mapping,
    baseline_runs: Mapping,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[PairedDifference, dict]:
    """Compare two methods over the splits and seeds both have, on the test images every one of those runs scored.

    Runs map seed -> {path: (label, pred[, group])}, or split -> seed -> {...} when the data was split several
    ways. Rows are matched by path, so a different row order never matters. Returns the difference and a note
    dict (splits and seeds used, images dropped because not every run of their split had them).
    """
    nested = all(isinstance(v, Mapping) and v and isinstance(next(iter(v)), int) for v in method_runs.values())
    if method_runs and nested:
        splits = sorted(set(method_runs) & set(baseline_runs))
        if not splits:
            raise PathoTuneError("the two methods share no split with predictions")
    else:
        splits = [None]
        method_runs, baseline_runs = {None: method_runs}, {None: baseline_runs}
    pairs, seeds, dropped = [], {}, 0
    for sp in splits:
        p, used, lost = _split_pairs(method_runs[sp], baseline_runs[sp])
        pairs.append(p)
        seeds[sp] = used
        dropped += lost
    diff = paired_bootstrap_splits(pairs, n_resamples=n_resamples, seed=seed)
    note = {"seeds": seeds[None] if splits == [None] else seeds, "images_not_in_every_run": dropped}
    if splits != [None]:
        note["splits"] = splits
    return diff, note


__all__ = [
    "BOOTSTRAP_SEED",
    "MIN_GROUPS",
    "N_RESAMPLES",
    "PairedDifference",
    "SplitPairs",
    "compare_runs",
    "paired_bootstrap",
    "paired_bootstrap_splits",
    "read_predictions",
    "verdict",
]

"""Is a gain on validation larger than its noise? Paired bootstrap lower bounds over validation groups.

Model selection compares candidates (training steps, subsets of prompt groups) with a simpler reference (step 0,
which is the probe) on the same validation images. A candidate's gain is its monitored score minus the
reference's. Each resample draws validation groups (images when the data names none) with replacement, once for
every candidate, and recomputes every gain; the one-sided lower bound of a gain is its observed value minus the
(1 - alpha) quantile of the resampled gains' deviation from it. ``simultaneous=True`` takes that quantile over
the largest deviation of all candidates in each resample (a max-T bound, valid for the best of many steps, so
picking the best step does not by itself pass the test); ``simultaneous=False`` bounds each gain on its own.
With fewer than ``MIN_GROUPS`` validation units there is no bound: the gain cannot be told from noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .metrics import MIN_GROUPS, interval_note, resampling_units, unit_weights, weighted_metric_values

N_RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Gains:
    """Observed gains over the reference and their one-sided lower bounds (None without enough units)."""

    gain: list[float]
    lower: list[float] | None
    units: int
    unit: str
    alpha: float
    simultaneous: bool
    note: str | None = None

    def significant(self, i: int) -> bool:
        return self.lower is not None and self.lower[i] > 0

    def to_dict(self) -> dict:
        return asdict(self)


def _scores(y: np.ndarray, probs: np.ndarray, weights: np.ndarray, monitor: str) -> np.ndarray:
    name = "loss" if monitor == "loss" else monitor
    values = weighted_metric_values(y, probs, weights, [name])[name]
    return -values if monitor == "loss" else values


def gain_bounds(
    labels: Sequence[int],
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    groups: Sequence[str] | None = None,
    monitor: str = "balanced_accuracy",
    alpha: float = 0.05,
    simultaneous: bool = True,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> Gains:
    """Gains of ``candidate`` over ``reference`` for each ``(candidate_probs, reference_probs)`` pair (N, K) on
    the same validation samples, with one-sided lower bounds at level 1 - ``alpha`` (module docstring)."""
    y = np.asarray(labels, dtype=np.int64)
    unit, n_units = resampling_units(groups, y.size)
    kind = "group" if groups is not None else "image"
    ones = np.ones((1, y.size), dtype=np.int64)
    gain = [float(_scores(y, c, ones, monitor)[0] - _scores(y, r, ones, monitor)[0]) for c, r in pairs]
    note = interval_note(n_units, kind, MIN_GROUPS)
    if note is not None or not pairs:
        return Gains(gain, None, n_units, kind, alpha, simultaneous, note)
    rng = np.random.default_rng(seed)
    weights = unit_weights(rng, unit, n_units, n_resamples)
    resampled = [_scores(y, c, weights, monitor) - _scores(y, r, weights, monitor) for c, r in pairs]
    deviation = np.stack(resampled, axis=1) - np.asarray(gain)  # (R, candidates)
    deviation = np.where(np.isnan(deviation), -np.inf, deviation)  # an undefined resample never widens a bound
    if simultaneous:
        q = np.full(len(pairs), float(np.quantile(deviation.max(axis=1), 1 - alpha)))
    else:
        q = np.quantile(deviation, 1 - alpha, axis=0)
    return Gains(gain, [float(g - t) for g, t in zip(gain, q, strict=True)], n_units, kind, alpha, simultaneous)

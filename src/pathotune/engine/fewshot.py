"""Few-shot protocol: k labelled tiles per class for training and k for validation, the full test split kept.

Each (k, episode) draws its own tiles from a generator seeded by (seed, k, episode), so an episode is the same
for every method (their results pair up) and on every rerun (cells resume). Validation is also k per class:
a few-shot learner that picked its hyper-parameters on a large validation set would not be few-shot. Every
method gets the same 2k labelled tiles per class; how it spends them is its own recipe (the probe with C
cross-validated inside them and fitted on all, PathoTune with ``selection: cv``). Results are summarised over
episodes with a t-interval, since episodes, not test images, are the replicates.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from ..data import PatchSource, Sample
from ..data.sources import H5Ref
from ..errors import ConfigError
from ..report import format_cell, markdown_table


@dataclass(frozen=True)
class Episode:
    """The tiles of one few-shot episode: sampled train and val, plus the dataset's whole test split."""

    k: int
    episode: int
    samples: list[Sample]
    notes: list[str] = field(default_factory=list)  # classes that had fewer than k tiles in a split

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]


def episode_rng(seed: int, k: int, episode: int) -> np.random.Generator:
    """The generator of one episode; depends on nothing else, so adding shots or episodes never moves others."""
    return np.random.default_rng([seed, k, episode])


def sample_episode(source: PatchSource, k: int, episode: int, seed: int = 0) -> Episode:
    """k tiles per class from train and k per class from val, without replacement; all of a smaller class."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    test = source.split("test")
    if not test:
        raise ConfigError(
            f"{source.origin}: few-shot evaluation needs a test split; add test/ or set the dataset's test_fraction"
        )
    rng = episode_rng(seed, k, episode)
    picked: list[Sample] = []
    notes: list[str] = []
    for split in ("train", "val"):
        pool = source.split(split)
        for label, name in enumerate(source.classes):
            items = [s for s in pool if s.label == label]
            if len(items) <= k:
                if len(items) < k:
                    notes.append(f"class '{name}' has {len(items)} {split} tile(s) < k={k}: took all")
                picked.extend(items)
                continue
            idx = np.sort(rng.choice(len(items), size=k, replace=False))
            picked.extend(items[i] for i in idx)
    return Episode(k, episode, picked + list(test), notes)


def manifest_csv(episode: Episode, classes: Sequence[str]) -> str:
    """The episode as a path,label,split,group manifest with absolute paths, readable by ``--data``."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "split", "group"])
    for s in episode.samples:
        if isinstance(s.path_or_key, H5Ref):
            raise ConfigError(f"few-shot manifests list image files; {s.path_or_key} is inside an HDF5 file")
        w.writerow([os.path.abspath(s.path_or_key), classes[s.label], s.split, s.group or ""])
    return buf.getvalue()


def t_interval(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean with a Student-t interval over replicates (episodes); no interval from a single value."""

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def summarise_fewshot(scores: Mapping[tuple[str, int], Sequence[float]], level: float = 0.95) -> list[dict]:
    """Rows {method, shots, mean, low, high, n} from per-episode test scores keyed by (method, k)."""
    return [{"method": m, "shots": k, **t_interval(v, level)} for (m, k), v in scores.items()]


def fewshot_table(rows: Sequence[Mapping], shots: Sequence[int]) -> str:
    """One row per method, one column per k: 'mean [low, high]' (n episodes in the last column)."""

    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = {r["shots"]: r for r in rows if r["method"] == method}
        line: dict = {"method": method}
        for k in shots:
            r = mine.get(k)
            if r is None or r["mean"] is None:
                line[f"k={k}"] = None
            elif r["low"] is None:
                line[f"k={k}"] = format_cell(r["mean"])
            else:
                line[f"k={k}"] = f"{format_cell(r['mean'])} {format_cell((r['low'], r['high']))}"
        ns = sorted({r["n"] for r in mine.values()})
        line["episodes"] = ", ".join(map(str, ns))
        table.append(line)
    return markdown_table(table, ["method", *[f"k={k}" for k in shots], "episodes"])

"""Selection that respects validation noise: gains judged by paired bootstraps over validation groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pathotune.core.significance import gain_bounds


def onehot(pred: np.ndarray, k: int = 3) -> np.ndarray:
    return np.eye(k)[pred] * 0.9 + 0.1 / k


def test_a_real_gain_is_significant_and_noise_is_not() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    ref = np.where(rng.random(200) < 0.6, y, (y + 1) % 3)
    better = np.where(rng.random(200) < 0.5, y, ref)  # fixes about half the errors: +0.2
    noisy = np.where(rng.random(200) < 0.05, (ref + 1) % 3, ref)  # moves 5% of predictions either way
    g = gain_bounds(y, [(onehot(better), onehot(ref)), (onehot(noisy), onehot(ref))], simultaneous=False)
    assert g.significant(0) and not g.significant(1)
    assert g.gain[0] > 0.1 and g.units == 200 and g.unit == "image"


def test_max_t_does_not_let_the_best_of_many_noisy_steps_pass() -> None:
    """Twenty candidates that each differ from the reference by chance: the best one's gain can pass a pointwise
    test, never the simultaneous one."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 60)
    ref = np.where(rng.random(60) < 0.7, y, (y + 1) % 3)
    right, wrong = np.flatnonzero(ref == y), np.flatnonzero(ref != y)
    cands = []
    for _ in range(20):  # as many fixes as breaks on average: every gain is chance
        c = ref.copy()
        fix = rng.choice(wrong, rng.integers(0, 6), replace=False)
        c[fix] = y[fix]
        brk = rng.choice(right, rng.integers(0, 6), replace=False)
        c[brk] = (y[brk] + 1) % 3
        cands.append(c)
    pairs = [(onehot(c), onehot(ref)) for c in cands]
    point = gain_bounds(y, pairs, simultaneous=False)
    joint = gain_bounds(y, pairs, simultaneous=True)
    best = int(np.argmax(joint.gain))
    assert joint.gain[best] > 0 and not joint.significant(best)
    assert all(j <= p + 1e-12 for j, p in zip(joint.lower, point.lower, strict=True))  # max-T is never looser


def test_groups_are_the_unit_and_too_few_give_no_bound() -> None:
    y = np.repeat([0, 1, 2], 20)
    ref = (y + 1) % 3
    pairs = [(onehot(y), onehot(ref))]
    g = gain_bounds(y, pairs, groups=[f"g{i % 4}" for i in range(60)])
    assert g.lower is None and g.units == 4 and "too few groups" in g.note and not g.significant(0)
    g = gain_bounds(y, pairs, groups=[f"g{i % 12}" for i in range(60)])
    assert g.significant(0) and g.unit == "group" and g.units == 12


class _Data(torch.utils.data.Dataset):
    def __init__(self, x, y) -> None:
        self.x, self.y = torch.as_tensor(x, dtype=torch.float32), list(map(int, y))

    @property
    def labels(self):
        return self.y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def _fit(tmp_path, val_y, rule: str, feature_y=None):
    from lightning_fabric import Fabric

    from pathotune.core.budget import Budget
    from pathotune.core.loop import fit

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    x = rng.normal(size=(120, 4)) + 2.0 * np.eye(4)[y]
    vx = rng.normal(size=(60, 4)) + 2.0 * np.eye(4)[val_y if feature_y is None else feature_y]
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    fabric = Fabric(accelerator="cpu", devices=1)
    budget = Budget(steps=40, warmup_steps=0, eval_every=4, patience=100)
    return fit(fabric, model, _Data(x, y), _Data(vx, val_y), budget, 0.1, 0.1, 0.0, 16, tmp_path / "c.pt", 0,
               ["a", "b"], progress=False, selection=rule)  # fmt: skip


def test_the_loop_leaves_step_0_only_for_a_gain_above_the_noise(tmp_path) -> None:
    """Training from a zero head: on validation drawn like training the gain is real and the rule keeps a later
    step; on validation whose labels barely follow the features (34 of 60 agree) a later step scores better by
    about two images' worth, which the old rule ('best') takes and the rule 'significant' does not."""
    real = _fit(tmp_path / "a", np.arange(60) % 2, "significant")
    assert real.best_step > 0 and real.selection["kept_step"] == real.best_step and real.selection["best_lower"] > 0
    other_y = np.repeat([0, 1], 30)  # what the features follow
    noise_y = other_y.copy()
    noise_y[np.r_[0:13, 30:43]] ^= 1  # 13 flipped in each class: 34 of 60 labels agree with the features
    chance = _fit(tmp_path / "b", noise_y, "best", other_y)
    kept = _fit(tmp_path / "c", noise_y, "significant", other_y)
    assert chance.best_step > 0  # a later step looked better by chance
    assert kept.best_step == 0 and kept.selection["best_step"] == chance.best_step
    assert kept.selection["kept_step"] == 0 and kept.selection["best_lower"] <= 0
    assert torch.equal(kept.best_state["weight"], torch.zeros(2, 4))  # step 0's tensors came back


def test_group_choice_prefers_fewer_groups_unless_dropping_one_costs_more_than_noise() -> None:
    from pathotune.engine.config import TrainConfig
    from pathotune.engine.selection import _significant_choice

    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    ref = np.where(rng.random(300) < 0.5, y, (y + 1) % 3)
    good = np.where(rng.random(300) < 0.8, y, (y + 1) % 3)
    same = np.where(rng.random(300) < 0.02, (good + 1) % 3, good)  # equal to good up to noise
    cfg = TrainConfig(data="x")

    def cand(kept, pred, score):
        return {"kept": kept, "val_score": score, "val_loss": 1.0, "probs": onehot(pred)}

    tied = [cand(["tvp", "ttp"], good, 0.80), cand(["tvp"], same, 0.79), cand([], ref, 0.5)]
    assert _significant_choice(tied, y, onehot(ref), None, cfg)["kept"] == ["tvp"]
    needed = [cand(["tvp", "ttp"], good, 0.80), cand(["tvp"], ref, 0.5), cand([], ref, 0.5)]
    assert _significant_choice(needed, y, onehot(ref), None, cfg)["kept"] == ["tvp", "ttp"]


@pytest.mark.parametrize("rule", ["significant", "best"])
def test_selection_rules_are_configurable(rule: str) -> None:
    from pathotune.engine.config import TrainConfig

    assert TrainConfig(data="x", selection=rule).selection == rule
    assert TrainConfig(data="x").selection == "significant"


def test_cross_validated_selection_uses_every_label(tmp_path) -> None:
    """selection: cv pools train + val; with nothing to gain (lr 0) it keeps step 0, which is then exactly the
    probe fitted on the pool with C cross-validated inside it (the few-shot probe)."""
    from helpers import TINY_CONFIG, read_predictions, write_dataset

    from pathotune.engine.config import TrainConfig
    from pathotune.engine.run import train_run

    data = write_dataset(tmp_path / "d", {"train": 4, "val": 2, "test": 3})
    base = {**TINY_CONFIG, "data": str(data), "accelerator": "cpu", "augment": "none", "bootstrap": 0}
    frozen = {"lr": 0.0, "head_lr": 0.0, "selection": "cv", "selection_folds": 3, "out": str(tmp_path / "cv")}
    cv = train_run(TrainConfig(**base, method="vpt-deep", steps=4, eval_every=2, **frozen), progress=False)
    sel = cv["selection"]
    assert sel["rule"] == "cv" and sel["folds"] == 3 and sel["steps"] == [0, 2, 4] and sel["kept_step"] == 0
    assert all((tmp_path / "cv" / "checkpoints" / f"fold_{f}.pt").is_file() for f in range(3))
    assert cv["val_score"] is None and cv["probe"]["rule"] == "cv" and cv["probe"]["fit_on"] == "train+val"
    probe = train_run(
        TrainConfig(**base, method="linear", probe={"c": "cv"}, out=str(tmp_path / "lin")), progress=False
    )
    assert probe["probe"]["C"] == cv["probe"]["C"]
    a, b = read_predictions(tmp_path / "cv" / "predictions.csv"), read_predictions(tmp_path / "lin" / "predictions.csv")
    assert [r["pred"] for r in a] == [r["pred"] for r in b]
    with pytest.raises(Exception, match="probe.c=cv fits the starting probe on validation"):
        train_run(TrainConfig(**base, method="vpt-deep", steps=2, probe={"c": "cv"}, out=str(tmp_path / "x")),
                  progress=False)  # fmt: skip

"""The training engine end to end on tiny data: DDP equivalence, resume after SIGKILL and mid-epoch, non-finite
losses, gradient accumulation, step budgets and early stopping, the probe start (LP-FT), prompt-group selection,
feature caching, seed repeats and what a run folder holds."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    TINY_CONFIG,
    assert_rows_close,
    cli_cmd,
    cli_env,
    count_images,
    numeric_rows,
    one_line_error,
    read_log,
    read_metrics,
    read_predictions,
    run_main,
    write_config,
    write_dataset,
)

from pathotune.core import loop as loop_mod
from pathotune.core.budget import plan_budget
from pathotune.core.loop import TrainingError
from pathotune.engine import run as run_mod
from pathotune.engine.config import TrainConfig, load_config
from pathotune.engine.run import SUMMARY_KEYS, train_run
from pathotune.errors import ConfigError

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "auroc", "eval_loss")
# 8 train images per class = 24: divisible by batch_size (8) and by the 2 DDP ranks, so DistributedSampler
# adds no padding and every global batch is a full 8 (4 per rank). The val split (3 per class = 9) is odd
# on purpose: see test_ddp_validation_loss_ignores_sampler_padding.
SPLITS = {"train": 8, "val": 3, "test": 4}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "tiles", SPLITS)


@pytest.fixture(scope="module")
def data_no_test(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data_no_test") / "tiles", {"train": 8, "val": 3}, seed=1)


def tiny_cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = {"data": str(data), "out": str(out), "accelerator": "cpu", "augment": "none", "bootstrap": 0}
    return TrainConfig(**{**TINY_CONFIG, **base, **kw})


def load_ckpt(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def assert_metrics_close(a: dict, b: dict, tol: float) -> None:
    for k in METRIC_KEYS:
        assert a[k] == pytest.approx(b[k], abs=tol), f"{k}: {a[k]} vs {b[k]}"


# 1. DDP on CPU gives the same numbers as one process ------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_runs(data, tmp_path_factory) -> tuple[Path, Path]:
    """The same 6-step pathotune run with 1 process and with 2 gloo processes, run side by side.

    Augmentation is on: it is seeded per (seed, epoch, sample), so both world sizes see the same batches.
    """
    root = tmp_path_factory.mktemp("ddp")
    cfg = write_config(root / "cfg.yaml")
    common = ["train", "--data", data, "--method", "pathotune", "--config", cfg, "--steps", "6", "--eval-every", "3"]
    common += ["--quiet", "--augment", "pathology", "--accelerator", "cpu"]
    one, two = root / "one", root / "two"
    procs = [
        subprocess.Popen(
            cli_cmd(*common, "--out", one, "--devices", "1"),
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        subprocess.Popen(
            cli_cmd(*common, "--out", two, "--devices", "2", "--strategy", "ddp"),
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    ]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, f"rc {p.returncode}\n{out}\n{err}"
    return one, two


def test_ddp_two_processes_match_one(ddp_runs):
    one, two = ddp_runs
    m1, m2 = read_metrics(one), read_metrics(two)
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    for k in ("accuracy", "balanced_accuracy", "auroc"):
        assert m2[k] == pytest.approx(m1[k], abs=1e-9), k
    assert m2["eval_loss"] == pytest.approx(m1["eval_loss"], abs=1e-5)
    assert m2["n_test"] == m1["n_test"] == 3 * SPLITS["test"]
    assert m2["confusion_matrix"] == m1["confusion_matrix"]
    # every global batch holds the same (augmented) samples, so the training losses agree as well
    l1, l2 = read_log(one), read_log(two)
    assert [int(r["step"]) for r in l1] == [int(r["step"]) for r in l2] == [0, 3, 6]
    for r1, r2 in zip(l1[1:], l2[1:], strict=True):
        assert float(r2["train_loss"]) == pytest.approx(float(r1["train_loss"]), abs=1e-5)
        assert float(r2["val_balanced_accuracy"]) == pytest.approx(float(r1["val_balanced_accuracy"]), abs=1e-9)
    p1, p2 = read_predictions(one / "predictions.csv"), read_predictions(two / "predictions.csv")
    assert [r["path"] for r in p1] == [r["path"] for r in p2]
    for r1, r2 in zip(p1, p2, strict=True):
        for c in (c for c in r1 if c.startswith("prob_")):
            assert float(r2[c]) == pytest.approx(float(r1[c]), abs=1e-5)


def test_ddp_validation_loss_ignores_sampler_padding(ddp_runs):
    """With an odd val set, DistributedSampler pads rank 1 with a repeat of sample 0; that repeat must not
    count twice in val_loss (or eval_loss on an odd test split), which must not depend on the world size."""
    one, two = ddp_runs
    for r1, r2 in zip(read_log(one), read_log(two), strict=True):
        assert float(r2["val_loss"]) == pytest.approx(float(r1["val_loss"]), abs=1e-5), (r1, r2)


# 2. Resume ---------------------------------------------------------------------------------------------------


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert_metrics_close(ma, mb, 1e-6)
    assert (ma["steps_run"], ma["selected_step"]) == (mb["steps_run"], mb["selected_step"])
    assert ma["confusion_matrix"] == mb["confusion_matrix"]
    assert_rows_close(numeric_rows(read_log(a)), numeric_rows(read_log(b)), 1e-6)
    pa = numeric_rows(read_predictions(a / "predictions.csv"), drop=("path", "label", "pred"))
    pb = numeric_rows(read_predictions(b / "predictions.csv"), drop=("path", "label", "pred"))
    assert_rows_close(pa, pb, 1e-6)


def test_resume_after_sigkill_matches_uninterrupted_run(data, tmp_path):
    # batch 2: 12 steps per epoch; 30 steps with a checkpoint every 5, most of them mid-epoch; augmentation on
    cfg = write_config(tmp_path / "cfg.yaml", batch_size=2, bootstrap=0)
    args = ["train", "--data", data, "--method", "pathotune", "--config", cfg, "--steps", "30", "--eval-every", "5"]
    args += ["--quiet", "--augment", "pathology", "--accelerator", "cpu", "--seed", "3"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref_proc = subprocess.Popen(
        cli_cmd(*args, "--out", ref), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    proc = subprocess.Popen(
        cli_cmd(*args, "--out", killed), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = killed / "checkpoints" / "last.pt"
    wait_for(ckpt, proc)  # step 0 is judged (the checkpoint appears by an atomic rename)
    proc.send_signal(signal.SIGKILL)  # within milliseconds: training steps are running
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # a kill leaves a loadable checkpoint
    assert 0 <= state["fit"]["step"] < 30

    resumed = subprocess.run(
        cli_cmd(*args, "--out", killed, "--resume"),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    _, ref_err = ref_proc.communicate(timeout=240)
    assert ref_proc.returncode == 0, ref_err
    assert_same_run(killed, ref)
    assert [int(r["step"]) for r in read_log(ref)] == [0, 5, 10, 15, 20, 25, 30]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_replays_the_same_batches(data, tmp_path, monkeypatch, workers):
    """A checkpoint at step 5 of a 12-step epoch: the resumed run starts at batch 6 of that epoch's shuffle, with
    the same augmentation draws, whatever the number of loader workers."""
    real_save = loop_mod.save_checkpoint
    resume_dir = tmp_path / "resumed"

    def save_and_keep_step_5(path, state):
        real_save(path, state)
        if state["fit"]["step"] == 5:
            real_save(resume_dir / "checkpoints" / "last.pt", state)

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_and_keep_step_5)
    kw = dict(method="vpt-deep", steps=15, eval_every=5, batch_size=2, augment="pathology", num_workers=workers)
    train_run(tiny_cfg(data, tmp_path / "ref", **kw), progress=False)
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    train_run(tiny_cfg(data, resume_dir, resume=True, **kw), progress=False)
    assert_same_run(resume_dir, tmp_path / "ref")


# 3. Non-finite losses ------------------------------------------------------------------------------------


def test_huge_lr_raises_training_error_keeping_the_step_0_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss") as exc:
        cfg = tiny_cfg(data, out, method="pathotune", steps=4, eval_every=4, lr=1e30, head_lr=1e30)
        train_run(cfg, progress=False)
    assert f"the last good checkpoint is kept at {out / 'checkpoints' / 'last.pt'}" in str(exc.value)
    assert "\n" not in str(exc.value)
    ck = load_ckpt(out)  # the probe, judged at step 0, before any update
    assert ck["fit"]["step"] == 0 and all(torch.isfinite(t).all() for t in ck["trainable"].values())


def test_non_finite_parameters_after_an_update_raise_training_error(data, tmp_path, monkeypatch):
    """When the update that blows the weights up is the last one before an evaluation, the NaNs first appear in
    validation; that must stop the run with TrainingError too (an AdamW head at lr 1e10). The divergence check
    (which would stop this run earlier, on a finite but exploded validation loss) is switched off here."""
    monkeypatch.setattr(loop_mod, "EXPLODE_FLOOR", float("inf"))
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite"):
        train_run(tiny_cfg(data, out, method="linear-adamw", steps=6, lr=1e10, head_lr=1e10), progress=False)


def test_non_finite_loss_mid_run_keeps_loadable_checkpoint(data, tmp_path, monkeypatch):
    calls = {"train": 0}
    real_forward = run_mod.HeadOnly.forward

    def forward(self, features):
        logits = real_forward(self, features)
        if self.training:
            calls["train"] += 1
            if calls["train"] > 4:  # the 5th training step
                return logits * float("nan")
        return logits

    monkeypatch.setattr(run_mod.HeadOnly, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss") as exc:
        train_run(tiny_cfg(data, out, method="linear-adamw", steps=9, eval_every=3), progress=False)
    assert "at step 5 (epoch 2)" in str(exc.value)
    assert str(out / "checkpoints" / "last.pt") in str(exc.value)
    ck = load_ckpt(out)
    assert ck["fit"]["step"] == 3 and len(ck["fit"]["history"]) == 2  # steps 0 and 3
    assert all(torch.isfinite(t).all() for t in ck["trainable"].values())


def test_cli_non_finite_loss_is_one_line_exit_2(data, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0)
    out = tmp_path / "run"
    args = ["train", "--data", data, "--method", "pathotune", "--config", cfg, "--steps", "3", "--lr", "1e30"]
    args += ["--eval-every", "3"]
    args += ["--head-lr", "1e30", "--out", out, "--quiet", "--augment", "none", "--accelerator", "cpu"]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    line = one_line_error(err)
    assert "non-finite loss" in line
    assert "the last good checkpoint is kept" in line


# 4. Gradient accumulation ------------------------------------------------------------------------------------


def accum_pair(data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """batch 8 x accum 1 against batch 4 x accum 2: same shuffled order (DistributedSampler seeds by seed and
    epoch only), so each update sees the same sample set, and both count the same optimizer steps."""
    runs = []
    for name, bs, accum in (("b8", 8, 1), ("b4x2", 4, 2)):
        out = tmp_path / name
        cfg = tiny_cfg(data, out, method="linear-adamw", steps=9, head_lr=0.05, batch_size=bs, grad_accum=accum)
        train_run(cfg, progress=False)
        runs.append(out)
    return runs[0], runs[1]


def assert_same_training(a: Path, b: Path) -> None:
    ca, cb = load_ckpt(a), load_ckpt(b)  # last-step parameters, whatever step was best
    assert ca["trainable"].keys() == cb["trainable"].keys()
    for k in ca["trainable"]:
        torch.testing.assert_close(cb["trainable"][k], ca["trainable"][k], rtol=0, atol=1e-5, msg=k)
    assert_rows_close(numeric_rows(read_log(b)), numeric_rows(read_log(a)), 1e-5)
    assert read_metrics(b)["eval_loss"] == pytest.approx(read_metrics(a)["eval_loss"], abs=1e-5)


def test_grad_accum_matches_larger_batch(data, tmp_path):
    # 24 train images: every group of 2 micro-batches of 4 is exactly one batch of 8
    b8, b4x2 = accum_pair(data, tmp_path)
    assert_same_training(b8, b4x2)


def test_grad_accum_partial_last_group_matches_larger_batch(tmp_path):
    """A short last accumulation group weighs its samples like one batch of that size: with 21 train images,
    batch 8 ends on a batch of 5, and batch 4 x accum 2 ends on micro-batches of 4 and 1 that must give the
    same step."""
    data = write_dataset(tmp_path / "tiles", {"train": 7, "val": 3}, seed=2)
    b8, b4x2 = accum_pair(data, tmp_path)
    assert_same_training(b8, b4x2)


# 5. Budgets in steps and early stopping ------------------------------------------------------------------------


def test_budget_from_steps_epochs_and_the_default():
    by_steps = plan_budget(62, 32, 1, steps=500, default_steps=300, min_steps=200)
    assert (by_steps.steps, by_steps.eval_every, by_steps.warmup_steps) == (500, 25, 50)
    assert by_steps.min_steps == 250  # early stopping never fires in the first half
    # 62 images at batch 32: 30 epochs are 60 steps, raised to the floor
    floor = plan_budget(62, 32, 1, epochs=30, default_steps=300, min_steps=200)
    assert floor.steps == 200 and "raised to the floor of 200 steps" in floor.source
    big = plan_budget(100_000, 32, 1, epochs=2, default_steps=300, min_steps=200)
    assert big.steps == 2 * 3125  # a large task is not raised
    default = plan_budget(62, 32, 1, default_steps=300, min_steps=200)
    assert default.steps == 300 and "default" in default.source
    with pytest.raises(ConfigError, match="--steps or --epochs"):
        plan_budget(62, 32, 1, steps=5, epochs=5, default_steps=300, min_steps=200)


def test_early_stopping_waits_for_min_steps_and_keeps_the_best_step(data, tmp_path, monkeypatch):
    real = loop_mod.classification_metrics
    calls = {"n": 0}

    def worsening(labels, probs, names):
        m = real(labels, probs, names)
        calls["n"] += 1
        m["balanced_accuracy"] = 1.0 - 0.1 * calls["n"]  # the monitor gets worse at every evaluation
        return m

    monkeypatch.setattr(loop_mod, "classification_metrics", worsening)
    out = tmp_path / "run"
    cfg = tiny_cfg(data, out, method="linear-adamw", steps=12, eval_every=2, patience=1, head_lr=0.05, min_steps=0)
    m = train_run(cfg, progress=False)
    # evaluations at steps 0, 2, 4, 6: the smoothed score falls from step 2, but the first half (6 steps) runs
    assert calls["n"] == 4
    assert (m["steps_run"], m["selected_step"], m["stopped_early"]) == (6, 0, True)
    assert [int(r["step"]) for r in read_log(out)] == [0, 2, 4, 6]
    from safetensors.torch import load_file

    bundle = load_file(str(out / "bundle" / "prompts.safetensors"))
    ck = load_ckpt(out)
    best, last = ck["fit"]["best_state"]["model.head.weight"], ck["trainable"]["model.head.weight"]
    assert not torch.equal(best, last), "training did not change the head; the test proves nothing"
    assert torch.equal(bundle["head.weight"], best)


# 6. Start from the probe (LP-FT), keep prompts only where they help ------------------------------------------


@pytest.mark.parametrize("method", ["vpt-deep", "pathotune", "lora", "full"])
def test_step_0_reproduces_the_probe(data, tmp_path, method):
    """Every trained method is judged at step 0 with its head set to the fitted probe: the same validation
    predictions as the linear method, to float precision."""
    probe = tmp_path / "probe"
    train_run(tiny_cfg(data, probe, method="linear"), progress=False)
    out = tmp_path / method
    m = train_run(tiny_cfg(data, out, method=method, steps=2, eval_every=2), progress=False)
    assert m["recipe"]["head_init"] == "probe"
    assert m["probe"]["C"] == read_metrics(probe)["probe"]["C"]
    step0 = read_log(out)[0]
    assert int(step0["step"]) == 0 and step0["train_loss"] == ""
    probe_val = read_metrics(probe)["probe"]
    assert float(step0["val_loss"]) == pytest.approx(probe_val["val_loss"], abs=1e-6)
    assert float(step0["val_balanced_accuracy"]) == pytest.approx(probe_val["val_score"], abs=1e-9)


def test_prompt_groups_that_never_open_are_removed_from_the_bundle(data, tmp_path):
    """With the prompt learning rate at 0 the gates stay shut: every subset of groups scores the same on
    validation, so selection keeps none, and the bundle holds the probe head only."""
    from pathotune import load_bundle

    out = tmp_path / "run"
    cfg = tiny_cfg(data, out, method="pathotune", steps=2, lr=0.0, head_lr=0.0, selection="best")
    m = train_run(cfg, progress=False)
    assert m["prompt_groups"]["kept"] == [] and set(m["prompt_groups"]["dropped"]) == {"tvp", "ttp", "ivp"}
    assert len(m["prompt_groups"]["candidates"]) == 8
    assert m["kept_params"] < m["trainable_params"]
    # The default rule keeps step 0 (no gain beats the noise), so the groups go without scoring any subset.
    m2 = train_run(cfg.model_copy(update={"selection": "significant", "out": str(tmp_path / "r2")}), progress=False)
    assert m2["selected_step"] == 0 and m2["prompt_groups"]["kept"] == [] and m2["prompt_groups"]["candidates"] == []
    assert m2["balanced_accuracy"] == m["balanced_accuracy"]
    bundle = load_bundle(out / "bundle")
    assert bundle.groups == [] and bundle.switches.tvp_tokens == 0
    from safetensors.torch import load_file

    assert set(load_file(str(out / "bundle" / "prompts.safetensors"))) == {"head.weight", "head.bias"}


def test_selection_keeps_groups_that_help(data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(data, out, method="tvp+ttp", steps=6, eval_every=3, lr=0.05, selection="best")
    m = train_run(cfg, progress=False)
    cands = {tuple(c["kept"]): c for c in m["prompt_groups"]["candidates"]}
    best = cands[tuple(m["prompt_groups"]["kept"])]
    assert all((best["val_score"], -best["val_loss"]) >= (c["val_score"], -c["val_loss"]) for c in cands.values())


# 7. Head-only methods train on cached features ------------------------------------------------------------------


@pytest.mark.parametrize("method,cache", [("linear", True), ("linear-adamw", True), ("linear-adamw", False)])
def test_head_only_backbone_runs_once_per_image(data, tmp_path, monkeypatch, method, cache):
    seen = {"images": 0}
    real_create = run_mod.create_model

    def create_counting(*args, **kwargs):
        model = real_create(*args, **kwargs)
        model.backbone.vit.patch_embed.register_forward_hook(
            lambda _m, inputs, _o: seen.__setitem__("images", seen["images"] + inputs[0].shape[0])
        )
        return model

    monkeypatch.setattr(run_mod, "create_model", create_counting)
    cfg = tiny_cfg(data, tmp_path / "run", method=method, steps=6, eval_every=3, cache_features=cache)
    m = train_run(cfg, progress=False)
    n_train, n_val, n_test = (3 * SPLITS[s] for s in ("train", "val", "test"))
    assert m["recipe"]["cached_features"] is cache
    if cache:
        assert seen["images"] == n_train + n_val + n_test
    else:  # the control: without the cache the backbone runs at every step and evaluation
        assert seen["images"] == 6 * TINY_CONFIG["batch_size"] + 3 * n_val + n_test


# 8. Seeds --------------------------------------------------------------------------------------------------------


def test_seeds_aggregate_mean_and_std(tmp_path, monkeypatch, capsys):
    # noisy colours so that the seeds disagree and std is not trivially 0
    data = write_dataset(tmp_path / "tiles", {"train": 6, "val": 4, "test": 5}, seed=4, noise_sd=160.0)
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0)
    out = tmp_path / "run"
    args = ["train", "--data", data, "--method", "linear-adamw", "--config", cfg, "--steps", "4"]
    args += ["--seeds", "0", "1", "2", "--out", out, "--quiet", "--augment", "none", "--accelerator", "cpu"]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    summary = read_metrics(out)
    assert summary["seeds"] == [0, 1, 2]
    subs = [read_metrics(out / f"seed_{s}") for s in (0, 1, 2)]
    assert [s["seed"] for s in subs] == [0, 1, 2]
    assert (out / "report.md").is_file()
    varied = 0
    for k in SUMMARY_KEYS:
        values = np.array([s[k] for s in subs], dtype=np.float64)
        assert summary[k]["values"] == pytest.approx(values.tolist())
        assert summary[k]["mean"] == pytest.approx(values.mean(), abs=1e-12)
        assert summary[k]["std"] == pytest.approx(values.std(ddof=1), abs=1e-12)
        varied += summary[k]["std"] > 0
    assert varied, "all seeds scored the same; the std check is vacuous"
    assert [p["seed"] for p in summary["per_seed"]] == [0, 1, 2]


# 9. What a run folder holds ----------------------------------------------------------------------------------------

RUN_KEYS = {
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "auroc",
    "trainable_params",
    "total_params",
    "method",
    "backbone",
    "seed",
    "n_train",
    "n_test",
}


@pytest.mark.parametrize("with_test", [True, False])
def test_run_folder_contents(data, data_no_test, tmp_path, with_test):
    src = data if with_test else data_no_test
    out = tmp_path / "run"
    cfg = tiny_cfg(src, out, method="pathotune", steps=4, eval_every=2, bootstrap=50)
    m = train_run(cfg, progress=False)

    assert load_config(out / "config.yaml") == cfg
    saved = read_metrics(out)
    assert saved.keys() >= RUN_KEYS
    assert {k: saved[k] for k in RUN_KEYS} == {k: m[k] for k in RUN_KEYS}
    assert (saved["method"], saved["backbone"], saved["seed"]) == ("pathotune", cfg.backbone, 0)
    assert saved["n_train"] == count_images(src, "train")
    split = "test" if with_test else "val"
    assert saved["eval_split"] == split
    assert saved["n_test"] == count_images(src, split)
    preds = read_predictions(out / "predictions.csv")
    assert len(preds) == saved["n_test"]
    assert all(Path(r["path"]).parent.parent.name == split for r in preds)  # judged on that split's files
    assert 0 < saved["trainable_params"] < saved["total_params"]

    report = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert figures
    for f in figures:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "bundle" / "manifest.json").is_file()
    assert (out / "bundle" / "prompts.safetensors").is_file()
    assert load_ckpt(out)["fit"]["step"] == 4
    log = read_log(out)
    assert [int(r["step"]) for r in log] == [0, 2, 4] and saved["steps_run"] == 4
    assert saved["budget"]["steps"] == 4 and saved["selected_step"] in (0, 2, 4)
    assert "## Training" in report and f"selected step {saved['selected_step']}" in report

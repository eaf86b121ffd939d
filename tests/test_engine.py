"""The training engine end to end on tiny data: DDP equivalence, resume after SIGKILL, non-finite losses,
gradient accumulation, early stopping, feature caching, seed repeats and what a run folder holds."""

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

from pathotune.engine import loop as loop_mod
from pathotune.engine import run as run_mod
from pathotune.engine.config import TrainConfig, load_config
from pathotune.engine.loop import TrainingError
from pathotune.engine.run import SUMMARY_KEYS, train_run

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
    """The same 2-epoch pathotune run with 1 process and with 2 gloo processes, run side by side."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = write_config(root / "cfg.yaml")
    # --augment none: augmentation draws from each rank's own RNG, so augmented batches differ between
    # world sizes by design.
    common = ["train", "--data", data, "--method", "pathotune", "--config", cfg, "--epochs", "2", "--quiet",
              "--augment", "none", "--accelerator", "cpu"]
    one, two = root / "one", root / "two"
    procs = [
        subprocess.Popen(cli_cmd(*common, "--out", one, "--devices", "1"), env=cli_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen(cli_cmd(*common, "--out", two, "--devices", "2", "--strategy", "ddp"), env=cli_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
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
    # every global batch holds the same samples, so the training losses agree as well
    l1, l2 = read_log(one), read_log(two)
    assert len(l1) == len(l2) == 2
    for r1, r2 in zip(l1, l2, strict=True):
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


# 2. Resume after SIGKILL ------------------------------------------------------------------------------------


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


def test_resume_after_sigkill_matches_uninterrupted_run(data, tmp_path):
    # batch 2: 12 steps per epoch; 4 epochs; pathology augmentation, so the restored RNG states matter
    cfg = write_config(tmp_path / "cfg.yaml", batch_size=2, bootstrap=0)
    args = ["train", "--data", data, "--method", "pathotune", "--config", cfg, "--epochs", "4", "--quiet",
            "--augment", "pathology", "--accelerator", "cpu", "--seed", "3"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref_proc = subprocess.Popen(cli_cmd(*args, "--out", ref), env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(cli_cmd(*args, "--out", killed), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "last.pt"
    wait_for(ckpt, proc)  # epoch 1 is done (the checkpoint appears by an atomic rename)
    proc.send_signal(signal.SIGKILL)  # within milliseconds: epoch 2 is running
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # a kill leaves a loadable checkpoint
    assert 0 <= state["fit"]["epoch"] < 3

    resumed = subprocess.run(cli_cmd(*args, "--out", killed, "--resume"), env=cli_env(), capture_output=True,
                             text=True, timeout=240, check=False)
    assert resumed.returncode == 0, resumed.stderr
    _, ref_err = ref_proc.communicate(timeout=240)
    assert ref_proc.returncode == 0, ref_err

    m_ref, m_res = read_metrics(ref), read_metrics(killed)
    assert_metrics_close(m_res, m_ref, 1e-6)
    assert (m_res["epochs_run"], m_res["best_epoch"]) == (m_ref["epochs_run"], m_ref["best_epoch"])
    assert m_res["confusion_matrix"] == m_ref["confusion_matrix"]
    assert_rows_close(numeric_rows(read_log(killed)), numeric_rows(read_log(ref)), 1e-6)
    assert len(read_log(ref)) == 4
    preds_ref = numeric_rows(read_predictions(ref / "predictions.csv"), drop=("path", "label", "pred"))
    preds_res = numeric_rows(read_predictions(killed / "predictions.csv"), drop=("path", "label", "pred"))
    assert_rows_close(preds_res, preds_ref, 1e-6)


def test_resume_continues_the_shuffle_order(data, tmp_path, monkeypatch):
    """A resumed run draws epoch e's shuffle for epoch e, not the order of the first epoch it runs (a loader
    wrapper that counts its own iter() calls would restart at 0 in the resumed process)."""
    orders: list[list[int]] = []

    class RecordingSampler(loop_mod.DistributedSampler):
        def __iter__(self):
            order = list(super().__iter__())
            if self.shuffle:
                orders.append(order)
            return iter(order)

    real_save = loop_mod.save_checkpoint
    resume_dir = tmp_path / "resumed"

    def save_and_keep_epoch_1(path, state):
        real_save(path, state)
        if state["fit"]["epoch"] == 0:
            real_save(resume_dir / "checkpoints" / "last.pt", state)

    monkeypatch.setattr(loop_mod, "DistributedSampler", RecordingSampler)
    monkeypatch.setattr(loop_mod, "save_checkpoint", save_and_keep_epoch_1)
    train_run(tiny_cfg(data, tmp_path / "ref", method="linear", epochs=3), progress=False)
    ref_orders, ref_log = list(orders), read_log(tmp_path / "ref")
    assert len(ref_orders) == 3 and ref_orders[0] != ref_orders[1]
    orders.clear()
    monkeypatch.setattr(loop_mod, "save_checkpoint", real_save)
    train_run(tiny_cfg(data, resume_dir, method="linear", epochs=3, resume=True), progress=False)
    assert orders == ref_orders[1:], "the resumed epochs 2-3 did not draw the shuffles of epochs 2-3"
    assert_rows_close(numeric_rows(read_log(resume_dir)), numeric_rows(ref_log), 1e-6)


# 3. Non-finite losses ------------------------------------------------------------------------------------


def test_huge_lr_in_epoch_1_raises_training_error_saying_no_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss") as exc:
        train_run(tiny_cfg(data, out, method="pathotune", epochs=2, lr=1e30, head_lr=1e30), progress=False)
    assert "no epoch had finished, so there is no checkpoint yet" in str(exc.value)
    assert not (out / "checkpoints" / "last.pt").exists()
    assert "\n" not in str(exc.value)


def test_non_finite_parameters_after_last_step_of_epoch_raise_training_error(data, tmp_path):
    """When the update that blows the weights up is the last step of an epoch, the NaNs first appear in
    validation; that must stop the run with TrainingError too (linear probe at lr 1e10: the 3rd and last
    update of epoch 1 overflows)."""
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite"):
        train_run(tiny_cfg(data, out, method="linear", epochs=2, lr=1e10, head_lr=1e10), progress=False)


def test_non_finite_loss_in_epoch_2_keeps_loadable_checkpoint(data, tmp_path, monkeypatch):
    steps_per_epoch = 3 * SPLITS["train"] // TINY_CONFIG["batch_size"]
    calls = {"train": 0}
    real_forward = run_mod.HeadOnly.forward

    def forward(self, features):
        logits = real_forward(self, features)
        if self.training:
            calls["train"] += 1
            if calls["train"] > steps_per_epoch:  # the first training step of epoch 2
                return logits * float("nan")
        return logits

    monkeypatch.setattr(run_mod.HeadOnly, "forward", forward)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="non-finite loss") as exc:
        train_run(tiny_cfg(data, out, method="linear", epochs=3), progress=False)
    assert "epoch 2 step 1" in str(exc.value)
    assert str(out / "checkpoints" / "last.pt") in str(exc.value)
    ck = load_ckpt(out)
    assert ck["fit"]["epoch"] == 0 and len(ck["fit"]["history"]) == 1
    assert all(torch.isfinite(t).all() for t in ck["trainable"].values())


def test_cli_non_finite_loss_is_one_line_exit_2(data, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0)
    out = tmp_path / "run"
    code, _, err = run_main(
        monkeypatch, capsys, "train", "--data", data, "--method", "pathotune", "--config", cfg, "--epochs", "2",
        "--lr", "1e30", "--head-lr", "1e30", "--out", out, "--quiet", "--augment", "none", "--accelerator", "cpu",
    )
    assert code == 2
    line = one_line_error(err)
    assert "non-finite loss" in line
    assert "no checkpoint yet" in line


# 4. Gradient accumulation ------------------------------------------------------------------------------------


def accum_pair(data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """batch 8 x accum 1 against batch 4 x accum 2: same shuffled order (DistributedSampler seeds by seed and
    epoch only), so each update sees the same sample set, and ceil(len(loader) / accum) gives both the same
    number of scheduler steps."""
    runs = []
    for name, bs, accum in (("b8", 8, 1), ("b4x2", 4, 2)):
        out = tmp_path / name
        cfg = tiny_cfg(data, out, method="linear", epochs=3, head_lr=0.05, batch_size=bs, grad_accum=accum)
        train_run(cfg, progress=False)
        runs.append(out)
    return runs[0], runs[1]


def assert_same_training(a: Path, b: Path) -> None:
    ca, cb = load_ckpt(a), load_ckpt(b)  # last-epoch parameters, whatever epoch was best
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


# 5. Early stopping --------------------------------------------------------------------------------------------


def test_early_stopping_keeps_best_epoch(data, tmp_path, monkeypatch):
    real = loop_mod.classification_metrics
    calls = {"n": 0}

    def worsening(labels, probs, names):
        m = real(labels, probs, names)
        calls["n"] += 1
        m["balanced_accuracy"] = 1.0 - 0.1 * calls["n"]  # the monitor gets worse every epoch
        return m

    monkeypatch.setattr(loop_mod, "classification_metrics", worsening)
    out = tmp_path / "run"
    m = train_run(tiny_cfg(data, out, method="linear", epochs=6, patience=1, head_lr=0.05), progress=False)
    assert calls["n"] == 2
    assert (m["epochs_run"], m["best_epoch"]) == (2, 1)
    assert read_metrics(out)["epochs_run"] == 2
    assert len(read_log(out)) == 2
    from safetensors.torch import load_file

    bundle = load_file(str(out / "bundle" / "prompts.safetensors"))
    ck = load_ckpt(out)
    best, last = ck["fit"]["best_state"]["model.head.weight"], ck["trainable"]["model.head.weight"]
    assert not torch.equal(best, last), "epoch 2 did not change the head; the test proves nothing"
    assert torch.equal(bundle["head.weight"], best)
    assert torch.equal(bundle["head.bias"], ck["fit"]["best_state"]["model.head.bias"])


# 6. Head-only methods train on cached features ------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False])
def test_head_only_backbone_runs_once_per_image(data, tmp_path, monkeypatch, cache):
    seen = {"images": 0}
    real_create = run_mod.create_model

    def create_counting(*args, **kwargs):
        model = real_create(*args, **kwargs)
        model.backbone.vit.patch_embed.register_forward_hook(
            lambda _m, inputs, _o: seen.__setitem__("images", seen["images"] + inputs[0].shape[0])
        )
        return model

    monkeypatch.setattr(run_mod, "create_model", create_counting)
    epochs = 3
    m = train_run(tiny_cfg(data, tmp_path / "run", method="linear", epochs=epochs, cache_features=cache),
                  progress=False)
    n_train, n_val, n_test = (3 * SPLITS[s] for s in ("train", "val", "test"))
    assert m["recipe"]["cached_features"] is cache
    if cache:
        assert seen["images"] == n_train + n_val + n_test
    else:  # the control: without the cache the backbone runs every epoch
        assert seen["images"] == epochs * (n_train + n_val) + n_test


# 7. Seeds --------------------------------------------------------------------------------------------------------


def test_seeds_aggregate_mean_and_std(tmp_path, monkeypatch, capsys):
    # noisy colours so that the seeds disagree and std is not trivially 0
    data = write_dataset(tmp_path / "tiles", {"train": 6, "val": 4, "test": 5}, seed=4, noise_sd=160.0)
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0)
    out = tmp_path / "run"
    code, _, err = run_main(
        monkeypatch, capsys, "train", "--data", data, "--method", "linear", "--config", cfg, "--epochs", "2",
        "--seeds", "0", "1", "2", "--out", out, "--quiet", "--augment", "none", "--accelerator", "cpu",
    )
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


# 8. What a run folder holds ----------------------------------------------------------------------------------------

RUN_KEYS = {"accuracy", "balanced_accuracy", "macro_f1", "auroc", "trainable_params", "total_params", "method",
            "backbone", "seed", "n_train", "n_test"}


@pytest.mark.parametrize("with_test", [True, False])
def test_run_folder_contents(data, data_no_test, tmp_path, with_test):
    src = data if with_test else data_no_test
    out = tmp_path / "run"
    cfg = tiny_cfg(src, out, method="pathotune", epochs=2, bootstrap=50)
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
    assert load_ckpt(out)["fit"]["epoch"] == 1
    log = read_log(out)
    assert [int(r["epoch"]) for r in log] == [1, 2] and saved["epochs_run"] == 2

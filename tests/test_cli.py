"""The `pathotune` command line: one-line errors with exit code 2, listings, eval/predict/info on a run.

Most commands run in-process through the real entry point (``main()`` with a patched ``sys.argv``, so the
``run_cli`` error wrapper is exercised); the exit-code/traceback contract is also checked in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_CONFIG,
    cli_cmd,
    cli_env,
    count_images,
    one_line_error,
    read_log,
    read_metrics,
    read_predictions,
    run_main,
    write_config,
    write_dataset,
)

from pathotune.engine.config import TrainConfig
from pathotune.engine.run import train_run
from pathotune.methods import list_methods
from pathotune.records import MARKER

EVAL_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "auroc")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("cli_data") / "tiles", {"train": 8, "val": 3, "test": 4})


@pytest.fixture(scope="module")
def trained_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli_run") / "run"
    cfg = TrainConfig(
        **{
            **TINY_CONFIG,
            "data": str(data),
            "out": str(out),
            "method": "pathotune",
            "steps": 4,
            "augment": "none",
            "accelerator": "cpu",
            "bootstrap": 0,
        }
    )
    train_run(cfg, progress=False)
    return out


def table_rows(text: str) -> list[list[str]]:
    """Body cells of the rich tables printed to ``text``."""
    return [
        [c.strip() for c in line.strip().strip("│").split("│")]
        for line in text.splitlines()
        if line.strip().startswith("│")
    ]


def train_args(data: Path | str, cfg: Path, out: Path, *extra: str) -> list:
    """Train arguments for a 2-step run, unless ``extra`` passes its own --steps or --epochs."""
    epochs = [] if {"--epochs", "--steps"} & set(extra) else ["--steps", "2"]
    return [
        "train",
        "--data",
        data,
        "--config",
        cfg,
        "--out",
        out,
        *epochs,
        "--quiet",
        "--augment",
        "none",
        "--accelerator",
        "cpu",
        *extra,
    ]


# Config errors ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unknown_key_runs(data, tmp_path_factory) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The same bad config without and with --debug, as real processes (run side by side)."""
    root = tmp_path_factory.mktemp("bad_key")
    cfg = write_config(root / "cfg.yaml", colour="red")
    procs = [
        subprocess.Popen(
            cli_cmd(*prefix, *train_args(data, cfg, root / "run")),
            env=cli_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for prefix in ((), ("--debug",))
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results[0], results[1]


def test_unknown_yaml_key_is_one_line_exit_2(unknown_key_runs):
    plain, _ = unknown_key_runs
    assert plain.returncode == 2, plain.stderr
    line = one_line_error(plain.stderr)
    assert "unknown key 'colour'" in line
    assert "allowed keys are" in line
    for key in ("steps", "batch_size", "backbone_kwargs", "augment"):
        assert f"'{key}'" in line
    assert "Traceback" not in plain.stdout


def test_debug_shows_traceback(unknown_key_runs):
    _, debug = unknown_key_runs
    assert debug.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError" in debug.stderr and "unknown key 'colour'" in debug.stderr


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"epochs": "abc"}, "key 'epochs'"),
        (
            {"task": {"colour": "pink"}},
            "unknown key 'task.colour'; allowed keys are ['class_descriptions', 'control', 'description', 'name'",
        ),
        ({"batch_size": 0}, "key 'batch_size'"),
        ({"switches": {"no_such_switch": 1}}, "no_such_switch"),
    ],
)
def test_bad_config_values_name_the_key(data, tmp_path, monkeypatch, capsys, overrides, expected):
    cfg = write_config(tmp_path / "cfg.yaml", **{"steps": 2, **overrides})
    args = ["train", "--data", data, "--config", cfg, "--out", tmp_path / "run", "--quiet", "--accelerator", "cpu"]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    line = one_line_error(err)
    assert expected in line
    assert str(cfg) in line  # the file at fault


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--data", "/no/such/tiles"], "data path /no/such/tiles does not exist"),
        (["--backbone", "not_a_backbone"], "unknown backbone 'not_a_backbone'"),
        (["--method", "no-such-method"], "unknown method 'no-such-method'"),
        (["--augment", "sideways"], "Invalid value for '--augment': 'sideways' is not one of 'pathology', 'none'"),
    ],
)
def test_bad_flags_are_one_line_exit_2(data, tmp_path, monkeypatch, capsys, flags, expected):
    cfg = write_config(tmp_path / "cfg.yaml")
    code, _, err = run_main(monkeypatch, capsys, *train_args(data, cfg, tmp_path / "run"), *flags)
    assert code == 2
    assert expected in one_line_error(err)
    assert not (tmp_path / "run" / "metrics.json").exists()


# Unreadable images ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corrupt_data(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corrupt") / "tiles"
    shutil.copytree(data, root)
    (root / "train" / "red" / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    good = (root / "train" / "green" / "train_green_0.png").read_bytes()
    (root / "train" / "green" / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def test_corrupt_images_fail_with_a_count(corrupt_data, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0)
    code, _, err = run_main(monkeypatch, capsys, *train_args(corrupt_data, cfg, tmp_path / "run", "--method", "linear"))
    assert code == 2
    line = one_line_error(err)
    total = sum(count_images(corrupt_data, s) for s in ("train", "val", "test"))
    assert f"2 of {total} images bad" in line
    assert "--skip-bad" in line and "skip_bad" not in line


def test_skip_bad_trains_without_them(corrupt_data, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0)
    out = tmp_path / "run"
    code, stdout, err = run_main(
        monkeypatch, capsys, *train_args(corrupt_data, cfg, out, "--method", "linear", "--skip-bad")
    )
    assert code == 0, err
    m = read_metrics(out)
    assert m["skipped_files"] == 2
    assert m["n_train"] == count_images(corrupt_data, "train") - 2
    assert "skipped 2 unreadable file(s)" in stdout


# Listings and info ----------------------------------------------------------------------------------------------


def test_backbones_lists_registered_ids(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "backbones")
    assert code == 0
    ids = {row[0] for row in table_rows(out)}
    assert {"dinov2_vits14", "uni"} <= ids


def test_methods_lists_all_methods(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "methods")
    assert code == 0
    names = [row[0] for row in table_rows(out)]
    assert sorted(names) == sorted(list_methods())
    assert len(names) == 14


def test_info_shows_method_and_classes(trained_run, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "info", trained_run)
    assert code == 0
    fields = {row[0]: row[1] for row in table_rows(out) if len(row) >= 2}
    assert fields["method"] == "pathotune"
    assert fields["classes"] == "blue, green, red"


# eval and predict on a trained run ---------------------------------------------------------------------------------


def test_eval_reproduces_the_runs_metrics(trained_run, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    code, stdout, err = run_main(monkeypatch, capsys, "eval", trained_run, "--data", data, "--out", out)
    assert code == 0, err
    run_m, ev = read_metrics(trained_run), json.loads((out / "metrics.json").read_text())
    assert (ev["split"], ev["n"]) == ("test", run_m["n_test"])
    printed = {row[0]: row[1] for row in table_rows(stdout)}
    for k in EVAL_KEYS:
        assert ev[k] == pytest.approx(run_m[k], abs=1e-6), k
        assert printed[k] == f"{run_m[k]:.4f}", k
    assert ev["confusion_matrix"] == run_m["confusion_matrix"]


def test_predict_writes_probabilities_matching_the_run(trained_run, data, tmp_path, monkeypatch, capsys):
    csv_path = tmp_path / "preds.csv"
    code, _, err = run_main(monkeypatch, capsys, "predict", trained_run, data / "test", "--out", csv_path)
    assert code == 0, err
    rows = read_predictions(csv_path)
    assert len(rows) == count_images(data, "test")
    run_preds = {Path(r["path"]).resolve(): r["pred"] for r in read_predictions(trained_run / "predictions.csv")}
    assert {Path(r["path"]).resolve() for r in rows} == set(run_preds)
    for r in rows:
        probs = {k.removeprefix("prob_"): float(v) for k, v in r.items() if k.startswith("prob_")}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert r["pred"] == max(probs, key=probs.__getitem__)
        assert r["pred"] == run_preds[Path(r["path"]).resolve()]


# A second run into the same folder ---------------------------------------------------------------------------------


def test_second_train_into_a_finished_run_is_refused(data, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0)
    out = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, *train_args(data, cfg, out, "--method", "linear", "--steps", "2"))
    assert code == 0, err
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = train_args(data, cfg, out, "--method", "linear-adamw", "--steps", "2")
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    line = one_line_error(err)
    assert f"{out} holds a finished run" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_second_train_with_overwrite_replaces_the_run(data, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0)
    out = tmp_path / "run"
    code, _, err = run_main(monkeypatch, capsys, *train_args(data, cfg, out, "--method", "pathotune", "--steps", "2"))
    assert code == 0, err
    (out / "notes.txt").write_text("mine")  # not a run output: it stays
    args = train_args(data, cfg, out, "--method", "linear-adamw", "--steps", "2", "--overwrite")
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert read_metrics(out)["method"] == "linear-adamw"
    assert json.loads((out / "bundle" / "manifest.json").read_text())["method"] == "linear-adamw"
    assert "method: linear-adamw" in (out / "config.yaml").read_text()
    assert len(read_log(out)) == 3  # steps 0, 1 and 2
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert all(k.startswith("model.head.") for k in ck["trainable"]), sorted(ck["trainable"])
    assert ck["config"]["method"] == "linear-adamw"
    assert (out / "notes.txt").read_text() == "mine"
    left = [p.name for p in out.rglob("*") if p.name.startswith(".") and p.name != MARKER]
    assert not left, f"temporary files left behind: {left}"

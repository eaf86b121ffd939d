"""Experiment loggers through Fabric's ``loggers=``: CSV and TensorBoard built in, chosen by ``--logger`` or the
``logger:`` key; MLflow and W&B only when installed, with one line saying what to install otherwise."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
from helpers import one_line_error, read_log, run_main, write_config, write_dataset

from pathotune.core.runtime import parse_loggers
from pathotune.engine.config import load_config
from pathotune.engine.runfolder import HARMLESS_ON_RESUME
from pathotune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("logger_data") / "tiles", {"train": 4, "val": 2, "test": 2})


def train(monkeypatch, capsys, data: Path, cfg: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    args = ["train", "--data", data, "--config", cfg, "--out", out, "--quiet", "--accelerator", "cpu", *extra]
    return run_main(monkeypatch, capsys, *args)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tensorboard_and_csv_loggers_write_beside_log_csv(data, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0, augment="none")
    out = tmp_path / "run"
    extra = ("--method", "linear-adamw", "--steps", "2", "--eval-every", "1")
    code, _, err = train(monkeypatch, capsys, data, cfg, out, *extra, "--logger", "csv,tensorboard")
    assert code == 0, err
    assert [int(r["step"]) for r in read_log(out)] == [0, 1, 2]  # the run's own log, as before
    events = list((out / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    blob = events[0].read_bytes()
    assert b"val_loss" in blob and b"test_balanced_accuracy" in blob  # the curves and the final judgement
    rows = csv_rows(out / "logs" / "csv" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [0, 1, 2]
    assert [r["test_accuracy"] for r in rows if r["test_accuracy"]]
    assert "logger:\n- csv\n- tensorboard\n" in (out / "config.yaml").read_text()


def test_yaml_logger_key_and_repeated_flags(data, tmp_path, monkeypatch, capsys):
    assert load_config(None, data="x", logger=["csv", "tensorboard,csv"]).logger == ["csv", "tensorboard"]
    assert load_config(None, data="x", logger="none").logger == []
    assert load_config(None, data="x").logger == ["csv"]  # the default
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0, logger="tensorboard")
    out = tmp_path / "run"
    code, _, err = train(monkeypatch, capsys, data, cfg, out, "--method", "linear")
    assert code == 0, err
    assert list((out / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert not (out / "logs" / "csv").exists()  # the YAML chose TensorBoard alone
    assert (out / "log.csv").is_file()


def test_seeds_log_under_their_own_names(data, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0)
    out = tmp_path / "run"
    code, _, err = train(monkeypatch, capsys, data, cfg, out, "--method", "linear", "--seeds", "0", "--seeds", "1")
    assert code == 0, err
    rows = csv_rows(out / "logs" / "csv" / "version_0" / "metrics.csv")
    assert {"seed_0/test_accuracy", "seed_1/test_accuracy"} <= set(rows[0])


def test_unknown_logger_names_the_key(data, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "cfg.yaml")
    code, _, err = train(monkeypatch, capsys, data, cfg, tmp_path / "run", "--logger", "csv,neptune")
    assert code == 2
    line = one_line_error(err)
    assert "key 'logger'" in line and "unknown logger 'neptune'" in line
    with pytest.raises(ValueError, match="choose from csv, tensorboard, mlflow, wandb"):
        parse_loggers("tensorbored")


@pytest.mark.parametrize(
    ("name", "modules", "install"),
    [
        ("mlflow", ("mlflow", "pytorch_lightning"), "pip install mlflow pytorch-lightning"),
        ("wandb", ("wandb",), "pip install wandb"),
    ],
)
def test_missing_optional_logger_is_one_line_before_any_work(
    data, tmp_path, monkeypatch, capsys, name, modules, install
):
    if all(importlib.util.find_spec(m) is not None for m in modules):
        pytest.skip(f"{name} is installed here")
    cfg = write_config(tmp_path / "cfg.yaml")
    out = tmp_path / "run"
    code, _, err = train(monkeypatch, capsys, data, cfg, out, "--logger", name)
    assert code == 2
    assert install in one_line_error(err)
    assert not out.exists() or not any(out.iterdir())  # nothing was trained or written


def test_logger_setting_is_harmless_on_resume():
    assert "logger" in HARMLESS_ON_RESUME
    with pytest.raises(ConfigError, match="key 'logger'"):
        load_config(None, data="x", logger=3)

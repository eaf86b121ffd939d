"""What the command line prints for logs and scripts: progress as plain lines off a terminal (or none), --json on
stdout, --version, tables that never cut a name, rounded numbers, one trainable percentage, every bad file named;
and ``eval``/``predict`` on the engine's Fabric runtime with --devices, --accelerator, --num-workers,
--batch-size and --precision."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    cli_cmd,
    cli_env,
    count_images,
    one_line_error,
    read_metrics,
    read_predictions,
    run_cli_subprocess,
    run_main,
    write_config,
    write_dataset,
)
from rich.console import Console

from pathotune.backbones import list_backbones
from pathotune.cli import common
from pathotune.records import MARKER
from pathotune.report import format_percent, progress_bar, trainable_percent
from pathotune.report.progress import PlainLines
from pathotune.version import __version__

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("output_data") / "tiles", {"train": 4, "val": 2, "test": 3})


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[Path, dict, str, str]:
    """`pathotune train --json` as a real process with piped stderr: (run folder, its JSON, stdout, stderr)."""
    root = tmp_path_factory.mktemp("output_run")
    cfg = write_config(root / "cfg.yaml", bootstrap=0, augment="none")
    out = root / "run"
    args = ["train", "--data", data, "--config", cfg, "--out", out, "--method", "pathotune", "--steps", "2"]
    proc = run_cli_subprocess(*args, "--accelerator", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout), proc.stdout, proc.stderr


# --json, --version ---------------------------------------------------------------------------------------------


def test_train_json_is_the_only_thing_on_stdout(trained):
    out, result, _, stderr = trained
    assert result == {**read_metrics(out), "out": str(out)}
    assert "run written to" in stderr and "trainable params" in stderr  # the human lines moved to stderr
    assert "\r" not in stderr  # no progress redraws in a piped log


def test_version(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "--version")
    assert (code, out, err) == (0, f"pathotune {__version__}\n", "")


def test_info_json_and_rounded_metrics(trained, monkeypatch, capsys):
    out = trained[0]
    extra = json.loads((out / "bundle" / "manifest.json").read_text())["extra"]
    stored, run = extra["metrics"], read_metrics(out)
    assert extra["evaluation"] == {k: run[v] for k, v in (("split", "eval_split"), ("n", "n_samples"))} | {
        k: run[k] for k in ("ci_unit", "ci_units") if run.get(k) is not None
    }
    assert extra["intervals"] == {k: v for k, v in (run.get("ci") or {}).items() if k in stored and None not in v}
    assert extra["training"]["method"] == "pathotune" and extra["training"]["lr"] == run["recipe"]["lr"]
    assert f"n = {run['n_samples']} images" in (out / "bundle" / "README.md").read_text()
    code, stdout, err = run_main(monkeypatch, capsys, "info", out, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["method"] == "pathotune" and info["classes"] == ["blue", "green", "red"]
    assert info["metrics"] == stored  # raw in JSON
    code, stdout, _ = run_main(monkeypatch, capsys, "info", out)
    assert code == 0
    line = next(ln for ln in stdout.splitlines() if "│ metrics" in ln)
    for k, v in stored.items():
        assert f"{k} {v:.4f}" in line  # rounded as every table rounds
    assert "{" not in line


# Progress ------------------------------------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_off_a_terminal_is_plain_lines():
    stream = io.StringIO()
    with progress_bar(5, "work", file=stream, interval=0.0) as bar:
        for _ in range(5):
            bar.update(1)
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(ln.startswith("work:") for ln in lines)
    quick = io.StringIO()
    with progress_bar(5, "work", file=quick) as bar:  # finished within the interval: nothing at all
        bar.update(5)
    assert quick.getvalue() == ""


def test_progress_on_a_terminal_redraws_in_place():
    stream = FakeTTY()
    with progress_bar(3, "work", file=stream) as bar:
        bar.update(3)
    assert "\r" in stream.getvalue()


@pytest.mark.parametrize(("value", "disabled"), [("1", True), ("true", True), ("0", False), ("", False)])
def test_tqdm_disable_turns_bars_off(monkeypatch, value, disabled):
    monkeypatch.setenv("TQDM_DISABLE", value)
    stream = FakeTTY()
    with progress_bar(3, "work", file=stream) as bar:
        off = bar.disable  # (tqdm sets it on close)
        bar.update(3)
    assert off is disabled
    assert (stream.getvalue() == "") is disabled


def test_plain_lines_drop_blank_frames():
    stream = io.StringIO()
    lines = PlainLines(stream, interval=0.0)
    lines.write("\r   \r")
    lines.write("\rwork: 50%")
    assert stream.getvalue() == "work: 50%\n"


# Tables --------------------------------------------------------------------------------------------------------


def test_tables_keep_whole_names_when_piped(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(common, "console", Console(file=stream, width=40))  # not a terminal, 40 columns
    name = "vit_base_patch16_224.augreg2_in21k_ft_in1k_with_a_long_tail"
    common.print_table([{"id": name, "weights": "/some/long/folder/of/weights.safetensors"}])
    assert name in stream.getvalue()
    assert "…" not in stream.getvalue()


def test_backbones_listing_piped_at_80_columns(tmp_path):
    env = {**cli_env(), "COLUMNS": "80"}
    proc = subprocess.run(cli_cmd("backbones"), capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    for name in list_backbones():
        assert f"│ {name} " in proc.stdout


# One trainable percentage ---------------------------------------------------------------------------------------


def test_trainable_percent_is_one_number_everywhere(trained):
    out, result, _, stderr = trained
    m = read_metrics(out)
    percent = trainable_percent(m["trainable_params"], m["total_params"])
    assert m["trainable_percent"] == pytest.approx(percent)
    assert percent == pytest.approx(100.0 * m["trainable_params"] / m["total_params"])  # backbone included
    shown = format_percent(percent)
    assert shown == f"{percent:.2f} %"
    assert f"| {shown} |" in (out / "report.md").read_text()
    assert f"({shown})" in stderr  # the console line of `train --json` (on stderr)


# eval and predict on the Fabric runtime ----------------------------------------------------------------------------


def eval_json(monkeypatch, capsys, run: Path, data: Path, *extra: str) -> dict:
    code, stdout, err = run_main(monkeypatch, capsys, "eval", run, "--data", data, "--json", "--quiet", *extra)
    assert code == 0, err
    return json.loads(stdout)


def test_eval_options_are_honoured(trained, data, monkeypatch, capsys):
    run = trained[0]
    default = eval_json(monkeypatch, capsys, run, data, "--accelerator", "cpu")
    assert (default["batch_size"], default["num_workers"], default["precision"]) == (32, 0, "32-true")
    assert (default["accelerator"], default["devices"]) == ("cpu", 1)
    other = eval_json(
        monkeypatch,
        capsys,
        run,
        data,
        "--batch-size",
        "2",
        "--num-workers",
        "1",
        "--accelerator",
        "cpu",
        "--devices",
        "1",
    )
    assert (other["batch_size"], other["num_workers"]) == (2, 1)
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        assert other[k] == pytest.approx(default[k], abs=1e-6), k
    assert other["confusion_matrix"] == default["confusion_matrix"]
    bf16 = eval_json(monkeypatch, capsys, run, data, "--precision", "bf16-mixed", "--accelerator", "cpu")
    assert bf16["precision"] == "bf16-mixed" and bf16["n"] == default["n"]


def test_eval_rejects_an_unknown_precision(trained, data, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "eval", trained[0], "--data", data, "--precision", "8-bit")
    assert code == 2
    assert "--precision '8-bit'" in one_line_error(err)


def probs_of(path: Path) -> dict[str, np.ndarray]:
    return {
        Path(r["path"]).name: np.array([float(v) for k, v in r.items() if "prob_" in k]) for r in read_predictions(path)
    }


def test_predict_options_are_honoured(trained, data, tmp_path, monkeypatch, capsys):
    run = trained[0]
    ref, small = tmp_path / "ref.csv", tmp_path / "small.csv"
    code, _, err = run_main(monkeypatch, capsys, "predict", run, data / "test", "--out", ref, "--quiet")
    assert code == 0, err
    args = ["predict", run, data / "test", "--out", small, "--batch-size", "2", "--num-workers", "1"]
    code, stdout, err = run_main(monkeypatch, capsys, *args, "--accelerator", "cpu", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert (result["batch_size"], result["num_workers"], result["precision"]) == (2, 1, "32-true")
    assert len(result["predictions"]) == count_images(data, "test")
    a, b = probs_of(ref), probs_of(small)
    assert a.keys() == b.keys()
    for name in a:
        assert np.allclose(a[name], b[name], atol=2e-6), name
    for row in result["predictions"]:
        (task,) = row["tasks"].values()
        assert np.allclose(list(task["probs"].values()), a[Path(row["path"]).name], atol=2e-6)


def test_multi_bundle_predict_takes_the_options(trained, data, tmp_path, monkeypatch, capsys):
    run = trained[0]
    twin = tmp_path / "twin"
    shutil.copytree(run / "bundle", twin)
    out = tmp_path / "two.csv"
    args = ["predict", data / "test", "--bundle", run, "--bundle", twin, "--out", out, "--batch-size", "4"]
    code, stdout, err = run_main(monkeypatch, capsys, *args, "--precision", "32-true", "--accelerator", "cpu", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["batch_size"] == 4
    for row in result["predictions"]:
        first, second = row["tasks"].values()
        assert first["pred"] == second["pred"]
        assert first["probs"] == pytest.approx(second["probs"], abs=1e-6)


def test_predict_on_two_cpu_processes_matches_one(trained, data, tmp_path):
    """Fabric launches a second process; each predicts its share and rank 0 writes all rows, in order."""
    run = trained[0]
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    for out, devices in ((one, "1"), (two, "2")):
        args = ["predict", run, data / "test", "--out", out, "--accelerator", "cpu", "--devices", devices]
        proc = run_cli_subprocess(*args, "--batch-size", "2", timeout=300)
        assert proc.returncode == 0, proc.stderr
    rows_one, rows_two = read_predictions(one), read_predictions(two)
    assert [r["path"] for r in rows_one] == [r["path"] for r in rows_two]
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert r1["pred"] == r2["pred"]
        for k in r1:
            if k.startswith("prob_"):
                assert float(r1[k]) == pytest.approx(float(r2[k]), abs=2e-6)


# Bad files -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def five_bad(data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("five_bad") / "tiles"
    shutil.copytree(data, root)
    for i in range(5):
        (root / "train" / "red" / f"bad_{i}.png").write_bytes(b"not an image" * (i + 1))
    return root


def test_every_bad_file_is_named(five_bad, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", bootstrap=0)
    out = tmp_path / "run"
    args = ["train", "--data", five_bad, "--config", cfg, "--out", out, "--method", "linear", "--quiet"]
    code, _, err = run_main(monkeypatch, capsys, *args, "--accelerator", "cpu")
    assert code == 2
    line = one_line_error(err)
    for i in range(3):
        assert f"bad_{i}.png" in line
    assert "bad_3.png" not in line and "and 2 more" in line
    assert f"all listed in {out / 'bad_files.csv'}" in line
    assert "--skip-bad" in line and "skip_bad" not in line
    listed = read_predictions(out / "bad_files.csv")
    assert [Path(r["path"]).name for r in listed] == [f"bad_{i}.png" for i in range(5)]
    assert {r["problem"] for r in listed} == {"unreadable"}
    assert not (out / "metrics.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != MARKER], "temporary files left behind"

    code, stdout, err = run_main(monkeypatch, capsys, *args, "--accelerator", "cpu", "--skip-bad", "--overwrite")
    assert code == 0, err
    assert read_metrics(out)["skipped_files"] == 5
    assert f"listed in {out / 'bad_files.csv'}" in stdout
    assert len(read_predictions(out / "bad_files.csv")) == 5

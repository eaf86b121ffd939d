"""Every output folder is a record under one rule (pathotune.records): a replacement is staged and swapped in
under a journal, a swap killed half-way is rolled back whole, generations never mix, Ctrl-C says what was kept,
and undefined metrics are reported, not crashed on."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fault_kit import Base, base_train_args
from helpers import cli_cmd, cli_env, run_main, toy_slide, write_image

from pathotune.records import JOURNAL, KINDS, MARKER, STAGING, TRASH, read_marker, recover, swap_in, write_marker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def on_data(args: list, data: Path) -> list:
    """The base training command on another data folder."""
    return [data if a is not None and i and args[i - 1] == "--data" else a for i, a in enumerate(args)]


def record(folder: Path, names: dict[str, str], kind: str = "mil") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in names.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    write_marker(folder, kind)
    return folder


def test_a_swap_replaces_every_owned_entry_and_keeps_the_users_files(tmp_path: Path) -> None:
    out = record(tmp_path / "run", {"metrics.json": "old", "fold_0/model.json": "old", "fold_3/model.json": "old"})
    (out / "notes.txt").write_text("mine")
    staging = record(out / STAGING, {"metrics.json": "new", "fold_0/model.json": "new"})
    swap_in(out, staging, KINDS["mil"])
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "fold_0", "metrics.json", "notes.txt"]  # no fold_3
    assert (out / "metrics.json").read_text() == "new" and (out / "notes.txt").read_text() == "mine"


def test_a_swap_killed_half_way_is_rolled_back_whole(tmp_path: Path) -> None:
    """A real process is killed (SIGKILL, no clean-up) after moving two entries; the next opening restores."""
    out = record(tmp_path / "run", {"metrics.json": "old", "report.md": "old", "fold_0/model.json": "old"})
    record(out / STAGING, {"metrics.json": "new", "report.md": "new", "fold_0/model.json": "new"})
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and STAGING not in p.parts}
    script = f"""
import os
from pathlib import Path
import pathotune.records as r
moves = []
real = r._move
def dying(src, dst):
    real(src, dst)
    moves.append(src)
    if len(moves) == 4:
        os.kill(os.getpid(), 9)
r._move = dying
r.swap_in(Path({str(out)!r}), Path({str(out / STAGING)!r}), r.KINDS["mil"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert (out / JOURNAL).exists() and (out / TRASH).exists()
    assert "restored whole" in (recover(out) or "")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not any((out / n).exists() for n in (JOURNAL, TRASH, STAGING))


def test_mil_rerun_with_fewer_folds_replaces_the_run_whole(tmp_path: Path, monkeypatch, capsys) -> None:
    rng = np.random.default_rng(0)
    feats = tmp_path / "toy"
    lines = ["slide_id,label"]
    for i in range(12):
        toy_slide(feats / f"t{i:02d}.h5", (rng.normal(size=(5, 8)) + i % 2).astype(np.float32))
        lines.append(f"t{i:02d},{'b' if i % 2 else 'a'}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    common = ["slides", "train", "--features", feats, "--labels", tmp_path / "labels.csv", "--epochs", "1"]
    common += ["--out", tmp_path / "mil", "--quiet"]
    code, _, err = run_main(monkeypatch, capsys, *common, "--folds", "4")
    assert code == 0, err
    code, _, err = run_main(monkeypatch, capsys, *common, "--folds", "2")
    assert code == 2 and "already holds a slide-level MIL run" in err
    code, out, err = run_main(monkeypatch, capsys, *common, "--folds", "2", "--overwrite", "--json")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "mil").glob("fold_*")) == ["fold_0", "fold_1"]
    assert json.loads(out)["n_folds"] == 2 and read_marker(tmp_path / "mil")["kind"] == "mil"
    assert (tmp_path / "mil" / "logs" / "csv").is_dir()  # --logger csv is the default


def test_a_fold_with_one_class_reports_auroc_undefined(tmp_path: Path, monkeypatch, capsys) -> None:
    rng = np.random.default_rng(1)
    feats = tmp_path / "toy"
    rows = ["slide_id,label,split"]
    for i in range(8):
        toy_slide(feats / f"t{i}.h5", rng.normal(size=(4, 8)).astype(np.float32))
        split = "test" if i in (0, 2) else ("val" if i in (4, 5) else "train")
        rows.append(f"t{i},{'b' if i % 2 else 'a'},{split}")  # the test split holds class a only
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    args = ["slides", "train", "--features", feats, "--labels", tmp_path / "labels.csv", "--epochs", "1"]
    code, out, err = run_main(monkeypatch, capsys, *args, "--out", tmp_path / "mil", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["auroc"]["mean"] is None and metrics["per_fold"][0]["auroc"] is None
    assert "AUROC undefined: only class ['a'] present" in metrics["undefined"]["auroc"][0]
    assert "auroc undefined in 1 fold(s)" in err
    assert "Undefined metrics" in (tmp_path / "mil" / "report.md").read_text()


def test_a_failed_overwrite_keeps_the_old_runs_bad_files_listing(base: Base, tmp_path: Path, monkeypatch, capsys):
    import shutil

    data = Path(shutil.copytree(base.tiles, tmp_path / "tiles"))
    (data / "train" / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "run"
    code, _, err = run_main(
        monkeypatch, capsys, *on_data(base_train_args(base, out, "--skip-bad", "--method", "linear"), data)
    )
    assert code == 0, err
    listing = (out / "bad_files.csv").read_bytes()
    assert b"broken.png" in listing
    code, _, err = run_main(
        monkeypatch, capsys, *on_data(base_train_args(base, out, "--overwrite", "--method", "linear"), data)
    )
    assert code == 2 and "pathotune-bad_files-" in err  # without --skip-bad the scan stops; its list is elsewhere
    assert (out / "bad_files.csv").read_bytes() == listing


def test_bad_files_listing_is_the_same_in_every_run(base: Base, tmp_path: Path, monkeypatch, capsys) -> None:
    import shutil

    data = Path(shutil.copytree(base.tiles, tmp_path / "tiles"))
    (data / "train" / "red" / "junk.png").write_bytes(b"not an image at all")
    write_image(data / "train" / "red" / "cut.png", (200, 40, 40), np.random.default_rng(0))
    raw = (data / "train" / "red" / "cut.png").read_bytes()
    (data / "train" / "red" / "cut.png").write_bytes(raw[: len(raw) // 2])
    listings = []
    for name in ("a", "b"):
        args = on_data(base_train_args(base, tmp_path / name, "--skip-bad", "--method", "linear"), data)
        code, _, err = run_main(monkeypatch, capsys, *args)
        assert code == 0, err
        listings.append((tmp_path / name / "bad_files.csv").read_text())
    assert listings[0] == listings[1] and " at 0x" not in listings[0]


def test_ctrl_c_says_what_was_kept_and_how_to_resume(base: Base, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = base_train_args(base, out, "--steps", "100000", "--method", "vpt-deep")
    # faulthandler prints every thread's stack on SIGABRT: if the run ever hangs, the failure shows where.
    # The run gets Ctrl-C's default disposition, as at a terminal: a shell starting the tests in the background
    # (`make test &`, nohup) hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt.
    env = {**cli_env(), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        cli_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT if (out / "checkpoints" / "last.pt").exists() else signal.SIGABRT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the run did not stop within 120 s of Ctrl-C; its stacks:\n{err}")
    assert (out / "checkpoints" / "last.pt").exists(), f"no checkpoint within 240 s; the run's stacks:\n{err}"
    assert proc.returncode == 130
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [
        f"interrupted: {out} keeps the run up to its last checkpoint; rerun the same command with --resume to continue"
    ], err

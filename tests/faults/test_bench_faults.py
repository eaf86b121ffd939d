"""`pathotune bench` never erases published numbers, and bad grid or seed settings stop on one line.

Each case runs the real entry point in-process and asserts exit code 2, the one error line, and that
BENCHMARKS.md (and every other file that existed) is byte-identical afterwards. A grid whose test split leaves
a metric undefined is not a fault: it reports the metric as undefined, with the reason, and exits 0.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from fault_kit import Base
from helpers import COLOURS, TINY2, one_line_error, run_main, write_dataset, write_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

START, END = "<!-- bench:tiny:start -->\n", "<!-- bench:tiny:end -->\n"
PUBLISHED = f"# Benchmarks\n\nHand-written.\n\n{START}## tiny\n\nold numbers\n{END}"


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def grid(root: Path, data: Path, **keys) -> Path:
    cfg = {
        "name": "tiny",
        "backbone": "vit_small_patch16_224",
        "image_size": 32,
        "datasets": {"d": {"data": str(data)}},
        "methods": ["linear"],
        "seeds": [0],
        "common": {"backbone_kwargs": TINY2, "batch_size": 8, "bootstrap": 0, "augment": "none", "accelerator": "cpu"},
        "runs_dir": str(root / "runs"),
        "output": str(root / "BENCHMARKS.md"),
        **keys,
    }
    path = root / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fail(monkeypatch, capsys, root: Path, *args) -> str:
    before = snapshot(root)
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2, err
    line = one_line_error(err)
    assert snapshot(root) == before  # BENCHMARKS.md and everything else byte-identical
    return line


@pytest.fixture
def root(base: Base, tmp_path: Path) -> Path:
    shutil.copytree(base.tiles, tmp_path / "tiles")
    (tmp_path / "BENCHMARKS.md").write_text(PUBLISHED)
    return tmp_path


def test_an_empty_seed_list_never_replaces_a_published_section(root, monkeypatch, capsys) -> None:
    cfg = grid(root, root / "tiles", seeds=[])
    line = fail(monkeypatch, capsys, root, "bench", "--config", cfg, "--quiet")
    assert "no cell of grid 'tiny' has finished" in line and "nothing was written" in line


def test_report_only_over_an_empty_runs_folder_is_refused(root, monkeypatch, capsys) -> None:
    cfg = grid(root, root / "tiles")
    (root / "runs").mkdir()
    line = fail(monkeypatch, capsys, root, "bench", "--config", cfg, "--report-only", "--quiet")
    assert "no cell of grid 'tiny' has finished" in line


@pytest.mark.parametrize(
    ("page", "words"),
    [
        (f"{END}x\n{START}", "comes before"),
        (f"{START}a\n{END}{START}b\n{END}", "appears 2 times"),
        (f"{START}old\n", "is missing"),
    ],
)
def test_damaged_markers_are_refused_before_any_work(root, monkeypatch, capsys, page: str, words: str) -> None:
    (root / "BENCHMARKS.md").write_text("# Benchmarks\n\n" + page)
    cfg = grid(root, root / "tiles")
    line = fail(monkeypatch, capsys, root, "bench", "--config", cfg, "--quiet")
    assert words in line and "BENCHMARKS.md" in line
    assert not (root / "runs").exists()  # refused before any cell trained


@pytest.mark.parametrize(("keys", "words"), [({"seeds": [0, 0]}, "key 'seeds': 0 is listed twice"),
                                             ({"splits": [1, 1]}, "key 'splits': 1 is listed twice")])  # fmt: skip
def test_duplicate_seeds_or_splits_in_a_grid(root, monkeypatch, capsys, keys: dict, words: str) -> None:
    cfg = grid(root, root / "tiles", **keys)
    assert words in fail(monkeypatch, capsys, root, "bench", "--config", cfg, "--quiet")


def test_duplicate_seeds_on_the_command_line(root, base: Base, monkeypatch, capsys) -> None:
    line = fail(monkeypatch, capsys, root, "train", "--data", root / "tiles", "--config", base.cfg, "--out",
                root / "run", "--method", "linear", "--seeds", "0", "--seeds", "0", "--quiet")  # fmt: skip
    assert "--seeds lists 0 twice" in line


def test_a_split_whose_test_part_has_one_class_reports_auroc_undefined(tmp_path, monkeypatch, capsys) -> None:
    data = write_dataset(tmp_path / "d", {"train": 4, "val": 2})
    rng = np.random.default_rng(7)
    for i in range(3):  # a test split holding red tiles only
        write_image(tmp_path / "d" / "test" / "red" / f"t{i}.png", COLOURS["red"], rng)
    (tmp_path / "BENCHMARKS.md").write_text(PUBLISHED)
    cfg = grid(tmp_path, data, comparisons=[], methods=["linear", "vpt-deep"], common={
        "backbone_kwargs": TINY2, "batch_size": 8, "bootstrap": 50, "augment": "none", "steps": 2,
        "accelerator": "cpu"})  # fmt: skip
    code, _, err = run_main(monkeypatch, capsys, "bench", "--config", cfg, "--quiet")
    assert code == 0, err
    m = json.loads((tmp_path / "runs" / "tiny" / "d" / "linear" / "seed_0" / "metrics.json").read_text())
    assert m["auroc"] is None and any("AUROC undefined" in n for n in m["notes"])
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| linear | 1.000 ± 0.000 |" in text and "| undefined |" in text
    assert "- linear: auroc undefined in 1 of 1 runs (AUROC undefined: only class ['red'] present in y_true)" in text

"""Atomic writes, figures, markdown tables and the per-run report page."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib._pylab_helpers import Gcf

from pathotune.report import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    format_params,
    markdown_table,
    plot_confusion_matrix,
    plot_metric_vs_params,
    plot_training_curves,
    write_run_report,
)
from pathotune.report import io as io_mod
from pathotune.report.io import atomic_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_atomic_path_failure_keeps_original_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    target.write_text("original")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("half written")
        raise RuntimeError("boom")
    assert target.read_text() == "original"
    assert leftovers(tmp_path) == []


def test_atomic_path_success_replaces_and_keeps_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".txt"  # writers that infer the format from the suffix keep working
        tmp.write_text("first")
    assert target.read_text() == "first"
    target.chmod(0o640)
    atomic_write_text(target, "second\r\nline")
    assert target.read_bytes() == b"second\r\nline"
    assert target.stat().st_mode & 0o777 == 0o640
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert leftovers(target.parent) == []


def test_atomic_write_json_converts_numpy_and_keeps_key_order(tmp_path: Path) -> None:
    obj = {
        "z": np.float32(0.5),
        "a": np.arange(3),
        "n": np.int64(7),
        "flag": np.bool_(True),
        "pair": (1, 2),
        np.int64(3): "numpy key",
        "path": tmp_path,
    }
    path = atomic_write_json(tmp_path / "m.json", obj)
    text = path.read_text()
    assert text.startswith('{\n  "z": 0.5,') and text.endswith("}\n")
    loaded = json.loads(text)
    assert list(loaded) == ["z", "a", "n", "flag", "pair", "3", "path"]
    assert loaded == {
        "z": 0.5,
        "a": [0, 1, 2],
        "n": 7,
        "flag": True,
        "pair": [1, 2],
        "3": "numpy key",
        "path": str(tmp_path),
    }


def test_atomic_write_json_failure_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_swaps_a_whole_folder_in(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "built"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and list(tmp.iterdir()) == []
        (tmp / "a.txt").write_text("one")
        assert not target.exists()  # nothing visible until the block finishes
    assert (target / "a.txt").read_text() == "one"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir, not mkdtemp's 0700
    with atomic_dir(target) as tmp:  # an older build is replaced whole
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in target.parent.iterdir()] == ["built"]


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "built"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["built"] and (target / "old.txt").read_text() == "old"

    real = os.replace

    def refuse_the_new_folder(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise PermissionError(13, "Permission denied")
        real(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", refuse_the_new_folder)
    with pytest.raises(PermissionError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["built"] and (target / "old.txt").read_text() == "old"


def test_atomic_dir_loses_a_race_with_an_oserror_and_keeps_the_winner(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "built"
    real = os.replace

    def another_process_wins(src, dst):
        if Path(src).name.endswith(".tmp"):
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
        real(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", another_process_wins)
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert [p.name for p in tmp_path.iterdir()] == ["built"] and (target / "theirs.txt").read_text() == "theirs"


def test_markdown_table_exact_text() -> None:
    rows = [
        {"method": "linear", "params": 1234567, "bacc": 0.81234, "auroc": {"mean": 0.8123, "std": 0.0141}},
        {"method": "a|b", "params": 45, "bacc": None, "auroc": {"mean": 0.9, "std": 0.0}, "ci": (0.1, 0.25)},
    ]
    expected = (
        "| method | params | bacc | auroc | ci |\n"
        "|---|---:|---:|---:|---|\n"
        "| linear | 1,234,567 | 0.812 | 0.812 ± 0.014 | – |\n"
        "| a\\|b | 45 | – | 0.900 ± 0.000 | [0.100, 0.250] |"
    )
    assert markdown_table(rows) == expected
    assert markdown_table(rows, ["params", "bacc"], floatfmt=".1f") == (
        "| params | bacc |\n|---:|---:|\n| 1,234,567 | 0.8 |\n| 45 | – |"
    )
    assert markdown_table([]) == ""


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (1_234_567, "1.23 M"),
        (45_600, "45.6 K"),
        (123_456, "123 K"),
        (999_999, "1.00 M"),
        (812, "812"),
        (86_389_248_000, "86.4 B"),
        (np.int64(5000), "5.00 K"),
        (None, "–"),
    ],
)
def test_format_params(n: object, text: str) -> None:
    assert format_params(n) == text


def test_plots_write_pngs_without_leaking_figures(tmp_path: Path) -> None:
    before = Gcf.get_num_fig_managers()
    cm = [[5, 1, 0], [2, 3, 0], [0, 0, 0]]
    paths = [
        plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png"),
        plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm_counts.png", normalize=False),
        plot_training_curves(
            [
                {"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_balanced_accuracy": 0.5},
                {"epoch": 2, "train_loss": 0.7, "val_loss": None, "val_balanced_accuracy": 0.6},
            ],
            tmp_path / "curves.png",
        ),
        plot_training_curves([], tmp_path / "empty_curves.png"),
        plot_metric_vs_params(
            [
                {"method": "linear", "trainable_params": 2_000, "balanced_accuracy": 0.7},
                {
                    "method": "pathotune",
                    "trainable_params": 90_000,
                    "balanced_accuracy": {"mean": 0.8, "std": 0.02},
                },
                {"method": "full", "trainable_params": 86e6, "balanced_accuracy": 0.82, "sd": 0.01},
            ],
            tmp_path / "scatter.png",
            yerr="sd",
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert Gcf.get_num_fig_managers() == before
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="does not match"):
        plot_confusion_matrix(cm, ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="log axis"):
        plot_metric_vs_params([{"trainable_params": 0, "balanced_accuracy": 0.5}], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_write_run_report(tmp_path: Path) -> None:
    metrics = {
        "n_samples": 12,
        "accuracy": 0.75,
        "balanced_accuracy": 0.7,
        "macro_f1": 0.68,
        "weighted_f1": 0.74,
        "auroc": None,
        "confusion_matrix": [[5, 1], [2, 4]],
        "per_class": {
            "benign": {"precision": 0.714, "recall": 0.833, "f1": 0.769, "support": 6},
            "tumor": {"precision": 0.8, "recall": 0.667, "f1": 0.727, "support": 6},
        },
        "notes": ["a note"],
        "ci": {"accuracy": (0.5, 0.9), "balanced_accuracy": (0.45, 0.88)},
        "trainable_params": 12_345,
        "total_params": 1_234_500,
    }
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_balanced_accuracy": 0.5 + e / 20} for e in (1, 2, 3)
    ]
    config = {"backbone": "dinov2_vits14", "method": "pathotune", "lr": 1e-3, "tokens": (4, 8)}
    path = write_run_report(tmp_path / "run", metrics, history, ["benign", "tumor"], config, "Tiny run")
    assert path == tmp_path / "run" / "report.md"
    text = path.read_text()
    assert text.startswith("# Tiny run\n")
    assert "| Metric | Value | 95% CI |" in text
    assert "| Balanced accuracy | 0.700 | [0.450, 0.880] |" in text
    assert "| AUROC (one-vs-rest macro) | undefined | – |" in text  # the reason is in the notes below
    assert "| benign | 0.714 | 0.833 | 0.769 | 6 |" in text
    assert "| 12.3 K (12,345) | 1.23 M (1,234,500) | 1.00 % |" in text  # one rounding: 2 decimals
    assert "- a note" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["figures/confusion_matrix.png", "figures/training_curves.png"]
    for link in links:
        assert not Path(link).is_absolute()
        assert (path.parent / link).read_bytes()[:8] == PNG_MAGIC
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    assert yaml.safe_load(block.group(1)) == {**config, "tokens": [4, 8]}
    assert leftovers(path.parent) == []
    with pytest.raises(ValueError, match="confusion_matrix"):
        write_run_report(tmp_path / "run2", {"accuracy": 1.0}, [], ["a", "b"], {}, "x")


def test_metric_vs_params_names_each_method_once_in_a_legend(tmp_path: Path, monkeypatch) -> None:
    """Methods of similar size sit a few pixels apart: their names go in the legend, not on the points."""
    from pathotune.report import plots

    drawn = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (drawn.append(fig), save(fig, path))[1])
    rows = [
        {"method": m, "trainable_params": p, "balanced_accuracy": {"mean": 0.8, "std": 0.01}}
        for m, p in [("vpt-deep", 47_307), ("instance", 74_291), ("text", 102_347), ("pathotune", 221_635)]
    ]
    plot_metric_vs_params(rows, tmp_path / "scatter.png")
    (fig,) = drawn
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["vpt-deep", "instance", "text", "pathotune"]
    assert len(fig.axes[0].texts) == 0
    styles = {(ln.get_color(), ln.get_marker()) for ln in fig.axes[0].get_lines() if ln.get_marker() != "_"}  # not caps
    assert len(styles) == 4

"""Fault cases of the artifact flags: a bad --qc or --drop-artifacts value, or a threshold out of range, ends in
one line and exit code 2 before anything is written; an earlier run's files stay byte-identical and a new --out
is never created."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import one_line_error, run_main
from slide_fixtures import tissue_and_glass, write_pyramid_tiff

TILE = ["--target-mpp", "2.0", "--tile-size", "32", "--mask-size", "96"]

CASES = [
    ("unknown_qc_kind", ["--qc", "pen,smudge"], ("--qc 'pen,smudge'", "unknown artifact 'smudge'", "pen, blur, fold")),
    ("unknown_drop_kind", ["--drop-artifacts", "dust"], ("--drop-artifacts 'dust'", "unknown artifact 'dust'")),
    ("drop_without_its_flag", ["--qc", "pen", "--drop-artifacts", "blur"], ("--drop-artifacts blur", "add it to --qc")),
    ("blur_threshold_above_1", ["--blur-threshold", "1.5"], ("blur_threshold (--blur-threshold)", "got 1.5")),
    ("blur_threshold_negative", ["--blur-threshold", "-0.2"], ("--blur-threshold", "got -0.2")),
    ("fold_threshold_nan", ["--fold-threshold", "nan"], ("fold_threshold (--fold-threshold)", "got nan")),
    ("max_artifact_1", ["--max-artifact", "1"], ("max_fraction (--max-artifact)", "below 1")),
    ("blur_threshold_not_a_number", ["--blur-threshold", "sharp"], ("--blur-threshold", "valid number")),
]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fault_slides")
    write_pyramid_tiff(d / "s1.tif", tissue_and_glass(384, 768, seed=0), mpp=0.5, levels=3, tile=64)
    return d


def sha_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")}


# `slides extract` has no --qc: it computes only the kinds it drops.
RUNS = [(cmd, *case) for cmd in ("tile", "extract") for case in CASES if cmd == "tile" or "--qc" not in case[1]]


@pytest.mark.parametrize(("command", "name", "flags", "expect"), RUNS, ids=[f"{r[0]}-{r[1]}" for r in RUNS])
def test_bad_artifact_flags(monkeypatch, capsys, slides: Path, tmp_path: Path, command, name, flags, expect) -> None:
    earlier = tmp_path / "earlier"
    code, _, err = run_main(monkeypatch, capsys, "slides", "tile", "--slides", slides, "--out", earlier, *TILE)
    assert code == 0, err
    before = sha_tree(earlier)
    assert {"s1_pen.png", "s1_blur.geojson", "s1_fold.png", "s1_tiles.csv"} <= set(before)
    model = ["--backbone", "vit_tiny_patch16_224", "--weights", "random"] if command == "extract" else []
    for out in (earlier, tmp_path / "fresh"):
        args = ["slides", command, "--slides", slides, "--out", out, *TILE, *model, *flags]
        code, stdout, err = run_main(monkeypatch, capsys, *args)
        assert code == 2, f"exit {code}\n{stdout}\n{err}"
        line = one_line_error(err)
        for word in expect:
            assert word in line, f"{word!r} not in: {line}"
    assert sha_tree(earlier) == before
    assert not (tmp_path / "fresh").exists()

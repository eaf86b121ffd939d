"""Faults of the slide formats: broken DICOM WSI series and OME-TIFFs whose pixel size cannot be used. Each ends in
exit code 2 and one line that names the slide, with every file that existed before byte-identical afterwards.

The slides folder of every case also holds a healthy slide (``ok.tif``, listed before the broken one), so a
failure cannot hide behind an empty run.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fault_kit import Base
from helpers import cli_cmd, cli_env, one_line_error, run_main
from slide_fixtures import cmu_crop, truncate, write_pyramid_tiff
from vendor_slides import dicom_level_files, write_dicom_file, write_dicom_wsi, write_ome_tiff

HE = (700, 1500, 256, 192)


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Path], tuple[Path, list[str]]]  # (the slide the error names, the words it must hold)
    command: str = "tile"  # tile | extract | tile-csv (the slides given as a slide list)
    process: bool = False  # a real process: nothing a library logs may reach stderr


def slides_folder(root: Path) -> Path:
    slides = root / "slides"
    slides.mkdir()
    write_pyramid_tiff(slides / "ok.tif", cmu_crop(*HE), mpp=0.5, levels=2)
    return slides


def dicom_case(mutate: Callable[[Path, list[Path]], list[str]]) -> Callable[[Path], tuple[Path, list[str]]]:
    """A DICOM series ``slides/series`` written from H&E, then broken by ``mutate`` (files largest first)."""

    def setup(root: Path) -> tuple[Path, list[str]]:
        series = slides_folder(root) / "series"
        write_dicom_wsi(series, cmu_crop(*HE), mpp=0.5, levels=2)
        return series, mutate(series, dicom_level_files(series))

    return setup


def cut(fraction: float) -> Callable[[Path, list[Path]], list[str]]:
    def mutate(series: Path, files: list[Path]) -> list[str]:
        truncate(files[0], fraction)
        return [files[0].name, "truncated or corrupt", "re-copy or re-export"]

    return mutate


def cut_header(series: Path, files: list[Path]) -> list[str]:
    files[0].write_bytes(files[0].read_bytes()[:1000])
    return [files[0].name, "truncated or corrupt", "cannot read it as a whole-slide image instance"]


def garbage(series: Path, files: list[Path]) -> list[str]:
    rng = np.random.default_rng(0)
    files[0].write_bytes(b"\0" * 128 + b"DICM" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return [files[0].name, "truncated or corrupt", "no SOP Class UID"]


def second_series(series: Path, files: list[Path]) -> list[str]:
    """Another slide's series copied into the same folder."""
    other = series.parent.parent / "other_series"
    write_dicom_wsi(other, cmu_crop(300, 900, 128, 128), mpp=0.5, levels=1)
    for f in dicom_level_files(other):
        f.rename(series / f.name)
    other.rmdir()
    return ["holds 2 DICOM WSI series", "folder of its own"]


def secondary_capture(root: Path) -> tuple[Path, list[str]]:
    """A folder of one DICOM file that is no whole-slide image (a Secondary Capture, as a photo export)."""
    folder = slides_folder(root) / "photo"
    folder.mkdir()
    write_dicom_file(folder / "photo.dcm")
    return folder, ["holds no DICOM whole-slide image instances", "among its 1 DICOM files"]


def empty_folder(root: Path) -> tuple[Path, list[str]]:
    folder = slides_folder(root) / "not_exported_yet"
    folder.mkdir()
    return folder, ["is a folder without DICOM files", "a folder holding one DICOM WSI series"]


def ome(size, unit: str) -> Callable[[Path], tuple[Path, list[str]]]:
    def setup(root: Path) -> tuple[Path, list[str]]:
        path = slides_folder(root) / "stain.ome.tif"
        write_ome_tiff(path, cmu_crop(*HE), size, unit, levels=2)
        return path, ["has no usable mpp", f"{unit!r}" if unit == "pixel" else f"{size!r}", "pass --mpp"]

    return setup


CASES = [
    Case("dicom_instance_truncated_at_half", dicom_case(cut(0.5))),
    Case("dicom_instance_missing_its_last_bytes", dicom_case(cut(0.995))),
    Case("dicom_instance_cut_in_its_header", dicom_case(cut_header), process=True),
    Case("dicom_instance_is_garbage", dicom_case(garbage)),
    Case("dicom_folder_with_two_series", dicom_case(second_series)),
    Case("dicom_folder_without_a_whole_slide_image", secondary_capture),
    Case("dicom_folder_empty_in_a_slide_list", empty_folder, command="tile-csv"),
    Case("dicom_truncated_found_before_any_extraction", dicom_case(cut(0.5)), command="extract"),
    Case("ome_physical_size_not_a_number", ome("abc", "\u00b5m")),
    Case("ome_physical_size_in_pixels", ome(0.25, "pixel")),
    Case("ome_physical_size_checked_before_any_extraction", ome("abc", "\u00b5m"), command="extract"),
]


def sha_tree(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_slide_format_fault(case: Case, tmp_path: Path, request, monkeypatch, capsys) -> None:
    root = tmp_path / "case"
    root.mkdir()
    slide, expect = case.setup(root)
    slides, out = root / "slides", root / "out"
    if case.command == "tile-csv":
        listing = root / "slides.csv"
        listing.write_text(f"slide_path\n{slides / 'ok.tif'}\n{slide}\n")
        args = ["slides", "tile", "--slides", listing, "--out", out, "--target-mpp", "1.0", "--tile-size", "64"]
    elif case.command == "extract":
        base: Base = request.getfixturevalue("base")  # the shared tiny run: its bundle is the model
        bundle = base.run / "bundle"
        args = ["slides", "extract", "--slides", slides, "--bundle", bundle, "--out", out, "--target-mpp", "1.0"]
        args += ["--num-workers", "0", "--quiet"]
    else:
        args = ["slides", "tile", "--slides", slides, "--out", out, "--target-mpp", "1.0", "--tile-size", "64"]
    shared = request.getfixturevalue("base").root if case.command == "extract" else root
    before = {**sha_tree(root), **sha_tree(shared)}
    if case.process:
        env = cli_env()
        env.pop("PYTHONWARNINGS", None)
        proc = subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=env, timeout=300, check=False)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    else:
        code, stdout, stderr = run_main(monkeypatch, capsys, *args)
    assert code == 2, f"exit {code}\n{stdout}\n{stderr}"
    line = one_line_error(stderr)
    assert "Traceback" not in stdout
    assert f"slide {slide}" in line, line
    for word in expect:
        assert word in line, f"{word!r} not in: {line}"
    after = {**sha_tree(root), **sha_tree(shared)}
    assert [p for p in before if after.get(p) != before[p]] == [], "files changed or lost"
    if case.command == "extract":  # every slide is checked before the first is extracted
        assert not out.exists() or not [p for p in out.rglob("*.h5")]


def test_case_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)

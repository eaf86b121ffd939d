"""A cohort survives its bad slides: --skip-errors, errors.csv and exit code 3, reruns that retry only the failed
and unfinished slides, a slide broken deep inside, resuming inside a slide, TRIDENT patch files from `slides tile`
fed back to `slides extract`, and extraction over two processes equal to one."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from helpers import TINY2, TINY_NAME, cli_cmd, cli_env
from helpers import run_main as cli
from PIL import Image
from slide_fixtures import cmu_crop, tissue_and_glass, write_pyramid_tiff

from pathotune import create_model, save_bundle
from pathotune.features import read_slide_features
from pathotune.features.partial import partial_dir
from pathotune.slides import TilingConfig
from pathotune.slides.extract import extract_slides
from pathotune.slides.extractor import as_extractor

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COARSE = ["--target-mpp", "2.0", "--num-workers", "0", "--quiet"]
GRID = ["--target-mpp", "2.0", "--tile-size", "32"]


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def errors(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "errors.csv", newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def corrupt_tile(path: Path, level: int = 0) -> None:
    """Garble the compressed bytes of one tile in the middle of ``level``: the file opens, that tile cannot be
    decoded."""
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[level]
        k = len(page.dataoffsets) // 2
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xde\xad" * (count // 2) + b"\x00" * (count % 2)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good1, good2 (real H&E pyramids), broken (garbage named .svs), nompp (a PNG without mpp)."""
    d = tmp_path_factory.mktemp("cohort")
    write_pyramid_tiff(d / "good1.tif", tissue_and_glass(384, 768, seed=0), mpp=0.5, levels=3, tile=64)
    write_pyramid_tiff(d / "good2.tif", tissue_and_glass(384, 768, seed=1), mpp=0.5, levels=3, tile=64)
    (d / "broken.svs").write_bytes(b"II*\x00" + b"\x00" * 64)
    Image.fromarray(cmu_crop(900, 1800, 256, 256)).save(d / "nompp.png")
    return d


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model(TINY_NAME, "vpt-deep", num_classes=2, image_size=32, backbone_kwargs=TINY2)
    return save_bundle(model, tmp_path_factory.mktemp("b") / "bundle")


def test_tile_skip_errors_lists_failures_and_a_rerun_retries_only_those(
    monkeypatch, capsys, cohort_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiles"
    code, stdout, err = cli(
        monkeypatch, capsys, "slides", "tile", "--slides", cohort_dir, "--out", out, *GRID, "--skip-errors"
    )
    assert code == 3, err
    assert "2 of 4 slide(s) failed" in err and "errors.csv" in err and "Traceback" not in err
    failed = errors(out)
    assert sorted(failed) == ["broken", "nompp"]
    assert failed["broken"]["stage"] == "tile" and "broken.svs" in failed["broken"]["reason"]
    assert "--mpp" in failed["nompp"]["reason"]
    assert {p.name for p in out.glob("*_patches.h5")} == {"good1_patches.h5", "good2_patches.h5"}
    done = tree(out)
    # the PNG gets its mpp from a slide list now; the rerun does it and leaves the finished slides alone
    listing = tmp_path / "slides.csv"
    rows = [
        [cohort_dir / n, 0.5 if n == "nompp.png" else ""] for n in ("good1.tif", "good2.tif", "broken.svs", "nompp.png")
    ]
    listing.write_text("slide_path,mpp\n" + "".join(f"{p},{m}\n" for p, m in rows))
    code, stdout, err = cli(
        monkeypatch, capsys, "slides", "tile", "--slides", listing, "--out", out, *GRID, "--skip-errors", "--json"
    )
    assert code == 3, err
    report = json.loads(stdout)
    status = {r["slide_id"]: r["status"] for r in report["slides"]}
    assert status == {"good1": "done", "good2": "done", "broken": "failed", "nompp": "tiled"}
    assert sorted(errors(out)) == ["broken"]
    after = tree(out)
    assert {k: v for k, v in after.items() if k.startswith("good")} == {
        k: v for k, v in done.items() if k.startswith("good")
    }


def test_without_skip_errors_the_first_bad_slide_stops_on_one_line_and_finished_slides_stay(
    monkeypatch, capsys, cohort_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "tiles"
    code, _, err = cli(monkeypatch, capsys, "slides", "tile", "--slides", cohort_dir / "good1.tif", "--out", out, *GRID)
    assert code == 0, err
    before = tree(out)
    code, _, err = cli(monkeypatch, capsys, "slides", "tile", "--slides", cohort_dir, "--out", out, *GRID)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines[-1].startswith("error: ") and "broken.svs" in lines[-1] and "Traceback" not in err
    assert {k: v for k, v in tree(out).items() if k in before} == before  # nothing finished was touched


def test_a_tile_broken_deep_inside_fails_that_slide_only(monkeypatch, capsys, bundle: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramid_tiff(slides / "a.tif", tissue_and_glass(384, 768, seed=0), mpp=0.5, levels=3, tile=64)
    write_pyramid_tiff(slides / "b.tif", tissue_and_glass(384, 768, seed=1), mpp=0.5, levels=3, tile=64)
    corrupt_tile(slides / "b.tif", level=2)  # the level read at 2.0 mpp: opens fine, one tile cannot be decoded
    out = tmp_path / "feats"
    args = ["slides", "extract", "--slides", slides, "--bundle", bundle, "--out", out, *COARSE]
    code, _, err = cli(monkeypatch, capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "b.tif" in lines[-1] and "corrupt" in lines[-1] and "Traceback" not in err
    assert (out / "a.h5").is_file() and not (out / "b.h5").exists()
    code, _, err = cli(monkeypatch, capsys, *args, "--skip-errors")
    assert code == 3, err
    (row,) = errors(out).values()
    assert row["slide_id"] == "b" and row["stage"] == "extract" and "b.tif" in row["reason"]
    assert not (out / "b.h5").exists()


def test_an_interrupted_slide_resumes_from_its_chunks_and_ends_equal(tmp_path: Path, capsys) -> None:
    slide = tmp_path / "s.tif"
    write_pyramid_tiff(slide, tissue_and_glass(384, 768, seed=0), mpp=0.5, levels=3, tile=64)
    torch.manual_seed(0)
    model = create_model(TINY_NAME, "linear", num_classes=2, image_size=32, backbone_kwargs=TINY2)
    tiling = TilingConfig(target_mpp=1.0, tile_size=32)
    whole = extract_slides(model, [slide], tmp_path / "whole", tiling, batch_size=4, num_workers=0, progress=False)
    n = whole[0].n_tiles
    assert n > 12
    ex = as_extractor(model)
    calls = {"n": 0}
    forward = ex.forward

    def dies_on_the_fourth_batch(x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return forward(x)

    ex.forward = dies_on_the_fourth_batch
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        extract_slides(ex, [slide], out, tiling, batch_size=4, num_workers=0, progress=False, chunk_tiles=8)
    chunks = sorted(p.name for p in partial_dir(out, "s").glob("chunk_*.npy"))
    assert chunks == ["chunk_000000.npy"]  # batches 1-2 made chunk 0; batch 3 was in chunk 1 when it died
    assert not (out / "s.h5").exists()
    calls["n"] = -10_000
    capsys.readouterr()
    extract_slides(ex, [slide], out, tiling, batch_size=4, num_workers=0, progress=False, chunk_tiles=8)
    said = capsys.readouterr()  # even without progress, and on stderr (stdout may be --json)
    assert "s: resuming, 1 of" in said.err and "resuming" not in said.out
    assert calls["n"] == -10_000 + (n - 8 + 3) // 4  # only the tiles after the first chunk ran again
    a, b = read_slide_features(tmp_path / "whole" / "s.h5"), read_slide_features(out / "s.h5")
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.features, b.features)  # bit for bit
    assert not partial_dir(out, "s").exists()


def test_tile_patches_feed_extract_and_magnifications_are_trident_buckets(
    monkeypatch, capsys, bundle: Path, tmp_path: Path
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramid_tiff(slides / "s1.tif", tissue_and_glass(384, 768, seed=0), mpp=0.499, levels=3, tile=64)
    tiles = tmp_path / "tiles"
    code, _, err = cli(
        monkeypatch,
        capsys,
        "slides",
        "tile",
        "--slides",
        slides,
        "--out",
        tiles,
        "--target-mpp",
        "1.0",
        "--tile-size",
        "32",
    )
    assert code == 0, err
    with h5py.File(tiles / "s1_patches.h5") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][()]
    assert attrs["level0_magnification"] == 20 and attrs["target_magnification"] == 10  # 20.04x -> 20, 10x -> 10
    assert attrs["patch_size"] == 32 and attrs["patch_size_level0"] == 64
    grid = ["slides", "extract", "--slides", slides, "--bundle", bundle, "--num-workers", "0", "--quiet"]
    code, _, err = cli(monkeypatch, capsys, *grid, "--out", tmp_path / "a", "--target-mpp", "1.0", "--tile-size", "32")
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, *grid, "--out", tmp_path / "b", "--coords", tiles)
    assert code == 0, err
    code, _, err = cli(
        monkeypatch,
        capsys,
        *grid,
        "--out",
        tmp_path / "c",
        "--target-mpp",
        "1.0",
        "--tile-size",
        "32",
        "--tissue-geojson",
        tiles,
    )
    assert code == 0, err
    a, b = read_slide_features(tmp_path / "a" / "s1.h5"), read_slide_features(tmp_path / "b" / "s1.h5")
    np.testing.assert_array_equal(a.coords, coords)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.features, b.features)
    assert "s1_tissue.geojson" in read_slide_features(tmp_path / "c" / "s1.h5").attrs["tissue_config"]
    with h5py.File(tmp_path / "a" / "s1.h5") as f:
        assert f["coords"].attrs["level0_magnification"] == 20


def test_extraction_over_two_processes_equals_one_bit_for_bit(bundle: Path, cohort_dir: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for k in range(3):
        write_pyramid_tiff(slides / f"s{k}.tif", tissue_and_glass(256, 512, seed=k), mpp=0.5, levels=2, tile=64)
    common = ["slides", "extract", "--slides", slides, "--bundle", bundle, *COARSE, "--accelerator", "cpu"]
    procs = [
        subprocess.Popen(
            cli_cmd(*common, "--out", tmp_path / "one"),
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        subprocess.Popen(
            cli_cmd(*common, "--out", tmp_path / "two", "--devices", "2", "--strategy", "ddp"),
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
    ]
    for p in procs:
        o, e = p.communicate(timeout=300)
        assert p.returncode == 0, f"rc {p.returncode}\n{o}\n{e}"
    for k in range(3):
        a, b = read_slide_features(tmp_path / "one" / f"s{k}.h5"), read_slide_features(tmp_path / "two" / f"s{k}.h5")
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.coords, b.coords)
    with open(tmp_path / "two" / "extract_log.csv", newline="") as f:
        ranks = sorted((r["slide_id"], r["rank"]) for r in csv.DictReader(f))
    assert ranks == [("s0", "0"), ("s1", "1"), ("s2", "0")]  # each slide once, shared out by rank

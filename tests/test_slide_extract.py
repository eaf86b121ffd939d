"""Slide feature extraction: the HDF5 holds the plan's tiles and exactly the model's features, and resumes safely."""

from __future__ import annotations

import csv
import multiprocessing
import pickle
import shutil
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import TINY2, TINY_NAME, pooled
from PIL import Image
from slide_fixtures import cmu_crop, tissue_and_glass, write_pyramid_tiff

import pathotune
from pathotune import create_model, load_bundle, save_bundle
from pathotune.bundle import read_manifest
from pathotune.data import build_transforms
from pathotune.errors import BundleError, ConfigError, DataError
from pathotune.slides import TilingConfig, open_slide, plan_tiles, read_tile, sample_slide
from pathotune.slides.extract import (
    LOG_NAME,
    SlideTileDataset,
    TileTransform,
    as_extractor,
    extract_slide,
    extract_slides,
    find_slides,
    load_extractor,
    read_slide_features,
)

TINY = TINY2
NAME = TINY_NAME
SMALL = TilingConfig(target_mpp=2.0, tile_size=32, min_tissue=0.5)  # 0.5 mpp slide: level 2 (ds 4), no resize
CMU_COARSE = TilingConfig(target_mpp=4.0, tile_size=32)  # one-level SVS: 257 px reads shrunk to 32


def tiny_model(method: str = "linear", **kw) -> pathotune.PathoTuneModel:
    return create_model(NAME, method, 2, image_size=32, backbone_kwargs=dict(TINY), **kw)


@pytest.fixture(scope="module")
def model() -> pathotune.PathoTuneModel:
    return tiny_model().eval()


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 768x384 half-tissue/half-glass pyramids at 0.5 mpp (3 levels), named a.tif and b.tif."""
    d = tmp_path_factory.mktemp("slides")
    write_pyramid_tiff(d / "a.tif", tissue_and_glass(384, 768, seed=0), mpp=0.5, levels=3, tile=64)
    rgb = tissue_and_glass(384, 768, seed=1)
    rgb[:, :384] = cmu_crop(700, 1500, 384, 384)
    write_pyramid_tiff(d / "b.tif", rgb, mpp=0.5, levels=3, tile=64)
    return d


def direct_features(forward, slide: Path, tiling: TilingConfig, transform, mpp: float | None = None):
    """The reference: read_tile + transform, one stack, one forward."""
    with open_slide(slide, mpp=mpp) as reader:
        plan = plan_tiles(reader, tiling)
        x = torch.stack([transform(read_tile(reader, plan, i)) for i in range(len(plan))])
    with torch.inference_mode():
        return plan, forward(x).numpy()


def test_h5_holds_plan_coords_and_model_features(model, slides_dir: Path, tmp_path: Path) -> None:
    slide = slides_dir / "a.tif"
    path = extract_slide(model, slide, tmp_path, tiling=SMALL, batch_size=4, num_workers=0)
    assert path == tmp_path / "a.h5" and not (tmp_path / "a.h5.tmp").exists()
    spec = model.backbone.spec
    tf = TileTransform(spec.mean, spec.std, 32)
    plan, ref = direct_features(partial(pooled, model), slide, SMALL, tf)
    # The split transform is the project's eval transform, so features match what training saw.
    eval_tf = build_transforms(spec.mean, spec.std, 32, train=False)
    _, ref_eval = direct_features(partial(pooled, model), slide, SMALL, eval_tf)
    assert 0 < len(plan) < plan.n_candidates  # the glass half was dropped
    with h5py.File(path, "r") as f:
        coords, feats, attrs = f["coords"][()], f["features"][()], dict(f.attrs)
    assert coords.dtype == np.int64 and np.array_equal(coords, plan.coords)
    assert feats.dtype == np.float32 and feats.shape == (len(plan), 32)
    np.testing.assert_allclose(feats, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(feats, ref_eval, atol=1e-5, rtol=0)
    expected = {
        "backbone": NAME,
        "bundle_fingerprint": "",
        "feature_dim": 32,
        "mpp": 0.5,
        "target_mpp": 2.0,
        "tile_size": 32,
        "level": 2,
        "slide_path": str(slide),
        "n_tiles": len(plan),
        "image_size": 32,
        "pathotune_version": pathotune.__version__,
        "backbone_fingerprint": model.provenance.fingerprint,
    }
    for k, v in expected.items():
        assert attrs[k] == v, k
    np.testing.assert_allclose(attrs["norm_mean"], spec.mean)
    np.testing.assert_allclose(attrs["norm_std"], spec.std)
    assert attrs["tile_size_level0"] == pytest.approx(128.0)
    sf = read_slide_features(path)
    assert sf.slide_id == "a" and sf.attrs["backbone"] == NAME and np.array_equal(sf.features, feats)


def test_cmu_workers_match_single_process_and_direct_read(model, tmp_path: Path) -> None:
    """The real Aperio slide through the resize path; two worker processes give bit-identical features."""
    paths = {}
    for workers in (0, 2):
        (r,) = extract_slides(
            model,
            [sample_slide()],
            tmp_path / f"w{workers}",
            tiling=CMU_COARSE,
            batch_size=8,
            num_workers=workers,
            progress=False,
        )
        assert r.status == "extracted" and r.n_tiles > 8
        paths[workers] = r.path
    f0, f2 = read_slide_features(paths[0]), read_slide_features(paths[2])
    assert np.array_equal(f0.coords, f2.coords) and np.array_equal(f0.features, f2.features)
    spec = model.backbone.spec
    tf = TileTransform(spec.mean, spec.std, 32)
    plan, ref = direct_features(partial(pooled, model), sample_slide(), CMU_COARSE, tf)
    assert np.array_equal(f0.coords, plan.coords)
    np.testing.assert_allclose(f0.features, ref, atol=1e-5, rtol=0)
    assert f0.attrs["mpp"] == pytest.approx(0.499) and f0.attrs["level"] == 0
    with open(tmp_path / "w2" / LOG_NAME, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["slide_id"] == "cmu_small_region" and int(row["n_tiles"]) == len(plan) and float(row["tiles_per_s"]) > 0


def test_rerun_skips_finished_ignores_stale_tmp(model, slides_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    a, b = slides_dir / "a.tif", slides_dir / "b.tif"
    extract_slides(model, [a], out, tiling=SMALL, num_workers=0, progress=False)
    before = (out / "a.h5").stat().st_mtime_ns
    (out / "b.h5.tmp").write_bytes(b"half a file from a killed run")
    results = extract_slides(model, [a, b], out, tiling=SMALL, num_workers=0, progress=False)
    assert [(r.slide_id, r.status) for r in results] == [("a", "skipped"), ("b", "extracted")]
    assert (out / "a.h5").stat().st_mtime_ns == before
    assert not (out / "b.h5.tmp").exists()
    assert read_slide_features(out / "b.h5").features.shape[0] == results[1].n_tiles > 0
    with open(out / LOG_NAME, newline="") as fh:
        assert sorted(r["slide_id"] for r in csv.DictReader(fh)) == ["a", "b"]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_final_h5_is_redone_like_a_stale_tmp(model, slides_dir: Path, tmp_path: Path, capsys, damage):
    """A final .h5 that is no readable HDF5 (garbage, or cut short by a full disk or a copy) is extracted again,
    with a note, instead of being refused with no way forward but --overwrite (which redoes every slide)."""
    out = tmp_path / "feats"
    a, b = slides_dir / "a.tif", slides_dir / "b.tif"
    extract_slides(model, [a, b], out, tiling=SMALL, num_workers=0, progress=False)
    good = (out / "b.h5").read_bytes()
    before_a = (out / "a.h5").read_bytes()
    (out / "b.h5").write_bytes(b"\x00garbage" * 50 if damage == "garbage" else good[: len(good) // 2])
    capsys.readouterr()
    results = extract_slides(model, [a, b], out, tiling=SMALL, num_workers=0, progress=False)
    assert [(r.slide_id, r.status) for r in results] == [("a", "skipped"), ("b", "extracted")]
    assert f"{out / 'b.h5'} is not a readable HDF5 file" in capsys.readouterr().out
    assert (out / "a.h5").read_bytes() == before_a
    assert read_slide_features(out / "b.h5").features.shape[0] == results[1].n_tiles > 0


def test_interrupted_slide_is_never_finished(slides_dir: Path, tmp_path: Path) -> None:
    """A crash mid-slide leaves neither a final nor a temp file; the rerun then extracts it."""
    ex = as_extractor(tiny_model().eval())
    calls = {"n": 0}
    real = ex.module.forward_features

    def dies_on_second_batch(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(x)

    ex.module.forward_features = dies_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        extract_slides(ex, [slides_dir / "a.tif"], tmp_path, tiling=SMALL, batch_size=2, num_workers=0, progress=False)
    assert list(tmp_path.glob("a.h5*")) == []
    ex.module.forward_features = real
    (r,) = extract_slides(
        ex, [slides_dir / "a.tif"], tmp_path, tiling=SMALL, batch_size=2, num_workers=0, progress=False
    )
    assert r.status == "extracted" and (tmp_path / "a.h5").is_file()


def test_mismatching_file_is_an_error_unless_overwrite(model, slides_dir: Path, tmp_path: Path) -> None:
    a = slides_dir / "a.tif"
    extract_slides(model, [a], tmp_path, tiling=SMALL, num_workers=0, progress=False)
    coarser = TilingConfig(target_mpp=4.0, tile_size=32)
    with pytest.raises(ConfigError, match=r"target_mpp=2\.0.*--overwrite"):
        extract_slides(model, [a], tmp_path, tiling=coarser, num_workers=0, progress=False)
    other = create_model(NAME, "linear", 2, image_size=32, backbone_kwargs={**TINY, "depth": 1})
    with pytest.raises(ConfigError, match="backbone_fingerprint"):
        extract_slides(other, [a], tmp_path, tiling=SMALL, num_workers=0, progress=False)
    (r,) = extract_slides(model, [a], tmp_path, tiling=coarser, num_workers=0, overwrite=True, progress=False)
    assert r.status == "extracted" and read_slide_features(r.path).attrs["target_mpp"] == 4.0


def test_bundle_features_are_the_prompted_models(
    model, slides_dir: Path, tmp_path: Path, text_features: tuple[torch.Tensor, torch.Tensor]
) -> None:
    prompted = tiny_model("pathotune", text_features=text_features)  # deep TVP + TTP + IVP
    with torch.no_grad():  # as after training: gates open (at their zero init the prompts are a no-op)
        for g in prompted.gates.values():
            g.fill_(0.5)
    bundle = save_bundle(prompted, tmp_path / "bundle")
    ex = load_extractor(bundle=bundle)
    assert ex.bundle_fingerprint == read_manifest(bundle)["sha256"] != ""
    (r,) = extract_slides(ex, [slides_dir / "a.tif"], tmp_path / "f", tiling=SMALL, num_workers=0, progress=False)
    sf = read_slide_features(r.path)
    assert sf.attrs["bundle_fingerprint"] == ex.bundle_fingerprint and sf.attrs["backbone"] == NAME
    reloaded = load_bundle(bundle)
    tf = TileTransform(ex.mean, ex.std, 32)
    _, ref = direct_features(partial(pooled, reloaded), slides_dir / "a.tif", SMALL, tf)
    np.testing.assert_allclose(sf.features, ref, atol=1e-5, rtol=0)
    _, plain = direct_features(partial(pooled, model), slides_dir / "a.tif", SMALL, tf)
    assert np.abs(sf.features - plain).max() > 1e-2
    with pytest.raises(BundleError, match="trained on backbone"):
        load_extractor(backbone="dinov2_vits14", bundle=bundle)
    with pytest.raises(ConfigError, match="32 px"):
        load_extractor(bundle=bundle, image_size=64)


def test_ranks_share_out_slides(model, slides_dir: Path, tmp_path: Path) -> None:
    """slides[rank::world_size]: rank 1 of 2 takes the second slide only, and logs to its own file."""

    class FakeFabric:
        device = torch.device("cpu")
        global_rank, world_size, is_global_zero = 1, 2, False

        def autocast(self):  # pragma: no cover - not called on CPU
            raise AssertionError

        def barrier(self) -> None:
            pass

    slides = [slides_dir / "a.tif", slides_dir / "b.tif"]
    results = extract_slides(model, slides, tmp_path, tiling=SMALL, num_workers=0, fabric=FakeFabric(), progress=False)
    assert [r.slide_id for r in results] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.h5", "extract_log.rank1.csv"]


def test_missing_mpp_needs_override(model, tmp_path: Path) -> None:
    png = tmp_path / "plain.png"
    Image.fromarray(tissue_and_glass(256, 512)).save(png)
    with pytest.raises(DataError, match="--mpp"):
        extract_slides(model, [png], tmp_path / "f", tiling=SMALL, num_workers=0, progress=False)
    assert not (tmp_path / "f").exists()
    (r,) = extract_slides(model, [png], tmp_path / "f", tiling=SMALL, mpp_override=0.5, num_workers=0, progress=False)
    assert r.n_tiles > 0 and read_slide_features(r.path).attrs["mpp"] == 0.5


def test_slide_without_tissue_gives_empty_arrays(model, tmp_path: Path) -> None:
    glass = tmp_path / "glass.png"
    Image.new("RGB", (256, 256), (242, 241, 244)).save(glass)
    (r,) = extract_slides(model, [glass], tmp_path, tiling=SMALL, mpp_override=0.5, num_workers=2, progress=False)
    sf = read_slide_features(r.path)
    assert r.n_tiles == 0 and sf.coords.shape == (0, 2) and sf.features.shape == (0, 32)


def test_dataset_pickles_and_reopens(slides_dir: Path) -> None:
    with open_slide(slides_dir / "a.tif") as reader:
        plan = plan_tiles(reader, SMALL)
    ds = SlideTileDataset(slides_dir / "a.tif", plan, TileTransform((0.5,) * 3, (0.5,) * 3, 32))
    x, i = ds[1]
    assert x.shape == (3, 32, 32) and i == 1
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._reader is None and torch.equal(clone[1][0], x)
    ds.close()
    clone.close()


def test_find_slides(tmp_path: Path, slides_dir: Path) -> None:
    d = tmp_path / "in"
    (d / "case1").mkdir(parents=True)
    (d / "vms").mkdir()
    shutil.copy(slides_dir / "a.tif", d / "case1" / "a.tif")
    shutil.copy(slides_dir / "b.tif", d / "b.svs")
    (d / "notes.txt").write_text("not a slide")
    (d / "vms" / "s.vms").write_text("[Virtual Microscope Specimen]")
    (d / "vms" / "s_0.jpg").write_bytes(b"")
    assert [p.relative_to(d).as_posix() for p in find_slides(d)] == ["b.svs", "case1/a.tif", "vms/s.vms"]
    listing = tmp_path / "list.csv"
    listing.write_text("slide_path,label\nin/case1/a.tif,x\n" + f"{d / 'b.svs'},y\n")
    assert find_slides(listing) == [d / "case1" / "a.tif", d / "b.svs"]
    (tmp_path / "bad.csv").write_text("file,label\na.tif,x\n")
    with pytest.raises(DataError, match="slide_path"):
        find_slides(tmp_path / "bad.csv")
    shutil.copy(slides_dir / "a.tif", d / "a.tiff")
    with pytest.raises(DataError, match="share the id 'a'"):
        find_slides(d)
    with pytest.raises(DataError, match="not found"):
        find_slides(tmp_path / "missing")


def test_worker_errors_stay_one_line(model, slides_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tile that fails in a DataLoader worker surfaces as the worker's own message, not its traceback."""
    import pathotune.slides.dataset as dataset_mod

    def broken(reader, plan, i):
        raise DataError(f"cannot read slide {reader.path} (tile {i}): the file is truncated or corrupt")

    monkeypatch.setattr(dataset_mod, "read_tile", broken)  # forked workers inherit the patched module
    with pytest.raises(DataError) as err:
        extract_slides(
            model, [slides_dir / "a.tif"], tmp_path, tiling=SMALL, batch_size=2, num_workers=2, progress=False
        )
    assert str(err.value).startswith("cannot read slide") and "\n" not in str(err.value)
    assert list(tmp_path.glob("a.h5*")) == [] and list(tmp_path.glob(".a.h5*")) == []
    assert multiprocessing.active_children() == []  # the worker pool was shut down at once, not at a later gc


def test_planning_ahead_changes_nothing(model, slides_dir: Path, tmp_path: Path) -> None:
    """The next slide planned in a thread (as on a GPU) while workers decode this one: same files as serially."""
    slides = [slides_dir / "a.tif", slides_dir / "b.tif"]
    ahead = extract_slides(
        model, slides, tmp_path / "ahead", tiling=SMALL, batch_size=4, num_workers=2, plan_ahead=True, progress=False
    )
    serial = extract_slides(
        model, slides, tmp_path / "serial", tiling=SMALL, batch_size=4, num_workers=0, plan_ahead=False, progress=False
    )
    for r1, r2 in zip(ahead, serial, strict=True):
        f1, f2 = read_slide_features(r1.path), read_slide_features(r2.path)
        assert r1.slide_id == r2.slide_id and r1.plan_seconds > 0
        assert np.array_equal(f1.coords, f2.coords) and np.array_equal(f1.features, f2.features)


def test_default_workers_leave_the_models_cores_to_the_model(monkeypatch):
    """Beside a GPU, min(4, CPUs) decoding processes; on the CPU only the cores that torch's threads leave free."""
    from pathotune.slides.extract import default_num_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    assert default_num_workers("cuda") == 4
    assert default_num_workers("cpu") == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert default_num_workers(torch.device("cpu")) == 0

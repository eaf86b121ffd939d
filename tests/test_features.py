"""The slide feature file (pathotune.features): round trip, what counts as compatible, listing, old files.

``tests/data/legacy_0.1.0/legacy_slide.h5`` was written by pathotune 0.1.0 (commit 1b28e50, before this module
existed) with ``extract_slides`` on a 256x128 half-tissue pyramid (slide_fixtures, seed 3; 0.5 mpp, 2 levels)
at target_mpp 1.0, 32 px tiles, with a tiny seeded ViT (``torch.manual_seed(0)``; embed dim 16, depth 1, 32 px).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from slide_fixtures import tissue_and_glass, write_pyramid_tiff

import pathotune
from pathotune import create_model
from pathotune.errors import ConfigError, DataError
from pathotune.features import (
    ATTRIBUTES,
    REQUEST_KEYS,
    check_feature_compatibility,
    extractor_mismatch,
    finished_tiles,
    list_feature_files,
    read_feature_attrs,
    read_slide_features,
    tile_side,
    write_feature_file,
)
from pathotune.mil import read_slide_features as read_bag
from pathotune.slides import TilingConfig
from pathotune.slides.extract import extract_slides, request_attrs
from pathotune.slides.extractor import as_extractor

LEGACY = Path(__file__).parent / "data" / "legacy_0.1.0" / "legacy_slide.h5"


def attrs_for(n: int, **changes) -> dict:
    """A full attribute set as extraction gives it (None where HDF5 will hold NaN)."""
    base = {
        "backbone": "toy_vit",
        "backbone_fingerprint": "f" * 32,
        "bundle_fingerprint": "",
        "bundle_path": "",
        "target_mpp": None,
        "tile_size": 32,
        "image_size": 32,
        "overlap": 0,
        "min_tissue": 0.5,
        "feature_dim": 4,
        "mpp": 0.25,
        "level": 0,
        "downsample": 1.0,
        "read_size": 32,
        "stride": 32,
        "tile_size_level0": 32.0,
        "dimensions": np.array([640, 480], dtype=np.int64),
        "n_tiles": n,
        "n_candidates": n + 2,
        "slide_id": "s",
        "slide_path": "/slides/s.svs",
        "slide_backend": "openslide",
        "norm_mean": np.array([0.5, 0.5, 0.5]),
        "norm_std": np.array([0.5, 0.5, 0.5]),
        "normalization": "x / 255",
        "precision": "32-true",
        "tissue_config": "{}",
    }
    return {**base, **changes}


def write(path: Path, n: int = 5, dim: int = 4, **changes) -> tuple[np.ndarray, np.ndarray]:
    coords = np.stack([np.arange(n) * 32, np.zeros(n)], axis=1).astype(np.int64)
    feats = np.random.default_rng(n).normal(size=(n, dim)).astype(np.float32)
    with write_feature_file(path, coords, np.linspace(0.5, 1, n), dim, attrs_for(n, feature_dim=dim, **changes)) as w:
        for start in range(0, n, 2):
            w.write(start, feats[start : start + 2])
    return coords, feats


def test_round_trip(tmp_path: Path) -> None:
    coords, feats = write(tmp_path / "s.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no temporary file left beside it
    sf = read_slide_features(tmp_path / "s.h5")
    assert np.array_equal(sf.coords, coords) and sf.coords.dtype == np.int64
    assert np.array_equal(sf.features, feats) and sf.features.dtype == np.float32
    assert sf.tissue is not None and sf.tissue.shape == (5,) and sf.slide_id == "s" and sf.tile_side == 32.0
    assert set(sf.attrs) == set(ATTRIBUTES)
    assert sf.attrs["target_mpp"] is None and sf.attrs["dimensions"] == [640, 480]  # NaN back to None, lists
    assert sf.attrs["pathotune_version"] == pathotune.__version__ and isinstance(sf.attrs["level"], int)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert np.isnan(f.attrs["target_mpp"])  # on disk as 0.1.0 wrote it
    assert read_feature_attrs(tmp_path / "s.h5") == {**sf.attrs}


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    coords = np.zeros((3, 2), dtype=np.int64)
    with pytest.raises(RuntimeError), write_feature_file(tmp_path / "s.h5", coords, np.ones(3), 4, attrs_for(3)):
        raise RuntimeError("model died")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"missing \['slide_id'\]"):
        attrs = attrs_for(3)
        del attrs["slide_id"]
        with write_feature_file(tmp_path / "s.h5", coords, np.ones(3), 4, attrs):
            pass
    with (
        pytest.raises(ValueError, match="does not fit"),
        write_feature_file(tmp_path / "s.h5", coords, np.ones(3), 4, attrs_for(3)) as w,
    ):
        w.write(2, np.zeros((2, 4), dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


def test_empty_slide_reads_but_is_no_bag(tmp_path: Path) -> None:
    write(tmp_path / "glass.h5", n=0)
    sf = read_slide_features(tmp_path / "glass.h5")
    assert sf.coords.shape == (0, 2) and sf.features.shape == (0, 4)
    with pytest.raises(DataError, match="has no tiles"):
        read_slide_features(tmp_path / "glass.h5", bag=True)


def test_compatibility_is_the_extractor(tmp_path: Path) -> None:
    write(tmp_path / "a.h5")
    write(tmp_path / "b.h5", target_mpp=0.5, tile_size=64)  # other tiles, same feature space: poolable
    shared = check_feature_compatibility([tmp_path / "a.h5", tmp_path / "b.h5"])
    assert shared["backbone"] == "toy_vit" and "tile_size" not in shared and "slide_path" not in shared
    write(tmp_path / "c.h5", bundle_fingerprint="abc")
    with pytest.raises(DataError, match=r"a\.h5 and .*c\.h5 come from different extractors \(bundle_fingerprint"):
        check_feature_compatibility([tmp_path / "a.h5", tmp_path / "c.h5"])
    write(tmp_path / "d.h5", dim=8)
    assert extractor_mismatch(read_feature_attrs(tmp_path / "a.h5"), read_feature_attrs(tmp_path / "d.h5")) == (
        "feature_dim"
    )
    # a fingerprint only one side records (a file from another tool) is no mismatch; two different ones are
    a = read_feature_attrs(tmp_path / "a.h5")
    assert extractor_mismatch(a, {k: v for k, v in a.items() if k != "backbone_fingerprint"}) is None
    assert extractor_mismatch(a, {**a, "backbone_fingerprint": "other"}) == "backbone_fingerprint"


def test_finished_tiles_is_the_request(tmp_path: Path) -> None:
    write(tmp_path / "a.h5")
    request = {k: attrs_for(5)[k] for k in REQUEST_KEYS}
    assert finished_tiles(tmp_path / "a.h5", request) == 5
    with pytest.raises(ConfigError, match=r"tile_size=32, not 64; pass another --out or --overwrite"):
        finished_tiles(tmp_path / "a.h5", {**request, "tile_size": 64})
    with pytest.raises(ConfigError, match=r"target_mpp=None, not 0\.5"):
        finished_tiles(tmp_path / "a.h5", {**request, "target_mpp": 0.5})
    (tmp_path / "junk.h5").write_bytes(b"\x00junk" * 20)
    assert finished_tiles(tmp_path / "junk.h5", request) is None  # not HDF5 at all: made again
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(DataError, match="has no coords/features"):
        finished_tiles(tmp_path / "empty.h5", request)


def test_listing(tmp_path: Path) -> None:
    write(tmp_path / "b.h5")
    write(tmp_path / "a.h5")
    (tmp_path / ".a.h5.x1y2.tmp.h5").write_bytes(b"half a file")  # what an interrupted writer leaves
    assert list_feature_files(tmp_path) == [tmp_path / "a.h5", tmp_path / "b.h5"]
    assert list_feature_files(tmp_path / "a.h5") == [tmp_path / "a.h5"]
    assert list_feature_files([tmp_path / "b.h5"]) == [tmp_path / "b.h5"]
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"no slide feature files \(\*\.h5\) in"):
        list_feature_files(tmp_path / "none")
    with pytest.raises(DataError, match="not found"):
        list_feature_files(tmp_path / "missing")
    with pytest.raises(DataError, match="no slide feature files given"):
        list_feature_files([])


def test_tile_side_of_files_without_it() -> None:
    assert tile_side({"tile_size_level0": 448.0}) == 448.0
    assert tile_side({"tile_size": 224, "target_mpp": 0.5, "mpp": 0.25}) == 448.0
    assert tile_side({"tile_size": 224, "target_mpp": None, "mpp": 0.25}) == 224.0


def test_reads_a_file_written_by_0_1_0() -> None:
    sf = read_slide_features(LEGACY)
    assert sf.coords.shape == (4, 2) and sf.features.shape == (4, 16) and sf.tissue.shape == (4,)
    assert sf.slide_id == "legacy_slide" and sf.tile_side == 64.0
    assert set(sf.attrs) == set(ATTRIBUTES)  # the schema is unchanged
    assert sf.attrs["target_mpp"] == 1.0 and sf.attrs["dimensions"] == [256, 128]
    assert sf.attrs["pathotune_version"] == "0.1.0" and sf.attrs["norm_mean"] == [0.5, 0.5, 0.5]
    feats, coords, attrs = read_bag(LEGACY)
    assert feats.dtype == torch.float32 and np.array_equal(coords, sf.coords) and attrs == sf.attrs
    request = {k: sf.attrs[k] for k in REQUEST_KEYS}
    assert finished_tiles(LEGACY, request) == 4  # a rerun of the same request skips it


def test_today_writes_what_0_1_0_wrote(tmp_path: Path) -> None:
    """The same extraction as the legacy file's, today: same datasets, dtypes, attribute names and types."""
    slide = tmp_path / "legacy_slide.tif"
    write_pyramid_tiff(slide, tissue_and_glass(128, 256, seed=3), mpp=0.5, levels=2, tile=64)
    torch.manual_seed(0)
    model = create_model(
        "vit_small_patch16_224",
        "linear",
        2,
        image_size=32,
        backbone_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2},
    ).eval()
    tiling = TilingConfig(target_mpp=1.0, tile_size=32, min_tissue=0.5)
    assert set(request_attrs(as_extractor(model), tiling)) == set(REQUEST_KEYS)
    (r,) = extract_slides(model, [slide], tmp_path / "f", tiling=tiling, batch_size=4, num_workers=0, progress=False)
    with h5py.File(LEGACY, "r") as old, h5py.File(r.path, "r") as new:
        assert {k: (v.dtype, v.shape) for k, v in old.items()} == {k: (v.dtype, v.shape) for k, v in new.items()}
        assert {k: type(v) for k, v in old.attrs.items()} == {k: type(v) for k, v in new.attrs.items()}
        for key in ("dimensions", "norm_mean", "norm_std"):
            assert old.attrs[key].dtype == new.attrs[key].dtype
        assert np.array_equal(old["coords"][()], new["coords"][()])
        assert np.array_equal(old["tissue"][()], new["tissue"][()])
        if old.attrs["backbone_fingerprint"] == new.attrs["backbone_fingerprint"]:  # the same seeded weights
            np.testing.assert_allclose(old["features"][()], new["features"][()], atol=1e-5)

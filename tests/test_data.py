"""Sources (folders, CSV), scanning, transforms and image loading, on tiny images written here."""

from __future__ import annotations

import ast
import os
import pickle
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import pathotune.data
from pathotune.data import (
    H5Ref,
    HEDJitter,
    PatchDataset,
    PatchSource,
    RandomRot90,
    Sample,
    build_transforms,
    check_source,
    list_images,
    load_rgb,
    load_source,
    scan,
    sort_class_names,
)
from pathotune.data.dataset import H5Cache
from pathotune.errors import ConfigError, DataError, one_line

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def write_img(path: Path, color: tuple[int, int, int] = (200, 100, 50), size: tuple[int, int] = (8, 8)) -> Path:
    """A flat tile with one pixel that depends on the path: distinct files are never byte-identical copies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    im.putpixel((size[0] - 1, size[1] - 1), tuple(zlib.crc32(str(path).encode()).to_bytes(4, "big")[:3]))
    im.save(path)
    return path


def random_img(seed: int = 0, size: tuple[int, int] = (12, 12)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def class_folders(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        for i in range(n):
            write_img(root / cls / f"{cls}_{i:02d}.png")
    return root


def keys(samples: list[Sample]) -> set:
    return {s.path_or_key for s in samples}


# --------------------------------------------------------------------------------------------- sources


def test_split_folders_keep_their_splits_and_sorted_classes(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for cls in ("tumor", "adipose"):
            for i in range(n):
                write_img(tmp_path / split / cls / f"{i}.png")
    write_img(tmp_path / "train" / "tumor" / "nested" / "deep.JPG")  # subfolders and upper-case suffixes count
    (tmp_path / "train" / "tumor" / "notes.txt").write_text("not an image")
    write_img(tmp_path / "train" / "tumor" / ".hidden.png")

    src = load_source(tmp_path, val_fraction=0.3, test_fraction=0.3)

    assert src.classes == ["adipose", "tumor"]
    assert src.counts() == {"train": [3, 4], "val": [2, 2], "test": [1, 1]}
    for s in src.all_samples():
        split_dir, class_dir = s.path_or_key.relative_to(tmp_path).parts[:2]
        assert (split_dir, class_dir) == (s.split, src.classes[s.label])
    assert all(".hidden" not in str(k) for k in keys(src.all_samples()))


def test_hidden_files_and_folders_are_skipped_by_every_reader(tmp_path: Path) -> None:
    root = tmp_path / ".cache" / "data"  # a hidden folder above the data does not count
    for name in ("a", "b"):
        for i in range(3):
            write_img(root / "train" / name / f"{i}.png")
    write_img(root / "train" / "a" / ".hidden.png")
    write_img(root / "train" / "a" / ".ipynb_checkpoints" / "copy.png")
    write_img(root / "train" / "a" / "nested" / ".trash" / "old.png")
    write_img(root / "train" / ".c" / "0.png")  # a hidden class folder is no class

    found = list_images(root / "train" / "a")
    assert [p.relative_to(root) for p in found] == [Path("train/a/0.png"), Path("train/a/1.png"), Path("train/a/2.png")]
    src = load_source(root, val_fraction=0.0)
    assert src.classes == ["a", "b"] and src.counts()["train"] == [3, 3]
    nct = tmp_path / "nct"
    write_img(nct / "NCT-CRC-HE-100K" / "ADI" / "0.tif")
    write_img(nct / "NCT-CRC-HE-100K" / "ADI" / ".DS_Store.tif")
    train = load_source(f"layout:nct-crc-he:{nct}", val_fraction=0.0).split("train")
    assert [s.path_or_key.name for s in train] == ["0.tif"]


def test_class_names_sort_numerically_only_when_all_are_integers() -> None:
    assert sort_class_names(["10", "2", "-1", "2"]) == ["-1", "2", "10"]
    assert sort_class_names(["10", "2", "b"]) == ["10", "2", "b"]
    assert sort_class_names([]) == []


def test_one_line_collapses_whitespace_and_names_empty_errors() -> None:
    assert one_line(ValueError("a\n  b\tc ")) == "a b c"
    assert one_line(KeyError()) == "KeyError"
    assert one_line("") == ""
    assert one_line(OSError("x" * 50), limit=10) == "xxxxxxx..."
    assert one_line("short", limit=10) == "short"


def test_train_only_folder_carves_stratified_val(tmp_path: Path) -> None:
    class_folders(tmp_path / "train", {"a": 10, "b": 5})
    src = load_source(tmp_path, val_fraction=0.2)
    assert src.counts() == {"train": [8, 4], "val": [2, 1], "test": [0, 0]}


def test_class_folders_split_is_stratified_disjoint_and_seeded(tmp_path: Path) -> None:
    class_folders(tmp_path, {"LYM": 20, "ADI": 10, "TUM": 10})
    src = load_source(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)

    assert src.classes == ["ADI", "LYM", "TUM"]
    assert src.counts() == {"train": [7, 14, 7], "val": [2, 4, 2], "test": [1, 2, 1]}
    tr, va, te = (keys(src.split(n)) for n in ("train", "val", "test"))
    assert not (tr & va or tr & te or va & te)
    assert len(tr | va | te) == 40

    again = load_source(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert again.samples == src.samples
    other = load_source(tmp_path, val_fraction=0.2, test_fraction=0.1, seed=4)
    assert keys(other.split("val")) != va


def test_too_small_class_to_stratify_names_folder_and_fraction(tmp_path: Path) -> None:
    class_folders(tmp_path, {"a": 6, "b": 1})
    with pytest.raises(DataError, match=r"val_fraction") as e:
        load_source(tmp_path, val_fraction=0.5)
    assert str(tmp_path) in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_fractions_and_paths(tmp_path: Path) -> None:
    class_folders(tmp_path, {"a": 2})
    with pytest.raises(ConfigError, match="val_fraction"):
        load_source(tmp_path, val_fraction=1.2)
    with pytest.raises(ConfigError, match="leaves no training data"):
        load_source(tmp_path, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="does not exist"):
        load_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_source(tmp_path / "empty")


def test_csv_manifest_relative_paths_splits_and_extra_columns(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data"
    for name in ("x1", "x2", "x3", "x4"):
        write_img(data / "imgs" / f"{name}.png")
    absolute = write_img(tmp_path / "elsewhere" / "abs.png")
    (data / "manifest.csv").write_text(
        "slide_id,path,label,split,notes\n"
        "s1,imgs/x1.png,tumor,train,first\n"
        "s1,imgs/x2.png,normal,train,\n"
        f"s2,{absolute},tumor,valid,aliased split\n"
        "s3,imgs/x3.png,normal,val,\n"
        "s4,imgs/x4.png,tumor,test,\n"
    )
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory

    src = load_source(data / "manifest.csv")

    assert src.classes == ["normal", "tumor"]
    by_path = {s.path_or_key: (s.label, s.split) for s in src.all_samples()}
    assert by_path == {
        data / "imgs" / "x1.png": (1, "train"),
        data / "imgs" / "x2.png": (0, "train"),
        absolute: (1, "val"),
        data / "imgs" / "x3.png": (0, "val"),
        data / "imgs" / "x4.png": (1, "test"),
    }


def test_csv_without_split_column_is_split_stratified(tmp_path: Path) -> None:
    rows = ["label,path"] + [f"{c},img_{c}_{i}.png" for c in ("2", "10") for i in range(5)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    src = load_source(tmp_path / "m.csv", val_fraction=0.4, seed=1)
    assert src.classes == ["2", "10"]  # integer names sort numerically
    assert src.counts()["val"] == [2, 2]
    assert all(s.path_or_key.parent == tmp_path for s in src.all_samples())


def test_csv_missing_column_and_bad_rows(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("path,class\na.png,x\n")
    with pytest.raises(DataError, match=r"bad\.csv.*'label'"):
        load_source(bad)
    bad.write_text("path,label,split\na.png,x,holdout\n")
    with pytest.raises(DataError, match=r"bad\.csv: line 2 has split 'holdout'"):
        load_source(bad)
    bad.write_text("path,label\na.png,\n")
    with pytest.raises(DataError, match=r"line 2 has an empty 'label'"):
        load_source(bad)


def test_labels_unseen_in_train_are_reported(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,label,split\na.png,cat,train\nb.png,dog,val\nc.png,cow,test\n")
    with pytest.warns(UserWarning, match=r"not seen in train \(val: dog; test: cow\)"):
        src = load_source(tmp_path / "m.csv")
    assert src.unseen_labels() == {"val": ["dog"], "test": ["cow"]}
    assert src.empty_classes() == ["cow", "dog"]


def test_layout_prefix_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known layouts: bach, breakhis, histolytics-hgsc, mhist, nct-crc-he, pcam"):
        load_source(f"layout:imagenet:{tmp_path}")
    with pytest.raises(ConfigError, match="layout:<name>:<path>"):
        load_source("layout:pcam")
    class_folders(tmp_path, {"a": 4})
    with pytest.raises(ConfigError, match="only apply to published layouts"):
        load_source(tmp_path, subtypes=True)


# --------------------------------------------------------------------------------------------- scan


def _damaged_source(tmp_path: Path) -> tuple[PatchSource, dict[str, Path]]:
    good = [write_img(tmp_path / f"good{i}.png") for i in range(3)]
    random_img(0, (32, 32)).save(tmp_path / "whole.png")
    full = (tmp_path / "whole.png").read_bytes()
    files = {"trunc_png": tmp_path / "trunc.png", "trunc_tif": tmp_path / "trunc.tif"}
    files["trunc_png"].write_bytes(full[: len(full) * 3 // 4])  # header intact, pixel data cut short
    random_img(1, (16, 16)).save(tmp_path / "whole.tif")
    tif = (tmp_path / "whole.tif").read_bytes()
    files["trunc_tif"].write_bytes(tif[: len(tif) // 2])  # verify() passes on this one; only a full load fails
    files["garbage"] = tmp_path / "garbage.jpg"
    files["garbage"].write_bytes(b"\x00" * 64)
    files["missing"] = tmp_path / "missing.png"
    train = [Sample(p, 0, "train") for p in good[:2]] + [Sample(p, 1, "train") for p in files.values()]
    train.append(Sample(write_img(tmp_path / "b.png"), 1, "train"))
    src = PatchSource(["a", "b"], {"train": train, "val": [Sample(good[2], 0, "val")]}, origin="fixture")
    return src, files


def test_scan_finds_truncated_corrupt_and_missing_files(tmp_path: Path) -> None:
    src, files = _damaged_source(tmp_path)
    report = scan(src)

    kinds = {b.key: b.kind for b in report.bad}
    assert kinds == {
        files["trunc_png"]: "truncated",
        files["trunc_tif"]: "truncated",
        files["garbage"]: "unreadable",
        files["missing"]: "missing",
    }
    assert not report.ok and report.checked == 8
    summary = report.summary()
    assert "\n" not in summary
    assert summary.startswith("fixture: 4 of 8 images bad (1 missing, 1 unreadable, 2 truncated")
    assert str(files["garbage"]) in summary  # first bad file, sorted by path
    assert "--skip-bad" in summary and "skip_bad" not in summary.replace("--skip-bad", "")
    lines = report.lines()
    assert len(lines) == 4 and any(line.startswith(f"missing: {files['missing']}") for line in lines)

    with pytest.raises(DataError) as e:
        report.apply(src, skip_bad=False)
    assert str(e.value) == summary

    cleaned, skipped = report.apply(src, skip_bad=True)
    assert skipped == 4
    assert keys(cleaned.split("train")).isdisjoint(files.values())
    assert len(cleaned.split("train")) == 3 and len(cleaned.split("val")) == 1
    assert scan(cleaned).ok


def test_scan_clean_source_and_progress_bar(tmp_path: Path, capsys) -> None:
    class_folders(tmp_path, {"a": 3, "b": 3})
    src = load_source(tmp_path, val_fraction=0.34)
    report = scan(src, progress=True)
    assert report.ok and report.lines() == []
    assert report.summary().endswith("6 images checked, no problems")
    assert "\r" not in capsys.readouterr().err  # off a terminal: no in-place redraws (short work prints nothing)
    assert check_source(src) == (src, 0)


def test_empty_class_fails_even_with_skip_bad(tmp_path: Path) -> None:
    class_folders(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "c").mkdir()
    src = load_source(tmp_path, val_fraction=0.5)
    report = scan(src)
    assert report.empty_classes == ["c"] and not report.bad
    with pytest.raises(DataError, match=r"class\(es\) without training images \(c\)"):
        report.apply(src, skip_bad=True)


def test_skipping_the_only_image_of_a_class_is_an_error(tmp_path: Path) -> None:
    good = write_img(tmp_path / "a.png")
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png")
    src = PatchSource(["a", "b"], {"train": [Sample(good, 0, "train"), Sample(bad, 1, "train")]})
    with pytest.raises(DataError, match=r"without training images \(b\)"):
        check_source(src, skip_bad=True)


def test_scan_checks_h5_index_bounds(tmp_path: Path) -> None:
    f = tmp_path / "x.h5"
    with h5py.File(f, "w") as h:
        h["x"] = np.zeros((3, 4, 4, 3), np.uint8)
    refs = [H5Ref(f, i) for i in (0, 2, 3)] + [H5Ref(tmp_path / "gone.h5", 0)]
    src = PatchSource(["a"], {"train": [Sample(r, 0, "train") for r in refs]})
    report = scan(src)
    assert [(b.key.index, b.kind) for b in report.bad] == [(0, "missing"), (3, "corrupt")]
    assert "index outside 0..2" in report.lines()[1]


# --------------------------------------------------------------------------------------------- transforms


def test_eval_transform_resizes_crops_and_normalises() -> None:
    t = build_transforms(MEAN, STD, 16, train=False)
    out = t(Image.new("RGB", (40, 20), (255, 128, 0)))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = (torch.tensor([255, 128, 0]) / 255.0 - 0.5) / 0.25
    assert torch.allclose(out[:, 8, 8], expected, atol=1e-5)


def test_train_transform_is_seeded_and_none_disables_augmentation() -> None:
    img = random_img(5, (20, 20))
    t = build_transforms(MEAN, STD, 20, train=True)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t(img)
    torch.manual_seed(1)
    c = t(img)
    assert torch.equal(a, b) and not torch.equal(a, c)

    plain = build_transforms(MEAN, STD, 20, train=True, augment="none")(img)
    assert torch.equal(plain, build_transforms(MEAN, STD, 20, train=False)(img))
    with pytest.raises(ConfigError, match="unknown augment 'heavy'"):
        build_transforms(MEAN, STD, 20, train=True, augment="heavy")


def test_rot90_produces_exact_quarter_turns() -> None:
    x = torch.arange(2 * 3 * 3).reshape(2, 3, 3)
    rot = RandomRot90()
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        y = rot(x)
        k = next(k for k in range(4) if torch.equal(y, torch.rot90(x, k, dims=(-2, -1))))
        seen.add(k)
    assert seen == {0, 1, 2, 3}
    img = random_img(2, (4, 6))
    torch.manual_seed(0)
    out = rot(img)
    assert isinstance(out, Image.Image) and {out.size, img.size} <= {(4, 6), (6, 4)}


def test_hed_jitter_kinds_identity_and_effect() -> None:
    img = random_img(3, (10, 10))
    arr = np.asarray(img).astype(int)
    # Near-zero strength: RGB -> HED -> RGB must round-trip, which checks the conversion direction.
    near = np.asarray(HEDJitter(1e-6)(img)).astype(int)
    assert np.abs(near - arr).max() <= 2
    assert HEDJitter(0.0)(img) is img

    torch.manual_seed(0)
    strong = HEDJitter(0.3)(img)
    assert isinstance(strong, Image.Image) and strong.size == img.size
    assert np.abs(np.asarray(strong).astype(int) - arr).mean() > 2

    t8 = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    torch.manual_seed(7)
    o1 = HEDJitter(0.1)(t8)
    torch.manual_seed(7)
    o2 = HEDJitter(0.1)(t8)
    assert o1.dtype == torch.uint8 and o1.shape == t8.shape and torch.equal(o1, o2)
    of = HEDJitter(0.1)(t8.float() / 255)
    assert of.dtype == torch.float32 and float(of.min()) >= 0.0 and float(of.max()) <= 1.0


# --------------------------------------------------------------------------------------------- loading


def _roundtrip(tmp_path: Path, img: Image.Image, name: str, **save: object) -> np.ndarray:
    path = tmp_path / name
    img.save(path, **save)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def test_load_rgb_composites_alpha_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 0, 128)])
    px = _roundtrip(tmp_path, rgba, "a.png")
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 1].tolist() == [0, 0, 0]
    assert abs(int(px[0, 2, 0]) - 127) <= 1 and len(set(px[0, 2].tolist())) == 1

    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (60, 255)])
    assert _roundtrip(tmp_path, la, "la.png").tolist() == [[[255, 255, 255], [60, 60, 60]]]


def test_load_rgb_gray_and_bilevel(tmp_path: Path) -> None:
    gray = Image.new("L", (2, 1))
    gray.putdata([10, 200])
    assert _roundtrip(tmp_path, gray, "l.png").tolist() == [[[10, 10, 10], [200, 200, 200]]]
    bw = Image.new("1", (2, 1))
    bw.putdata([0, 255])
    assert _roundtrip(tmp_path, bw, "bw.bmp").tolist() == [[[0, 0, 0], [255, 255, 255]]]


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_load_rgb_scales_16_bit_instead_of_clipping(tmp_path: Path, suffix: str) -> None:
    img = Image.fromarray(np.array([[0, 65535, 32896, 1000]], dtype=np.uint16))
    assert img.mode == "I;16"
    px = _roundtrip(tmp_path, img, f"g16.{suffix}")
    assert px[0, :, 0].tolist() == [0, 255, 128, 4]
    assert (px[..., 0] == px[..., 2]).all()


def test_load_rgb_32_bit_and_float(tmp_path: Path) -> None:
    i32 = Image.fromarray(np.array([[0, 65535, 257 * 100]], dtype=np.int32))
    assert i32.mode == "I"
    assert _roundtrip(tmp_path, i32, "i.tif")[0, :, 0].tolist() == [0, 255, 100]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert _roundtrip(tmp_path, f, "f.tif")[0, :, 0].tolist() == [0, 128, 255]


def test_load_rgb_cmyk_and_palette_with_transparency(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (3, 1))
    cmyk.putdata([(0, 0, 0, 0), (0, 255, 255, 0), (0, 0, 0, 255)])
    assert _roundtrip(tmp_path, cmyk, "c.tif").tolist() == [[[255, 255, 255], [255, 0, 0], [0, 0, 0]]]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1])
    assert _roundtrip(tmp_path, pal, "p.png", transparency=0).tolist() == [[[255, 255, 255], [0, 0, 255]]]
    assert _roundtrip(tmp_path, pal, "p_opaque.png").tolist() == [[[0, 0, 0], [0, 0, 255]]]


def test_load_rgb_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken_tile.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="broken_tile.png") as e:
        load_rgb(broken)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="absent_tile.png"):
        load_rgb(tmp_path / "absent_tile.png")


def test_patch_dataset_items_and_h5_per_process(tmp_path: Path) -> None:
    png = write_img(tmp_path / "a.png", (255, 0, 0), (6, 4))
    f = tmp_path / "x.h5"
    patches = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    with h5py.File(f, "w") as h:
        h["x"] = patches
    ds = PatchDataset([Sample(png, 1, "train"), Sample(H5Ref(f, 2), 0, "train")])
    assert len(ds) == 2 and ds.labels == [1, 0]

    x, y, i = ds[0]
    assert (y, i) == (1, 0) and x.shape == (3, 4, 6) and x.dtype == torch.float32
    assert torch.equal(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    x2, y2, i2 = ds[1]
    assert (y2, i2) == (0, 1)
    assert torch.equal((x2 * 255).round().to(torch.uint8), torch.from_numpy(patches[2]).permute(2, 0, 1))

    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive: no open h5 handle
    assert torch.equal(clone[1][0], x2)

    t = build_transforms(MEAN, STD, 8, train=False)
    assert PatchDataset(ds.samples, t)[1][0].shape == (3, 8, 8)


def test_h5_cache_reopens_after_fork() -> None:
    cache = H5Cache()
    cache._files = {Path("x.h5"): "parent-handle"}
    cache._pid = os.getpid() + 1  # as if inherited from a parent process
    with pytest.raises(FileNotFoundError):
        cache.get(Path("does-not-exist.h5"))
    assert Path("x.h5") not in cache._files and cache._pid == os.getpid()


def test_sample_and_source_reject_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="split"):
        Sample(Path("a.png"), 0, "holdout")
    with pytest.raises(ValueError, match="does not belong"):
        PatchSource(["a"], {"train": [Sample(Path("a.png"), 3, "train")]})
    assert PatchSource(["a"]).samples == {"train": [], "val": [], "test": []}


def test_data_package_is_small_modules_with_module_level_imports() -> None:
    """Function-level imports hide cycles: only the optional hgsc extra (pyarrow, shapely) is imported late."""
    root = Path(pathotune.data.__file__).parent
    late, long = [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 400:
            long.append(path.name)
        for fn in ast.walk(ast.parse(text)):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or "."] if isinstance(node, ast.ImportFrom) else []
                late += [
                    f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] not in {"pyarrow", "shapely"}
                ]
    assert late == [] and long == []

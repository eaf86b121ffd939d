"""The Python API a notebook user meets first: model.predict on images in any form, timm's data config, and a
clear message for a forward on something that is not a tensor."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from helpers import IMG, TINY2, TINY_NAME, run_main, write_image
from PIL import Image

import pathotune
from pathotune import ConfigError, Task, create_model, save_bundle
from pathotune.backbones import create_backbone


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model(
        TINY_NAME, "vpt-deep", 3, task=Task(classes=("a", "b", "c")), image_size=IMG, backbone_kwargs=TINY2
    )
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i, colour in enumerate([(200, 40, 40), (40, 180, 60), (50, 60, 200), (120, 120, 120)]):
        write_image(d / f"{i}.png", colour, rng, size=48)
    return d


def test_timm_reads_the_models_own_data_config(model):
    cfg = timm.data.resolve_data_config({}, model=model)
    spec = model.backbone.spec
    assert cfg["input_size"] == (3, IMG, IMG)
    assert tuple(cfg["mean"]) == tuple(spec.mean) and tuple(cfg["std"]) == tuple(spec.std)
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"
    assert pathotune.data_config(model)["input_size"] == (3, IMG, IMG)


def test_predict_takes_pil_arrays_paths_and_folders_alike(model, folder):
    files = sorted(folder.glob("*.png"))
    by_folder = model.predict(folder)
    assert by_folder.names == [str(f) for f in files] and by_folder.probs.shape == (4, 3)
    pil = model.predict([Image.open(f) for f in files])
    arrays = model.predict([np.asarray(Image.open(f)) for f in files])
    paths = pathotune.predict(model, [str(f) for f in files], batch_size=3)
    for other in (pil, arrays, paths):
        np.testing.assert_allclose(other.probs, by_folder.probs, atol=1e-6)
        assert other.labels == by_folder.labels
    assert set(by_folder.labels) <= {"a", "b", "c"}
    np.testing.assert_allclose(by_folder.probs.sum(1), 1.0, atol=1e-6)
    x = torch.stack([pathotune.transforms(model)(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        np.testing.assert_allclose(model(x).softmax(-1).numpy(), by_folder.probs, atol=1e-6)


def test_predict_equals_the_command_line(model, folder, tmp_path, monkeypatch, capsys):
    bundle = save_bundle(model, tmp_path / "bundle")
    code, _, err = run_main(monkeypatch, capsys, "predict", bundle, folder, "--out", tmp_path / "p.csv", "--quiet")
    assert code == 0, err
    with open(tmp_path / "p.csv", newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    ours = model.predict(folder)
    for name, row in zip(ours.names, ours.probs, strict=True):
        cli = [float(rows[Path(name).name][f"prob_{c}"]) for c in ("a", "b", "c")]
        np.testing.assert_allclose(row, cli, atol=1e-5)


def test_a_forward_on_an_image_says_what_to_do(model, folder, tmp_path):
    with pytest.raises(TypeError, match=r"takes a normalised \(B, 3, H, W\) tensor, not a PngImageFile.*model.predict"):
        model(Image.open(next(folder.glob("*.png"))))
    with pytest.raises(pathotune.DataError, match="no images in folder"):
        model.predict(tmp_path)
    with pytest.raises(pathotune.DataError, match="cannot read image .*gone.png"):
        model.predict(tmp_path / "gone.png")


def test_the_old_img_size_keyword_warns_and_still_works() -> None:
    """``image_size`` is the one name; ``img_size=`` (the old keyword) works for one release, with a FutureWarning
    that points at the caller's line."""
    with pytest.warns(FutureWarning, match=r"create_model\(img_size=\.\.\.\) is now create_model\(image_size") as got:
        m = create_model(TINY_NAME, "linear", 2, img_size=IMG, backbone_kwargs=TINY2)
    assert got[0].filename == __file__
    assert m.backbone.image_size == m.provenance.image_size == IMG
    with pytest.warns(FutureWarning, match=r"create_backbone\(img_size=\.\.\.\) is now") as got:
        bb = create_backbone(TINY_NAME, img_size=2 * IMG, **TINY2)
    assert got[0].filename == __file__
    assert bb.image_size == 2 * IMG and bb.vit.patch_embed.img_size == (2 * IMG, 2 * IMG)
    with (
        pytest.raises(ConfigError, match="image_size=32 and img_size=64; pass image_size only"),
        pytest.warns(FutureWarning),
    ):
        create_model(TINY_NAME, "linear", 2, image_size=IMG, img_size=2 * IMG, backbone_kwargs=TINY2)

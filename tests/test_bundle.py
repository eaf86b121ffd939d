"""Bundles round-trip exactly, stay small, and refuse anything they were not made for."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, TINY_NAME
from safetensors.torch import load_file, save_file

from pathotune import BundleError, Task, create_model, load_bundle, save_bundle
from pathotune.bundle import MANIFEST, TENSORS, manifest_checksum, read_manifest

NAME = TINY_NAME


@pytest.fixture
def weights(tmp_path):
    """A local backbone checkpoint, as a user would have one."""
    torch.manual_seed(1)
    model = create_model(NAME, "linear", 2, image_size=32, backbone_kwargs=TINY)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.vit.state_dict().items()}, str(path))
    return path


def trained(method: str, weights, text_features=None, **switches):
    torch.manual_seed(0)
    task = Task(name="pen-mark QC", organ="skin", classes=("background", "pen", "tissue"))
    model = create_model(
        NAME,
        method,
        3,
        task=task,
        weights=weights,
        image_size=32,
        backbone_kwargs=TINY,
        text_features=text_features,
        **switches,
    )
    with torch.no_grad():  # stand-in for training: move every trainable tensor off its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("method", ["pathotune", "lora", "full", "linear", "vpt-shallow"])
def test_round_trip_gives_identical_logits(method, weights, tmp_path, images, text_features):
    model = trained(method, weights, text_features)
    out = save_bundle(model, tmp_path / "bundle")
    loaded = load_bundle(out)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["method"] == method
    assert manifest["class_names"] == ["background", "pen", "tissue"]
    assert manifest["provenance"]["backbone"] == NAME
    assert manifest["provenance"]["fingerprint"] == model.provenance.fingerprint
    assert manifest["provenance"]["image_size"] == 32 and "img_size" not in manifest["provenance"]
    assert "pen-mark QC" in manifest["task_text"]
    saved = set(load_file(str(out / TENSORS)))
    assert all(k.startswith(("head.", "tvp.", "ttp.", "ivp.", "gates.", "backbone.")) for k in saved)
    if method != "full":
        assert not any(k.startswith("backbone.") and "lora_" not in k for k in saved)


def test_ttp_bundle_needs_no_text_encoder(weights, tmp_path, text_features, monkeypatch):
    model = trained("text", weights, text_features)
    out = save_bundle(model, tmp_path / "b")

    def refuse(*a, **k):
        raise AssertionError("the text encoder must not be loaded when a bundle carries the text encoding")

    monkeypatch.setattr("pathotune.text.encoders.load_text_encoder", refuse)
    loaded = load_bundle(out)
    torch.testing.assert_close(loaded.ttp.text_pooled, text_features[0])


def test_default_pathotune_bundle_is_under_5_percent_of_vit_s(tmp_path, text_features):
    model = create_model(
        "vit_small_patch14_dinov2",
        "pathotune",
        3,
        image_size=224,
        text_features=(torch.randn(384), torch.randn(12, 384)),
    )
    out = save_bundle(model, tmp_path / "b")
    backbone_bytes = sum(t.numel() * t.element_size() for t in model.backbone.vit.state_dict().values())
    bundle_bytes = (out / TENSORS).stat().st_size + (out / MANIFEST).stat().st_size
    assert bundle_bytes < 0.05 * backbone_bytes, (bundle_bytes, backbone_bytes)


def test_refuses_other_backbone_id(weights, tmp_path, text_features):
    out = save_bundle(trained("vpt-deep", weights), tmp_path / "b")
    with pytest.raises(BundleError, match="trained on backbone 'vit_small_patch16_224', not 'vit_base_patch16_224'"):
        load_bundle(out, backbone="vit_base_patch16_224")


def test_refuses_other_weights(weights, tmp_path):
    out = save_bundle(trained("vpt-deep", weights), tmp_path / "b")
    other = tmp_path / "other.safetensors"
    sd = load_file(str(weights))
    sd["norm.weight"] = sd["norm.weight"] + 1.0
    save_file(sd, str(other))
    with pytest.raises(BundleError, match="fingerprint .* pass the weights it was trained with"):
        load_bundle(out, weights=other)


def test_refuses_missing_and_corrupt_files(weights, tmp_path):
    out = save_bundle(trained("vpt-deep", weights), tmp_path / "b")
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    blob = (out / TENSORS).read_bytes()
    (out / TENSORS).write_bytes(blob[:-10] + b"0123456789")
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(out)
    (out / TENSORS).unlink()
    with pytest.raises(BundleError, match=f"has no {TENSORS}"):
        load_bundle(out)
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="manifest .* is corrupt"):
        load_bundle(out)


def test_refuses_wrong_shapes(weights, tmp_path):
    out = save_bundle(trained("vpt-deep", weights), tmp_path / "b")
    sd = load_file(str(out / TENSORS))
    sd["tvp.tokens"] = torch.zeros(3, 7, 32)
    save_file(sd, str(out / TENSORS))
    manifest = json.loads((out / MANIFEST).read_text())
    import hashlib

    manifest["sha256"] = hashlib.sha256((out / TENSORS).read_bytes()).hexdigest()
    manifest["manifest_sha256"] = manifest_checksum(manifest)  # a consistent re-export, not an edit
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"tensor 'tvp.tokens' has shape \(3, 7, 32\), model wants \(3, 10, 32\)"):
        load_bundle(out)


def test_refuses_newer_format(weights, tmp_path):
    out = save_bundle(trained("linear", weights), tmp_path / "b")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format 99, newer than .* upgrade pathotune"):
        load_bundle(out)


def test_overwrite_is_atomic(weights, tmp_path, monkeypatch):
    first = save_bundle(trained("linear", weights), tmp_path / "b")
    before = (first / TENSORS).read_bytes()

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("pathotune.bundle.save_file", crash)
    with pytest.raises(RuntimeError):
        save_bundle(trained("vpt-deep", weights), tmp_path / "b", overwrite=True)
    assert (first / TENSORS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "backbone.safetensors"]


@pytest.mark.parametrize("name", ["pathotune_attn", "instance_mlp"])
def test_format_1_bundles_still_load_and_predict_as_they_did(name):
    """Bundles written by the format-1 code (prompts concatenated into the sequence, IVP from a second pass,
    no gates, VRM tokens without base tokens) give the logits that code gave, recorded beside them."""
    from pathlib import Path

    folder = Path(__file__).parent / "data" / "format1_bundles" / name
    assert json.loads((folder / MANIFEST).read_text())["format_version"] == 1
    model = load_bundle(folder)
    assert model.switches.prompt_attn == "joint" and not model.gates
    ref = load_file(str(folder / "reference.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(ref["images"]), ref["logits"], atol=1e-5, rtol=1e-5)


def test_manifest_naming_the_size_img_size_still_loads(weights, tmp_path, images):
    """Bundles written before the input size was called ``image_size`` name it ``img_size`` in their provenance
    (format 1, and format 2 up to that change): the manifest reader takes either, and a re-save writes the new
    name."""
    from pathlib import Path

    fixture = Path(__file__).parent / "data" / "format1_bundles" / "pathotune_attn"
    stored = json.loads((fixture / MANIFEST).read_text())["provenance"]
    assert stored["img_size"] == 32 and "image_size" not in stored
    prov = read_manifest(fixture)["provenance"]
    assert prov["image_size"] == 32 and "img_size" not in prov
    assert list(prov)[:4] == ["backbone", "weights", "fingerprint", "image_size"]  # same place, new name
    old = load_bundle(fixture)
    assert old.provenance.image_size == old.backbone.image_size == 32

    model = trained("vpt-deep", weights)  # a format-2 bundle as the code before the rename wrote it
    out = save_bundle(model, tmp_path / "b")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["provenance"] = {("img_size" if k == "image_size" else k): v for k, v in manifest["provenance"].items()}
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    loaded = load_bundle(out)
    assert loaded.provenance.image_size == 32
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    again = json.loads((save_bundle(loaded, tmp_path / "c") / MANIFEST).read_text())["provenance"]
    assert again["image_size"] == 32 and "img_size" not in again

    manifest["provenance"]["image_size"] = 64  # both names: not guessed between
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"unknown key 'provenance\.img_size'"):
        load_bundle(out)

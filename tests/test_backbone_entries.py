"""Registered backbones load each vendor's published checkpoint layout and reproduce the vendor's features.

Every model is built at a tiny width and depth (the entry's distinctive kwargs kept) and filled with random
weights, so the checks cover key maps, shapes and forward semantics without downloading anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from helpers import TINY2, randomize
from safetensors.torch import load_file, save_file
from timm.layers import SwiGLUPacked
from torch import nn

from pathotune.backbones import create_backbone, get_backbone_spec, list_backbones
from pathotune.backbones.vit import create_vit
from pathotune.errors import WeightsError
from pathotune.prompts.attention import check_block

TINY = TINY2
# Smallest image with a 2x2 patch grid for each entry.
TINY_IMG = {
    "dinov2_vits14": 28,
    "dinov2_vitb14": 28,
    "vit_b16_imagenet": 32,
    "clip_vitb16": 32,
    "uni": 32,
    "uni2_h": 28,
    "virchow2": 28,
    "phikon": 32,
    "phikon_v2": 32,
    "h_optimus_0": 28,
    "gigapath": 32,
    "conch": 32,
    "pathoduet": 32,
}
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(name: str, weights: str | Path | None = None, img: int | None = None, **kw) -> nn.Module:
    return create_backbone(name, weights=weights, image_size=img or TINY_IMG[name], **{**TINY, **kw})


def assert_landed(backbone: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Each expected timm tensor is in the backbone, bit for bit, and nothing in it was left unset."""
    got = backbone.vit.state_dict()
    assert set(expected) == set(got), sorted(set(expected) ^ set(got))
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def pixels(img: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, img, img)


# --------------------------------------------------------------------------------------------- registry


def test_all_entries_are_listed_with_family() -> None:
    natural = {"dinov2_vits14", "dinov2_vitb14", "vit_b16_imagenet", "clip_vitb16"}
    pathology = {"uni", "uni2_h", "virchow2", "phikon", "phikon_v2", "h_optimus_0", "gigapath", "conch"}
    pathology.add("pathoduet")
    assert natural | pathology <= set(list_backbones())
    assert natural <= set(list_backbones("natural"))
    assert pathology <= set(list_backbones("pathology"))
    for name in natural | pathology:
        spec = get_backbone_spec(name)
        assert spec.description and spec.weights_hint and spec.pool in ("default", "token", "avg", "token+avg")
    assert get_backbone_spec("dinov2_vits14").bundled


# Published full-size shapes: (million params, pos_embed, first fc1 weight, prefix tokens, patch).
FULL = {
    "dinov2_vits14": (21.6, (1, 257, 384), (1536, 384), 1, 14),
    "dinov2_vitb14": (85.7, (1, 257, 768), (3072, 768), 1, 14),
    "vit_b16_imagenet": (85.8, (1, 197, 768), (3072, 768), 1, 16),
    "clip_vitb16": (85.8, (1, 197, 768), (3072, 768), 1, 16),
    "uni": (303.4, (1, 197, 1024), (4096, 1024), 1, 16),
    "uni2_h": (681.4, (1, 256, 1536), (8192, 1536), 9, 14),
    "virchow2": (631.2, (1, 261, 1280), (6832, 1280), 5, 14),
    "phikon": (85.8, (1, 197, 768), (3072, 768), 1, 16),
    "phikon_v2": (303.4, (1, 197, 1024), (4096, 1024), 1, 16),
    "h_optimus_0": (1134.8, (1, 256, 1536), (8192, 1536), 5, 14),
    "gigapath": (1135.0, (1, 197, 1536), (8192, 1536), 1, 16),
    "conch": (87.6, (1, 785, 768), (3072, 768), 1, 16),  # trunk + contrastive attentional pooler
    "pathoduet": (85.8, (1, 198, 768), (3072, 768), 2, 16),
}


@pytest.mark.parametrize("name", list_backbones())
def test_full_size_architecture_on_meta_device(name: str) -> None:
    """The real-size model (never allocated) has the vendor's parameter count and tensor shapes."""
    millions, pos, fc1, prefix, patch = FULL[name]
    with torch.device("meta"):
        vit = create_vit(get_backbone_spec(name))
    sd = vit.state_dict()
    assert sum(p.numel() for p in vit.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)
    assert tuple(sd["pos_embed"].shape) == pos
    assert tuple(sd["blocks.0.mlp.fc1.weight"].shape) == fc1
    assert vit.num_prefix_tokens == prefix
    assert vit.patch_embed.patch_size == (patch, patch)


@pytest.mark.parametrize("name", list_backbones())
def test_every_entry_takes_prompts(name: str) -> None:
    """Prompted blocks re-run timm's Block/Attention parts; every registered architecture must be that kind."""
    with torch.device("meta"):
        vit = create_vit(get_backbone_spec(name))
    for block in vit.blocks:
        check_block(block)


# ---------------------------------------------------------------------------------- errors and hints


@pytest.mark.parametrize("name", sorted(TINY_IMG))
def test_missing_weights_name_the_expected_file(name: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as e:
        tiny(name, weights=tmp_path / "absent.bin")
    assert get_backbone_spec(name).weights_hint in str(e.value)


def test_wrong_width_raises(tmp_path: Path) -> None:
    ref = timm.create_model("vit_large_patch16_224", img_size=32, init_values=1e-5, num_classes=0, **TINY)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="shape of"):
        tiny("uni", weights=tmp_path, embed_dim=64)


def test_plain_mlp_checkpoint_does_not_fit_swiglu_entry(tmp_path: Path) -> None:
    ref = timm.create_model(
        "vit_huge_patch14_224",
        img_size=28,
        mlp_ratio=5.3375,
        init_values=1e-5,
        reg_tokens=4,
        num_classes=0,
        **TINY,
    )
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"mlp\.fc2"):
        tiny("virchow2", weights=tmp_path)


def test_hf_file_missing_a_key_names_the_hint(tmp_path: Path) -> None:
    sd = _hf_vit_file(tmp_path, layer_norm_eps=1e-12)[1]
    del sd["layernorm.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="owkin/phikon"):
        tiny("phikon", weights=tmp_path / "pytorch_model.bin")


# -------------------------------------------------------------------- vendors publishing timm keys


def _timm_vendor_case(name: str) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The vendor's own timm recipe (as in their model cards), shrunk; and how they read the embedding."""
    img = TINY_IMG[name]
    swiglu = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}
    if name == "uni":
        ref = timm.create_model("vit_large_patch16_224", img_size=img, init_values=1e-5, num_classes=0, **TINY)
        return ref, ref
    if name == "uni2_h":
        kw = {"patch_size": 14, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8, **swiglu}
        ref = timm.create_model("vit_giant_patch14_224", img_size=img, init_values=1e-5, num_classes=0, **kw, **TINY)
        return ref, ref
    if name == "virchow2":
        kw = {"mlp_ratio": 5.3375, "reg_tokens": 4, "global_pool": "", **swiglu}
        ref = timm.create_model("vit_huge_patch14_224", img_size=img, init_values=1e-5, num_classes=0, **kw, **TINY)

        def virchow_embedding(x: torch.Tensor) -> torch.Tensor:
            out = ref(x)  # [cls][4 registers][patches]
            return torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)

        return ref, virchow_embedding
    if name == "h_optimus_0":
        ref = timm.create_model(
            "vit_giant_patch14_reg4_dinov2",
            img_size=img,
            init_values=1e-5,
            global_pool="token",
            num_classes=0,
            **TINY,
        )
        return ref, ref
    if name == "gigapath":
        kw = {"patch_size": 16, "mlp_ratio": 5.33334, "init_values": 1e-5}
        ref = timm.create_model("vit_giant_patch14_dinov2", img_size=img, num_classes=0, **kw, **TINY)
        return ref, ref
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["uni", "uni2_h", "virchow2", "h_optimus_0", "gigapath"])
def test_timm_layout_vendors(name: str, tmp_path: Path) -> None:
    ref, embed = _timm_vendor_case(name)
    randomize(ref)
    sd = ref.state_dict()
    if name == "h_optimus_0":
        save_file(sd, str(tmp_path / "model.safetensors"))
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    bb = tiny(name, weights=tmp_path)
    assert_landed(bb, sd)
    x = pixels(TINY_IMG[name])
    with torch.no_grad():
        torch.testing.assert_close(bb(x), embed(x), atol=ATOL, rtol=0)
    if name == "virchow2":
        assert bb.feature_dim == 2 * bb.embed_dim


# ------------------------------------------------------------------------------- HF ViT / Phikon


def _hf_vit_file(tmp_path: Path, layer_norm_eps: float, classifier: bool = False):
    import transformers as tf

    cfg = tf.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=16,
        layer_norm_eps=layer_norm_eps,
        attn_implementation="eager",
    )
    if classifier:
        cfg.num_labels = 5
        model = randomize(tf.ViTForImageClassification(cfg))
    else:
        model = randomize(tf.ViTModel(cfg))
    model.save_pretrained(tmp_path / "hf")  # writes the published (original) key names
    return model, load_file(str(tmp_path / "hf" / "model.safetensors"))


def _expected_from_hf_vit(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Hand-written correspondence, independent of the converter under test."""
    g = {k.removeprefix(prefix): v for k, v in sd.items()}
    out = {
        "cls_token": g["embeddings.cls_token"],
        "pos_embed": g["embeddings.position_embeddings"],
        "patch_embed.proj.weight": g["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": g["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": g["layernorm.weight"],
        "norm.bias": g["layernorm.bias"],
    }
    for i in range(2):
        e, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            a = e + "attention.attention."
            out[b + "attn.qkv." + t] = torch.cat([g[a + "query." + t], g[a + "key." + t], g[a + "value." + t]])
            out[b + "attn.proj." + t] = g[e + "attention.output.dense." + t]
            out[b + "mlp.fc1." + t] = g[e + "intermediate.dense." + t]
            out[b + "mlp.fc2." + t] = g[e + "output.dense." + t]
            out[b + "norm1." + t] = g[e + "layernorm_before." + t]
            out[b + "norm2." + t] = g[e + "layernorm_after." + t]
    return out


def test_phikon_matches_transformers_vit(tmp_path: Path) -> None:
    model, sd = _hf_vit_file(tmp_path, layer_norm_eps=1e-12)
    torch.save(sd, tmp_path / "pytorch_model.bin")  # Owkin's file name
    bb = tiny("phikon", weights=tmp_path / "pytorch_model.bin")
    assert_landed(bb, _expected_from_hf_vit(sd))
    assert bb.vit.norm.eps == 1e-12
    x = pixels(32)
    with torch.no_grad():
        ref = model(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(bb(x), ref, atol=ATOL, rtol=0)


def test_vit_b16_imagenet_reads_hf_classifier_and_timm_files(tmp_path: Path) -> None:
    model, sd = _hf_vit_file(tmp_path, layer_norm_eps=1e-6, classifier=True)
    bb = tiny("vit_b16_imagenet", weights=tmp_path / "hf")
    assert_landed(bb, _expected_from_hf_vit(sd, prefix="vit."))
    x = pixels(32)
    with torch.no_grad():
        ref = model.vit(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(bb(x), ref, atol=ATOL, rtol=0)

    timm_ref = randomize(timm.create_model("vit_base_patch16_224", img_size=32, num_classes=7, **TINY))
    save_file(timm_ref.state_dict(), str(tmp_path / "model.safetensors"))
    bb = tiny("vit_b16_imagenet", weights=tmp_path / "model.safetensors")
    assert_landed(bb, {k: v for k, v in timm_ref.state_dict().items() if not k.startswith("head.")})
    with torch.no_grad():
        torch.testing.assert_close(bb(x), timm_ref.forward_head(timm_ref.forward_features(x), pre_logits=True))


# ------------------------------------------------------------------------------ HF DINOv2 layouts


def _hf_dinov2(image_size: int, patch_size: int):
    import transformers as tf

    cfg = tf.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        image_size=image_size,
        patch_size=patch_size,
        attn_implementation="eager",
    )
    return randomize(tf.Dinov2Model(cfg))


def test_phikon_v2_matches_transformers_dinov2(tmp_path: Path) -> None:
    model = _hf_dinov2(32, 16)
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    bb = tiny("phikon_v2", weights=tmp_path)
    got = bb.vit.state_dict()
    assert torch.equal(got["blocks.1.ls2.gamma"], sd["encoder.layer.1.layer_scale2.lambda1"])
    assert torch.equal(got["blocks.0.mlp.fc1.weight"], sd["encoder.layer.0.mlp.fc1.weight"])
    assert torch.equal(got["pos_embed"], sd["embeddings.position_embeddings"])
    x = pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), model(pixel_values=x).pooler_output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitb14"])
def test_dinov2_hf_layout_with_position_resampling(name: str, tmp_path: Path) -> None:
    """File made for a 3x3 grid, used on 2x2: both sides resample the position table the same way."""
    model = _hf_dinov2(42, 14)
    model.save_pretrained(tmp_path)
    bb = tiny(name, weights=tmp_path / "model.safetensors", img=28)
    assert bb.vit.pos_embed.shape == (1, 5, 32)
    x = pixels(28)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), model(pixel_values=x).pooler_output, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vitb14"])
def test_dinov2_original_pth_layout(name: str, tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed

    spec = get_backbone_spec(name)
    ref = randomize(timm.create_model(spec.timm_name, img_size=42, num_classes=0, **TINY))
    sd = dict(ref.state_dict())
    assert "blocks.0.ls1.gamma" in sd  # the facebookresearch names, which timm shares
    sd["mask_token"] = torch.randn(1, 32)
    torch.save(sd, tmp_path / f"{name}_pretrain.pth")

    same = tiny(name, weights=tmp_path / f"{name}_pretrain.pth", img=42)
    assert_landed(same, ref.state_dict())
    x = pixels(42)
    with torch.no_grad():
        torch.testing.assert_close(same(x), ref(x), atol=ATOL, rtol=0)

    small = tiny(name, weights=tmp_path / f"{name}_pretrain.pth", img=28)
    want = resample_abs_pos_embed(sd["pos_embed"], new_size=[2, 2], num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(small.vit.pos_embed.data, want)


# -------------------------------------------------------------------------------------------- CLIP


def test_clip_open_clip_layout(tmp_path: Path) -> None:
    from open_clip.transformer import QuickGELU, VisionTransformer

    ref = randomize(VisionTransformer(32, 16, 32, 2, 2, 4.0, output_dim=16, act_layer=QuickGELU))
    sd = {f"visual.{k}": v for k, v in ref.state_dict().items()}
    sd.update({"logit_scale": torch.tensor(4.6), "positional_embedding": torch.randn(8, 32)})
    sd["token_embedding.weight"] = torch.randn(50, 32)
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    bb = tiny("clip_vitb16", weights=tmp_path)
    got = bb.vit.state_dict()
    assert torch.equal(got["cls_token"].flatten(), sd["visual.class_embedding"])
    assert torch.equal(got["blocks.1.attn.qkv.weight"], sd["visual.transformer.resblocks.1.attn.in_proj_weight"])
    assert torch.equal(got["norm_pre.weight"], sd["visual.ln_pre.weight"])
    x = pixels(32)
    with torch.no_grad():  # open_clip's embedding is ln_post(cls) @ proj; ours stops before the projection
        torch.testing.assert_close(bb(x) @ sd["visual.proj"], ref(x), atol=ATOL, rtol=0)


def test_clip_hf_layout(tmp_path: Path) -> None:
    import transformers as tf

    cfg = tf.CLIPConfig(
        text_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    cfg._attn_implementation = "eager"
    model = randomize(tf.CLIPModel(cfg))
    model.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("text_model.") for k in sd)
    bb = tiny("clip_vitb16", weights=tmp_path)
    got = bb.vit.state_dict()
    assert torch.equal(got["pos_embed"][0], sd["vision_model.embeddings.position_embedding.weight"])
    assert torch.equal(got["blocks.1.mlp.fc2.bias"], sd["vision_model.encoder.layers.1.mlp.fc2.bias"])
    assert torch.equal(got["norm.weight"], sd["vision_model.post_layernorm.weight"])
    x = pixels(32)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=x).pooler_output
        torch.testing.assert_close(bb(x), ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------- CONCH


# The CoCa file layout, its attentional pooler and ln_contrast: tests/test_fm_entries.py.


# ---------------------------------------------------------------------------------------- PathoDuet


def _moco_sincos(grid: int, dim: int) -> torch.Tensor:
    """The MoCo v3 / PathoDuet table, written the way their code builds it (meshgrid of w then h)."""
    gw, gh = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    omega = 1.0 / (10000.0 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    ow = torch.einsum("m,d->md", gw.flatten(), omega)
    oh = torch.einsum("m,d->md", gh.flatten(), omega)
    return torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], dim=1)


def _pathoduet_file(img: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    kw = {"img_size": img, "global_pool": "avg", "num_classes": 0}  # as PathoDuet builds it: fc_norm, no norm
    vit = randomize(timm.create_model("vit_base_patch16_224", **kw, **TINY))
    grid = img // 16
    sd = {k: v for k, v in vit.state_dict().items() if k != "pos_embed"}
    sd["pos_embed"] = torch.cat([torch.zeros(2, 32), _moco_sincos(grid, 32)]).unsqueeze(0)  # [pretext][cls][...]
    sd["pretext_token"] = torch.randn(1, 1, 32)
    sd["head.0.weight"] = torch.randn(64, 32)  # MoCo projector left in the file
    return vit, sd


def _pathoduet_reference(vit: nn.Module, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """PathoDuet's forward from its own layout: [pretext][cls][patches] + table, blocks, fc_norm(mean patch)."""
    t = vit.patch_embed(x)
    n = t.shape[0]
    t = torch.cat([sd["pretext_token"].expand(n, -1, -1), sd["cls_token"].expand(n, -1, -1), t], dim=1)
    t = vit.norm(vit.blocks(t + sd["pos_embed"]))
    return vit.fc_norm(t[:, 2:].mean(1))


def test_pathoduet_pretext_token_and_sincos_table(tmp_path: Path) -> None:
    vit, sd = _pathoduet_file(32)
    torch.save(sd, tmp_path / "checkpoint_HE.pth")
    bb = tiny("pathoduet", weights=tmp_path / "checkpoint_HE.pth")
    got = bb.vit.state_dict()
    assert torch.equal(got["reg_token"], sd["pretext_token"])
    assert torch.equal(got["pos_embed"][:, :2], torch.zeros(1, 2, 32))
    assert torch.equal(got["pos_embed"][:, 2:], sd["pos_embed"][:, 2:])
    assert bb.num_prefix_tokens == 2
    x = pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), _pathoduet_reference(vit, sd, x), atol=ATOL, rtol=0)


def test_pathoduet_file_without_table_gets_it_rebuilt(tmp_path: Path) -> None:
    vit, sd = _pathoduet_file(224)  # the 14x14 grid PathoDuet was trained on
    stripped = {k: v for k, v in sd.items() if k != "pos_embed"}
    torch.save({"state_dict": stripped}, tmp_path / "checkpoint_p2.pth")
    bb = tiny("pathoduet", weights=tmp_path / "checkpoint_p2.pth", img=224)
    torch.testing.assert_close(bb.vit.pos_embed.data[:, 2:], sd["pos_embed"][:, 2:], atol=1e-6, rtol=0)
    x = pixels(224, n=1)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), _pathoduet_reference(vit, sd, x), atol=ATOL, rtol=0)

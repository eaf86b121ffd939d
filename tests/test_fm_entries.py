"""FM entries that pool or resample as their vendor does, each checked against a model built the vendor's way.

PathoDuet: timm's ViT with ``global_pool='avg'`` (``fc_norm`` over the mean patch token, ``norm`` Identity) and
no input normalisation. CONCH: the attentional pooler and ``ln_contrast`` over the trunk's tokens (512-d).
Pool overrides apply ``fc_norm`` after pooling, as timm does. Position tables resampled to another grid use
antialias exactly for the vendors that build with ``dynamic_img_size`` (UNI, UNI2-h, Virchow2, CONCH).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from helpers import TINY2, randomize
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pathotune.backbones import create_backbone, get_backbone_spec
from pathotune.errors import WeightsError

TINY = TINY2
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pixels(img: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, img, img)


# ---------------------------------------------------------------------------------------- PathoDuet


class _PathoDuetViT(VisionTransformer):
    """PathoDuet's ``VisionTransformerMoCo(pretext_token=True, global_pool='avg')`` (vits.py), shrunk: timm's ViT
    with a pretext token before the class token and a position table with two prefix rows."""

    def __init__(self, img: int) -> None:
        super().__init__(img_size=img, patch_size=16, global_pool="avg", num_classes=0, **TINY)
        self.num_prefix_tokens += 1
        self.pretext_token = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 2 + (img // 16) ** 2, self.embed_dim), requires_grad=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """PathoDuet's forward_features, then timm's avg pooling through fc_norm (forward_head, pre-logits)."""
        t = self.patch_embed(x)
        n = t.shape[0]
        t = torch.cat([self.pretext_token.expand(n, -1, -1), self.cls_token.expand(n, -1, -1), t], dim=1)
        t = self.norm(self.blocks(t + self.pos_embed))
        return self.forward_head(t, pre_logits=True)


def _moco_projector(dim: int) -> dict[str, torch.Tensor]:
    """The MoCo v3 projector (Linear, BatchNorm) that PathoDuet's files carry under ``head.``."""
    return {
        "head.0.weight": torch.randn(64, dim),
        "head.1.weight": torch.randn(64),
        "head.1.bias": torch.randn(64),
        "head.1.running_mean": torch.randn(64),
        "head.1.running_var": torch.rand(64),
        "head.1.num_batches_tracked": torch.tensor(7),
    }


@pytest.mark.parametrize("layout", ["release", "training"])
def test_pathoduet_pools_the_mean_patch_token_through_fc_norm(layout: str, tmp_path: Path) -> None:
    ref = randomize(_PathoDuetViT(32))
    sd = ref.state_dict()
    assert "fc_norm.weight" in sd and "norm.weight" not in sd  # what global_pool='avg' gives PathoDuet's files
    sd.update(_moco_projector(32))
    if layout == "release":  # checkpoint_p2.pth: the encoder's flat state dict, loaded with strict=False
        path = tmp_path / "checkpoint_p2.pth"
        torch.save(sd, path)
    else:  # main_bridge.py: the MoCo wrapper's state dict under DDP, base and momentum encoders
        path = tmp_path / "checkpoint_0019.pth"
        wrapped = {f"module.base_encoder.{k}": v for k, v in sd.items()}
        wrapped.update({f"module.momentum_encoder.{k}": v + 1 for k, v in sd.items()})
        torch.save({"state_dict": wrapped}, path)
    bb = create_backbone("pathoduet", weights=path, image_size=32, **TINY)
    assert isinstance(bb.vit.norm, nn.Identity)
    assert torch.equal(bb.vit.fc_norm.weight, sd["fc_norm.weight"])
    assert torch.equal(bb.vit.reg_token, sd["pretext_token"])
    assert bb.feature_dim == 32
    x = pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref.features(x), atol=ATOL, rtol=0)


def test_pathoduet_takes_unnormalised_pixels() -> None:
    """PathoDuet trains and evaluates on ToTensor() pixels: no mean/std normalisation."""
    spec = get_backbone_spec("pathoduet")
    assert spec.mean == (0.0, 0.0, 0.0)
    assert spec.std == (1.0, 1.0, 1.0)


# -------------------------------------------------------------------------------------------- CONCH


class _ConchPooler(nn.Module):
    """CONCH's AttentionalPooler (open_clip_custom/transformer.py): sequence-first attention of learned queries
    (``ln_q``) over the normalised tokens (``ln_k``), keys and values of the trunk's width."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x).permute(1, 0, 2)  # NLD -> LND
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, x.shape[1], 1)
        return self.attn(q, x, x, need_weights=False)[0].permute(1, 0, 2)


class _Conch(nn.Module):
    """The module tree of CONCH's ``pytorch_model.bin`` (coca_model.py, vision_tower.py), shrunk."""

    def __init__(self, width: int = 32, embed_dim: int = 512) -> None:
        super().__init__()
        self.visual = nn.Module()
        self.visual.trunk = VisionTransformer(
            img_size=32, patch_size=16, num_classes=0, dynamic_img_size=True, mlp_ratio=4, **TINY
        )
        self.visual.attn_pool_contrast = _ConchPooler(embed_dim, width, 8, 1)
        self.visual.ln_contrast = nn.LayerNorm(embed_dim)
        self.visual.proj_contrast = nn.Parameter(torch.randn(embed_dim, embed_dim))
        self.visual.attn_pool_caption = _ConchPooler(48, width, 8, 4)
        self.visual.ln_caption = nn.LayerNorm(48)
        self.text = nn.Module()
        self.text.token_embedding = nn.Embedding(10, 48)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def encode_image(self, x: torch.Tensor, proj_contrast: bool) -> torch.Tensor:
        """CoCa.encode_image(normalize=False): the pooler's single query through ln_contrast (then proj)."""
        v = self.visual
        pooled = v.ln_contrast(v.attn_pool_contrast(v.trunk.forward_features(x))[:, 0])
        return pooled @ v.proj_contrast if proj_contrast else pooled


def test_conch_image_embedding_is_the_attentional_pooler(tmp_path: Path) -> None:
    conch = randomize(_Conch())
    sd = conch.state_dict()
    assert "visual.attn_pool_contrast.attn.k_proj_weight" in sd  # kdim != d_model: separate q/k/v weights
    torch.save(sd, tmp_path / "pytorch_model.bin")
    bb = create_backbone("conch", weights=tmp_path, image_size=32, **TINY)
    assert bb.feature_dim == 512
    got = bb.vit.state_dict()
    assert torch.equal(got["blocks.1.attn.qkv.weight"], sd["visual.trunk.blocks.1.attn.qkv.weight"])
    assert torch.equal(got["attn_pool.query"], sd["visual.attn_pool_contrast.query"])
    assert torch.equal(got["attn_pool.norm.weight"], sd["visual.ln_contrast.weight"])
    x = pixels(32)
    with torch.no_grad():
        ours = bb(x)
        torch.testing.assert_close(ours, conch.encode_image(x, proj_contrast=False), atol=ATOL, rtol=0)
        joint = conch.encode_image(x, proj_contrast=True)
        torch.testing.assert_close(ours @ sd["visual.proj_contrast"], joint, atol=1e-4, rtol=0)
        torch.testing.assert_close(bb.forward_tokens(x), conch.visual.trunk.forward_features(x), atol=ATOL, rtol=0)


def test_conch_file_without_the_pooler_is_refused(tmp_path: Path) -> None:
    sd = {k: v for k, v in _Conch().state_dict().items() if "attn_pool_contrast" not in k}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"visual\.attn_pool_contrast\.query.*MahmoodLab/CONCH"):
        create_backbone("conch", weights=tmp_path, image_size=32, **TINY)


# ------------------------------------------------------------------------------ fc_norm after pooling


def _avg_trained(tmp_path: Path) -> tuple[nn.Module, Path]:
    ref = randomize(timm.create_model("vit_small_patch16_224", img_size=32, global_pool="avg", num_classes=0, **TINY))
    assert isinstance(ref.norm, nn.Identity) and isinstance(ref.fc_norm, nn.LayerNorm)
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    return ref, tmp_path / "model.safetensors"


def _timm_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("pool", ["default", "avg"])
def test_avg_pool_goes_through_fc_norm_as_timm(pool: str, tmp_path: Path) -> None:
    ref, path = _avg_trained(tmp_path)
    bb = create_backbone("vit_small_patch16_224", weights=path, image_size=32, pool=pool, global_pool="avg", **TINY)
    x = pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), _timm_features(ref, x), atol=ATOL, rtol=0)


def test_token_pools_go_through_fc_norm_as_timm(tmp_path: Path) -> None:
    """On the same weights, timm's token pooling with fc_norm is what the token override must give."""
    ref, path = _avg_trained(tmp_path)
    tok = timm.create_model(
        "vit_small_patch16_224", img_size=32, global_pool="token", fc_norm=True, num_classes=0, **TINY
    ).eval()
    tok.load_state_dict(ref.state_dict())
    x = pixels(32)
    kw = {"weights": path, "image_size": 32, "global_pool": "avg", **TINY}
    with torch.no_grad():
        token = create_backbone("vit_small_patch16_224", pool="token", **kw)(x)
        both = create_backbone("vit_small_patch16_224", pool="token+avg", **kw)(x)
        torch.testing.assert_close(token, _timm_features(tok, x), atol=ATOL, rtol=0)
        torch.testing.assert_close(both, torch.cat([token, _timm_features(ref, x)], dim=-1), atol=ATOL, rtol=0)


def test_plain_model_pools_unchanged(tmp_path: Path) -> None:
    """A token-trained model (final norm, fc_norm Identity): the avg override is the mean of normalised patches."""
    ref = randomize(timm.create_model("vit_small_patch16_224", img_size=32, num_classes=0, **TINY))
    save_file(ref.state_dict(), str(tmp_path / "model.safetensors"))
    bb = create_backbone("vit_small_patch16_224", weights=tmp_path, image_size=32, pool="avg", **TINY)
    x = pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref.forward_features(x)[:, 1:].mean(1), atol=ATOL, rtol=0)


# ------------------------------------------------------------------ position tables at another size

# (entry, native image of the file, image it is used at, the vendor resamples with antialias)
RESAMPLED = [
    ("uni", 64, 32, True),
    ("uni2_h", 56, 28, True),
    ("virchow2", 56, 28, True),
    ("conch", 64, 32, True),
    ("gigapath", 64, 32, False),
    ("h_optimus_0", 56, 28, False),
]


def _vendor_file(name: str, img: int, tmp_path: Path) -> dict[str, torch.Tensor]:
    """A randomised tiny model of the entry at ``img`` px, saved in the vendor's layout; its timm state dict."""
    src = create_backbone(name, image_size=img, **TINY)
    sd = randomize(src.vit).state_dict()
    if name == "conch":
        layout = {}
        for k, v in sd.items():
            if k.startswith("attn_pool.norm."):
                layout[k.replace("attn_pool.norm.", "visual.ln_contrast.")] = v
            elif k.startswith("attn_pool."):
                layout[k.replace("attn_pool.", "visual.attn_pool_contrast.")] = v
            else:
                layout[f"visual.trunk.{k}"] = v
        torch.save(layout, tmp_path / "pytorch_model.bin")
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    return sd


@pytest.mark.parametrize(("name", "native", "img", "antialias"), RESAMPLED)
def test_position_table_resampled_as_the_vendor(
    name: str, native: int, img: int, antialias: bool, tmp_path: Path
) -> None:
    sd = _vendor_file(name, native, tmp_path)
    bb = create_backbone(name, weights=tmp_path, image_size=img, **TINY)
    grid = list(bb.vit.patch_embed.grid_size)
    n_prefix = 0 if bb.vit.no_embed_class else bb.num_prefix_tokens
    table = sd["pos_embed"]

    def resampled(aa: bool) -> torch.Tensor:
        return resample_abs_pos_embed(table, new_size=grid, num_prefix_tokens=n_prefix, antialias=aa)

    torch.testing.assert_close(bb.vit.pos_embed.data, resampled(antialias), atol=1e-6, rtol=0)
    assert not torch.allclose(resampled(True), resampled(False), atol=1e-3)  # the choice matters at this size


def test_uni_at_half_size_matches_the_vendor_model_run_dynamically(tmp_path: Path) -> None:
    """UNI's own recipe (dynamic_img_size=True at 224) fed smaller tiles resamples at run time; ours at load."""
    ref = randomize(
        timm.create_model(
            "vit_large_patch16_224", img_size=64, init_values=1e-5, dynamic_img_size=True, num_classes=0, **TINY
        )
    )
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    bb = create_backbone("uni", weights=tmp_path, image_size=32, **TINY)
    x = pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref(x), atol=ATOL, rtol=0)

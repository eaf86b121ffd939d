"""Key maps from published checkpoint layouts to timm ``VisionTransformer`` keys.

Each function takes and returns a flat ``{key: tensor}`` dict. timm's own ``checkpoint_filter_fn`` runs
afterwards, so layouts timm already understands (original DINOv2, open_clip ``visual.*``) need no map here.
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]


def strip_prefix(sd: StateDict, prefix: str) -> StateDict:
    """Keep keys under ``prefix`` (without it) when any key has it; otherwise return ``sd`` unchanged."""
    if not any(k.startswith(prefix) for k in sd):
        return sd
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _hf_layers(sd: StateDict) -> list[int]:
    ids = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    return sorted(ids)


def _hf_embeddings(sd: StateDict) -> StateDict:
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    if "embeddings.register_tokens" in sd:
        out["reg_token"] = sd["embeddings.register_tokens"]
    return out


def _hf_attention(sd: StateDict, i: int) -> StateDict:
    a = f"encoder.layer.{i}.attention."
    out = {}
    for kind in ("weight", "bias"):
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
            [sd[f"{a}attention.{n}.{kind}"] for n in ("query", "key", "value")], dim=0
        )
        out[f"blocks.{i}.attn.proj.{kind}"] = sd[f"{a}output.dense.{kind}"]
    return out


def hf_vit_to_timm(sd: StateDict) -> StateDict:
    """HF ``ViTModel`` (e.g. Phikon) -> timm ViT."""
    sd = strip_prefix(sd, "vit.")
    out = _hf_embeddings(sd)
    for i in _hf_layers(sd):
        p = f"encoder.layer.{i}."
        out.update(_hf_attention(sd, i))
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.norm1.{kind}"] = sd[f"{p}layernorm_before.{kind}"]
            out[f"blocks.{i}.norm2.{kind}"] = sd[f"{p}layernorm_after.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[f"{p}intermediate.dense.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[f"{p}output.dense.{kind}"]
    return out


def hf_dinov2_to_timm(sd: StateDict) -> StateDict:
    """HF ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (e.g. Phikon-v2) -> timm ViT with layer scale."""
    sd = strip_prefix(sd, "dinov2.")
    out = _hf_embeddings(sd)
    for i in _hf_layers(sd):
        p = f"encoder.layer.{i}."
        out.update(_hf_attention(sd, i))
        out[f"blocks.{i}.ls1.gamma"] = sd[f"{p}layer_scale1.lambda1"]
        out[f"blocks.{i}.ls2.gamma"] = sd[f"{p}layer_scale2.lambda1"]
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.norm1.{kind}"] = sd[f"{p}norm1.{kind}"]
            out[f"blocks.{i}.norm2.{kind}"] = sd[f"{p}norm2.{kind}"]
            if f"{p}mlp.fc1.{kind}" in sd:
                out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[f"{p}mlp.fc1.{kind}"]
                out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[f"{p}mlp.fc2.{kind}"]
            else:  # SwiGLU: HF packs both input projections in weights_in, as timm's SwiGLUPacked does
                out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[f"{p}mlp.weights_in.{kind}"]
                out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[f"{p}mlp.weights_out.{kind}"]
    return out


def dinov2_to_timm(sd: StateDict) -> StateDict:
    """DINOv2 from either the facebookresearch ``.pth`` or an HF ``Dinov2Model`` file -> timm ViT.

    The original layout already uses timm's names; only the unused ``mask_token`` (and a training wrapper's
    ``backbone.`` prefix) must go. HF files are recognised by their ``embeddings.cls_token`` key.
    """
    hf = strip_prefix(sd, "dinov2.")
    if "embeddings.cls_token" in hf:
        return hf_dinov2_to_timm(hf)
    sd = strip_prefix(sd, "backbone.")
    return {k: v for k, v in sd.items() if k != "mask_token"}


def vit_to_timm(sd: StateDict) -> StateDict:
    """Timm ViT files pass through; HF ``ViTModel`` / ``ViTForImageClassification`` files are converted."""
    if "embeddings.cls_token" in strip_prefix(sd, "vit."):
        return hf_vit_to_timm(sd)
    return sd


def hf_clip_vision_to_timm(sd: StateDict) -> StateDict:
    """HF ``CLIPModel`` / ``CLIPVisionModel`` vision tower -> timm CLIP ViT (pre-norm, bias-free patch conv).

    The text tower and ``visual_projection`` are dropped: the backbone's features are the normalised class
    token before CLIP's projection, as for the open_clip layout.
    """
    sd = strip_prefix(sd, "vision_model.")
    out = {
        "cls_token": sd["embeddings.class_embedding"].reshape(1, 1, -1),
        "pos_embed": sd["embeddings.position_embedding.weight"].unsqueeze(0),
        "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
    }
    for kind in ("weight", "bias"):
        out[f"norm_pre.{kind}"] = sd[f"pre_layrnorm.{kind}"]
        out[f"norm.{kind}"] = sd[f"post_layernorm.{kind}"]
    ids = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in ids:
        p, b = f"encoder.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{b}attn.qkv.{kind}"] = torch.cat(
                [sd[f"{p}self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")], dim=0
            )
            out[f"{b}attn.proj.{kind}"] = sd[f"{p}self_attn.out_proj.{kind}"]
            out[f"{b}norm1.{kind}"] = sd[f"{p}layer_norm1.{kind}"]
            out[f"{b}norm2.{kind}"] = sd[f"{p}layer_norm2.{kind}"]
            out[f"{b}mlp.fc1.{kind}"] = sd[f"{p}mlp.fc1.{kind}"]
            out[f"{b}mlp.fc2.{kind}"] = sd[f"{p}mlp.fc2.{kind}"]
    return out


def clip_to_timm(sd: StateDict) -> StateDict:
    """CLIP image tower: HF files converted; open_clip ``visual.*`` and timm keys pass to timm's filter."""
    if "embeddings.class_embedding" in strip_prefix(sd, "vision_model."):
        return hf_clip_vision_to_timm(sd)
    return sd


CONCH_POOL = "visual.attn_pool_contrast."
CONCH_NORM = "visual.ln_contrast."


def conch_to_timm(sd: StateDict) -> StateDict:
    """CONCH ``pytorch_model.bin`` -> its timm ViT trunk with the contrastive attentional pooler as ``attn_pool``.

    ``attn_pool_contrast`` keeps its names under ``attn_pool.``; ``ln_contrast`` becomes ``attn_pool.norm``. The text
    tower, the caption pooler and ``proj_contrast`` (into the joint space) are dropped: the features are CONCH's
    ``encode_image(proj_contrast=False)``. A file without the pooler raises ``KeyError`` naming what is missing.
    """
    missing = [k for k in ("visual.trunk.pos_embed", f"{CONCH_POOL}query", f"{CONCH_NORM}weight") if k not in sd]
    if missing:
        raise KeyError(missing[0])
    out = strip_prefix(sd, "visual.trunk.")
    out.update({f"attn_pool.{k[len(CONCH_POOL) :]}": v for k, v in sd.items() if k.startswith(CONCH_POOL)})
    out.update({f"attn_pool.norm.{k[len(CONCH_NORM) :]}": v for k, v in sd.items() if k.startswith(CONCH_NORM)})
    return out


def sincos_2d_pos_embed(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[grid*grid, dim]`` in MoCo v3's channel order: sin/cos of the row, then of
    the column, each at ``dim/4`` frequencies ``temperature ** (-k / (dim/4))``."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freq = temperature ** -(torch.arange(quarter, dtype=torch.float32) / quarter)
    idx = torch.arange(grid * grid)
    rows = (idx // grid).float()[:, None] * freq
    cols = (idx % grid).float()[:, None] * freq
    return torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)


def pathoduet_to_timm(sd: StateDict, grid: int = 14) -> StateDict:
    """PathoDuet (MoCo v3 ViT with a ``pretext_token``) -> timm ViT with one register token.

    PathoDuet builds timm's ViT with ``global_pool='avg'``: ``norm`` is Identity and ``fc_norm`` normalises the
    mean patch token, so ``fc_norm.*`` is kept (and the MoCo projector ``head.*`` dropped at loading). It runs
    ``[pretext][cls][patches]`` with a position table whose two prefix rows are zero; timm with
    ``reg_tokens=1`` runs ``[cls][reg][patches]``, so the two prefix rows swap places and the pretext token
    becomes ``reg_token``. Files without ``pos_embed`` get the fixed sin-cos table rebuilt for a ``grid``
    square (14 = 224 px / 16), again with zero rows for both prefix tokens. A training checkpoint's
    ``base_encoder.`` keys are used when present.
    """
    sd = strip_prefix(sd, "base_encoder.")
    out = {k: v for k, v in sd.items() if k not in ("pretext_token", "pos_embed")}
    out["reg_token"] = sd["pretext_token"]
    pe = sd.get("pos_embed")
    if pe is None:
        dim = sd["cls_token"].shape[-1]
        pe = torch.cat([torch.zeros(2, dim), sincos_2d_pos_embed(grid, dim)]).unsqueeze(0)
    out["pos_embed"] = torch.cat([pe[:, 1:2], pe[:, 0:1], pe[:, 2:]], dim=1)
    return out

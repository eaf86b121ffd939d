"""A token-level view of a frozen timm VisionTransformer: embed, run blocks, pool."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import ConfigError, WeightsError
from .bundled import bundled_weights_path
from .loading import load_into_vit, read_state_dict
from .registry import BackboneSpec, get_backbone_spec

POOLS = ("default", "token", "avg", "token+avg")
RANDOM_INIT_SEED = 0


class AttentionalPool(nn.Module):
    """CoCa's attentional pooler followed by a LayerNorm (CONCH's ``attn_pool_contrast`` then ``ln_contrast``).

    Learned queries (``ln_q``) cross-attend over every normalised token (``ln_k``) with ``num_heads`` heads; the
    first query's output, normalised by ``norm``, is the image embedding of width ``dim``.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int = 8, num_queries: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.query = nn.Parameter(torch.randn(num_queries, dim))
        self.attn = nn.MultiheadAttention(dim, num_heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.norm(self.attn(q, kv, kv, need_weights=False)[0][:, 0])


@dataclass(frozen=True)
class HeadSpec(BackboneSpec):
    """A spec whose vendor pools with a head that timm's ViT lacks (CONCH's attentional pooler).

    ``head(vit)`` fits that head into the built model as its ``attn_pool`` (setting ``head_hidden_size``), so
    timm's ``forward_head`` runs it, strict loading fills it and the weight fingerprint covers it.
    """

    head: Callable[[VisionTransformer], None] | None = None


class TokenViT(nn.Module):
    """Wraps a timm ``VisionTransformer`` so prompts can be inserted between its blocks.

    Pooling uses timm's own ``forward_head(pre_logits=True)``, so with no prompts the features are exactly
    the plain model's.
    """

    def __init__(self, vit: nn.Module, spec: BackboneSpec, pool: str = "default") -> None:
        super().__init__()

        if not isinstance(vit, VisionTransformer):
            raise ConfigError(
                f"backbone '{spec.name}' ({type(vit).__name__}) is not a timm VisionTransformer; "
                "prompt tuning needs a ViT (CNNs can still serve as an instance encoder)"
            )
        pool = spec.pool if pool == "default" else pool
        if pool not in POOLS:
            raise ConfigError(f"unknown pool '{pool}'; allowed values are {list(POOLS)}")
        self.vit = vit
        self.spec = spec
        self.pool_mode = pool
        self.fingerprint: str | None = None  # of the weights as loaded; set once by create_model

    @property
    def embed_dim(self) -> int:
        return int(self.vit.embed_dim)

    @property
    def feature_dim(self) -> int:
        if self.pool_mode == "default":  # the model's own head, which may change the width (CONCH: 512)
            return int(getattr(self.vit, "head_hidden_size", self.embed_dim))
        return self.embed_dim * (2 if self.pool_mode == "token+avg" else 1)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.vit.num_prefix_tokens)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_embed.patch_size[0])

    @property
    def image_size(self) -> int:
        return int(self.vit.patch_embed.img_size[0])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels -> [prefix][patches] tokens with position embeddings, before the first block."""
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        return v.norm_pre(x)

    def run_blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        for blk in self.vit.blocks[start:end]:
            x = blk(x)
        return x

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm, as timm's ``forward_features`` ends: per token, so prompt tokens may sit among them."""
        return self.vit.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and the backbone's own pooling over [prefix][carried prompts][patches] tokens."""
        return self.pool_tokens(self.final_norm(x))

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's own pooling over tokens already through the final norm (timm's ``forward_head`` with
        ``pre_logits=True``): (B, N, D) -> (B, feature_dim). Avg pooling reads every token after the prefix.

        The overrides pool as timm does: ``fc_norm`` after pooling (a LayerNorm in models trained on pooled
        features, whose ``norm`` is then Identity; Identity otherwise).
        """
        v = self.vit
        if self.pool_mode == "default":
            return v.forward_head(x, pre_logits=True)
        patches = x[:, self.num_prefix_tokens :]
        if self.pool_mode == "token":
            return v.fc_norm(x[:, 0])
        if self.pool_mode == "avg":
            return v.fc_norm(patches.mean(1))
        return torch.cat([v.fc_norm(x[:, 0]), v.fc_norm(patches.mean(1))], dim=-1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens (normalised), used as instance features."""
        return self.final_norm(self.run_blocks(self.embed(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.run_blocks(self.embed(x)))


def take_old_image_size(image_size: int | None, kwargs: dict, where: str) -> int | None:
    """Deprecated, kept for one release: ``img_size=`` as the old name of ``image_size=`` in ``where`` (taken out of
    ``kwargs``, with a FutureWarning)."""
    if "img_size" not in kwargs:
        return image_size
    old = kwargs.pop("img_size")
    warnings.warn(
        f"{where}(img_size=...) is now {where}(image_size=...), the name the CLI, config and bundles use; "
        "img_size= stops working in the next release.",
        FutureWarning,
        stacklevel=3,
    )
    if image_size is not None and image_size != old:
        raise ConfigError(f"{where} got image_size={image_size!r} and img_size={old!r}; pass image_size only")
    return old


def create_vit(spec: BackboneSpec, image_size: int | None = None, **overrides) -> nn.Module:

    kwargs = {**spec.model_kwargs, **overrides}
    kwargs.setdefault("img_size", image_size or spec.image_size)
    try:
        vit = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise ConfigError(f"backbone '{spec.name}' does not accept {sorted(kwargs)}: {e}") from e
    if isinstance(spec, HeadSpec) and spec.head is not None:
        spec.head(vit)
    return vit


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    image_size: int | None = None,
    pool: str = "default",
    **overrides,
) -> TokenViT:
    """Build a frozen backbone by id. ``weights``: None (random init), ``"bundled"``, or a local file/folder.

    Random init is seeded with a fixed seed, so a bundle trained on a random backbone (smoke tests, tiny
    configurations) reloads onto the same weights in any process.
    """
    image_size = take_old_image_size(image_size, overrides, "create_backbone")
    spec = get_backbone_spec(name)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image size must be a positive number of pixels, got {image_size!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        vit = create_vit(spec, image_size=image_size, **overrides)
    grid_size = getattr(getattr(vit, "patch_embed", None), "img_size", None)
    size = int(grid_size[0]) if grid_size else 0
    patch = int(vit.patch_embed.patch_size[0]) if size else 1
    if size % patch:
        lower, upper = max(patch, size - size % patch), size - size % patch + patch
        raise ConfigError(
            f"image size {size} is not a multiple of the patch size {patch} of backbone '{name}'; "
            f"use {lower} or {upper}"
        )
    if weights is not None:
        if str(weights) == "bundled":
            path = bundled_weights_path(spec.name)
        else:
            path = Path(weights)
        sd = read_state_dict(path, spec)
        if spec.key_map is not None:
            try:
                sd = spec.key_map(sd)
            except KeyError as e:
                raise WeightsError(
                    f"weights {path} lack key {e} expected for '{spec.name}' ({spec.weights_hint})"
                ) from e
        load_into_vit(vit, sd, source=str(path))
    backbone = TokenViT(vit, spec, pool=pool)
    backbone.requires_grad_(False)
    backbone.eval()
    return backbone

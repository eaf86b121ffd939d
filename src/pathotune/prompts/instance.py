"""Instance-specific visual prompts (IVP): a frozen instance encoder and a Visual Refine Module (VRM)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .group import BuildContext, PromptGroup, check_entry
from .options import Option, at_least, fraction, one_of
from .visual import vpt_init

VRM_KINDS = ("attn", "mlp")
# What the VRM reads: "early" (image tokens after the first ivp_layer blocks: no second pass), "backbone" (a second
# frozen pass of the whole backbone), "encoder" (a separate frozen ivp_encoder, e.g. a pathology FM or a CNN).
IVP_SOURCES = ("backbone", "early", "encoder")


class InstanceEncoder(nn.Module):
    """A frozen second encoder that sees the same image, with its own input size and normalisation.

    Images arrive normalised for the prompted backbone; they are mapped back to pixels and re-normalised for
    this encoder. ViTs give their output tokens, CNNs their flattened last feature map.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_prefix_tokens: int,
        dim: int,
        src_mean: tuple[float, ...],
        src_std: tuple[float, ...],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        image_size: int | None,
    ) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.num_prefix_tokens = num_prefix_tokens
        self.dim = dim
        self.image_size = image_size
        # x_enc = (x * src_std + src_mean - mean) / std, as one affine map per channel.
        s_std, s_mean = torch.tensor(src_std), torch.tensor(src_mean)
        e_std, e_mean = torch.tensor(std), torch.tensor(mean)
        self.register_buffer("scale", (s_std / e_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - e_mean) / e_std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> InstanceEncoder:
        super().train(mode)
        self.encoder.eval()  # frozen: dropout and norm statistics stay in inference mode
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.shift
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if hasattr(self.encoder, "forward_tokens"):
            return self.encoder.forward_tokens(x)
        fmap = self.encoder.forward_features(x)
        return fmap.flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap


class InstanceCache:
    """Instance tokens keyed by image content (an LRU of ``size`` images).

    The instance encoder is frozen, so an image seen again (un-augmented training epochs, repeated inference,
    several tasks on one image) needs no second encoder pass.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.store: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(img: torch.Tensor) -> bytes:
        return hashlib.blake2b(img.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()

    def lookup(self, x: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        keys = [self.key(img) for img in x]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = encode(x[missing]).detach()
            for i, tok in zip(missing, fresh, strict=True):
                self.store[keys[i]] = tok.cpu()
        out = torch.stack([self.store[k] for k in keys]).to(x.device)
        for k in keys:
            self.store.move_to_end(k)
        while len(self.store) > self.size:
            self.store.popitem(last=False)
        return out


class AttnVRM(nn.Module):
    """K learnable queries cross-attend to the instance tokens; an MLP maps them to the backbone width."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, hidden: int, dropout: float, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.inp = nn.Linear(in_dim, hidden)
        self.queries = nn.Parameter(torch.randn(num_tokens, hidden) * 0.02)
        self.attn = nn.MultiheadAttention(hidden, heads if hidden % heads == 0 else 1, batch_first=True)
        self.out = _refine_mlp(hidden, out_dim, hidden, dropout)

    def forward(self, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        kv = self.inp(self.norm(tokens))
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.out(q + self.attn(q, kv, kv, need_weights=False)[0])


class MlpVRM(nn.Module):
    """The simple baseline: an MLP over the pooled instance feature (class token, else mean token)."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, hidden: int, dropout: float, heads: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.out_dim = out_dim
        self.mlp = _refine_mlp(in_dim, num_tokens * out_dim, hidden, dropout)

    def forward(self, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        pooled = tokens[:, 0] if num_prefix_tokens > 0 else tokens.mean(1)
        return self.mlp(pooled).view(tokens.shape[0], self.num_tokens, self.out_dim)


def _refine_mlp(in_dim: int, out_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear, the last one zero-initialised (see InstancePrompts)."""
    last = nn.Linear(hidden, out_dim)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), last)


_VRMS: dict[str, type[nn.Module]] = {"attn": AttnVRM, "mlp": MlpVRM}


class InstancePrompts(PromptGroup):
    """Per-image prompt tokens: learnable base tokens plus a swappable VRM's refinement of the instance features.

    The VRM's output layer starts at zero, so IVP begins as plain learnable tokens and becomes instance-specific
    only as far as training finds useful; with a small hidden width and dropout it cannot memorise a few dozen
    images. What the VRM reads is ``source``: the image tokens entering its block ("early"), or tokens of the
    whole image from a second frozen pass, of the backbone or of its own ``encoder``, optionally cached.
    """

    kind = "ivp"
    order = 20
    per_image = True
    no_decay = ("base", "vrm.queries")
    frozen = ("encoder",)
    off = {"ivp_tokens": 0}
    options = (
        Option("ivp_tokens", "int", 0, at_least(0), "tokens per image (0: off)"),
        Option("ivp_vrm", "str", "attn", one_of(VRM_KINDS)),
        Option("ivp_hidden", "int", 64, doc="small on purpose: the VRM must not memorise a few dozen images"),
        Option("ivp_dropout", "float", 0.1, fraction),
        Option("ivp_layer", "int | None", None, at_least(0), "None: depth // 3 for the early source, else 0"),
        Option("ivp_source", "str", "early", one_of(IVP_SOURCES), "what the VRM reads (see IVP_SOURCES)"),
        Option("ivp_encoder", "str | None", None, doc="backbone id or timm name when ivp_source is encoder"),
        Option("ivp_encoder_weights", "str | None", None),
        Option("ivp_cache", "int", 0, doc="cache instance tokens of up to this many images (un-augmented inputs)"),
    )

    def __init__(
        self,
        vrm: str,
        in_dim: int,
        out_dim: int,
        num_tokens: int,
        layer: int = 0,
        hidden: int = 64,
        dropout: float = 0.1,
        patch_size: int = 16,
        source: str = "early",
        encoder: InstanceEncoder | None = None,
        prefix_tokens: int = 1,
        cache: int = 0,
    ):
        super().__init__([layer], num_tokens)
        self.base = nn.Parameter(vpt_init(torch.empty(num_tokens, out_dim), patch_size))
        self.vrm = _VRMS[vrm](in_dim, out_dim, num_tokens, hidden=hidden, dropout=dropout)
        self.source = source
        self.encoder = encoder
        # Prefix tokens (cls, registers) of what the VRM reads: the encoder's, else the backbone's.
        self.prefix_tokens = encoder.num_prefix_tokens if encoder is not None else prefix_tokens
        self.cache = InstanceCache(cache) if cache and source != "early" else None

    @staticmethod
    def entry(switches: Any, depth: int) -> int:
        """The block before which IVP enters; by default a third of the way in when IVP reads early tokens."""
        if switches.ivp_layer is not None:
            return switches.ivp_layer
        return max(1, depth // 3) if switches.ivp_source == "early" else 0

    @classmethod
    def check_switches(cls, switches: Any) -> None:
        s = switches
        if s.ivp_tokens and s.ivp_source == "encoder" and not s.ivp_encoder:
            raise ConfigError("switch ivp_source='encoder' needs ivp_encoder (a backbone id or timm name)")
        if s.ivp_tokens and s.ivp_source == "early" and s.ivp_layer == 0:
            raise ConfigError("switch ivp_source='early' needs ivp_layer >= 1: the blocks run before IVP enters")
        if s.ivp_cache and s.train in ("all", "lora"):
            raise ConfigError("switch ivp_cache needs a frozen backbone; it cannot be used with train='all' or 'lora'")
        if s.ivp_cache < 0:
            raise ConfigError(f"switch ivp_cache must be >= 0 (a number of images), got {s.ivp_cache}")

    @classmethod
    def prepare(cls, switches: Any, ctx: BuildContext) -> InstanceEncoder | None:
        """The separate frozen encoder, when IVP reads one; recorded in the model's provenance."""
        s = switches
        if not (s.ivp_tokens and s.ivp_source == "encoder"):
            return None
        if ctx.build_encoder is None:
            raise ConfigError("ivp_source='encoder' needs an encoder built by create_model")
        encoder, ctx.provenance.instance_fingerprint = ctx.build_encoder(s.ivp_encoder, s.ivp_encoder_weights)
        ctx.provenance.instance_encoder = s.ivp_encoder
        ctx.provenance.instance_weights = None if s.ivp_encoder_weights is None else str(s.ivp_encoder_weights)
        return encoder

    @classmethod
    def build(cls, switches: Any, ctx: BuildContext) -> InstancePrompts | None:
        s, bb = switches, ctx.backbone
        if not s.ivp_tokens:
            return None
        layer = cls.entry(s, bb.depth)
        check_entry("ivp_layer", layer, bb.depth)
        encoder = ctx.prepared.get(cls.kind)
        in_dim = encoder.dim if encoder is not None else bb.embed_dim
        return cls(
            s.ivp_vrm, in_dim, bb.embed_dim, s.ivp_tokens, layer, s.ivp_hidden, s.ivp_dropout, bb.patch_size,
            s.ivp_source, encoder, bb.num_prefix_tokens, s.ivp_cache,
        )  # fmt: skip

    def read_image(self, x: torch.Tensor, backbone: nn.Module) -> torch.Tensor | None:
        """Tokens of the whole image from the second frozen pass (through the cache), or None for "early"."""
        if self.source == "early":
            return None

        def encode(images: torch.Tensor) -> torch.Tensor:
            if self.encoder is not None:
                return self.encoder(images)
            with torch.no_grad():
                return backbone.forward_tokens(images)

        return encode(x) if self.cache is None else self.cache.lookup(x, encode)

    def layout_key(self) -> tuple:
        return (self.source,)

    def release(self, provenance: Any) -> None:
        provenance.instance_encoder = provenance.instance_weights = provenance.instance_fingerprint = None

    def forward(self, layer: int, batch: int, features: torch.Tensor) -> torch.Tensor:
        """Tokens for each image from its instance features."""
        return self.base + self.vrm(features, self.prefix_tokens)

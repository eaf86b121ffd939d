"""Instance-specific visual prompts (IVP): a frozen instance encoder and a Visual Refine Module (VRM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .group import PromptGroup
from .visual import vpt_init

VRM_KINDS = ("attn", "mlp")


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
        img_size: int | None,
    ) -> None:
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.num_prefix_tokens = num_prefix_tokens
        self.dim = dim
        self.img_size = img_size
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
        if self.img_size is not None and x.shape[-1] != self.img_size:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        if hasattr(self.encoder, "forward_tokens"):
            return self.encoder.forward_tokens(x)
        fmap = self.encoder.forward_features(x)
        return fmap.flatten(2).transpose(1, 2) if fmap.ndim == 4 else fmap


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
    images.
    """

    kind = "ivp"
    per_image = True
    no_decay = ("base", "vrm.queries")

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
    ):
        super().__init__([layer], num_tokens)
        self.base = nn.Parameter(vpt_init(torch.empty(num_tokens, out_dim), patch_size))
        self.vrm = _VRMS[vrm](in_dim, out_dim, num_tokens, hidden=hidden, dropout=dropout)

    def forward(self, layer: int, batch: int, features: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """Tokens for each image from its instance features (``num_prefix_tokens`` of them are cls/registers)."""
        return self.base + self.vrm(features, num_prefix_tokens)

"""Slide-level MIL aggregators over frozen tile features, registered by name.

Every aggregator maps a bag of tile features ``(B, N, D)`` (or one bag ``(N, D)``) and an optional
``mask`` ``(B, N)`` (True marks a real tile, False padding) to ``(logits (B, C), tile_scores (B, N))``.
Tile scores are non-negative, zero on padding and sum to one over each bag's real tiles, so heat maps from
different aggregators share one scale. Training uses one bag per step (batch size 1, the MIL standard), so
the mask only matters for padded batches at inference.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = [
    "MIL_AGGREGATORS",
    "ABMIL",
    "MeanMIL",
    "MILAggregator",
    "TransMIL",
    "create_aggregator",
    "list_aggregators",
]


def _as_batch(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) features and a (B, N) bool mask, accepting one unbatched bag and a missing mask."""
    if x.ndim == 2:
        x = x.unsqueeze(0)
        if mask is not None and mask.ndim == 1:
            mask = mask.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"MIL features must have shape (N, D) or (B, N, D), got {tuple(x.shape)}")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    else:
        mask = mask.to(device=x.device, dtype=torch.bool)
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match bags {tuple(x.shape[:2])}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every bag needs at least one unmasked tile")
    return x, mask


class MILAggregator(nn.Module):
    """Common type of the registry's models: ``forward(x, mask=None) -> (logits, tile_scores)``.

    Subclasses record ``in_dim`` and ``num_classes`` so saved models can be checked against feature files.
    """

    in_dim: int
    num_classes: int


class MeanMIL(MILAggregator):
    """Mean pooling + linear head: the no-learned-weighting baseline every attention model must beat."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = _as_batch(x, mask)
        weights = mask.to(x.dtype)
        scores = weights / weights.sum(dim=1, keepdim=True)
        pooled = torch.einsum("bn,bnd->bd", scores, x)
        return self.classifier(self.dropout(pooled)), scores


class ABMIL(MILAggregator):
    """Gated attention MIL (Ilse et al., 2018): a = w^T (tanh(V h) * sigmoid(U h)), softmax over tiles.

    Tiles are first projected (Linear + ReLU + dropout) to ``hidden`` so the attention and the classifier
    work in a space smaller than the foundation model's embedding. The attention weights are the tile scores.
    """

    def __init__(
        self, in_dim: int, num_classes: int, hidden: int = 256, attn_dim: int = 128, dropout: float = 0.25
    ) -> None:
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_v = nn.Linear(hidden, attn_dim)
        self.attn_u = nn.Linear(hidden, attn_dim)
        self.attn_w = nn.Linear(attn_dim, 1)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = _as_batch(x, mask)
        h = self.project(x)
        gate = torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))
        logits_a = self.attn_w(gate).squeeze(-1).masked_fill(~mask, float("-inf"))
        attn = torch.softmax(logits_a, dim=1)
        pooled = torch.einsum("bn,bnd->bd", attn, h)
        return self.classifier(pooled), attn


class _SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention block with a residual, as in TransMIL's TransLayer.

    TransMIL uses the Nystrom approximation; this uses exact softmax attention through
    ``F.scaled_dot_product_attention``, whose fused kernels avoid materialising the (L, L) matrix. When
    asked it also returns the class token's attention over all tokens (head mean), computed as one row.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"transmil: hidden {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cls_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = self.out(y.transpose(1, 2).reshape(b, length, dim))
        row = None
        if cls_attention:
            scale = 1.0 / math.sqrt(q.shape[-1])
            row = torch.softmax((q[:, :, :1] @ k.transpose(-2, -1)) * scale, dim=-1).mean(dim=1).squeeze(1)
        return x + y, row


class _PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions on the tile grid, plus identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        cls, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILAggregator):
    """TransMIL (Shao et al., 2021): class token, two self-attention layers and a PPEG between them.

    Tiles are projected to ``hidden`` (default 256 to stay CPU-friendly; the paper uses 512), then the
    sequence is squared into a ``side x side`` grid by repeating its first tokens, which the PPEG convolves.
    Attention is exact multi-head softmax attention rather than Nystrom (see ``_SelfAttention``).
    Tile scores are the last layer's class-token attention (mean over heads); the mass on a tile's
    repeated copies is added back to the tile and the class token's self-attention dropped, then renormalised.
    Bags in a padded batch are run one at a time, since the grid depends on each bag's length.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 256, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.project = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.normal_(self.cls_token, std=0.02)
        self.layer1 = _SelfAttention(hidden, heads, dropout)
        self.ppeg = _PPEG(hidden)
        self.layer2 = _SelfAttention(hidden, heads, dropout)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def _one_bag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (1, C) and scores (1, N) for one unpadded bag (1, N, D)."""
        n = x.shape[1]
        side = math.ceil(math.sqrt(n))
        fill = torch.arange(side * side - n, device=x.device) % n  # wraps around for very short bags
        owner = torch.cat([torch.arange(n, device=x.device), fill])  # grid position -> original tile
        h = self.project(x)[:, owner]
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h, _ = self.layer1(h)
        h = self.ppeg(h, side)
        h, row = self.layer2(h, cls_attention=True)
        logits = self.classifier(self.norm(h)[:, 0])
        scores = torch.zeros(1, n, dtype=row.dtype, device=x.device).index_add_(1, owner, row[:, 1:])
        return logits, scores / scores.sum(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = _as_batch(x, mask)
        if x.shape[0] == 1 and bool(mask.all()):
            return self._one_bag(x)
        logits, scores = [], torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        for i in range(x.shape[0]):
            keep = mask[i].nonzero().squeeze(1)
            lg, sc = self._one_bag(x[i : i + 1, keep])
            logits.append(lg)
            scores[i, keep] = sc[0].to(scores.dtype)
        return torch.cat(logits), scores


MIL_AGGREGATORS: dict[str, type[MILAggregator]] = {"mean": MeanMIL, "abmil": ABMIL, "transmil": TransMIL}


def list_aggregators() -> list[str]:
    """Registered aggregator names, sorted."""
    return sorted(MIL_AGGREGATORS)


def aggregator_options(name: str) -> list[str]:
    """Keyword arguments ``name`` accepts beyond ``in_dim`` and ``num_classes``."""
    cls = _lookup(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "in_dim", "num_classes")]


def _lookup(name: str) -> type[MILAggregator]:
    cls = MIL_AGGREGATORS.get(name)
    if cls is None:
        raise ConfigError(f"unknown MIL aggregator '{name}'; choose from {list_aggregators()}")
    return cls


def create_aggregator(name: str, in_dim: int, num_classes: int, **kw: Any) -> MILAggregator:
    """Build aggregator ``name``; unknown keyword arguments fail with the ones it does accept."""
    cls = _lookup(name)
    unknown = sorted(set(kw) - set(aggregator_options(name)))
    if unknown:
        raise ConfigError(f"aggregator '{name}' does not take {unknown}; it accepts {aggregator_options(name)}")
    if in_dim < 1 or num_classes < 2:
        raise ConfigError(f"aggregator '{name}' needs in_dim >= 1 and num_classes >= 2, got {in_dim}, {num_classes}")
    return cls(in_dim, num_classes, **kw)

"""Task-specific visual prompts (TVP): learnable tokens, shallow or deep as in VPT."""

from __future__ import annotations

import math

import torch
from torch import nn


def vpt_init(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Uniform in the Xavier range of the patch projection, so prompts start on the scale of patch embeddings."""
    bound = math.sqrt(6.0 / (3 * patch_size * patch_size + tokens.shape[-1]))
    return tokens.uniform_(-bound, bound)


class VisualPrompts(nn.Module):
    """``num_tokens`` learnable tokens for each of ``num_layers`` layers (1 = shallow, >1 = VPT-deep).

    Initialised as VPT does: uniform in ±sqrt(6 / (3 * patch_area + dim)), the Xavier range of the patch
    projection, so prompts start on the scale of patch embeddings.
    """

    def __init__(self, num_tokens: int, dim: int, num_layers: int, patch_size: int, dropout: float = 0.0):
        super().__init__()
        self.num_tokens = num_tokens
        self.num_layers = num_layers
        self.tokens = nn.Parameter(vpt_init(torch.empty(num_layers, num_tokens, dim), patch_size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, layer: int, batch_size: int) -> torch.Tensor:
        """The prompts for the ``layer``-th prompted layer (0-based, counted from where TVP enters)."""
        return self.dropout(self.tokens[layer].unsqueeze(0).expand(batch_size, -1, -1))

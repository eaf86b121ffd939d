"""Task-specific visual prompts (TVP): learnable tokens, shallow or deep as in VPT."""

from __future__ import annotations

import math

import torch
from torch import nn

from .group import PromptGroup


def vpt_init(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Uniform in the Xavier range of the patch projection, so prompts start on the scale of patch embeddings."""
    bound = math.sqrt(6.0 / (3 * patch_size * patch_size + tokens.shape[-1]))
    return tokens.uniform_(-bound, bound)


class VisualPrompts(PromptGroup):
    """``num_tokens`` learnable tokens for each of its ``layers`` (one layer = shallow, several = VPT-deep).

    Initialised as VPT does: uniform in ±sqrt(6 / (3 * patch_area + dim)), the Xavier range of the patch
    projection, so prompts start on the scale of patch embeddings.
    """

    kind = "tvp"
    no_decay = ("tokens",)

    def __init__(self, num_tokens: int, dim: int, layers: list[int], patch_size: int, dropout: float = 0.0):
        super().__init__(layers, num_tokens)
        self.tokens = nn.Parameter(vpt_init(torch.empty(len(self.layers), num_tokens, dim), patch_size))
        self.dropout = nn.Dropout(dropout)

    def forward(self, layer: int, batch: int, features: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """The prompts of block ``layer``, one of this group's layers."""
        return self.dropout(self.tokens[self.layers.index(layer)].unsqueeze(0).expand(batch, -1, -1))

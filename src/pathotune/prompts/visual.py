"""Task-specific visual prompts (TVP): learnable tokens, shallow or deep as in VPT."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .group import BuildContext, PromptGroup, check_entry
from .options import Option, at_least, fraction


def vpt_init(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Uniform in the Xavier range of the patch projection, so prompts start on the scale of patch embeddings."""
    bound = math.sqrt(6.0 / (3 * patch_size * patch_size + tokens.shape[-1]))
    return tokens.uniform_(-bound, bound)


def entry_layers(first: int, deep: bool, depth: int | None, blocks: int) -> list[int]:
    """The blocks a group (re)enters before: ``first`` alone, or deep from it for ``depth`` blocks (None: all)."""
    n = (depth or blocks) if deep else 1
    return list(range(first, min(blocks, first + n)))


class VisualPrompts(PromptGroup):
    """``num_tokens`` learnable tokens for each of its ``layers`` (one layer = shallow, several = VPT-deep).

    Initialised as VPT does: uniform in ±sqrt(6 / (3 * patch_area + dim)), the Xavier range of the patch
    projection, so prompts start on the scale of patch embeddings.
    """

    kind = "tvp"
    order = 30  # [prefix][TTP][IVP][TVP][patches]
    no_decay = ("tokens",)
    off = {"tvp_tokens": 0}
    options = (
        Option("tvp_tokens", "int", 0, at_least(0), "learnable tokens per layer (0: off)"),
        Option("tvp_deep", "bool", False, doc="fresh prompts before each of tvp_depth blocks (VPT-deep)"),
        Option("tvp_depth", "int | None", None, at_least(1, " or None"), "deep only: how many blocks (None: all)"),
        Option("tvp_layer", "int", 0, at_least(0), "the block before which TVP enters"),
        Option("tvp_dropout", "float", 0.0, fraction),
    )

    def __init__(self, num_tokens: int, dim: int, layers: list[int], patch_size: int, dropout: float = 0.0):
        super().__init__(layers, num_tokens)
        self.tokens = nn.Parameter(vpt_init(torch.empty(len(self.layers), num_tokens, dim), patch_size))
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def build(cls, switches: Any, ctx: BuildContext) -> VisualPrompts | None:
        s, bb = switches, ctx.backbone
        if not s.tvp_tokens:
            return None
        check_entry("tvp_layer", s.tvp_layer, bb.depth)
        layers = entry_layers(s.tvp_layer, s.tvp_deep, s.tvp_depth, bb.depth)
        return cls(s.tvp_tokens, bb.embed_dim, layers, bb.patch_size, s.tvp_dropout)

    def forward(self, layer: int, batch: int, features: torch.Tensor) -> torch.Tensor:
        """The prompts of block ``layer``, one of this group's layers."""
        return self.dropout(self.tokens[self.layers.index(layer)].unsqueeze(0).expand(batch, -1, -1))

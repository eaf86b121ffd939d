"""The interface every prompt kind implements, so that the model, multi-task serving, bundles and the optimiser
never dispatch on a kind's name."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import nn

# The order in which groups are listed (and concatenated, for the joint softmax): [prefix][TTP][IVP][TVP][patches].
GROUP_ORDER = ("ttp", "ivp", "tvp")


class PromptGroup(nn.Module):
    """One kind of prompt tokens.

    ``layers``: the blocks before which this group's tokens enter; the first one inserts them, each later one
    replaces the tokens that travelled on from the block before (deep prompts). ``per_image``: whether the tokens
    depend on the image (then several tasks' groups cannot be stacked by task: each task runs on its own rows).
    ``no_decay``: names of this group's parameters that take no weight decay (tokens are not weights).
    """

    kind: ClassVar[str]
    per_image: ClassVar[bool] = False
    no_decay: ClassVar[tuple[str, ...]] = ()

    def __init__(self, layers: list[int], num_tokens: int) -> None:
        super().__init__()
        self.layers = list(layers)
        self.num_tokens = num_tokens

    @abstractmethod
    def forward(self, layer: int, batch: int, features: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """(batch, num_tokens, dim) for block ``layer``. ``features``: what a per-image group reads (the instance
        encoder's tokens, or the image tokens entering this block); other groups ignore it."""

    def bundle_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers a bundle must carry besides the trained parameters (names relative to the group)."""
        return {}

"""Test-time augmentation: the 8 views of the dihedral group (4 quarter turns, with and without a flip).

Tissue has no canonical orientation, so these views are exact (no interpolation) and every method gets the same
ones: the probe through the features of each view, every other model through its forward on each view. The
predicted probabilities are averaged over the views. Views run one after the other, so memory stays that of
one batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

VIEWS = 8


def views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rot90 x flip views of a batch (B, C, H, W) of square images; the first is the batch itself."""
    return [torch.rot90(x.flip(-1) if flip else x, k, dims=(-2, -1)) for flip in (False, True) for k in range(4)]


def averaged(probabilities: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``probabilities(x)`` averaged over the views of ``x``."""

    def tta(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([probabilities(v) for v in views(x)]).mean(0)

    return tta


def stacked(encode: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode`` of every view: (B, VIEWS, D) features, which a head over cached features averages."""

    def tta(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([encode(v) for v in views(x)], dim=1)

    return tta


class TTAModel(nn.Module):
    """A classifier whose output is the log of its probabilities averaged over the views (so softmax of the
    output is that average and cross-entropy on it is the averaged prediction's)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = averaged(lambda v: self.model(v).float().softmax(-1))(x)
        return probs.clamp_min(1e-12).log()

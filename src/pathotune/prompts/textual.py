"""Task-specific textual prompts (TTP): cached task text + learnable context -> visual prompt tokens."""

from __future__ import annotations

import torch
from torch import nn

from .group import PromptGroup

TTP_MODES = ("pooled", "attn")


class TextualPrompts(PromptGroup):
    """Turns the frozen text encoding of the task description into ``num_tokens`` vision-width tokens.

    The text is constant for a task, so its encoding is computed once and stored as buffers (saved in bundles,
    which therefore need no text encoder at inference). CoOp-style learnable context vectors are added to
    the pooled text embedding (``pooled``) or attend over the text tokens (``attn``); a small MLP projects
    each of them to the vision width.
    """

    kind = "ttp"
    no_decay = ("context",)

    def __init__(
        self,
        num_tokens: int,
        text_pooled: torch.Tensor,
        text_tokens: torch.Tensor,
        vision_dim: int,
        layer: int = 0,
        hidden: int = 128,
        mode: str = "pooled",
        heads: int = 4,
    ) -> None:
        super().__init__([layer], num_tokens)
        text_dim = text_pooled.shape[-1]
        self.mode = mode
        self.register_buffer("text_pooled", text_pooled.detach().float().clone())
        self.register_buffer("text_tokens", text_tokens.detach().float().clone())
        self.context = nn.Parameter(torch.randn(num_tokens, text_dim) * 0.02)
        if mode == "attn":
            self.attn = nn.MultiheadAttention(text_dim, heads if text_dim % heads == 0 else 1, batch_first=True)
        self.proj = nn.Sequential(
            nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, vision_dim)
        )

    @classmethod
    def saved_encoding(cls, state: dict[str, torch.Tensor], prefix: str = "ttp.") -> tuple | None:
        """The (pooled, tokens) text encoding a bundle's tensors carry, if any: a bundle needs no text encoder."""
        keys = (f"{prefix}text_pooled", f"{prefix}text_tokens")
        return (state[keys[0]], state[keys[1]]) if keys[0] in state else None

    def bundle_buffers(self) -> dict[str, torch.Tensor]:
        return {"text_pooled": self.text_pooled, "text_tokens": self.text_tokens}

    def forward(self, layer: int, batch: int, features: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """The same tokens for every image of the task (the text is constant per task)."""
        return self.task_tokens().unsqueeze(0).expand(batch, -1, -1)

    def task_tokens(self) -> torch.Tensor:
        if self.mode == "attn":
            q = (self.context + self.text_pooled).unsqueeze(0)
            kv = self.text_tokens.unsqueeze(0)
            z = q + self.attn(q, kv, kv, need_weights=False)[0]
            z = z.squeeze(0)
        else:
            z = self.context + self.text_pooled
        return self.proj(z)

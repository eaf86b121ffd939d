"""Task-specific textual prompts (TTP): cached task text + learnable context -> visual prompt tokens."""

from __future__ import annotations

import torch
from torch import nn

TTP_MODES = ("pooled", "attn")


class TextualPrompts(nn.Module):
    """Turns the frozen text encoding of the task description into ``num_tokens`` vision-width tokens.

    The text is constant for a task, so its encoding is computed once and stored as buffers (saved in bundles,
    which therefore need no text encoder at inference). CoOp-style learnable context vectors are added to
    the pooled text embedding (``pooled``) or attend over the text tokens (``attn``); a small MLP projects
    each of them to the vision width.
    """

    def __init__(
        self,
        num_tokens: int,
        text_pooled: torch.Tensor,
        text_tokens: torch.Tensor,
        vision_dim: int,
        hidden: int = 128,
        mode: str = "pooled",
        heads: int = 4,
    ) -> None:
        super().__init__()
        text_dim = text_pooled.shape[-1]
        self.mode = mode
        self.num_tokens = num_tokens
        self.register_buffer("text_pooled", text_pooled.detach().float().clone())
        self.register_buffer("text_tokens", text_tokens.detach().float().clone())
        self.context = nn.Parameter(torch.randn(num_tokens, text_dim) * 0.02)
        if mode == "attn":
            self.attn = nn.MultiheadAttention(text_dim, heads if text_dim % heads == 0 else 1, batch_first=True)
        self.proj = nn.Sequential(
            nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, vision_dim)
        )

    def forward(self, batch_size: int) -> torch.Tensor:
        if self.mode == "attn":
            q = (self.context + self.text_pooled).unsqueeze(0)
            kv = self.text_tokens.unsqueeze(0)
            z = q + self.attn(q, kv, kv, need_weights=False)[0]
            z = z.squeeze(0)
        else:
            z = self.context + self.text_pooled
        return self.proj(z).unsqueeze(0).expand(batch_size, -1, -1)

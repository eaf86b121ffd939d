"""Task-specific textual prompts (TTP): cached text encodings + learnable context -> visual prompt tokens."""

from __future__ import annotations

import torch
from torch import nn

from .group import PromptGroup

TTP_MODES = ("pooled", "attn")
TTP_TEXTS = ("task", "classes")


class TextualPrompts(PromptGroup):
    """Turns frozen text encodings into vision-width tokens: ``num_tokens`` per text.

    The texts are constant for a task, so their encodings are computed once and stored as buffers (saved in
    bundles, which therefore need no text encoder at inference): one text (the task description, ``text_pooled``
    (D,), ``text_tokens`` (L, D)) or one per class (``(T, D)``, ``(T, L, D)``). CoOp-style learnable context
    vectors are added to each pooled text embedding (``pooled``) or attend over its tokens (``attn``); a small
    MLP projects each of them to the vision width. With several ``layers`` the tokens re-enter before each of them
    (deep), each layer adding its own learnable shift, zero at the start.
    """

    kind = "ttp"
    no_decay = ("context", "layer_shift")

    def __init__(
        self,
        num_tokens: int,
        text_pooled: torch.Tensor,
        text_tokens: torch.Tensor,
        vision_dim: int,
        layer: int | list[int] = 0,
        hidden: int = 128,
        mode: str = "pooled",
        heads: int = 4,
    ) -> None:
        layers = [layer] if isinstance(layer, int) else list(layer)
        pooled = text_pooled.detach().float().clone()
        tokens = text_tokens.detach().float().clone()
        n_texts = 1 if pooled.ndim == 1 else pooled.shape[0]
        super().__init__(layers, num_tokens * n_texts)
        self.per_text = num_tokens
        text_dim = pooled.shape[-1]
        self.mode = mode
        self.register_buffer("text_pooled", pooled)
        self.register_buffer("text_tokens", tokens)
        self.context = nn.Parameter(torch.randn(num_tokens, text_dim) * 0.02)
        if len(layers) > 1:
            self.layer_shift = nn.Parameter(torch.zeros(len(layers), vision_dim))
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
        """The same tokens for every image of the task (the texts are constant per task)."""
        tokens = self.task_tokens()
        if len(self.layers) > 1:
            tokens = tokens + self.layer_shift[self.layers.index(layer)]
        return tokens.unsqueeze(0).expand(batch, -1, -1)

    def task_tokens(self) -> torch.Tensor:
        """(num_tokens, vision_dim): ``per_text`` tokens for each text, text by text."""
        pooled = self.text_pooled.reshape(-1, self.text_pooled.shape[-1])  # (T, D)
        if self.mode == "attn":
            kv = self.text_tokens.reshape(pooled.shape[0], -1, pooled.shape[-1])  # (T, L, D)
            q = self.context.unsqueeze(0) + pooled.unsqueeze(1)  # (T, n, D)
            z = q + self.attn(q, kv, kv, need_weights=False)[0]
        else:
            z = self.context.unsqueeze(0) + pooled.unsqueeze(1)
        return self.proj(z.reshape(-1, z.shape[-1]))

"""Task-specific textual prompts (TTP): cached text encodings + learnable context -> visual prompt tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .group import BuildContext, PromptGroup, check_entry
from .options import Option, at_least, one_of
from .visual import entry_layers

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
    order = 10
    no_decay = ("context", "layer_shift")
    off = {"ttp_tokens": 0}
    options = (
        Option("ttp_tokens", "int", 0, at_least(0), "tokens per text (0: off)"),
        Option("ttp_mode", "str", "pooled", one_of(TTP_MODES), "context added to the pooled text, or attending"),
        Option("ttp_hidden", "int", 128),
        Option("ttp_layer", "int", 0, at_least(0)),
        Option("ttp_text", "str", "task", one_of(TTP_TEXTS), "the task description, or one text per class"),
        Option("ttp_deep", "bool", False, doc="re-enter before each of ttp_depth blocks (a shift per block)"),
        Option("ttp_depth", "int | None", None, at_least(1, " or None"), "deep only: how many blocks (None: all)"),
        Option("text_encoder", "str", "minilm"),
        Option("text_weights", "str | None", None),
    )

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
    def texts(cls, switches: Any, task: Any) -> list[str] | None:
        if not switches.ttp_tokens:
            return None
        return task.class_texts() if switches.ttp_text == "classes" else [task.render()]

    @classmethod
    def prepare(cls, switches: Any, ctx: BuildContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The texts' encoding: the one given (a bundle's, the engine's), else encoded now."""
        texts = cls.texts(switches, ctx.task)
        if texts is None or ctx.text_features is not None:
            return ctx.text_features
        if ctx.encode_texts is None:
            raise ConfigError("textual prompts need the encoded task text; build the model with create_model")
        return ctx.encode_texts(texts, switches.text_encoder, switches.text_weights)

    @classmethod
    def build(cls, switches: Any, ctx: BuildContext) -> TextualPrompts | None:
        s, bb = switches, ctx.backbone
        if not s.ttp_tokens:
            return None
        check_entry("ttp_layer", s.ttp_layer, bb.depth)
        pooled, tokens = ctx.prepared[cls.kind]
        if s.ttp_text == "task" and pooled.ndim == 2 and pooled.shape[0] == 1:
            pooled, tokens = pooled[0], tokens[0]  # one text is kept as (D,), (L, D), as bundles hold it
        if s.ttp_text == "classes" and (pooled.ndim != 2 or pooled.shape[0] != ctx.num_classes):
            raise ConfigError(f"ttp_text='classes' needs one text encoding per class ({ctx.num_classes})")
        layers = entry_layers(s.ttp_layer, s.ttp_deep, s.ttp_depth, bb.depth)
        return cls(s.ttp_tokens, pooled, tokens, bb.embed_dim, layers, s.ttp_hidden, s.ttp_mode)

    @classmethod
    def saved_text_features(cls, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        keys = (f"{cls.kind}.text_pooled", f"{cls.kind}.text_tokens")
        return (state[keys[0]], state[keys[1]]) if keys[0] in state else None

    def bundle_buffers(self) -> dict[str, torch.Tensor]:
        return {"text_pooled": self.text_pooled, "text_tokens": self.text_tokens}

    def forward(self, layer: int, batch: int, features: torch.Tensor) -> torch.Tensor:
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

"""The interface every prompt kind implements, and the registry of kinds, so that the model, the switches,
multi-task serving, bundles and the optimiser never dispatch on a kind's name.

A kind is a ``PromptGroup`` subclass that sets ``kind``: defining it registers it. It declares its switches
(``options``), checks them together (``check_switches``), and builds itself from them (``build``); the model
walks the registered kinds and knows none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .options import Option

_KINDS: dict[str, type[PromptGroup]] = {}  # registration order: the order of the switches and of building


def prompt_kinds() -> list[type[PromptGroup]]:
    """Every registered kind, in registration order (that of their switches, and of building: seeded models
    draw their initial values in this order)."""
    return list(_KINDS.values())


def sequence_order() -> list[str]:
    """Kind names in the order their tokens sit in the sequence: ``[prefix][groups by order][patches]``."""
    return [k.kind for k in sorted(_KINDS.values(), key=lambda k: k.order)]


def unregister_kind(kind: str) -> None:
    """Forget a kind (tests that define one clean up with this)."""
    _KINDS.pop(kind, None)


def saved_text_features(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The text encoding a bundle's tensors carry for whichever kind reads texts, if any."""
    for k in prompt_kinds():
        found = k.saved_text_features(state)
        if found is not None:
            return found
    return None


def prompt_texts(switches: Any, task: Any) -> list[str] | None:
    """The texts the switched-on kinds read (the engine encodes them under its text controls), or None."""
    for k in prompt_kinds():
        texts = k.texts(switches, task)
        if texts is not None:
            return texts
    return None


def check_entry(name: str, layer: int, depth: int) -> None:
    """A kind's entry layer must be one of the backbone's blocks."""
    if layer >= depth:
        raise ConfigError(f"switch {name}={layer} must be < the backbone depth {depth}")


@dataclass
class BuildContext:
    """What a kind builds from besides the switches.

    ``prompts`` sits below ``backbones`` and ``text`` in the layers (docs/ARCHITECTURE.md), so the model hands a
    kind what it needs of them as services: ``encode_texts(texts, encoder, weights) -> (pooled, tokens)`` and
    ``build_encoder(name, weights) -> (frozen encoder, fingerprint)``. ``text_features``: an encoding given by the
    caller (a bundle's, or the engine's text controls), which spares the text encoder. ``prepared``: what each
    kind's ``prepare`` made, by kind. ``provenance``: the model's record of its frozen parts, which a kind that
    adds one fills in.
    """

    backbone: Any  # the frozen TokenViT: embed_dim, depth, patch_size, num_prefix_tokens, spec
    num_classes: int
    task: Any  # pathotune.Task: what the texts describe
    provenance: Any
    text_features: tuple[torch.Tensor, torch.Tensor] | None = None
    encode_texts: Callable[[list[str], str, str | None], tuple[torch.Tensor, torch.Tensor]] | None = None
    build_encoder: Callable[[str, str | None], tuple[nn.Module, str]] | None = None
    prepared: dict[str, Any] = field(default_factory=dict)


def _function(cls: type, name: str) -> Any:
    """The function behind a method or classmethod, so that inherited and own ones compare by identity."""
    attr = getattr(cls, name)
    return getattr(attr, "__func__", attr)


class PromptGroup(nn.Module):
    """One kind of prompt tokens.

    ``layers``: the blocks before which this group's tokens enter; the first one inserts them, each later one
    replaces the tokens that travelled on from the block before (deep prompts). ``per_image``: whether the tokens
    depend on the image (then several tasks' groups cannot be stacked by task: each task runs on its own rows).
    ``no_decay``: names of this group's parameters that take no weight decay (tokens are not weights).
    ``frozen``: submodules that never train, even when the group does (a second encoder).

    Class-level description, read by the registry: ``kind`` (the id; also the model attribute holding the group,
    so tensors are named ``tvp.tokens``), ``order`` (its place in the sequence), ``options`` (its switches),
    ``off`` (the switch values that leave it off: a dropped group must stay off when its bundle is rebuilt).
    """

    kind: ClassVar[str]
    order: ClassVar[int]
    options: ClassVar[tuple[Option, ...]] = ()
    off: ClassVar[dict[str, Any]]
    per_image: ClassVar[bool] = False
    no_decay: ClassVar[tuple[str, ...]] = ()
    frozen: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" not in cls.__dict__:
            return
        if cls.kind in _KINDS:
            raise ConfigError(f"prompt kind '{cls.kind}' is already registered ({_KINDS[cls.kind].__qualname__})")
        missing = [name for name in ("order", "off") if not hasattr(cls, name)]
        # the two hooks every kind writes itself: refused here, at import, never found missing mid-training
        missing += [
            f"{name}()" for name in ("build", "forward") if _function(cls, name) is _function(PromptGroup, name)
        ]
        if missing:
            raise ConfigError(f"prompt kind '{cls.kind}' must set {' and '.join(missing)}")
        _KINDS[cls.kind] = cls

    def __init__(self, layers: list[int], num_tokens: int) -> None:
        super().__init__()
        self.layers = list(layers)
        self.num_tokens = num_tokens

    # Description and construction, from the switches.
    @classmethod
    def check_switches(cls, switches: Any) -> None:
        """Rules across this kind's switches (and the core ones); each value alone is checked by its Option."""

    @classmethod
    def prepare(cls, switches: Any, ctx: BuildContext) -> Any:
        """Frozen parts built before any group is (text encodings, a second encoder); ``build`` finds the result
        in ``ctx.prepared[kind]``. Every kind prepares before any builds, so seeded models draw their initial
        values in one fixed order."""
        return None

    @classmethod
    def build(cls, switches: Any, ctx: BuildContext) -> PromptGroup | None:
        """This kind's group for a model, or None when the switches leave it off (every kind defines it: checked
        when the kind registers)."""
        raise NotImplementedError(f"prompt kind '{cls.kind}' does not say how to build itself")

    @classmethod
    def texts(cls, switches: Any, task: Any) -> list[str] | None:
        """The texts this kind reads when on (None: it reads none)."""
        return None

    @classmethod
    def saved_text_features(cls, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The text encoding a bundle's tensors carry for this kind, if any: a bundle needs no text encoder."""
        return None

    # The group at work.
    def forward(self, layer: int, batch: int, features: torch.Tensor) -> torch.Tensor:
        """(batch, num_tokens, dim) for block ``layer``. ``features``: what a per-image group reads (what
        ``read_image`` gave, else the image tokens entering this block); other groups ignore it. Every kind
        defines it (checked when the kind registers)."""
        raise NotImplementedError(f"prompt kind '{type(self).kind}' does not say what its tokens are")

    def read_image(self, x: torch.Tensor, backbone: nn.Module) -> torch.Tensor | None:
        """What this group reads from the input image before the blocks run, or None (it reads the image tokens
        entering its block, or nothing)."""
        return None

    def layout_key(self) -> tuple:
        """Besides token counts and layers, what must agree for tasks to share one batched forward."""
        return ()

    def release(self, provenance: Any) -> None:
        """The group is being dropped: forget what it recorded in the model's provenance."""

    def requires_grad_(self, requires_grad: bool = True) -> PromptGroup:
        super().requires_grad_(requires_grad)
        for name in self.frozen:
            part = getattr(self, name, None)
            if part is not None:
                part.requires_grad_(False)
        return self

    def bundle_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers a bundle must carry besides the trained parameters (names relative to the group)."""
        return {}

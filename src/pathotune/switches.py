"""Every switch in one typed place, so ablations are configuration rather than code.

The core switches (attention, what trains, head and pooling) are declared here; each prompt kind declares its
own (``PromptGroup.options``: tvp_tokens, ttp_mode, ivp_source...), so this module names no kind. The form stays
flat: configs, flags, run folders and bundles spell every switch by its plain name.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .prompts import Option, fraction, one_of, prompt_kinds
from .prompts.attention import PROMPT_ATTENTION

TRAIN_MODES = ("head", "prompts", "all", "lora")

CORE_OPTIONS = (
    Option(
        "prompt_attn", "str", "gated", one_of(PROMPT_ATTENTION),
        "how image tokens read prompts: gated (zero-init per-group gates: step 0 is the frozen model) or joint "
        "(one softmax over image and prompt tokens, as VPT concatenates them)",
    ),
    Option("train", "str", "prompts", one_of(TRAIN_MODES), "what trains: head, prompts, all or lora"),
    Option("lora_r", "int", 8),
    Option("lora_alpha", "int", 16),
    Option("lora_dropout", "float", 0.0, fraction),
    Option("lora_targets", "str", r".*\.attn\.(qkv|proj)"),
    Option("pool", "str", "default"),
    Option("pool_prompts", "bool", False, doc="let avg pooling read prompt outputs too"),
    Option("head_dropout", "float", 0.0, fraction),
    Option("grad_checkpointing", "bool", False),
)  # fmt: skip


def switch_options() -> list[Option]:
    """Every switch: each registered prompt kind's, in registration order, then the core ones."""
    options = [o for kind in prompt_kinds() for o in kind.options] + list(CORE_OPTIONS)
    names = [o.name for o in options]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"switch(es) {twice} are declared twice (by two prompt kinds, or a kind and the core)")
    return options


def switch_names() -> list[str]:
    return [o.name for o in switch_options()]


def check_keys(d: dict) -> None:
    unknown = sorted(set(d) - set(switch_names()))
    if unknown:
        raise ConfigError(f"unknown switch(es) {unknown}; allowed switches are {switch_names()}")


class Switches:
    """What a method builds and trains: flat, frozen and validated on creation. Counts of 0 switch a kind off.

    Each switch reads as an attribute (``s.tvp_tokens``); ``update`` gives a changed copy.
    """

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        check_keys(values)
        options = switch_options()
        object.__setattr__(self, "_values", {o.name: values.get(o.name, o.default) for o in options})
        for o in options:
            o.validate(self._values[o.name])
        for kind in prompt_kinds():
            kind.check_switches(self)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"no switch {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"switches are frozen; use update({name}=...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Switches) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:
        return f"Switches({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __reduce__(self) -> tuple:
        """Copies and pickles rebuild through validation (the slots refuse assignment)."""
        return (type(self).from_dict, (self.to_dict(),))

    def to_dict(self) -> dict:
        return dict(self._values)

    def update(self, **changes: Any) -> Switches:
        check_keys(changes)
        return Switches(**{**self._values, **changes})

    @classmethod
    def from_dict(cls, d: dict) -> Switches:
        return cls(**d)

"""Prompt kinds behind one interface (``PromptGroup``), each registered by defining it: task visual (TVP), task
textual (TTP) and instance visual (IVP). A new kind is one module here plus its import below."""

# Import order is registration order: that of the switches (tvp_*, ttp_*, ivp_*) and of building.
from .group import (  # noqa: I001
    BuildContext,
    PromptGroup,
    check_entry,
    prompt_kinds,
    prompt_texts,
    saved_text_features,
    sequence_order,
    unregister_kind,
)
from .visual import VisualPrompts
from .textual import TextualPrompts
from .instance import VRM_KINDS, InstanceCache, InstanceEncoder, InstancePrompts
from .options import Option, at_least, fraction, one_of

__all__ = [
    "VRM_KINDS",
    "BuildContext",
    "InstanceCache",
    "InstanceEncoder",
    "InstancePrompts",
    "Option",
    "PromptGroup",
    "TextualPrompts",
    "VisualPrompts",
    "at_least",
    "check_entry",
    "fraction",
    "one_of",
    "prompt_kinds",
    "prompt_texts",
    "saved_text_features",
    "sequence_order",
    "unregister_kind",
]

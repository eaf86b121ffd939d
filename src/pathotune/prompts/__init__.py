"""The three prompt kinds behind one interface (``PromptGroup``): task visual (TVP), task textual (TTP) and
instance visual (IVP)."""

from .group import GROUP_ORDER, PromptGroup
from .instance import VRM_KINDS, InstanceEncoder, InstancePrompts
from .textual import TextualPrompts
from .visual import VisualPrompts

__all__ = [
    "GROUP_ORDER",
    "VRM_KINDS",
    "InstanceEncoder",
    "InstancePrompts",
    "PromptGroup",
    "TextualPrompts",
    "VisualPrompts",
]

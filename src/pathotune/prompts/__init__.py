"""The three prompt kinds: task visual (TVP), task textual (TTP) and instance visual (IVP)."""

from .instance import VRM_KINDS, InstanceEncoder, InstancePrompts
from .textual import TextualPrompts
from .visual import VisualPrompts

__all__ = ["VRM_KINDS", "InstanceEncoder", "InstancePrompts", "TextualPrompts", "VisualPrompts"]

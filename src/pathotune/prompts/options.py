"""One switch, declared where it is read: a prompt kind's own options and the core ones share this form, so
``Switches`` validates all of them alike without naming any kind."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

# A value check: (switch name, value) -> the error message, or None when the value is fine.
Check = Callable[[str, Any], "str | None"]

_TYPE_NAMES = {"int": "an integer", "bool": "true or false", "float": "a number", "str": "a string"}


@dataclass(frozen=True)
class Option:
    """A switch: its name (as configs, flags, run folders and bundles spell it), its type as an annotation would
    write it (``"int"``, ``"str | None"``...), its default, and a check of its value on its own."""

    name: str
    type: str
    default: Any
    check: Check | None = None
    doc: str = ""

    def validate(self, value: Any) -> None:
        """Raise ConfigError naming the switch when ``value`` has the wrong type or fails the check."""
        kinds = [k.strip() for k in self.type.split("|")]
        if value is None and "None" in kinds:
            return
        base = kinds[0]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "str": isinstance(value, str),
        }.get(base, True)
        if not ok:
            wanted = _TYPE_NAMES.get(base, base) + (" or null" if "None" in kinds else "")
            raise ConfigError(f"switch {self.name} must be {wanted}, got {value!r} ({type(value).__name__})")
        error = self.check(self.name, value) if self.check is not None else None
        if error:
            raise ConfigError(error)


def at_least(low: int, note: str = "") -> Check:
    """Integers from ``low`` on (``note`` follows the bound in the message, e.g. ``" or None"``)."""
    return lambda name, v: None if v is None or v >= low else f"switch {name} must be >= {low}{note}, got {v}"


def one_of(allowed: Sequence[str]) -> Check:
    return lambda name, v: None if v in allowed else f"switch {name}={v!r} is not one of {list(allowed)}"


def fraction(name: str, v: float) -> str | None:
    """A rate in [0, 1): dropout."""
    return None if 0.0 <= v < 1.0 else f"switch {name} must be in [0, 1), got {v}"

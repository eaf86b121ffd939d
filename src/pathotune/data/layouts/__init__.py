"""The registry of published pathology patch-dataset layouts, each read exactly as its download unpacks.

One module per layout defines its reader and a ``LAYOUT`` (name, description, reader, ``accepts_file``); this
module collects them. Each reader turns the unpacked download into a :class:`~pathotune.data.types.PatchSource`
with the dataset's own splits where it has them (filling the rest with a stratified, seeded share of train, or
by patient or by region where random tiles would leak), so users need no manifest. To add a layout, write its
module and list it in ``_MODULES``.
"""

from __future__ import annotations

from ...errors import ConfigError
from . import bach, breakhis, hgsc, mhist, nct_crc_he, pcam
from .base import Layout

__all__ = ["LAYOUTS", "Layout", "get_layout", "list_layouts"]

_MODULES = (nct_crc_he, pcam, bach, mhist, breakhis, hgsc)

LAYOUTS: dict[str, Layout] = {m.LAYOUT.name: m.LAYOUT for m in _MODULES}


def list_layouts() -> list[str]:
    """Names accepted by ``layout:<name>:<path>`` and ``load_source(..., layout=<name>)``."""
    return sorted(LAYOUTS)


def get_layout(name: str) -> Layout:
    """The layout registered under ``name`` (any case); ConfigError lists the known names otherwise."""
    try:
        return LAYOUTS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dataset layout '{name}'; known layouts: {', '.join(list_layouts())}") from None

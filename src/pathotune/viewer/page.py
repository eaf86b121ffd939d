"""The page's files: ``static/index.html``, its script and style, and the vendored OpenSeadragon.

The server answers them from this folder and the export copies it, so both show the same page.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["OPENSEADRAGON_VERSION", "static_dir"]

OPENSEADRAGON_VERSION = "6.1.1"  # static/openseadragon/SOURCE.md says where it came from


def static_dir() -> Path:
    """The folder of the page, its script and style, and OpenSeadragon (with its licence)."""
    return Path(str(files("pathotune.viewer") / "static"))

"""A browser viewer for whole slides with a model's map over the tissue: served live, or exported as a folder.

- :mod:`.deepzoom`: Deep Zoom pyramids over the project's slide reader (every format it opens), tiles on
  demand behind an LRU cache;
- :mod:`.overlays`: tile scores (a bundle's probabilities, a MIL run's attention, or a finished heat map) and
  region masks (tissue, pen, blur, fold);
- :mod:`.catalog`: the slides shown, fixed at start, and the data the page reads;
- :mod:`.page`: the page and the vendored OpenSeadragon;
- :mod:`.app`: the FastAPI server (uvicorn), loopback by default, with a token on any other address;
- :mod:`.export`: the same page and data as a static folder, for ``file://`` or any web host.

``app`` imports FastAPI and uvicorn, so it is imported from its module, not from here.
"""

from .catalog import Catalog, build_catalog
from .deepzoom import PyramidPool, ReaderSlide, SlidePyramid, SlideSource, TileNotFound
from .export import ExportedSlide, export_viewer
from .overlays import RegionLayer, ScoreLayer, TileOverlay, region_layers, tile_overlays
from .page import OPENSEADRAGON_VERSION, static_dir

__all__ = [
    "OPENSEADRAGON_VERSION",
    "Catalog",
    "ExportedSlide",
    "PyramidPool",
    "ReaderSlide",
    "RegionLayer",
    "ScoreLayer",
    "SlidePyramid",
    "SlideSource",
    "TileNotFound",
    "TileOverlay",
    "build_catalog",
    "export_viewer",
    "region_layers",
    "static_dir",
    "tile_overlays",
]

"""The slide feature file (``<slide_id>.h5``): the contract between extraction, MIL and heat maps.

It sits below both ``slides`` (which writes it) and ``mil`` (which reads it), so neither needs the other. The
readers also take TRIDENT's and CLAM's feature files (:mod:`.foreign`).
"""

from .foreign import PT_SUFFIX, magnification, mpp_of
from .h5 import (
    ATTRIBUTES,
    EXTRACTOR_KEYS,
    REQUEST_KEYS,
    SUFFIX,
    FeatureFileWriter,
    SlideFeatures,
    bundle_mismatch,
    check_feature_compatibility,
    check_unique_slides,
    extractor_mismatch,
    feature_path,
    finished_tiles,
    list_feature_files,
    read_feature_attrs,
    read_slide_features,
    read_tiles_source,
    remove_partial_files,
    require_coords,
    slide_feature_files,
    tile_side,
    tiles_source_mismatch,
    tiles_source_text,
    write_feature_file,
)

__all__ = [
    "ATTRIBUTES",
    "EXTRACTOR_KEYS",
    "PT_SUFFIX",
    "REQUEST_KEYS",
    "SUFFIX",
    "FeatureFileWriter",
    "SlideFeatures",
    "bundle_mismatch",
    "check_feature_compatibility",
    "check_unique_slides",
    "extractor_mismatch",
    "feature_path",
    "finished_tiles",
    "list_feature_files",
    "magnification",
    "mpp_of",
    "read_feature_attrs",
    "read_slide_features",
    "read_tiles_source",
    "remove_partial_files",
    "require_coords",
    "slide_feature_files",
    "tile_side",
    "tiles_source_mismatch",
    "tiles_source_text",
    "write_feature_file",
]

"""A slide's physical scale from its metadata (microns per pixel, objective power), read in one place for every
backend that opens a TIFF-like file.

mpp comes from, in order: the OME-XML of an OME-TIFF (``PhysicalSizeX``/``PhysicalSizeY`` with their units),
the backend's own parse of the vendor's metadata (``openslide.mpp-x``: Aperio, Hamamatsu, Leica, MIRAX...),
then the TIFF resolution tags when their unit is a length. Metadata that states a pixel size which cannot be
used (not a number, a unit that is no length) raises :class:`UnusableMpp`, whose message says what the file
holds, so the error that asks for ``--mpp`` can say why. The objective power comes from the OME-XML's
objective (``NominalMagnification``), else the backend's ``objective-power``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MICRONS_PER_UNIT",
    "UnusableMpp",
    "mpp_from_properties",
    "objective_from_properties",
    "ome_mpp",
    "ome_objective",
    "positive_float",
]

# Microns in one unit of OME's UnitsLength, for the units a microscope pixel is given in. OME's schema spells
# micrometre with U+00B5; writers also use the Greek mu (U+03BC) and plain "um".
MICRONS_PER_UNIT = {
    "m": 1e6,
    "dm": 1e5,
    "cm": 1e4,
    "mm": 1e3,
    "\u00b5m": 1.0,
    "\u03bcm": 1.0,
    "um": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "\u00c5": 1e-4,
    "in": 25400.0,
    "thou": 25.4,
}
_OME_NAMESPACE = "openmicroscopy.org/Schemas/OME/"


class UnusableMpp(ValueError):
    """The metadata states a pixel size that cannot be used; the message says what it holds."""


def positive_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(el: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [c for c in el if _local(c.tag) == name]


def _ome_image(root: ElementTree.Element, size: tuple[int, int] | None) -> ElementTree.Element | None:
    """The Image whose Pixels have the slide's level-0 size, else the first (label and macro images are images
    of their own in OME)."""
    images = [im for im in root.iter() if _local(im.tag) == "Image" and _children(im, "Pixels")]
    if size is not None:
        for im in images:
            pixels = _children(im, "Pixels")[0]
            if (pixels.get("SizeX"), pixels.get("SizeY")) == (str(size[0]), str(size[1])):
                return im
    return images[0] if images else None


def _ome_root(description: str | None) -> ElementTree.Element | None:
    """The parsed OME-XML, or None when ``description`` is no OME-XML."""
    if not description or _OME_NAMESPACE not in description:
        return None
    try:
        root = ElementTree.fromstring(description.encode("utf-8"))
    except ElementTree.ParseError as e:
        raise UnusableMpp(f"its OME-XML does not parse ({e})") from None
    return root if _local(root.tag) == "OME" else None


def _ome_axis(pixels: ElementTree.Element, axis: str) -> float | None:
    raw = pixels.get(f"PhysicalSize{axis}")
    if raw is None:
        return None
    value = positive_float(raw)
    if value is None:
        raise UnusableMpp(f"its OME-XML PhysicalSize{axis} is {raw!r}, not a positive number")
    unit = pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m").strip()
    if unit not in MICRONS_PER_UNIT:
        raise UnusableMpp(
            f"its OME-XML gives PhysicalSize{axis} in {unit!r}, which is no length a pixel can be converted from "
            f"(known: {', '.join(MICRONS_PER_UNIT)})"
        )
    return value * MICRONS_PER_UNIT[unit]


def ome_mpp(description: str | None, size: tuple[int, int] | None = None) -> float | None:
    """Microns per pixel from OME-XML (an OME-TIFF's ImageDescription), units honoured (OME's default is µm).

    None when ``description`` is no OME-XML or states no physical size; :class:`UnusableMpp` when it states
    one that cannot be used. ``size`` (level-0 width, height) picks the image it describes when there are several.
    """
    root = _ome_root(description)
    image = None if root is None else _ome_image(root, size)
    if image is None:
        return None
    pixels = _children(image, "Pixels")[0]
    found = [v for v in (_ome_axis(pixels, "X"), _ome_axis(pixels, "Y")) if v is not None]
    return sum(found) / len(found) if found else None


def ome_objective(description: str | None, size: tuple[int, int] | None = None) -> float | None:
    """The NominalMagnification of the objective the slide's OME image names in its ObjectiveSettings (else of
    the only objective in the file); None when there is none or the XML does not parse."""
    try:
        root = _ome_root(description)
    except UnusableMpp:
        return None
    image = None if root is None else _ome_image(root, size)
    if image is None:
        return None
    objectives = [el for el in root.iter() if _local(el.tag) == "Objective"]
    settings = _children(image, "ObjectiveSettings")
    if settings:
        objectives = [el for el in objectives if el.get("ID") == settings[0].get("ID")]
    return positive_float(objectives[0].get("NominalMagnification")) if len(objectives) == 1 else None


def _mpp_from_tiff_tags(props: Mapping[str, Any]) -> float | None:
    """Microns per pixel from TIFF XResolution/YResolution; a unitless resolution says nothing about size."""
    unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
    per_micron = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    if per_micron is None:
        return None
    resolutions = [positive_float(props.get(k)) for k in ("tiff.XResolution", "tiff.YResolution")]
    vals = [per_micron / r for r in resolutions if r is not None]
    return sum(vals) / len(vals) if vals else None


def mpp_from_properties(props: Mapping[str, Any], prefix: str, size: tuple[int, int] | None = None) -> float | None:
    """Microns per level-0 pixel from a backend's properties (``prefix``: ``openslide`` or ``tiffslide``).

    OME-XML first (OpenSlide and tiffslide leave it unread), then the backend's vendor parse
    (``<prefix>.mpp-x``/``-y``, averaged), then the TIFF resolution tags. None when nothing states a size.
    """
    description = props.get("tiff.ImageDescription")
    ome = ome_mpp(description if isinstance(description, str) else None, size)
    if ome is not None:
        return ome
    vals = [positive_float(props.get(f"{prefix}.mpp-{axis}")) for axis in ("x", "y")]
    found = [v for v in vals if v is not None]
    return sum(found) / len(found) if found else _mpp_from_tiff_tags(props)


def objective_from_properties(
    props: Mapping[str, Any], prefix: str, size: tuple[int, int] | None = None
) -> float | None:
    """Objective power from a backend's properties: the OME-XML's objective, else ``<prefix>.objective-power``."""
    description = props.get("tiff.ImageDescription")
    ome = ome_objective(description if isinstance(description, str) else None, size)
    return ome if ome is not None else positive_float(props.get(f"{prefix}.objective-power"))

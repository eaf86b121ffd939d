"""Uploaded images, checked before their pixels are decoded: content type, the format's magic bytes, and the
decoded size read from the header (a decompression bomb is refused before it is inflated); then decoded as
``pathotune predict`` decodes a file (:func:`pathotune.data.to_rgb`) and turned into the model's input by the same
eval transform."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

import torch
from PIL import Image

from ..data import to_rgb
from ..errors import one_line
from .errors import RequestError

# Content types a part may declare, and the Pillow format each one means.
CONTENT_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/tiff": "TIFF",
    "image/tif": "TIFF",
}
UNTYPED = ("", "application/octet-stream")  # no claim: the magic bytes decide
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)
ALLOWED = "send PNG, JPEG or TIFF (image/png, image/jpeg, image/tiff)"


@dataclass(frozen=True)
class Upload:
    """One image as received: ``name`` is what messages call it (its file name, or "image 3")."""

    name: str
    data: bytes
    content_type: str = ""


def sniff(data: bytes) -> str | None:
    """The Pillow format named by the first bytes, or None when they are not PNG, JPEG or TIFF."""
    return next((fmt for magic, fmt in MAGIC if data.startswith(magic)), None)


def from_base64(text: object, index: int) -> Upload:
    """An image given in JSON: base64 text, or a data URL (``data:image/png;base64,...``) whose type is its claim."""
    name = f"image {index}"
    if not isinstance(text, str):
        raise RequestError(422, f"{name} is a JSON {type(text).__name__}; send each image as a base64 string")
    content_type = ""
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if not head.endswith(";base64"):
            raise RequestError(422, f"{name} is a data URL without ';base64'; send base64-encoded bytes")
        content_type = head[5:].split(";")[0]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{name} is not valid base64; encode the file's bytes with base64") from None
    return Upload(name, data, content_type)


def decode_rgb(upload: Upload, max_pixels: int) -> Image.Image:
    """The upload as 8-bit RGB, after every check; a RequestError (413, 415 or 422) says what is wrong."""
    declared = upload.content_type.split(";")[0].strip().lower()
    if declared not in UNTYPED and declared not in CONTENT_TYPES:
        raise RequestError(415, f"{upload.name} has content type {declared}; {ALLOWED}")
    if not upload.data:
        raise RequestError(422, f"{upload.name} is empty; {ALLOWED}")
    fmt = sniff(upload.data)
    if fmt is None:
        raise RequestError(415, f"{upload.name} is not a PNG, JPEG or TIFF file (by its first bytes); {ALLOWED}")
    if declared in CONTENT_TYPES and CONTENT_TYPES[declared] != fmt:
        raise RequestError(415, f"{upload.name} is declared {declared} but holds {fmt} data; send its true type")
    try:
        img = Image.open(BytesIO(upload.data), formats=[fmt])  # reads the header only
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"{upload.name} is refused as a decompression bomb: {one_line(e)}") from None
    except Exception as e:  # Pillow raises many kinds for a malformed header
        raise RequestError(422, f"{upload.name} cannot be read as {fmt}: {one_line(e, 160)}") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise RequestError(
                413,
                f"{upload.name} would decode to {width} x {height} = {width * height:,} pixels, over the limit of "
                f"{max_pixels:,} (--max-pixels); send smaller tiles",
            )
        try:
            img.load()
            return to_rgb(img).copy()
        except Exception as e:  # truncated or corrupt data: Pillow's errors vary by format and codec
            raise RequestError(422, f"{upload.name} cannot be decoded as {fmt}: {one_line(e, 160)}") from None


def prepare(upload: Upload, max_pixels: int, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Decode and transform one upload into the model's input (3, S, S), as ``pathotune predict`` does a file."""
    return transform(decode_rgb(upload, max_pixels))

"""Slides in vendor and standard formats, written here from the real H&E of the vendored CMU slide.

Each writer produces what a scanner or converter writes, as far as the readers look: an OME-TIFF through
tifffile's OME writer (OME-XML with PhysicalSizeX/Y and units, a SubIFD pyramid), a DICOM WSI series through
wsidicom's own writer (one instance per level, pixel spacing, objective lens power), a Hamamatsu NDPI (JPEG
strips with restart markers and Hamamatsu's private tags) and a Leica SCN (BigTIFF, the SCN XML in the
ImageDescription) through tifffile, and a 3DHISTECH MIRAX (.mrxs beside a folder of Slidedat.ini, Index.dat
and a data file of camera images). Each returns the pixels its levels hold, so tests compare reads with them.
The layouts follow the formats' descriptions and OpenSlide's readers of them.
"""

from __future__ import annotations

import copy
import io
import re
import struct
import uuid
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MediaStorageDirectoryStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from slide_fixtures import pyramid_levels
from wsidicom import ImageData, WsiDicom
from wsidicom.codec import Encoder
from wsidicom.geometry import Point, Size, SizeMm
from wsidicom.instance import WsiDataset, WsiInstance
from wsidicom.metadata import (
    Equipment,
    ImageType,
    Label,
    Objectives,
    OpticalPath,
    Patient,
    Pyramid,
    Series,
    Slide,
    SlideSample,
    Study,
    WsiMetadata,
)
from wsidicom.metadata import Image as ImageMetadata
from wsidicom.metadata.schema.dicom import WsiMetadataDicomSchema
from wsidicom.source import Source

# -- OME-TIFF ------------------------------------------------------------------------------------------------------


def write_ome_tiff(
    path: str | Path,
    rgb: np.ndarray,
    size_x: float | str | None,
    unit: str | None = "\u00b5m",
    size_y: float | str | None = None,
    levels: int = 3,
    tile: int = 64,
    objective: float | None = None,
) -> list[np.ndarray]:
    """An OME-TIFF as Bio-Formats and QuPath write it: level 0 with the OME-XML, reductions as its SubIFDs.

    ``size_x``/``size_y`` (``size_y`` defaults to ``size_x``) and ``unit`` go into PhysicalSizeX/Y and their
    unit attributes exactly as given (a string is written verbatim; None leaves the attribute out), so
    malformed metadata can be written too. ``levels=1`` writes a plain single-level OME-TIFF. ``objective``
    adds an Instrument with that Objective (NominalMagnification) and links the image to it, as Bio-Formats
    does for scanner files.
    """
    arrays = pyramid_levels(rgb, levels)
    metadata: dict = {"axes": "YXS"}
    size_y = size_x if size_y is None else size_y
    for axis, value in (("X", size_x), ("Y", size_y)):
        if value is not None:
            metadata[f"PhysicalSize{axis}"] = value
            if unit is not None:
                metadata[f"PhysicalSize{axis}Unit"] = unit
    common = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(arrays[0], subifds=levels - 1, metadata=metadata, **common)
        for arr in arrays[1:]:
            tw.write(arr, subfiletype=1, **common)
    if objective is not None:
        xml = tifffile.tiffcomment(path)
        instrument = f'<Instrument ID="Instrument:0"><Objective ID="Objective:0:0" NominalMagnification="{objective}"/>'
        xml = re.sub(r"(<OME\b[^>]*>)", rf"\1{instrument}</Instrument>", xml, count=1)
        links = '<InstrumentRef ID="Instrument:0"/><ObjectiveSettings ID="Objective:0:0"/>'
        xml = re.sub(r"(<Image\b[^>]*>)", rf"\1{links}", xml, count=1)
        tifffile.tiffcomment(path, xml.encode("utf-8"))
    return arrays


# -- DICOM WSI -----------------------------------------------------------------------------------------------------

DICOM_TRANSFER_SYNTAXES = {"jpeg2000-lossless": JPEG2000Lossless, "uncompressed": ExplicitVRLittleEndian}


class _LevelTiles(ImageData):
    """One pyramid level held as an array and served tile by tile (edge tiles padded with white)."""

    def __init__(self, array: np.ndarray, mpp: float, tile: int, syntax: UID) -> None:
        self._array, self._mpp, self._tile, self._syntax = array, mpp, tile, syntax
        super().__init__(Encoder.create(syntax, 8, "RGB"))

    transfer_syntax = property(lambda self: self._syntax)
    image_size = property(lambda self: Size(self._array.shape[1], self._array.shape[0]))
    tile_size = property(lambda self: Size(self._tile, self._tile))
    pixel_spacing = property(lambda self: SizeMm(self._mpp / 1000, self._mpp / 1000))  # mm per pixel
    imaged_size = property(lambda self: None)
    samples_per_pixel = property(lambda self: 3)
    photometric_interpretation = property(lambda self: "RGB")
    bits = property(lambda self: 8)
    image_coordinate_system = property(lambda self: None)
    thread_safe = property(lambda self: True)
    lossy_compression = property(lambda self: None)
    transcoder = property(lambda self: None)

    def get_decoded_tile(self, tile_point: Point, z: float, path: str, cache: bool = True) -> np.ndarray:
        t = self._tile
        out = np.full((t, t, 3), 255, dtype=np.uint8)
        block = self._array[tile_point.y * t : (tile_point.y + 1) * t, tile_point.x * t : (tile_point.x + 1) * t]
        out[: block.shape[0], : block.shape[1]] = block
        return out

    def get_encoded_tile(self, tile_point: Point, z: float, path: str) -> bytes:
        return self.encoder.encode(self.get_decoded_tile(tile_point, z, path))


class _LevelsSource(Source):
    """A wsidicom source of volume instances only (no label, overview or thumbnail)."""

    def __init__(self, base: Dataset, levels: list[_LevelTiles]) -> None:
        super().__init__()
        self._base, self._levels = base, levels

    @property
    def base_dataset(self) -> WsiDataset:
        return WsiDataset(self._base)

    @property
    def level_instances(self) -> list[WsiInstance]:
        # each instance gets its own copy: building an instance's dataset writes its SOP Instance UID into it
        return [
            WsiInstance.create_instance(level, copy.deepcopy(self._base), ImageType.VOLUME, k)
            for k, level in enumerate(self._levels)
        ]

    label_instances = overview_instances = thumbnail_instances = annotation_instances = property(lambda self: [])

    def close(self) -> None:
        pass


def write_dicom_wsi(
    folder: str | Path,
    rgb: np.ndarray,
    mpp: float,
    levels: int = 3,
    tile: int = 64,
    objective: float | None = 20.0,
    transfer_syntax: str = "jpeg2000-lossless",
) -> list[np.ndarray]:
    """A DICOM WSI series (VL Whole Slide Microscopy Image, TILED_FULL, one instance per level) in ``folder``,
    written by ``WsiDicom.save``. Lossless transfer syntaxes only, so reads compare pixel for pixel."""
    arrays = pyramid_levels(rgb, levels)
    optical = OpticalPath(objective=Objectives(objective_power=objective) if objective is not None else None)
    metadata = WsiMetadata(
        study=Study(uid=generate_uid()),
        series=Series(uid=generate_uid()),
        patient=Patient(),
        equipment=Equipment(manufacturer="PathoTune tests"),
        slide=Slide(identifier="CMU-1-Small-Region", samples=[SlideSample(identifier="skin", uid=generate_uid())]),
        pyramid=Pyramid(uid=generate_uid(), image=ImageMetadata(), optical_paths=[optical]),
        label=Label(),
        frame_of_reference_uid=generate_uid(),
        dimension_organization_uids=[generate_uid()],
    )
    base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME, require_icc_profile=True)
    syntax = DICOM_TRANSFER_SYNTAXES[transfer_syntax]
    tiles = [_LevelTiles(a, mpp * 2**k, tile, syntax) for k, a in enumerate(arrays)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with WsiDicom(_LevelsSource(base, tiles)) as wsi:
        wsi.save(folder, workers=1)
    return arrays


def write_dicom_file(path: str | Path, sop_class: UID = SecondaryCaptureImageStorage) -> Path:
    """A small DICOM file of another kind than a whole-slide image: by default a Secondary Capture (a photo),
    with ``MediaStorageDirectoryStorage`` a DICOMDIR-like index (its class only in the File Meta)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if sop_class != MediaStorageDirectoryStorage:
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "OT", 8, 8, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PhotometricInterpretation, ds.PixelData = "MONOCHROME2", bytes(64)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def dicom_level_files(folder: str | Path) -> list[Path]:
    """The instances of a series written by :func:`write_dicom_wsi`, level 0 first (the largest file)."""
    return sorted(Path(folder).glob("*.dcm"), key=lambda p: -p.stat().st_size)


# -- Hamamatsu NDPI ------------------------------------------------------------------------------------------------

_NDPI_FORMAT_FLAG, _NDPI_SOURCELENS, _NDPI_XOFFSET, _NDPI_YOFFSET, _NDPI_FOCAL_PLANE = 65420, 65421, 65422, 65423, 65424
_NDPI_MCU_STARTS = 65426
_LONG, _FLOAT, _SLONG8 = 4, 11, 17


def _jpeg(arr: np.ndarray, restart_blocks: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, subsampling=0, restart_marker_blocks=restart_blocks)
    return buf.getvalue()


def _restart_interval_starts(jpeg: bytes) -> list[int]:
    """Offsets of each restart interval's first entropy-coded byte: the scan start, then after each RSTn."""
    sos = jpeg.index(b"\xff\xda")
    starts = [sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")]
    i = starts[0]
    while (i := jpeg.find(b"\xff", i)) != -1 and i + 1 < len(jpeg):
        if 0xD0 <= jpeg[i + 1] <= 0xD7:
            starts.append(i + 2)
        i += 2
    return starts


def write_ndpi(
    path: str | Path, rgb: np.ndarray, mpp: float, levels: int = 3, objective: float = 20.0, restart_blocks: int = 8
) -> list[np.ndarray]:
    """A Hamamatsu NDPI: one JPEG strip per level (restart markers every ``restart_blocks`` MCUs, so OpenSlide
    reads it in tiles), NDPI's private tags (format flag, source lens, slide-centre offsets, focal plane, MCU
    starts) and the resolution in pixels per centimetre. Returns each level as the JPEG decodes (Pillow)."""
    written = []
    with tifffile.TiffWriter(path) as tw:
        for k, arr in enumerate(pyramid_levels(rgb, levels)):
            data = _jpeg(arr, restart_blocks)
            starts = _restart_interval_starts(data)
            per_cm = 1e4 / (mpp * 2**k)
            tags = [
                (_NDPI_FORMAT_FLAG, _LONG, 1, 1, True),
                (_NDPI_SOURCELENS, _FLOAT, 1, objective, True),
                (_NDPI_XOFFSET, _SLONG8, 1, 0, True),
                (_NDPI_YOFFSET, _SLONG8, 1, 0, True),
                (_NDPI_FOCAL_PLANE, _SLONG8, 1, 0, True),
                (_NDPI_MCU_STARTS, _LONG, len(starts), starts, True),
            ]
            tw.write(
                iter([data]),
                shape=arr.shape,
                dtype="uint8",
                photometric="ycbcr",
                subsampling=(1, 1),
                compression="jpeg",
                rowsperstrip=arr.shape[0],
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                extratags=tags,
                metadata=None,
            )
            with Image.open(io.BytesIO(data)) as img:
                written.append(np.asarray(img.convert("RGB")))
    return written


# -- Leica SCN -----------------------------------------------------------------------------------------------------

SCN_NAMESPACE = "http://www.leica-microsystems.com/scn/2010/10/01"


def write_scn(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float,
    levels: int = 3,
    objective: int = 20,
    offset: tuple[int, int] = (64, 32),
    tile: int = 64,
) -> list[np.ndarray]:
    """A Leica SCN: tiled BigTIFF, the SCN XML in the first ImageDescription. The scanned image sits ``offset``
    level-0 pixels into a collection (the slide area) that is larger on every side, as on a real SCN, so the
    slide's level 0 is bigger than the image and blank (white) around it. Sizes in the XML are nanometres; mpp
    is in the TIFF resolution tags, where OpenSlide reads it."""
    arrays = pyramid_levels(rgb, levels)
    nm = mpp * 1000
    height, width = arrays[0].shape[:2]
    dims = "".join(
        f'<dimension sizeX="{a.shape[1]}" sizeY="{a.shape[0]}" r="{k}" ifd="{k}"/>' for k, a in enumerate(arrays)
    )
    view_w, view_h = round(width * nm), round(height * nm)
    off_x, off_y = round(offset[0] * nm), round(offset[1] * nm)
    xml = (
        f'<?xml version="1.0" encoding="utf-8"?><scn xmlns="{SCN_NAMESPACE}">'
        f'<collection name="CMU-1" uuid="urn:uuid:pathotune-collection" '
        f'sizeX="{view_w + 2 * off_x}" sizeY="{view_h + 2 * off_y}"><barcode>Q01VLTE=</barcode>'
        '<image name="main" uuid="urn:uuid:pathotune-image"><creationDate>2024-01-01T00:00:00.00Z</creationDate>'
        '<device model="Leica SCN400;Leica SCN" version="1.5.1"/>'
        f'<pixels sizeX="{width}" sizeY="{height}">{dims}</pixels>'
        f'<view sizeX="{view_w}" sizeY="{view_h}" sizeZ="1" offsetX="{off_x}" offsetY="{off_y}" offsetZ="0" '
        'spacingZ="0"/>'
        f"<scanSettings><objectiveSettings><objective>{objective}</objective></objectiveSettings>"
        "<illuminationSettings><numericalAperture>0.7</numericalAperture>"
        "<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings>"
        "</image></collection></scn>"
    )
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, arr in enumerate(arrays):
            per_cm = 1e4 / (mpp * 2**k)
            tw.write(
                arr,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                resolution=(per_cm, per_cm),
                resolutionunit="CENTIMETER",
                description=xml if k == 0 else None,
                metadata=None,
            )
    return arrays


# -- 3DHISTECH MIRAX -----------------------------------------------------------------------------------------------


def _i32(value: int) -> bytes:
    return struct.pack("<i", value)


def write_mrxs(
    path: str | Path,
    rgb: np.ndarray,
    mpp: float,
    levels: int = 3,
    objective: int = 20,
    image: int = 128,
    image_format: str = "PNG",
) -> list[np.ndarray]:
    """A MIRAX slide: ``path`` (``.mrxs``) and beside it a folder of that name holding ``Slidedat.ini`` (the
    slide's layout, MICROMETER_PER_PIXEL_X/Y and OBJECTIVE_MAGNIFICATION), ``Index.dat`` (per zoom level, a data
    page listing each camera image's index, offset, length and data file) and ``Data0000.dat`` (the images).

    Level 0 is a grid of ``image`` x ``image`` camera images without overlap (so no position map is needed);
    each zoom level concatenates 2x2 images of the one below (IMAGE_CONCAT_FACTOR=1), padded with the fill
    colour (white) past the slide's edge. ``image_format`` is PNG (lossless) or JPEG. Returns each level as
    its images decode."""
    path = Path(path)
    arrays = pyramid_levels(rgb, levels)
    height, width = arrays[0].shape[:2]
    if width % image or height % image:
        raise ValueError(f"a {width}x{height} slide is no whole number of {image} px camera images")
    across, down = width // image, height // image
    folder = path.with_suffix("")
    folder.mkdir(parents=True)
    slide_uuid = str(uuid.UUID(int=0xC0FFEE))
    data, pages, decoded = bytearray(), [], []
    for k, arr in enumerate(arrays):
        concat = 2**k
        level = np.full((arr.shape[0] + image, arr.shape[1] + image, 3), 255, dtype=np.uint8)
        entries = []
        for y in range(0, down, concat):
            for x in range(0, across, concat):
                cam = np.full((image, image, 3), 255, dtype=np.uint8)
                ly, lx = (y // concat) * image, (x // concat) * image
                block = arr[ly : ly + image, lx : lx + image]
                cam[: block.shape[0], : block.shape[1]] = block
                buf = io.BytesIO()
                Image.fromarray(cam).save(buf, image_format, **({"quality": 95} if image_format == "JPEG" else {}))
                with Image.open(io.BytesIO(buf.getvalue())) as img:
                    level[ly : ly + image, lx : lx + image] = np.asarray(img.convert("RGB"))
                entries.append((y * across + x, len(data), len(buf.getvalue()), 0))
                data += buf.getvalue()
        pages.append(entries)
        decoded.append(level[: arr.shape[0], : arr.shape[1]].copy())
    (folder / "Data0000.dat").write_bytes(bytes(data))

    # Index.dat: version and slide id, then a pointer to the zoom levels' record pointers and one to the
    # (empty) non-hierarchical table; each record is 0, a pointer to its data page, and the page holds its
    # entry count, the next page (0: none) and (image index, offset, length, data file) per image.
    index = bytearray(b"01.02" + slide_uuid.encode())
    root = len(index)
    index += bytes(8)
    table = len(index)
    index += bytes(4 * len(pages))
    index[root : root + 4] = _i32(table)
    index[root + 4 : root + 8] = _i32(len(index))
    index += _i32(0)
    for k, entries in enumerate(pages):
        index[table + 4 * k : table + 4 * k + 4] = _i32(len(index))
        index += _i32(0) + _i32(len(index) + 8)
        index += _i32(len(entries)) + _i32(0) + b"".join(_i32(v) for e in entries for v in e)
    (folder / "Index.dat").write_bytes(bytes(index))

    ini = [
        "[GENERAL]",
        f"SLIDE_ID={slide_uuid}",
        f"IMAGENUMBER_X={across}",
        f"IMAGENUMBER_Y={down}",
        f"OBJECTIVE_MAGNIFICATION={objective}",
        "[HIERARCHICAL]",
        "HIER_COUNT=1",
        "HIER_0_NAME=Slide zoom level",
        f"HIER_0_COUNT={levels}",
        *(f"HIER_0_VAL_{k}=ZoomLevel_{k}\nHIER_0_VAL_{k}_SECTION=LAYER_0_LEVEL_{k}_SECTION" for k in range(levels)),
        "NONHIER_COUNT=0",
        "INDEXFILE=Index.dat",
        "[DATAFILE]",
        "FILE_COUNT=1",
        "FILE_0=Data0000.dat",
    ]
    for k in range(levels):
        ini += [
            f"[LAYER_0_LEVEL_{k}_SECTION]",
            "OVERLAP_X=0",
            "OVERLAP_Y=0",
            f"MICROMETER_PER_PIXEL_X={mpp * 2**k}",
            f"MICROMETER_PER_PIXEL_Y={mpp * 2**k}",
            f"IMAGE_FORMAT={image_format}",
            "IMAGE_FILL_COLOR_BGR=16777215",
            f"DIGITIZER_WIDTH={image}",
            f"DIGITIZER_HEIGHT={image}",
            f"IMAGE_CONCAT_FACTOR={0 if k == 0 else 1}",
        ]
    (folder / "Slidedat.ini").write_text("\r\n".join(ini) + "\r\n")
    path.write_bytes(b"")  # the .mrxs itself carries nothing; OpenSlide reads the folder beside it
    return decoded

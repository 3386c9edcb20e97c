"""The defects an independent fuzz run found reaching grading (issue 23), made on valid phantom images:
impossible geometry, a codestream whose header lies about its size, a Secondary Capture holding an MR
image, an unknown character set. Used by the tests and by tests/benchmarks/fuzz_node.py."""

from __future__ import annotations

import copy
import struct
from collections.abc import Collection, Sequence
from enum import StrEnum

import jpeg_ls  # pyjpegls (CharLS), installed with highdicom
import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid


class Defect(StrEnum):
    """One way a study is made malformed (applied to the images of one role)."""

    HUGE_SPACING = "PixelSpacing 1e6 mm"  # on every image of the series
    SAME_POSITION = "one ImagePositionPatient"  # every slice of the series at the first one's position
    LYING_JPEG_LS = "JPEG-LS codestream declaring 20000 x 20000 x 16"  # inside an image declaring its own size
    SECONDARY_CAPTURE = "Secondary Capture holding MR"  # every image of the study
    BAD_CHARSET = "SpecificCharacterSet ISO_IR 999"  # every image of the study


BOMB_SIZE = 20000  # rows and columns the lying codestream declares


def jpeg_ls_declaring(pixels: np.ndarray, rows: int, columns: int) -> bytes:
    """A JPEG-LS codestream of ``pixels`` whose frame header (SOF55) declares ``rows`` x ``columns``
    and 16-bit samples: only the header lies, as in the fuzz run's 3.7 kB bomb."""
    data = bytearray(jpeg_ls.encode(np.ascontiguousarray(pixels.astype(np.uint16))).tobytes())
    at = data.find(b"\xff\xf7")
    if at < 0:
        raise ValueError("CharLS wrote no SOF55 marker")
    struct.pack_into(">BHH", data, at + 4, 16, rows, columns)
    return bytes(data)


def lie_about_size(ds: Dataset, rows: int = BOMB_SIZE, columns: int = BOMB_SIZE) -> Dataset:
    """``ds`` (native pixels) re-encoded as JPEG-LS Lossless whose codestream declares ``rows`` x
    ``columns`` while the data set keeps its own Rows and Columns."""
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16 if int(ds.BitsAllocated) == 16 else np.uint8)
    codestream = jpeg_ls_declaring(pixels.reshape(int(ds.Rows), int(ds.Columns)), rows, columns)
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True  # encapsulated: written with undefined length
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    return ds


def apply(defect: Defect, ds: Dataset, first_position: list[float] | None = None) -> Dataset:
    """``ds`` with ``defect`` (``first_position``: where SAME_POSITION puts every slice)."""
    if defect is Defect.HUGE_SPACING:
        ds.PixelSpacing = [1e6, 1e6]
    elif defect is Defect.SAME_POSITION:
        ds.ImagePositionPatient = list(first_position if first_position is not None else ds.ImagePositionPatient)
    elif defect is Defect.LYING_JPEG_LS:
        lie_about_size(ds)
    elif defect is Defect.SECONDARY_CAPTURE:
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.ConversionType = "WSD"
    elif defect is Defect.BAD_CHARSET:
        ds.SpecificCharacterSet = "ISO_IR 999"
    return ds


#: Whether a defect applies to one role's series (else to every image of the study).
PER_SERIES = frozenset({Defect.HUGE_SPACING, Defect.SAME_POSITION, Defect.LYING_JPEG_LS})


def defective_study(datasets: Sequence[Dataset], defect: Defect, series: str = "Axial",
                    chosen: Collection[int] | None = None) -> list[Dataset]:
    """Copies of one study's data sets under fresh Study, Series and SOP Instance UIDs, with ``defect``
    applied: a per-series defect to the images of the series whose SeriesDescription contains
    ``series`` (``chosen``: only those at these indices, in InstanceNumber order), the others to
    every image."""
    out = with_fresh_uids(datasets)
    targets = [ds for ds in out if defect not in PER_SERIES or series in str(ds.get("SeriesDescription", ""))]
    first = list(targets[0].ImagePositionPatient) if targets else None
    for index, ds in enumerate(targets):
        if chosen is None or index in chosen:
            apply(defect, ds, first)
    return out


def with_fresh_uids(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Copies of one study's data sets (by series, in InstanceNumber order) under fresh Study, Series
    and SOP Instance UIDs."""
    study_uid = generate_uid()
    series_uids: dict[str, str] = {}
    ordered = sorted(datasets, key=lambda d: (str(d.SeriesInstanceUID), int(d.InstanceNumber)))
    out = [copy.deepcopy(ds) for ds in ordered]
    for ds in out:
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids.setdefault(str(ds.SeriesInstanceUID), generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return out

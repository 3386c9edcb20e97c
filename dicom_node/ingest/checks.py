"""Checks on an offered instance's header (read by ``header.read_header``, large values deferred),
before anything is decoded: truncation, the declared image size, the series size, and whether its
SOP class (re)opens a study for grading. The admission applies them to every way in."""

from __future__ import annotations

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from dicom_node.ingest.header import as_uid

__all__ = ["PIXEL_DATA", "UNDEFINED_LENGTH", "image_size_problem", "reopens_study", "series_size_of", "truncation"]

PIXEL_DATA = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF

# Stored and recorded, but they do not (re)open a study for grading: Structured Reports (our own
# results coming back from the PACS among them), Secondary Captures, presentation states, PDFs.
_NOT_GRADED_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.11.",
                        "1.2.840.10008.5.1.4.1.1.104.")  # ... and encapsulated documents (our PDF)


def _held(element: RawDataElement, end: int) -> int:
    """How many bytes of a raw element's value the stream holds (``end``: the stream's size)."""
    if element.value is not None:
        return len(element.value)
    return max(0, min(element.length, end - element.value_tell))


def truncation(ds: Dataset, sop_class_uid: str, transfer_syntax: UID, end: int) -> str | None:
    """Why a dataset read by ``read_header`` (from a stream of ``end`` bytes) looks cut short, or
    None. Reads raw element lengths and a few image attributes, never decodes pixels: an image
    without Pixel Data, a last element shorter than its declared length, or native Pixel Data
    shorter than Rows x Columns x samples x frames."""
    tags = list(ds.keys())  # in the order read; membership is looked up by hash (``in ds``), never scanned
    if not tags:
        return "empty dataset"
    has_pixels = PIXEL_DATA in ds
    if not has_pixels and "Image Storage" in as_uid(sop_class_uid).name:
        return "an image without Pixel Data"
    last = ds.get_item(tags[-1], keep_deferred=True)
    if isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH \
            and (held := _held(last, end)) != last.length:
        return f"element {last.tag} holds {held} of its {last.length} bytes"
    if has_pixels and not transfer_syntax.is_compressed:
        try:
            expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                        * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) + 7) // 8
        except (AttributeError, TypeError, ValueError):
            return "an image without usable Rows, Columns or Bits Allocated"
        pixels = ds.get_item(PIXEL_DATA, keep_deferred=True)
        got = _held(pixels, end) if isinstance(pixels, RawDataElement) else len(pixels.value or b"")
        if got < expected:
            return f"Pixel Data holds {got} of the {expected} bytes its image size needs"
    return None


def reopens_study(sop_class_uid: str) -> bool:
    """Whether a new instance of this SOP class means its study must be graded (again)."""
    return not sop_class_uid.startswith(_NOT_GRADED_PREFIXES)


def image_size_problem(ds: Dataset, max_pixels: int) -> str | None:
    """Why an image's declared size is refused (Rows x Columns x frames x samples over
    ``max_pixels``, or not numbers), read from the header before anything is decoded."""
    if PIXEL_DATA not in ds:
        return None
    try:
        pixels = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
                  * int(ds.get("SamplesPerPixel", 1) or 1))
    except (AttributeError, TypeError, ValueError):
        return "an image without usable Rows, Columns, NumberOfFrames or SamplesPerPixel"
    if pixels > max_pixels:
        return f"an image of {pixels} pixels (Rows x Columns x frames x samples; at most {max_pixels})"
    return None


def series_size_of(ds: Dataset, max_images: int) -> int | None:
    """ImagesInAcquisition when it is a plausible series size (1..max_images), else None (ignored)."""
    try:
        value = int(str(ds.get("ImagesInAcquisition", "")).strip())
    except (TypeError, ValueError):
        return None
    return value if 1 <= value <= max_images else None

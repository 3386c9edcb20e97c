"""Header checks on a received instance, read from its encoded header before anything is decoded
or inflated: truncation, the declared image size, the Deflate bound, the series size, and whether
its SOP class (re)opens a study for grading. Every way in (C-STORE, the upload) uses them."""

from __future__ import annotations

import zlib

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

__all__ = ["PIXEL_DATA", "UNDEFINED_LENGTH", "image_size_problem", "inflated_size_problem", "reopens_study",
           "series_size_of", "truncation"]

PIXEL_DATA = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF

# Stored and recorded, but they do not (re)open a study for grading: Structured Reports (our own
# results coming back from the PACS among them), Secondary Captures, presentation states, PDFs.
_NOT_GRADED_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.11.",
                        "1.2.840.10008.5.1.4.1.1.104.")  # ... and encapsulated documents (our PDF)


def truncation(ds: Dataset, sop_class_uid: str, transfer_syntax: UID) -> str | None:
    """Why a received dataset looks cut short, or None. Reads raw element lengths and a few image
    attributes, never decodes pixels: an image without Pixel Data, a last element shorter than its
    declared length, or native Pixel Data shorter than Rows x Columns x samples x frames."""
    tags = list(ds.keys())
    if not tags:
        return "empty dataset"
    if "Image Storage" in UID(sop_class_uid).name and PIXEL_DATA not in tags:
        return "an image without Pixel Data"
    last = ds.get_item(tags[-1])
    if isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH and last.value is not None \
            and len(last.value) != last.length:
        return f"element {last.tag} holds {len(last.value)} of its {last.length} bytes"
    if PIXEL_DATA in tags and not transfer_syntax.is_compressed:
        try:
            expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                        * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) + 7) // 8
        except (AttributeError, TypeError, ValueError):
            return "an image without usable Rows, Columns or Bits Allocated"
        got = len(ds.get_item(PIXEL_DATA).value or b"")
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


def inflated_size_problem(raw: bytes, max_bytes: int) -> str | None:
    """Why a Deflated Explicit VR Little Endian dataset is refused: it inflates beyond ``max_bytes``
    (checked in bounded steps, so a deflate bomb never inflates in full), or is not deflate data."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, data = 0, raw
    try:
        while data:
            total += len(inflater.decompress(data, 1 << 20))
            if total > max_bytes:
                return f"a deflated dataset that inflates beyond {max_bytes // 2**20} MiB"
            data = inflater.unconsumed_tail
    except zlib.error as exc:
        return f"a deflated dataset that does not inflate ({exc})"
    return None


def series_size_of(ds: Dataset, max_images: int) -> int | None:
    """ImagesInAcquisition when it is a plausible series size (1..max_images), else None (ignored)."""
    try:
        value = int(str(ds.get("ImagesInAcquisition", "")).strip())
    except (TypeError, ValueError):
        return None
    return value if 1 <= value <= max_images else None

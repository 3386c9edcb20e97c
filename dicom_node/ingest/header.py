"""Reading an offered instance's header without inflating or decoding it whole: its UIDs
checked with pydicom's ``UID.is_valid``, the Part 10 file meta, a Deflated dataset inflated in
bounded steps (a deflate bomb never inflates past the bound), the dataset read with every large
value deferred (Pixel Data is skipped, not read), and the truncation check on raw lengths."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import BinaryIO

from pydicom import config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

PIXEL_DATA = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_UID_LENGTH = 64
CHUNK = 1 << 20  # bytes read, or inflated, per step
DEFER_BYTES = 64 * 1024  # values longer than this are skipped while reading a header, never read


def as_uid(value: str) -> UID:
    """``value`` as a pydicom UID, without pydicom's check (it would log a warning naming the value)."""
    return UID(value, validation_mode=config.IGNORE)


def uid_problem(value: object, name: str) -> str | None:
    """Why ``value`` is not a valid UID (PS3.5 9.1: digits and dots, 1-64 characters, no leading
    zeros in a component; pydicom's ``UID.is_valid``), or None if it is one."""
    text = "" if value is None else str(value)
    if not text:
        return f"{name} is empty"
    if len(text) > MAX_UID_LENGTH:
        return f"{name} is {len(text)} characters long (at most {MAX_UID_LENGTH})"
    if not as_uid(text).is_valid or text != text.strip():
        return f"{name} is not a UID (digits and dots, no leading zeros): {text[:80]!r}"
    return None


def _not_group_2(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 2


def read_file_meta(fp: BinaryIO) -> FileMetaDataset:
    """The file meta of a Part 10 stream read from its start, leaving ``fp`` at the dataset's
    first byte; pydicom's InvalidDicomError without the preamble's 'DICM' marker."""
    read_preamble(fp, False)
    return FileMetaDataset(read_dataset(fp, False, True, stop_when=_not_group_2))


class InflateProblem(ValueError):
    """A Deflated dataset that inflates beyond its bound, is not deflate data, or is cut short."""

    def __init__(self, message: str, too_large: bool):
        super().__init__(message)
        self.too_large = too_large


def inflate(read: Callable[[int], bytes], max_bytes: int, sink: BinaryIO | None = None) -> int:
    """Inflate raw deflate data read by ``read(n)`` in steps of at most ``CHUNK`` bytes out,
    into ``sink`` (or nowhere: only counted); the inflated size, or InflateProblem as soon as it
    passes ``max_bytes`` (so a deflate bomb never inflates in full)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof:
            data = inflater.unconsumed_tail or read(CHUNK)
            if not data:
                break
            out = inflater.decompress(data, CHUNK)
            total += len(out)
            if total > max_bytes:
                raise InflateProblem(f"a deflated dataset that inflates beyond {max_bytes // 2**20} MiB", True)
            if sink is not None:
                sink.write(out)
    except zlib.error as exc:
        raise InflateProblem(f"a deflated dataset that does not inflate ({exc})", False) from None
    if not inflater.eof:
        raise InflateProblem("a deflated dataset cut short (its deflate stream does not end)", False)
    return total


def read_header(fp: BinaryIO, transfer_syntax: UID) -> Dataset:
    """The dataset from ``fp``'s position to its end, every value longer than ``DEFER_BYTES``
    deferred (skipped: Pixel Data is never read nor decoded). A Deflated dataset must be
    inflated first (its elements are then Explicit VR Little Endian)."""
    if transfer_syntax.is_deflated:
        implicit, little = False, True
    else:
        implicit, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    return read_dataset(fp, implicit, little, defer_size=DEFER_BYTES)


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
    tags = list(ds.keys())
    if not tags:
        return "empty dataset"
    if "Image Storage" in as_uid(sop_class_uid).name and PIXEL_DATA not in tags:
        return "an image without Pixel Data"
    last = ds.get_item(tags[-1], keep_deferred=True)
    if isinstance(last, RawDataElement) and last.length != UNDEFINED_LENGTH and (held := _held(last, end)) != last.length:
        return f"element {last.tag} holds {held} of its {last.length} bytes"
    if PIXEL_DATA in tags and not transfer_syntax.is_compressed:
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

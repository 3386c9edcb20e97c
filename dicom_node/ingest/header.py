"""Reading an offered instance's header without inflating or decoding it whole: the Part 10 file
meta, a Deflated dataset inflated in bounded steps (a deflate bomb never inflates past the bound),
and the dataset read with every large value deferred (Pixel Data is skipped, never read)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import BinaryIO

from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import UID

CHUNK = 1 << 20  # bytes read, or inflated, per step
DEFER_BYTES = 64 * 1024  # values longer than this are skipped while reading a header, never read


def as_uid(value: str) -> UID:
    """``value`` as a pydicom UID, without pydicom's check (it would log a warning naming the value)."""
    return UID(value, validation_mode=config.IGNORE)


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

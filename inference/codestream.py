"""What a compressed frame's own header says it decodes to, checked against the data set before decoding.

A decoder allocates what the codestream declares, not what Rows and Columns say: a 3.7 kB JPEG-LS
codestream may declare 20000 x 20000 x 16 bit (800 MB decoded) inside an image that declares
320 x 320. ``check_codestreams`` reads each frame's header (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ,
the RLE header's segment count) and raises ``CodestreamMismatch`` naming the difference when it
disagrees with Rows, Columns, SamplesPerPixel or BitsAllocated; nothing is decoded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless


class Codestream(StrEnum):
    """The families of compressed pixel data whose headers are read."""

    JPEG = "JPEG"
    JPEG_LS = "JPEG-LS"
    JPEG_2000 = "JPEG 2000"
    RLE = "RLE"


class CodestreamMismatch(ValueError):
    """A frame whose codestream header disagrees with the data set's pixel description (or has none)."""


@dataclass(frozen=True)
class FrameHeader:
    """What a codestream declares: its size, components and sample precision in bits."""

    rows: int
    columns: int
    components: int
    precision: int


HEADER_BYTES = 64 * 1024  # a frame header lies within this many bytes of the codestream's start

_SOI, _SOS, _EOI = 0xD8, 0xDA, 0xD9
_SOF55 = 0xF7  # JPEG-LS frame header (ITU-T T.87)
#: JPEG frame headers (ITU-T T.81 B.1.1.3): C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_JPEG = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # markers without a length (TEM, RSTn)


def family(transfer_syntax: UID) -> Codestream | None:
    """The codestream family of a transfer syntax, None when it is native (or not checked here)."""
    if transfer_syntax in JPEGLSTransferSyntaxes:
        return Codestream.JPEG_LS
    if transfer_syntax in JPEGTransferSyntaxes:
        return Codestream.JPEG
    if transfer_syntax in JPEG2000TransferSyntaxes:
        return Codestream.JPEG_2000
    if transfer_syntax == RLELossless:
        return Codestream.RLE
    return None


def jpeg_header(data: bytes, kind: Codestream = Codestream.JPEG) -> FrameHeader:
    """The frame header (SOFn, or SOF55 for JPEG-LS) of a JPEG or JPEG-LS codestream."""
    frame_markers = {_SOF55} if kind is Codestream.JPEG_LS else _SOF_JPEG
    if data[:2] != b"\xff\xd8":
        raise CodestreamMismatch(f"the {kind.value} codestream does not start with an SOI marker")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise CodestreamMismatch(f"the {kind.value} codestream has no marker where one must be (byte {i})")
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (_SOS, _EOI, _SOI):
            break
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in frame_markers:
            if length < 8 or i + 10 > len(data):
                break
            precision, rows, columns, components = struct.unpack(">BHHB", data[i + 4:i + 10])
            return FrameHeader(rows, columns, components, precision)
        if length < 2:
            break
        i += 2 + length
    raise CodestreamMismatch(f"the {kind.value} codestream has no frame header before its scan data")


def j2k_header(data: bytes) -> FrameHeader:
    """The image size of a JPEG 2000 codestream (SIZ marker segment, ISO 15444-1 A.5.1); a JP2
    file's codestream box is searched for it."""
    start = data.find(b"\xff\x4f\xff\x51")
    if start < 0:
        raise CodestreamMismatch("the JPEG 2000 codestream has no SOC and SIZ markers")
    siz = data[start + 4:]
    if len(siz) < 38:
        raise CodestreamMismatch("the JPEG 2000 SIZ marker segment is cut short")
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", siz[4:20])
    (components,) = struct.unpack(">H", siz[36:38])
    if components < 1 or len(siz) < 38 + 3 * components:
        raise CodestreamMismatch("the JPEG 2000 SIZ marker segment is cut short")
    precision = max((siz[38 + 3 * c] & 0x7F) + 1 for c in range(components))
    return FrameHeader(ysiz - yosiz, xsiz - xosiz, components, precision)


def rle_segments(data: bytes) -> int:
    """The number of segments an RLE Lossless frame's header declares (PS3.5 G.5)."""
    if len(data) < 64:
        raise CodestreamMismatch("the RLE frame is shorter than its 64-byte header")
    (count,) = struct.unpack("<I", data[:4])
    return int(count)


def _int(ds: Dataset, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError):
        raise CodestreamMismatch(f"{keyword} is not a single integer") from None


def check_frame(data: bytes, kind: Codestream, ds: Dataset) -> None:
    """CodestreamMismatch when one frame's codestream header disagrees with the data set."""
    rows, columns = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    samples, bits = _int(ds, "SamplesPerPixel", 1), _int(ds, "BitsAllocated", 0)
    if kind is Codestream.RLE:
        expected = samples * -(-bits // 8)
        found = rle_segments(data)
        if found != expected:
            raise CodestreamMismatch(f"the RLE header declares {found} segments, SamplesPerPixel x "
                                     f"BitsAllocated / 8 = {expected}")
        return
    header = j2k_header(data[:HEADER_BYTES]) if kind is Codestream.JPEG_2000 else jpeg_header(data[:HEADER_BYTES], kind)
    if (header.rows, header.columns) != (rows, columns):
        raise CodestreamMismatch(f"the {kind.value} codestream declares {header.columns} x {header.rows} "
                                 f"(columns x rows), the data set {columns} x {rows}")
    if header.components != samples:
        raise CodestreamMismatch(f"the {kind.value} codestream declares {header.components} components, "
                                 f"SamplesPerPixel is {samples}")
    if not 1 <= header.precision <= max(bits, 8):
        raise CodestreamMismatch(f"the {kind.value} codestream declares {header.precision}-bit samples, "
                                 f"BitsAllocated is {bits}")


def check_codestreams(ds: Dataset, transfer_syntax: UID) -> None:
    """Check every frame of an encapsulated Pixel Data against Rows, Columns, SamplesPerPixel and
    BitsAllocated before anything is decoded; CodestreamMismatch names the first disagreement.
    Native pixel data (and families not read here) pass unchecked."""
    kind = family(transfer_syntax)
    if kind is None or "PixelData" not in ds:
        return
    frames = _int(ds, "NumberOfFrames", 1)
    try:
        for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            try:
                check_frame(frame, kind, ds)
            except CodestreamMismatch as exc:
                raise CodestreamMismatch(f"frame {index + 1}: {exc}" if frames > 1 else str(exc)) from None
    except CodestreamMismatch:
        raise
    except (ValueError, struct.error, KeyError, IndexError) as exc:  # the encapsulation itself is broken
        raise CodestreamMismatch(f"the encapsulated Pixel Data cannot be split into frames ({exc})") from None

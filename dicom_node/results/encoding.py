"""Writing a data set with large nested sequences (an SR's content tree: thousands of short text
elements) as Explicit VR Little Endian, the bytes pydicom writes, in a quarter of pydicom's time.

pydicom's writer pays per element for a buffer, the encodings' conversion, and its checks; most of
an SR's elements are one short string. ``write_dataset_file`` encodes the top-level sequences' items
here, element by element: a string of a text or code VR directly (as pydicom's ``write_text`` /
``write_string`` would), every other element through pydicom's own ``write_data_element``, and
hands each top-level sequence to ``dcmwrite`` as a raw element holding those bytes, so that the
preamble, the file meta and the top-level elements are pydicom's. A data set that was not prepared
by ``settle_encoding`` (writer.py) is written by pydicom alone.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

from pydicom.charset import convert_encodings, custom_encoders, default_encoding, need_tail_escape_sequence_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_sequence_item
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import VR

__all__ = ["encode_items", "write_dataset_file"]

_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = 0xFFFFFFFF
_EXPLICIT_LE = (False, True)  # (implicit VR, little endian)
#: The VRs whose single string value is encoded here: text in the data set's character set, the
#: others in pydicom's default encoding; each padded as pydicom pads it.
_TEXT = {VR.SH, VR.LO, VR.ST, VR.LT, VR.UT, VR.UC}
_ASCII: dict[str, bytes] = {VR.CS: b" ", VR.AE: b" ", VR.AS: b" ", VR.UR: b" ", VR.UI: b"\x00"}
_LONG = {VR.UT, VR.UC, VR.UR}  # 4-byte length (and 2 reserved bytes) in Explicit VR
_HEADERS: dict[tuple[int, str], bytes] = {}


def _header(tag: int, vr: str, length: int) -> bytes:
    """An element's tag, VR and length, as pydicom writes them in Explicit VR Little Endian."""
    start = _HEADERS.get((tag, vr))
    if start is None:
        start = _HEADERS.setdefault((tag, vr), struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode())
    if vr in _LONG or vr == VR.SQ:
        return start + struct.pack("<HL", 0, length)
    return start + struct.pack("<H", length)


def _settled(ds: Dataset) -> bool:
    """Whether ``ds`` is in the encoding it is written in (``settle_encoding``): no VR to correct."""
    return ds.original_encoding == _EXPLICIT_LE


def _string(elem: DataElement, encodings: list[str]) -> bytes | None:
    """A single string value's bytes, padded, as pydicom encodes it; None where pydicom decides more."""
    value = elem.value
    if type(value) is not str and not (isinstance(value, str) and elem.VR == VR.UI):
        return None  # several values, bytes, a PersonName...: pydicom's own writer
    vr = elem.VR
    try:
        if vr in _TEXT:
            encoding = encodings[0]
            if encoding in custom_encoders or encoding in need_tail_escape_sequence_encodings:
                return None  # ISO 2022 escapes: pydicom's encode_string
            data = value.encode(encoding)
            pad = b" "
        else:
            data, pad = value.encode(default_encoding), _ASCII[vr]
    except UnicodeError:
        return None  # pydicom tries the other encodings, or replaces with a warning
    if len(data) % 2:
        data += pad
    return data if len(data) <= 0xFFFF or vr in _LONG else None


def _element(out: bytearray, elem: DataElement | RawDataElement, encodings: list[str]) -> None:
    """One element of an item, appended to ``out``."""
    if not elem.is_raw:
        assert isinstance(elem, DataElement)
        vr = elem.VR
        if vr == VR.SQ:
            body = encode_items(elem.value, encodings)
            length = _UNDEFINED if elem.is_undefined_length else len(body)
            out += _header(elem.tag, vr, length)
            out += body
            if elem.is_undefined_length:
                out += _SEQUENCE_END
            return
        if vr in _TEXT or vr in _ASCII:
            data = _string(elem, encodings)
            if data is not None:
                out += _header(elem.tag, vr, len(data))
                out += data
                return
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = _EXPLICIT_LE
    write_data_element(buffer, elem, encodings)
    out += buffer.getvalue()


def encode_items(items: Iterable[Dataset], parent_encodings: list[str]) -> bytes:
    """A sequence's items as pydicom's ``write_sequence`` writes them in Explicit VR Little Endian
    (``parent_encodings``: the Python encodings of the data set that holds the sequence)."""
    out = bytearray()
    for item in items:
        if not _settled(item):  # pydicom corrects and re-encodes such an item: let it
            buffer = DicomBytesIO()
            buffer.is_implicit_VR, buffer.is_little_endian = _EXPLICIT_LE
            write_sequence_item(buffer, item, parent_encodings)
            out += buffer.getvalue()
            continue
        charset = item.get("SpecificCharacterSet")
        encodings = convert_encodings(charset) if charset else parent_encodings
        # pydicom writes a raw element as read unless the character set changed; then it decodes it
        get = item.get_item if item.original_character_set == item._character_set else item.__getitem__
        body = bytearray()
        for tag in sorted(item._dict):
            if tag & 0xFFFF == 0 and tag >> 16 > 6:
                continue  # retired group length, as pydicom leaves it out
            _element(body, get(tag), encodings)
        undefined = getattr(item, "is_undefined_length_sequence_item", False)
        out += _ITEM + struct.pack("<L", _UNDEFINED if undefined else len(body))
        out += body
        if undefined:
            out += _ITEM_END
    return bytes(out)


def write_dataset_file(ds: Dataset, path: Path) -> None:
    """``ds.save_as(path, enforce_file_format=True)``, the same bytes, its top-level sequences'
    items encoded here (``encode_items``). ``ds`` is left as it was."""
    syntax = ds.get("file_meta", Dataset()).get("TransferSyntaxUID")
    if syntax != ExplicitVRLittleEndian or not _settled(ds) or ds.original_character_set != ds._character_set:
        ds.save_as(path, enforce_file_format=True)
        return
    charset = ds.get("SpecificCharacterSet")
    encodings = convert_encodings(charset) if charset else [default_encoding]
    sequences = {tag: elem for tag, elem in ds._dict.items() if isinstance(elem, DataElement) and elem.VR == VR.SQ}
    try:
        for tag, elem in sequences.items():
            body = encode_items(elem.value, encodings)
            length = _UNDEFINED if elem.is_undefined_length else len(body)
            ds._dict[tag] = RawDataElement(elem.tag, VR.SQ, length, body, 0, False, True, True, False)
        ds.save_as(path, enforce_file_format=True)
    finally:
        ds._dict.update(sequences)

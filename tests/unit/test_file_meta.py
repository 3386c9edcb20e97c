"""The storage SCP's file meta, encoded directly: the same bytes as pynetdicom's own
(``create_file_meta`` + ``encode_file_meta``), which the spooled files held before."""

from __future__ import annotations

import pytest
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node.dicom.scp import file_meta_bytes


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), [
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even lengths
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.45", "1.2.840.10008.1.2"),  # odd: padded with a NUL
    ("1.2.840.10008.5.1.4.1.1.7", "1.2.826.0.1.3680043.8.498." + "1" * 38, "1.2.840.10008.1.2.4.80"),  # 64 chars
])
def test_the_file_meta_is_pynetdicoms_byte_for_byte(sop_class: str, sop_instance: str, syntax: str) -> None:
    meta = create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
                            transfer_syntax=UID(syntax))
    assert file_meta_bytes(sop_class, sop_instance, syntax) == b"\0" * 128 + b"DICM" + encode_file_meta(meta)

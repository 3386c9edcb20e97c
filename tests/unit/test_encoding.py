"""The results' encoder writes what pydicom writes, byte for byte (results.encoding), for the kinds
of element and item it encodes itself and for those it hands to pydicom."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from dicom_node.results.encoding import write_dataset_file
from dicom_node.results.writer import settle_encoding


def _item(text: str, **more: object) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"  # CS
    item.ValueType = "TEXT"
    item.TextValue = text  # UT
    item.ReferencedSOPInstanceUID = "1.2.840.10008.1"  # UI, odd length padded with NUL
    item.CodeMeaning = "odd"  # LO, padded with a space
    item.NumericValue = "12.5"  # DS
    item.FloatingPointValue = 12.5  # FD
    item.GraphicData = [1.5, 2.0, 3.25, 4.0]  # FL, several values
    item.CodeValue = ""  # empty
    item.ReferencedFrameNumber = [1, 2]  # IS, several values
    item.PersonName = "Doe^Jane"  # PN
    item.ObservationDateTime = "20240101120000"  # DT
    for keyword, value in more.items():
        setattr(item, keyword, value)
    return item


def _report(charset: str | list[str] | None, text: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = generate_uid()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientName = "Doe^John"
    nested = _item(text)
    nested.ContentSequence = Sequence([_item(text + " inner"), _item("")])
    nested.ContentSequence[1].is_undefined_length_sequence_item = True
    ds.ContentSequence = Sequence([nested, _item(text, SpecificCharacterSet="ISO_IR 192", TextValue="ünïcödé ✓")])
    ds.ReferencedRequestSequence = Sequence([])  # empty
    ds.ContentTemplateSequence = Sequence([_item("x")])
    ds["ContentTemplateSequence"].is_undefined_length = True
    return ds


def _both(ds: Dataset, tmp_path: Path) -> tuple[bytes, bytes]:
    settle_encoding(ds)
    ds.save_as(tmp_path / "pydicom.dcm", enforce_file_format=True)
    write_dataset_file(ds, tmp_path / "ours.dcm")
    again = tmp_path / "pydicom-again.dcm"
    ds.save_as(again, enforce_file_format=True)  # the data set is left as it was
    assert again.read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()
    return (tmp_path / "pydicom.dcm").read_bytes(), (tmp_path / "ours.dcm").read_bytes()


@pytest.mark.parametrize(("charset", "text"), [
    (None, "plain"), ("ISO_IR 100", "Grüße, odd"), ("ISO_IR 192", "Ωmega ✓ even"),
    (["", "ISO 2022 IR 87"], "ヤマダ^タロウ"),  # ISO 2022 escapes: pydicom's own encoding
    ("ISO_IR 100", "not latin-1: ✓"),  # pydicom replaces with a warning: handed to it
])
def test_the_bytes_are_pydicoms(charset: str | list[str] | None, text: str, tmp_path: Path) -> None:
    if text.startswith("not latin-1"):
        with pytest.warns(UserWarning):
            ours, theirs = _both(_report(charset, text), tmp_path)
    else:
        ours, theirs = _both(_report(charset, text), tmp_path)
    assert ours == theirs and len(ours) > 1500


def test_a_raw_element_and_an_implicit_item_are_written_as_pydicom_writes_them(tmp_path: Path) -> None:
    ds = _report("ISO_IR 100", "raw")
    ds.ContentSequence[0]["CodeMeaning"] = RawDataElement(0x00080104, "LO", 4, b"RAW ", 0, False, True)
    implicit = _item("from an implicit file")
    ds.ContentSequence.append(implicit)
    settle_encoding(ds)
    implicit.set_original_encoding(True, True, "iso8859")  # as read from Implicit VR: pydicom corrects it
    ds.save_as(tmp_path / "pydicom.dcm", enforce_file_format=True)
    write_dataset_file(ds, tmp_path / "ours.dcm")
    assert (tmp_path / "ours.dcm").read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()


def test_another_transfer_syntax_is_left_to_pydicom(tmp_path: Path) -> None:
    ds = _report(None, "implicit")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ours, theirs = _both(ds, tmp_path)
    assert ours == theirs

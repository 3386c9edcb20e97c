"""dicom_node.results.sources: what the outputs copy from real-world source headers, valid values only."""

from __future__ import annotations

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage
from structlog.testing import capture_logs

from dicom_node.results.sources import (
    column_spacing,
    image_key,
    number,
    patient_study,
    sop_reference,
    valid_value,
)
from inference.instances import sop_class_uid

BIRTH = "1931-07-04"


def _raw(ds: Dataset, keyword: str, text: str) -> None:
    """Set an element as read from a file (not converted yet), so that a value may break its VR."""
    tag, value = tag_for_keyword(keyword), text.encode("latin-1")
    ds[tag] = RawDataElement(tag, dictionary_VR(keyword), len(value), value, 0, False, True)


def _broken() -> Dataset:
    """A de-identified export's header with the values fuzzing and real exports produced."""
    ds = Dataset()
    for keyword, text in [("SpecificCharacterSet", "FOO_BAR"), ("PatientName", "Doe^Jane"),
                          ("PatientID", "A1\\A2"),  # two values where one is allowed
                          ("PatientBirthDate", BIRTH), ("PatientSex", "X"), ("StudyTime", "12:30:00"),
                          ("StudyDate", "20240131"), ("StudyDescription", "LUMBAR SPINE"),
                          ("StudyInstanceUID", "1.2.3"),
                          ("WindowCenter", "abc"), ("WindowWidth", "400")]:
        _raw(ds, keyword, text)
    return ds


def test_valid_values_are_copied_invalid_ones_left_empty_and_named_in_the_log_without_their_values() -> None:
    with capture_logs() as logs:
        found = patient_study([_broken()], "1.2.3")
    assert found.values["PatientName"] == "Doe^Jane" and found.values["StudyDate"] == "20240131"
    assert found.values["StudyDescription"] == "LUMBAR SPINE"
    for keyword in ("PatientID", "PatientBirthDate", "PatientSex", "StudyTime"):
        assert found.values[keyword] == "", keyword  # Type 2: present and empty
    assert found.character_set is None  # the default repertoire
    assert set(found.invalid) == {"SpecificCharacterSet", "PatientID", "PatientBirthDate", "PatientSex", "StudyTime"}
    [line] = [entry for entry in logs if "not valid" in entry["event"]]
    assert set(line["attributes"]) == set(found.invalid)
    assert BIRTH not in str(logs) and "12:30:00" not in str(logs) and "A1" not in str(logs)


def test_absent_type_2_attributes_are_written_empty_type_3_ones_left_out() -> None:
    source = Dataset()
    source.PatientID = "100206310"  # as the Kaggle files have it: no name, dates, accession
    found = patient_study([source], "100206310")
    target = Dataset()
    target.PatientName = "left by a builder"
    found.apply(target)
    assert target.PatientID == "100206310" and target.StudyInstanceUID == "100206310"
    for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                    "AccessionNumber", "ReferringPhysicianName"):
        assert keyword in target and target[keyword].value in ("", None), keyword
    assert "PatientAge" not in target and "StudyDescription" not in target and "SpecificCharacterSet" not in target
    assert found.invalid == ()


def test_non_ascii_text_under_an_unknown_character_set_is_not_copied() -> None:
    source = Dataset()
    source.SpecificCharacterSet = "FOO_BAR"
    source.StudyDescription = "Lendenwirbelsäule"
    assert valid_value(source, "StudyDescription", ascii_only=True) == (None, False)
    assert "StudyDescription" in patient_study([source], "1.2").invalid
    source.SpecificCharacterSet = "ISO_IR 100"  # a known one: copied with it
    found = patient_study([source], "1.2")
    assert found.values["StudyDescription"] == "Lendenwirbelsäule" and found.character_set == "ISO_IR 100"


def test_a_kaggle_header_gets_its_sop_class_from_the_file_meta_and_a_reference_for_highdicom() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "7", "7.10", "7.1.1"
    ds.PatientID = "7"
    ds.Rows = ds.Columns = 256
    ds.PixelSpacing = ["0.5", "0.6"]
    ds.ImageOrientationPatient = ["0", "1", "0", "0", "0", "-1"]
    ds.ImagePositionPatient = ["1", "2", "3"]
    ds.SliceThickness = "4"
    assert sop_class_uid(ds) == EnhancedMRImageStorage and image_key(ds) == ("7.10", "7.1.1")
    ref = patient_study([ds], "7").reference(ds)
    assert (ref.SOPClassUID, ref.SeriesInstanceUID, ref.SOPInstanceUID, ref.Modality) == (
        EnhancedMRImageStorage, "7.10", "7.1.1", "MR")
    assert ref.PatientName == "" and ref.PatientID == "7"
    _raw(ds, "SliceThickness", "thick")  # geometry not all valid: the entry lists none of it
    ref = patient_study([ds], "7").reference(ds)
    assert ref.Modality == "" and "PixelSpacing" not in ref
    ds.SOPClassUID = MRImageStorage  # the data set's own class wins
    assert sop_class_uid(ds) == MRImageStorage


def test_a_reference_item_names_the_instance_and_its_class_even_when_only_the_file_meta_has_it() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = "7.1.1"
    item = sop_reference(ds)
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (EnhancedMRImageStorage, "7.1.1")
    assert set(item.dir()) == {"ReferencedSOPClassUID", "ReferencedSOPInstanceUID"}
    ds.SOPClassUID = MRImageStorage
    assert sop_reference(ds).ReferencedSOPClassUID == MRImageStorage


def test_numbers_are_read_defensively() -> None:
    ds = _broken()
    assert number(ds, "WindowCenter") is None and number(ds, "WindowWidth") == 400.0
    ds.WindowCenter = ["40", "80"]
    assert number(ds, "WindowCenter") == 40.0 and number(ds, "Rows") is None
    _raw(ds, "WindowCenter", "nan")
    assert number(ds, "WindowCenter") is None
    ds.PixelSpacing = ["0.5", "0.7"]
    assert column_spacing(ds) == 0.7
    ds.PixelSpacing = "0.5"  # one value: not a usable spacing
    assert column_spacing(ds) == 1.0

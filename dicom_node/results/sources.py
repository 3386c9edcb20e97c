"""The DICOM modules every output (SR, Secondary Captures, PDF) shares, in one place: what they take
from their source images, how they reference another instance, and the model as contributing
equipment.

Source images are keyed by (SeriesInstanceUID, SOPInstanceUID), never by SOPInstanceUID alone: the
RSNA 2024 Kaggle files repeat the same SOP Instance UIDs in every series of a study.

The patient and study attributes come from real exports: absent rather than empty (de-identified
studies, the Kaggle files), or with values that break their VR (a birth date "1931-07-04", a TM
with colons, an unknown character set, two values where one is allowed). They are copied when
valid; a Type 2 attribute that is absent or invalid is written empty, as the IODs require, a
Type 3 one is left out; never is a value invented. Each attribute left empty is logged by name
(never its value).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from highdicom import ContributingEquipment
from pydicom import config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

from dicom_node.observability import get_logger
from dicom_node.results import codes as C
from dicom_node.results.identity import DISCLAIMER, MANUFACTURER, model_device_uid
from inference.analyze import Location, StudyResult
from inference.instances import MR_SOP_CLASSES, sop_class_uid

log = get_logger(__name__)

#: A source image in a study: (SeriesInstanceUID, SOPInstanceUID).
ImageKey = tuple[str, str]


class AttributeType(IntEnum):
    """DICOM attribute types (PS3.5 7.4) as the output IODs give them."""

    REQUIRED_EMPTY_IF_UNKNOWN = 2  # present, empty when unknown
    OPTIONAL = 3  # present only when known


#: Patient and study attributes copied from the sources onto every object the node writes (Patient,
#: General Study and Patient Study modules of the SR, SC and Encapsulated PDF IODs), so that the
#: PACS files them in the same patient and study. StudyInstanceUID (Type 1) is the study's own.
PATIENT_STUDY: tuple[tuple[str, AttributeType], ...] = (
    ("PatientName", AttributeType.REQUIRED_EMPTY_IF_UNKNOWN),
    ("PatientID", AttributeType.REQUIRED_EMPTY_IF_UNKNOWN),
    ("IssuerOfPatientID", AttributeType.OPTIONAL),
    ("PatientBirthDate", AttributeType.REQUIRED_EMPTY_IF_UNKNOWN),
    ("PatientSex", AttributeType.REQUIRED_EMPTY_IF_UNKNOWN),
    ("PatientAge", AttributeType.OPTIONAL),
    ("PatientIdentityRemoved", AttributeType.OPTIONAL),
    ("DeidentificationMethod", AttributeType.OPTIONAL),
    ("StudyDate", AttributeType.REQUIRED_EMPTY_IF_UNKNOWN),
    ("StudyTime", AttributeType.REQUIRED_EMPTY_IF_UNKNOWN),
    ("StudyID", AttributeType.REQUIRED_EMPTY_IF_UNKNOWN),
    ("AccessionNumber", AttributeType.REQUIRED_EMPTY_IF_UNKNOWN),
    ("ReferringPhysicianName", AttributeType.REQUIRED_EMPTY_IF_UNKNOWN),
    ("StudyDescription", AttributeType.OPTIONAL),
)

#: The source's acquisition equipment (highdicom lists it as contributing equipment), Type 3 here.
EQUIPMENT = ("Manufacturer", "ManufacturerModelName", "InstitutionName", "StationName", "DeviceSerialNumber",
             "SoftwareVersions", "InstitutionalDepartmentName")

#: What highdicom's Image Library entry (TID 1604) reads of a cross-sectional image.
GEOMETRY = ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness")

#: Enumerated values where the VR allows more than the IOD (PatientSex: PS3.3 C.7.1.1).
ENUMERATED = {"PatientSex": frozenset({"M", "F", "O"}), "PatientIdentityRemoved": frozenset({"YES", "NO"})}

#: The radius of the circle that marks where a finding was graded (the SR's region, the SC's circle).
REGION_RADIUS_MM = 4.0


def image_key(ds: Dataset) -> ImageKey:
    """The key of a source image header: (SeriesInstanceUID, SOPInstanceUID)."""
    return str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))


def location_key(location: Location) -> ImageKey:
    """The key of the image a label was graded on."""
    return location.series_uid, location.sop_instance_uid


def sop_reference(ds: Dataset) -> Dataset:
    """A Referenced SOP Class UID / Referenced SOP Instance UID item for ``ds`` (an output the node
    wrote, or a source image: its SOP class taken from the file meta where the data set has none),
    as the Source Image, Source Instance and evidence sequences list them."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid(ds)
    item.ReferencedSOPInstanceUID = str(ds.SOPInstanceUID)
    return item


def algorithm_equipment(result: StudyResult) -> ContributingEquipment:
    """The model as contributing equipment (IHE AI Results): Purpose of Reference "Processing
    Algorithm", manufacturer, model name, version and a Device UID per set of weights."""
    info = result.model
    item = ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=C.PROCESSING_EQUIPMENT,
        manufacturer_model_name=info.name, software_versions=info.version,
        contribution_description=(f"AI model, sha256 {info.sha256}, trained on {info.training_data}. "
                                  f"{DISCLAIMER}")[:1024])
    item.PurposeOfReferenceCodeSequence = [C.PROCESSING_ALGORITHM]  # highdicom allows CID 7005 codes only
    item.DeviceUID = model_device_uid(info.sha256)
    return item


def _read(ds: Dataset, keyword: str) -> Any:
    """The element's value, or raise ValueError when it cannot be read (conversion fails)."""
    try:
        return ds[keyword].value
    except (ValueError, TypeError, KeyError, OverflowError, UnicodeError) as exc:
        raise ValueError(keyword) from exc


def valid_value(ds: Dataset, keyword: str, ascii_only: bool = False) -> tuple[Any, bool]:
    """(value, valid) of an attribute: (None, True) when absent or empty; (the value, True) when it
    conforms to its VR and VM (and, for some, their enumerated values); (None, False) otherwise.
    With ``ascii_only``, text with characters outside ASCII is not valid (the source's character
    set is unknown, so its non-ASCII text cannot be trusted)."""
    if keyword not in ds:
        return None, True
    try:
        value = _read(ds, keyword)
    except ValueError:
        return None, False
    if value is None or value == "" or (isinstance(value, (list, MultiValue)) and len(value) == 0):
        return None, True
    vr, vm = dictionary_VR(keyword), dictionary_VM(keyword)
    values = _values(value)
    if vm == "1" and len(values) != 1:
        return None, False
    for item in values:
        text = str(item)
        if ascii_only and not text.isascii():
            return None, False
        try:
            validate_value(vr, text, config.RAISE)
        except (ValueError, TypeError):
            return None, False
        if vr in ("DS", "IS", "FD", "FL") and not _finite(item):
            return None, False
    if keyword in ENUMERATED and str(values[0]) not in ENUMERATED[keyword]:
        return None, False
    return value, True


def _finite(item: Any) -> bool:
    try:
        return math.isfinite(float(item))
    except (TypeError, ValueError):
        return False


def character_set(ds: Dataset) -> tuple[Any, bool]:
    """(SpecificCharacterSet, valid): the source's value when every term of it is a character set
    pydicom knows, else (None, False) (the default repertoire is used)."""
    if "SpecificCharacterSet" not in ds:
        return None, True
    try:
        value = _read(ds, "SpecificCharacterSet")
    except ValueError:
        return None, False
    terms = [str(t).strip() for t in (value if isinstance(value, (list, MultiValue)) else [value])]
    if not terms or terms == [""]:
        return None, True
    known = all(t in python_encoding or (i == 0 and t == "") for i, t in enumerate(terms))
    return (value, True) if known else (None, False)


@dataclass(frozen=True)
class PatientStudy:
    """The patient and study attributes of a study's outputs: the valid values of its sources, the
    Type 2 ones empty when unknown, and the names of the attributes left empty as invalid."""

    study_uid: str
    values: dict[str, Any]  # keyword -> valid value (Type 2 ones present, possibly "")
    character_set: Any  # the source's SpecificCharacterSet when valid, else None
    invalid: tuple[str, ...]  # keywords whose source values were not valid (logged, never their values)

    def apply(self, target: Dataset) -> None:
        """Write these attributes onto an output data set (replacing what a builder copied)."""
        if self.character_set is not None:
            target.SpecificCharacterSet = self.character_set
        elif "SpecificCharacterSet" in target:
            del target.SpecificCharacterSet
        target.StudyInstanceUID = self.study_uid
        for keyword, _ in PATIENT_STUDY:
            if keyword in self.values:
                setattr(target, keyword, self.values[keyword])
            elif keyword in target:
                delattr(target, keyword)

    def reference(self, source: Dataset | None = None) -> Dataset:
        """A data set for highdicom's builders (the SR's evidence and Image Library, the SC's
        reference data set): these patient/study attributes (the Type 2 ones empty when unknown:
        highdicom reads them as attributes), and, of ``source``, its UIDs, its SOP class
        (the file meta's where the data set has none), its valid acquisition equipment, and the
        geometry an Image Library entry lists when all of it is valid (Modality "MR" for an MR
        SOP class then; else Modality empty, and the entry lists no geometry)."""
        ref = Dataset()
        if self.character_set is not None:
            ref.SpecificCharacterSet = self.character_set
        ref.StudyInstanceUID = self.study_uid
        for keyword, value in self.values.items():
            setattr(ref, keyword, value)
        if source is None:
            return ref
        series_uid, sop_uid = image_key(source)
        ref.SeriesInstanceUID, ref.SOPInstanceUID, ref.SOPClassUID = series_uid, sop_uid, sop_class_uid(source)
        ascii_only = self.character_set is None
        for keyword in EQUIPMENT:
            value, ok = valid_value(source, keyword, ascii_only)
            if ok and value is not None:
                setattr(ref, keyword, value)
        for keyword in ("Rows", "Columns"):
            setattr(ref, keyword, int(source.get(keyword, 0) or 0))
        frame, ok = valid_value(source, "FrameOfReferenceUID")
        if ok and frame is not None:
            ref.FrameOfReferenceUID = frame
        geometry = {k: valid_value(source, k) for k in GEOMETRY}
        complete = all(ok and v is not None for v, ok in geometry.values())
        shapes = complete and [len(_values(geometry[k][0])) for k in GEOMETRY] == [2, 6, 3, 1]
        if shapes and ref.SOPClassUID in MR_SOP_CLASSES:
            for keyword, (value, _) in geometry.items():
                setattr(ref, keyword, value)
            ref.Modality = "MR"
        else:
            ref.Modality = ""  # highdicom lists the image without modality-specific descriptors
        return ref


def patient_study(sources: Iterable[Dataset], study_uid: str) -> PatientStudy:
    """The patient/study attributes of a study's outputs, from its first source image (all its
    images are of one patient and study); logs once which attributes were left empty as invalid."""
    source = next(iter(sources), None) or Dataset()
    charset, charset_ok = character_set(source)
    invalid = [] if charset_ok else ["SpecificCharacterSet"]
    values: dict[str, Any] = {}
    for keyword, kind in PATIENT_STUDY:
        value, ok = valid_value(source, keyword, ascii_only=charset is None)
        if not ok:
            invalid.append(keyword)
        if value is not None:
            values[keyword] = value
        elif kind is AttributeType.REQUIRED_EMPTY_IF_UNKNOWN:
            values[keyword] = ""
    if invalid:
        log.warning("source attributes not valid for their VR: written empty or left out", study_uid=study_uid,
                    attributes=invalid)
    return PatientStudy(study_uid, values, charset, tuple(invalid))


def number(ds: Dataset, keyword: str) -> float | None:
    """The first value of a numeric attribute (DS, IS, ...) when it is a finite number, else None
    (absent, empty, not a number: "abc", NaN)."""
    if keyword not in ds:
        return None
    try:
        value = _read(ds, keyword)
        first = value[0] if isinstance(value, (list, MultiValue)) else value
        result = float(first)
    except (ValueError, TypeError, IndexError):
        return None
    return result if math.isfinite(result) else None



def column_spacing(ds: Dataset) -> float:
    """The image's column spacing (mm per pixel along a row: PixelSpacing's second value) when
    valid and positive, else 1.0 (sizes in mm are then drawn in pixels)."""
    value, ok = valid_value(ds, "PixelSpacing")
    values = _values(value)
    if ok and len(values) == 2 and float(values[1]) > 0:
        return float(values[1])
    return 1.0


def _values(value: Any) -> list[Any]:
    """An element's value as a list of its values (none for None)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, MultiValue)) else [value]

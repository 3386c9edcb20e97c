"""The key images of a graded study as a Key Object Selection document (IHE Key Image Note; highdicom
``KeyObjectSelectionDocument``, TID 2010, title (113000, DCM, "Of Interest")) in its own series of the
source study: the source images of the findings graded Moderate or Severe, the images the SR's
findings are located on (results.sr), each listed once. A study without such a finding gets none.

Its UIDs follow from its report's, as the PDF's do (results.pdf): the series from the SR series (a
re-run's KOS lands in the same series, as its SR does), the instance from the SR instance; its
instance number is the SR's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.results import codes as C
from dicom_node.results.identity import DEVICE_NAME, DEVICE_UID, DISCLAIMER, MANUFACTURER, MODEL_NAME
from dicom_node.results.sources import ImageKey, PatientStudy, algorithm_equipment, location_key, patient_study
from dicom_node.results.sr import evidence_sequence
from inference.analyze import AssessedLabel, StudyResult
from inference.labels import Severity

KOS_SERIES_NUMBER = 9904
KOS_SERIES_DESCRIPTION = "AI lumbar stenosis key images (KOS) - not for diagnosis"
DOCUMENT_TITLE = codes.DCM.OfInterest  # CID 7010 (113000, DCM, "Of Interest")
#: The grades whose source images are key images.
KEY_GRADES = frozenset({Severity.MODERATE, Severity.SEVERE})


@dataclass(frozen=True)
class KeyImages:
    """A study's key images: its findings graded Moderate or Severe (in label order) and the source
    images they are located on, each once, in the order of their first finding."""

    findings: tuple[AssessedLabel, ...]
    images: tuple[ImageKey, ...]

    def __bool__(self) -> bool:
        return bool(self.findings)

    def labels_on(self, image: ImageKey) -> list[AssessedLabel]:
        """The findings located on ``image``."""
        return [r for r in self.findings if location_key(r.location) == image]


def key_images_of(result: StudyResult) -> KeyImages:
    """The findings of ``result`` graded Moderate or Severe and their source images."""
    findings = tuple(r for r in result.assessed() if r.grade in KEY_GRADES)
    return KeyImages(findings, tuple(dict.fromkeys(location_key(r.location) for r in findings)))


def kos_series_uid(sr_series_uid: str) -> str:
    """The KOS series of the study's reports: one per SR series, so that it is kept across re-runs."""
    return generate_uid(entropy_srcs=[sr_series_uid, "kos"])


def description(selected: KeyImages) -> str:
    """The Key Object Description (113012, DCM) a viewer shows with the images: each finding with
    its grade, and the disclaimer."""
    findings = "; ".join(f"{r.label.level.value} {r.label.condition.display}: {r.grade.display}"
                         for r in selected.findings)
    return f"AI-graded findings (Moderate or Severe) on these images: {findings}. {DISCLAIMER}"


def note(selected: KeyImages, enabled: bool = True) -> str:
    """What results.txt says of the key images: listed in the KOS, none to list, or switched off."""
    if not enabled:
        return "Key images: no Key Object Selection written (outputs.key_images is false)."
    if not selected:
        return "Key images: none - no finding graded Moderate or Severe, so no Key Object Selection written."
    images, findings = len(selected.images), len(selected.findings)
    return (f"Key images: {images} source image{'s' * (images != 1)} of the {findings} "
            f"finding{'s' * (findings != 1)} graded Moderate or Severe, listed in the Key Object Selection "
            "(\"Of Interest\").")


def key_images_json(selected: KeyImages, kos: Dataset | None) -> dict[str, object]:
    """What results.json says of the key images: the KOS written (its SOP Instance UID, or None)
    and each key image with the labels graded on it."""
    return {"key_object_selection": str(kos.SOPInstanceUID) if kos is not None else None,
            "key_images": [{"series_uid": series, "sop_instance_uid": sop,
                            "labels": [r.label.column for r in selected.labels_on((series, sop))]}
                           for series, sop in selected.images]}


def build_kos(result: StudyResult, sources: Mapping[ImageKey, Dataset], sr: Dataset,
              patient: PatientStudy | None = None) -> KeyObjectSelectionDocument | None:
    """The Key Object Selection document of the study's report ``sr``, or None when no finding is
    graded Moderate or Severe. ``sources`` maps (SeriesInstanceUID, SOPInstanceUID) -> the source
    image header (at least every image a finding is located on); ``patient`` holds the patient/study
    attributes to write (results.sources; made from the sources when not given)."""
    selected = key_images_of(result)
    if not selected:
        return None
    patient = patient or patient_study(sources.values(), result.study_uid)
    references = [patient.reference(sources[key]) for key in selected.images]
    observer = ObserverContext(
        observer_type=C.DEVICE,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name=DEVICE_NAME, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME))
    content = KeyObjectSelection(document_title=DOCUMENT_TITLE, referenced_objects=references,
                                 observer_device_context=observer, description=description(selected))
    kos = KeyObjectSelectionDocument(
        evidence=references, content=content,
        series_instance_uid=kos_series_uid(str(sr.SeriesInstanceUID)), series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=generate_uid(entropy_srcs=[str(sr.SOPInstanceUID), "kos"]),
        instance_number=int(sr.InstanceNumber), manufacturer=MANUFACTURER,
        contributing_equipment=[algorithm_equipment(result)],
    )
    patient.apply(kos)
    kos.SeriesDescription = KOS_SERIES_DESCRIPTION
    # each image by series and instance (the Kaggle files repeat SOP Instance UIDs across series)
    kos.CurrentRequestedProcedureEvidenceSequence = evidence_sequence(references)
    return kos

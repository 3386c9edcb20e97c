"""The study's TID 1500 Measurement Report (highdicom Comprehensive SR) in the study of the source
images, as OHIF v3 and IHE AI Results read it:

- Image Library (TID 1600): every image a finding is located on;
- Imaging Measurements: one TID 1410 planar ROI group per graded label (its region on its source
  image, tracking identifier and UID, grade, the three probabilities, the algorithm (TID 4019));
- Qualitative Evaluations (document level): the spinal canal summary, and each label not assessed
  with its reason (located nowhere, so not a measurement group: OHIF 3.13 fails on a group without
  a region);
- the model in the Contributing Equipment Sequence (Purpose of Reference "Processing Algorithm").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from highdicom.sr.templates import Template
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.results import codes as C
from dicom_node.results.identity import DEVICE_NAME, DEVICE_UID, MANUFACTURER, MODEL_NAME
from dicom_node.results.sources import (
    REGION_RADIUS_MM,
    ImageKey,
    PatientStudy,
    algorithm_equipment,
    column_spacing,
    location_key,
    patient_study,
    sop_reference,
)
from inference.analyze import AssessedLabel, LabelResult, NotAssessedLabel, StudyResult
from inference.labels import SEVERITIES, SPINAL, Severity

SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "AI lumbar stenosis grading (SR) - not for diagnosis"
G = TypeVar("G", bound=Template)


def algorithm(result: StudyResult) -> AlgorithmIdentification:
    """TID 4019: the model's name and version, its sha256 and the machine-generated disclaimer."""
    info = result.model
    return AlgorithmIdentification(
        name=info.name, version=info.version,
        parameters=[f"model sha256 {info.sha256}",
                    f"machine-generated result; trained on {info.training_data}; not for clinical use"])


def _sites(r: LabelResult) -> list[FindingSite]:
    """The disc level, and the structure with its side (the left foramen, not a left disc)."""
    side = r.label.condition.side
    return [FindingSite(C.LEVEL[r.label.level]),
            FindingSite(C.STRUCTURE[r.label.condition.group], laterality=C.LATERALITY[side] if side else None)]


def percent(probability: float) -> float:
    """A probability in percent as stored and shown: one decimal, or two significant digits under
    0.05 % (a stored 0 would read as an empty value in OHIF 3.13)."""
    value = round(100.0 * float(probability), 1)
    return value if value > 0 else float(f"{100.0 * float(probability):.2g}")


def _percent(name: hd.sr.CodedConcept, probability: float) -> Measurement:
    """A probability as a NUM in percent: what a reader sees is what is stored. The group's
    algorithm identification covers it (no per-measurement copy)."""
    return Measurement(name=name, value=percent(probability), unit=C.PERCENT)


def _grade(r: AssessedLabel) -> Measurement:
    """The grade as an ordinal NUM named after the condition, its unit the grade's name (see
    codes.GRADE_OF): what OHIF 3.13 draws beside the region, "<condition> grade: 2.00 {Moderate}"."""
    return Measurement(name=C.GRADE_OF[r.label.condition], value=int(r.grade) + 1, unit=C.GRADE_UNIT[r.grade])


def _separate(group: G) -> G:
    """Mark the group's container SEPARATE: renderers such as DCMTK's dsr2html then show each item
    with its concept name ("Probability of moderate: 12.3 %"), instead of running the values
    together as one sentence as they do for CONTINUOUS (highdicom's default)."""
    group[0].ContinuityOfContent = "SEPARATE"
    return group


def _tracking(study_uid: str, r: LabelResult) -> TrackingIdentifier:
    # stable per study and label, so that a superseding report tracks the same findings
    return TrackingIdentifier(uid=generate_uid(entropy_srcs=[study_uid, r.label.column]),
                              identifier=f"{r.label.level.value} {r.label.condition.display}")


def _assessed_group(result: StudyResult, r: AssessedLabel, source: Dataset,
                    reference: Dataset) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 for a graded label: a 4 mm circle on the source image (``reference``: its UIDs and
    SOP class, see results.sources), the grade (ordinal NUM), the three class probabilities and
    the coded severity."""
    x, y = r.location.pixel
    region = ImageRegion(graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
                         graphic_data=np.array([[x, y], [x + REGION_RADIUS_MM / column_spacing(source), y]]),
                         source_image=SourceImageForRegion.from_source_image(reference))
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result.study_uid, r),
        referenced_region=region,
        finding_type=C.STENOSIS,
        algorithm_id=algorithm(result),
        finding_sites=_sites(r),
        measurements=[_grade(r), *(_percent(C.PROBABILITY[s], p)
                                   for s, p in zip(SEVERITIES, r.probabilities, strict=True))],
        qualitative_evaluations=[QualitativeEvaluation(C.SEVERITY, C.GRADE[r.grade])],
    )


def _container(name: hd.sr.CodedConcept, items: Sequence[hd.sr.ContentItem]) -> ContainerContentItem:
    """A CONTAINS container of the report's root (SEPARATE, like the groups)."""
    container = ContainerContentItem(name=name, is_content_continuous=False,
                                     relationship_type=RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _not_assessed(study_uid: str, r: NotAssessedLabel) -> CodeContentItem:
    """A label the node could not grade, as a qualitative evaluation of the document: assessment
    status "Not assessed", with the label's tracking identifier and UID (as a graded label's group
    has them), the finding, its sites and the coded reason."""
    item = CodeContentItem(name=C.ASSESSMENT, value=C.NOT_ASSESSED, relationship_type=RelationshipTypeValues.CONTAINS)
    item.ContentSequence = hd.sr.ContentSequence([
        *_tracking(study_uid, r),
        CodeContentItem(name=C.FINDING, value=C.STENOSIS, relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD),
        *_sites(r),
        CodeContentItem(name=C.REASON, value=C.REASONS[r.why],
                        relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD),
    ])
    return item


def _summary(result: StudyResult) -> list[hd.sr.ContentItem]:
    """The study's spinal canal summary as qualitative evaluations of the document, when any
    spinal canal level was graded: whether any level is severe, and the highest probability of
    severe with its level (TEXT: the coded value is that level's NUM)."""
    spinal = [r for r in result.assessed() if r.label.condition == SPINAL]
    if not spinal:
        return []
    worst = max(spinal, key=lambda r: r.probabilities[Severity.SEVERE])
    any_severe = any(r.grade is Severity.SEVERE for r in spinal)
    return [
        CodeContentItem(name=C.ANY_SEVERE_SPINAL, value=C.PRESENT if any_severe else C.ABSENT,
                        relationship_type=RelationshipTypeValues.CONTAINS),
        TextContentItem(name=C.MAX_SEVERE_SPINAL, relationship_type=RelationshipTypeValues.CONTAINS,
                        value=f"{percent(worst.probabilities[Severity.SEVERE])} % "
                              f"({worst.label.level.value})"),
    ]


def build_sr(result: StudyResult, sources: Mapping[ImageKey, Dataset], *, series_uid: str | None = None,
             instance_number: int = 1, predecessors: Sequence[Dataset] = (),
             patient: PatientStudy | None = None) -> hd.sr.ComprehensiveSR:
    """The report for one graded study. ``sources`` maps (SeriesInstanceUID, SOPInstanceUID) -> the
    source image header (at least every image a finding is located on). ``patient`` holds the
    patient/study attributes to write (results.sources; made from the sources when not given).
    A re-run passes the earlier report(s) of the study as ``predecessors``: the new one lists them
    in its Predecessor Documents Sequence and is written into their series (``series_uid``)."""
    patient = patient or patient_study(sources.values(), result.study_uid)
    located: dict[ImageKey, Dataset] = {}  # image key -> its reference for highdicom
    groups: list[PlanarROIMeasurementsAndQualitativeEvaluations] = []
    for r in result.assessed():
        key = location_key(r.location)
        source = sources[key]
        reference = located.setdefault(key, patient.reference(source))
        groups.append(_separate(_assessed_group(result, r, source, reference)))
    evaluations = _summary(result) + [_not_assessed(result.study_uid, r)
                                      for r in result.labels if isinstance(r, NotAssessedLabel)]
    observer = ObserverContext(
        observer_type=C.DEVICE,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name=DEVICE_NAME, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                               procedure_reported=C.PROCEDURE_REPORTED,
                               referenced_images=list(located.values()) or None,
                               imaging_measurements=groups or [_placeholder_group()])
    root = report[0].ContentSequence
    if not groups:  # nothing located: no Imaging Measurements (highdicom needs one group to build the report)
        del root[-1]
    if evaluations:
        root.append(_container(C.QUALITATIVE_EVALUATIONS, evaluations))
    evidence = list(located.values()) or [patient.reference(next(iter(sources.values())))]
    container = report[0]
    if not isinstance(container, ContainerContentItem):  # highdicom's MeasurementReport: one root container
        raise TypeError(f"the report's root is a {type(container).__name__}, not a container")
    sr = _Report(
        evidence=evidence, content=container,
        series_instance_uid=series_uid or generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=instance_number, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        previous_versions=list(predecessors) or None,
        series_description=SR_SERIES_DESCRIPTION,
        contributing_equipment=[algorithm_equipment(result)],
    )
    patient.apply(sr)
    # highdicom lists each SOP Instance UID once, whatever its series: with the UIDs that the
    # Kaggle files repeat across series, an image of the second series would be left out
    sr.CurrentRequestedProcedureEvidenceSequence = evidence_sequence(evidence)
    return sr


class _Report(hd.sr.ComprehensiveSR):
    """highdicom's Comprehensive SR, built around the content tree as it is.

    highdicom's constructor deep-copies the whole tree, parses the copy back into content items,
    and searches it twice for image references (for the evidence, which ``build_sr`` writes
    itself) and once for 3D coordinates: 0.4 s of a 25-group report, about half of building it.
    The document is made here around the root container without its children, and the tree
    (already highdicom content items, with no 3D coordinates) is then set as its content, both
    as the data set's Content Sequence and as highdicom's view of it (``content``)."""

    def __init__(self, content: ContainerContentItem, **kwargs: Any):
        stub = Dataset()
        for element in content:
            if element.keyword != "ContentSequence":
                stub.add(element)
        stub.ContentSequence = []
        super().__init__(content=stub, **kwargs)
        self.ContentSequence = content.ContentSequence
        self._content = hd.sr.ContentSequence([content], is_root=True)


def evidence_sequence(images: Sequence[Dataset]) -> list[Dataset]:
    """Hierarchical SOP Instance Reference items (study, series, instance) for these images, each
    (series, instance) once, in the order given."""
    studies: dict[str, dict[str, dict[str, Dataset]]] = {}
    for ds in images:
        series = studies.setdefault(str(ds.StudyInstanceUID), {}).setdefault(str(ds.SeriesInstanceUID), {})
        series.setdefault(str(ds.SOPInstanceUID), ds)
    items = []
    for study_uid, series_map in studies.items():
        study_item = Dataset()
        study_item.StudyInstanceUID = study_uid
        study_item.ReferencedSeriesSequence = []
        for series_uid, instances in series_map.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID = series_uid
            series_item.ReferencedSOPSequence = [sop_reference(ds) for ds in instances.values()]
            study_item.ReferencedSeriesSequence.append(series_item)
        items.append(study_item)
    return items


def _placeholder_group() -> MeasurementsAndQualitativeEvaluations:
    """A throw-away group for highdicom's MeasurementReport, removed again (see build_sr)."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier="none"))

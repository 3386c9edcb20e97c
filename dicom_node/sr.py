"""The study's TID 1500 Measurement Report (highdicom Comprehensive SR), one measurement group per
level and side, in the study of the source images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
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
    SourceImageForRegion,
    TrackingIdentifier,
)
from highdicom.sr.templates import Template
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node import codes as C
from dicom_node.identity import DEVICE_NAME, DEVICE_UID, MANUFACTURER, MODEL_NAME
from inference.analyze import AssessedLabel, LabelResult, NotAssessedLabel, StudyResult
from inference.labels import SEVERITIES, SPINAL, Severity

SR_SERIES_NUMBER = 9901
SR_SERIES_DESCRIPTION = "AI lumbar stenosis grading (SR) - not for diagnosis"
REGION_RADIUS_MM = 4.0
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


def _percent(name: hd.sr.CodedConcept, probability: float) -> Measurement:
    """A probability as a NUM in percent, one decimal: what a reader sees is what is stored. The
    group's algorithm identification covers it (no per-measurement copy)."""
    return Measurement(name=name, value=round(100.0 * float(probability), 1), unit=C.PERCENT)


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


def _assessed_group(result: StudyResult, r: AssessedLabel, source: Dataset) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 for a graded label: a 4 mm circle on the source image, the three class
    probabilities and the coded severity."""
    x, y = r.location.pixel
    spacing = float(source.PixelSpacing[1])
    region = ImageRegion(graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
                         graphic_data=np.array([[x, y], [x + REGION_RADIUS_MM / spacing, y]]),
                         source_image=SourceImageForRegion.from_source_image(source))
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result.study_uid, r),
        referenced_region=region,
        finding_type=C.STENOSIS,
        algorithm_id=algorithm(result),
        finding_sites=_sites(r),
        measurements=[_percent(C.PROBABILITY[s], p) for s, p in zip(SEVERITIES, r.probabilities, strict=True)],
        qualitative_evaluations=[QualitativeEvaluation(C.SEVERITY, C.GRADE[r.grade])],
    )


def _not_assessed_group(result: StudyResult, r: NotAssessedLabel) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 for a label the node could not grade: "Not assessed" and the coded reason."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(result.study_uid, r),
        finding_type=C.STENOSIS,
        algorithm_id=algorithm(result),
        finding_sites=_sites(r),
        qualitative_evaluations=[QualitativeEvaluation(C.ASSESSMENT, C.NOT_ASSESSED),
                                 QualitativeEvaluation(C.REASON, C.REASONS[r.why])],
    )


def _summary_group(result: StudyResult) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 for the study: any severe spinal canal stenosis, and the highest probability of one."""
    spinal = [r for r in result.assessed() if r.label.condition == SPINAL]
    worst = max((r.probabilities[Severity.SEVERE] for r in spinal), default=None)
    any_severe = any(r.grade is Severity.SEVERE for r in spinal)
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=generate_uid(entropy_srcs=[result.study_uid, "summary"]),
                                               identifier="Study summary"),
        finding_type=C.STENOSIS,
        algorithm_id=algorithm(result),
        finding_sites=[FindingSite(C.STRUCTURE[SPINAL.group])],
        measurements=[] if worst is None else [_percent(C.MAX_SEVERE_SPINAL, worst)],
        qualitative_evaluations=[QualitativeEvaluation(C.ANY_SEVERE_SPINAL, C.PRESENT if any_severe else C.ABSENT)],
    )


# Patient and study attributes copied from the source images onto every object the node writes,
# so that the PACS files them in the same patient and study.
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientIdentityRemoved", "DeidentificationMethod", "StudyInstanceUID", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
)


def copy_patient_study(source: Dataset, target: Dataset) -> None:
    """Copy the patient and study attributes that the source has (and only those)."""
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            setattr(target, keyword, source.data_element(keyword).value)


def build_sr(result: StudyResult, sources: Mapping[str, Dataset], *, series_uid: str | None = None,
             instance_number: int = 1, predecessors: Sequence[Dataset] = ()) -> hd.sr.ComprehensiveSR:
    """The report for one graded study. ``sources`` maps SOPInstanceUID -> the source image header
    (at least every image a finding is located on). A re-run passes the earlier report(s) of the
    study as ``predecessors``: the new one lists them in its Predecessor Documents Sequence and is
    written into their series (``series_uid``)."""
    groups: list = [_summary_group(result)]  # first, where a reader starts
    evidence: dict[str, Dataset] = {}
    for r in result.labels:
        if isinstance(r, AssessedLabel):
            source = sources[r.location.sop_instance_uid]
            evidence[source.SOPInstanceUID] = source
            groups.append(_assessed_group(result, r, source))
        else:
            groups.append(_not_assessed_group(result, r))
    groups = [_separate(g) for g in groups]
    if not evidence:
        evidence = {next(iter(sources)): next(iter(sources.values()))}  # patient/study come from here
    observer = ObserverContext(
        observer_type=C.DEVICE,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name=DEVICE_NAME, manufacturer_name=MANUFACTURER, model_name=MODEL_NAME))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                               procedure_reported=C.PROCEDURE_REPORTED, imaging_measurements=groups)
    sr = hd.sr.ComprehensiveSR(
        evidence=list(evidence.values()), content=report,
        series_instance_uid=series_uid or generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=instance_number, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        previous_versions=list(predecessors) or None,
        series_description=SR_SERIES_DESCRIPTION,
    )
    copy_patient_study(next(iter(evidence.values())), sr)
    return sr

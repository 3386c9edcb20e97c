"""Coded concepts of the node's Structured Report: SNOMED CT, DCM and LOINC where they exist (each
taken from pydicom's verified code dictionary), a documented private scheme where none does.

Private scheme ``99LUMBAR`` (see docs/CONFORMANCE.md): neural foramen, subarticular zone, the
Normal/Mild class of the RSNA label set, class probabilities, assessment status and reasons.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.analyze import NotAssessedReason
from inference.labels import CONDITIONS, ConditionGroup, Level, Severity, Side

PRIVATE_SCHEME = "99LUMBAR"


def private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


def sct(code: Code, meaning: str | None = None) -> CodedConcept:
    """A pydicom dictionary code as a highdicom CodedConcept; ``meaning`` replaces a dictionary
    meaning that reads badly in a rendered report (e.g. "Severity (attribute)")."""
    return CodedConcept(code.value, code.scheme_designator, meaning or code.meaning)


PROCEDURE_REPORTED = sct(codes.LN.MRIUnspecifiedBodyRegion)  # in CID 100; the sites say lumbar
STENOSIS = sct(codes.SCT.Stenosis, "Stenosis")  # finding type; the site says which stenosis (post-coordination)
SEVERITY = sct(codes.SCT.Severity, "Severity")
PRESENT, ABSENT = sct(codes.SCT.Present), sct(codes.SCT.Absent)
DEVICE = sct(codes.DCM.Device)
FINDING = sct(codes.DCM.Finding)
# TID 1500's document-level "Qualitative Evaluations" container (PS3.16; not in pydicom's dictionary)
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
# IHE AI Results (Rev 1.1, 6.5.3.1): the Purpose of Reference of an algorithm in the Contributing
# Equipment Sequence, as MONAI Deploy writes it. Not DCM 109103, which is "Modifying Equipment"
# (pydicom's dictionary, CID 7005); CID 7005 has no code for an algorithm.
PROCESSING_ALGORITHM = CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # CID 7005, what highdicom accepts before the swap

LEVEL = {
    Level.L1_L2: sct(codes.SCT.L1L2Disc),
    Level.L2_L3: sct(codes.SCT.L2L3Disc),
    Level.L3_L4: sct(codes.SCT.L3L4Disc),
    Level.L4_L5: sct(codes.SCT.L4L5Disc),
    Level.L5_S1: sct(codes.SCT.L5S1Disc),
}
LATERALITY = {Side.LEFT: sct(codes.SCT.Left), Side.RIGHT: sct(codes.SCT.Right)}
STRUCTURE = {
    ConditionGroup.SPINAL: sct(codes.SCT.SpinalCanalStructure, "Spinal canal"),
    ConditionGroup.FORAMINAL: private("NF", "Neural (intervertebral) foramen"),
    ConditionGroup.SUBARTICULAR: private("SAZ", "Subarticular zone (lateral recess)"),
}
GRADE = {
    Severity.NORMAL_MILD: private("NM", "Normal or mild"),
    Severity.MODERATE: sct(codes.SCT.Moderate),
    Severity.SEVERE: sct(codes.SCT.Severe),
}
PROBABILITY = {
    Severity.NORMAL_MILD: private("PNM", "Probability of normal or mild"),
    Severity.MODERATE: private("PMO", "Probability of moderate"),
    Severity.SEVERE: private("PSE", "Probability of severe"),
}
PERCENT = CodedConcept("%", "UCUM", "percent")  # probabilities are stored as 0-100 %
# The grade again as an ordinal NUM (1 normal/mild, 2 moderate, 3 severe) named after its condition,
# its unit the grade's name as a UCUM annotation (dimensionless): viewers that draw only a group's
# NUM items and first finding site beside its region (OHIF 3.13) then show condition and grade.
GRADE_OF = {c: private(f"G{''.join(w[0] for w in c.key.split('_')).upper()}", f"{c.display} grade") for c in CONDITIONS}
GRADE_UNIT = {s: CodedConcept(f"{{{s.display}}}", "UCUM", s.display) for s in Severity}
ASSESSMENT = private("AST", "Assessment status")
NOT_ASSESSED = private("NA", "Not assessed")
REASON = private("RSN", "Reason not assessed")
ANY_SEVERE_SPINAL = private("ASS", "Any severe spinal canal stenosis")
MAX_SEVERE_SPINAL = private("MSS", "Highest probability of severe spinal canal stenosis")
REASONS = {  # the coded reason of a 'not assessed' label
    NotAssessedReason.NO_SAGITTAL: private("RNL", "Levels not localised: no usable sagittal series"),
    NotAssessedReason.UNUSABLE_SERIES: private("RSU", "Required series unusable"),
    NotAssessedReason.NOT_COVERED: private("RNC", "Level not covered by the required series"),
    NotAssessedReason.MISSING_SERIES: private("RMS", "Required series missing"),
    NotAssessedReason.LEVELS_NOT_LOCALISED: private("RLF", "Disc levels could not be localised"),
}

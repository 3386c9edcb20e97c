"""Whether a study is a lumbar spine MRI the node can grade, and whether a graded one is worth a
report: the policy the node's release and worker and the ``predict`` command share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pydicom
from pydicom.uid import UID

from dicom_node.states import SkipReason
from inference.analyze import LabelResult, NotAssessedLabel, NotAssessedReason, StudyResult
from inference.instances import Instance, is_mr, sop_class_uid
from inference.labels import SeriesRole
from inference.series import assign_roles, group_series, role_of

__all__ = ["ALL_ROLES", "LUMBAR_BODY_PARTS", "Skip", "has_all_roles", "mr_images", "note_missing", "nothing_assessed",
           "skip_reason"]

# BodyPartExamined values (PS3.16 CID 4031 defined terms and common variants) that are a lumbar spine.
LUMBAR_BODY_PARTS = frozenset({"LSPINE", "SPINE", "TLSPINE", "LSSPINE", "LUMBAR", "LUMBARSPINE", "L-SPINE"})
ALL_ROLES = frozenset(SeriesRole)


@dataclass(frozen=True)
class Skip:
    """Why a study is not graded: the kind, and what was found (the ledger's reason is its text)."""

    why: SkipReason
    found: str = ""

    def __str__(self) -> str:
        return f"{self.why.value} ({self.found})" if self.found else self.why.value


def mr_images(headers: list[Instance]) -> list[Instance]:
    """The MR instances among a study's headers (our own SR/SC and anything else left out)."""
    return [(ds, p) for ds, p in headers if is_mr(ds)]


def skip_reason(headers: list[Instance]) -> Skip | None:
    """Why this study is not a lumbar spine MRI we can grade, or None if it is."""
    if not headers:
        return Skip(SkipReason.NO_INSTANCES)
    modalities = sorted({str(ds.get("Modality", "")) or "none" for ds, _ in headers})
    mr = mr_images(headers)
    if not mr:
        found = f"modality {', '.join(modalities)}"
        if "MR" in modalities:  # e.g. Secondary Captures of MR images: never taken for an MR series
            classes = sorted({UID(sop_class_uid(ds)).name if sop_class_uid(ds) else "none" for ds, _ in headers})
            found += f", SOP class {', '.join(classes)}: no MR image storage class"
        return Skip(SkipReason.NOT_MR, found)
    parts = sorted({str(ds.get("BodyPartExamined", "")).upper() for ds, _ in mr} - {""})
    if parts and not LUMBAR_BODY_PARTS.intersection(parts):
        return Skip(SkipReason.NOT_LUMBAR, f"BodyPartExamined {', '.join(parts)}")
    series = group_series(mr)
    if not assign_roles(series):
        refused = sorted({s.problem for s in series if s.problem is not None and role_of(s) is not None})
        return Skip(SkipReason.NO_SERIES, f"implausible geometry: {'; '.join(refused)}" if refused else "")
    return None


def nothing_assessed(result: StudyResult) -> Skip | None:
    """A study of which no label could be graded (no sagittal series, levels not found, no usable
    series) is not reported: the reasons, or None when something was graded."""
    if result.assessed():
        return None
    counts: dict[str, int] = {}
    for r in result.labels:
        if isinstance(r, NotAssessedLabel):  # the per-level wordings of one kind are told once
            key = r.why.value if r.why is NotAssessedReason.NOT_COVERED else r.reason
            counts[key] = counts.get(key, 0) + 1
    return Skip(SkipReason.NOTHING_ASSESSED, "; ".join(f"{why}: {n} labels" for why, n in counts.items()))


def has_all_roles(headers: Sequence[pydicom.Dataset]) -> bool:
    """Whether these headers (one or more per series) cover Sagittal T1, Sagittal T2/STIR and Axial T2."""
    roles = {role_of(s) for s in group_series((ds, None) for ds in headers)}
    return roles >= ALL_ROLES


def note_missing(result: StudyResult, note: str) -> StudyResult:
    """The result with ``note`` added to the reason of every label not assessed because its series
    is missing (or both sagittal series are): the node asked the PACS for them, and what it says
    came of it (``pipeline.fetch.missing_note``: "not sent and not found on the PACS")."""
    no_sagittal = not {SeriesRole.SAG_T1, SeriesRole.SAG_T2} & set(result.series_roles)

    def noted(r: LabelResult) -> LabelResult:
        if not isinstance(r, NotAssessedLabel):
            return r
        missing = r.why is NotAssessedReason.MISSING_SERIES or (r.why is NotAssessedReason.NO_SAGITTAL and no_sagittal)
        return replace(r, reason=f"{r.reason}: {note}") if missing else r

    return replace(result, labels=tuple(noted(r) for r in result.labels))

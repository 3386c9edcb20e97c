"""STOW-RS as the node takes it (PS3.18 10.5): each part of a request, staged, goes through the
node's one admission (``ingest.Admission``: the same checks, spool, ledger, metrics and audit trail
as a C-STORE), refused with a Failure Reason when the admission refuses it or, for a request to
``/studies/{study}``, when its Study Instance UID is another; then the Store Instances Response
(PS3.18 Annex I, DICOM JSON) and its HTTP status: 200 all stored, 202 some, 409 none."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicom_node.ingest import Admission, Candidate, Refused, Source, StoreStatus, read_file_meta
from dicom_node.observability import get_logger
from dicom_node.store import uid_problem

__all__ = ["STUDY_MISMATCH", "Failed", "Stored", "StowResult", "store_parts"]

log = get_logger(__name__)

#: Failure Reason of an instance whose Study Instance UID is not the request's ``{study}``: the
#: node's own code in the "Error: Cannot understand" range (PS3.18 Table I.2-2 allows such codes,
#: named in the conformance statement).
STUDY_MISMATCH = 0xC409


@dataclass(frozen=True)
class Stored:
    """An instance the node holds after the request (new, replaced, or the same bytes again)."""

    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Failed:
    """An instance the node did not store: its UIDs when they could be read (and are valid), the
    Failure Reason, and why in plain words (logged and audited; never sent back with file names)."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: int
    detail: str


@dataclass
class StowResult:
    """What a STOW-RS request came to."""

    stored: list[Stored] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    study_uids: set[str] = field(default_factory=set)  # of the instances stored

    @property
    def http_status(self) -> int:
        """200 all stored, 202 some stored and some failed, 409 none stored (PS3.18 Table 10.5.3-1)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def response(self) -> dict[str, Any]:
        """The Store Instances Response Module in DICOM JSON (PS3.18 Annex I, PS3.18 Annex F)."""
        ds = Dataset()
        if self.failed:
            ds.FailedSOPSequence = [_item(f.sop_class_uid, f.sop_instance_uid, FailureReason=f.reason)
                                    for f in self.failed]
        if self.stored:
            ds.ReferencedSOPSequence = [_item(s.sop_class_uid, s.sop_instance_uid) for s in self.stored]
        return ds.to_json_dict()


def _item(sop_class: str | None, sop_instance: str | None, **values: Any) -> Dataset:
    item = Dataset()
    if sop_class is not None:
        item.ReferencedSOPClassUID = sop_class
    if sop_instance is not None:
        item.ReferencedSOPInstanceUID = sop_instance
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _uids_of(path: Path) -> tuple[str | None, str | None]:
    """The SOP Class and Instance UIDs of a refused part's file meta, when readable and valid (a
    hostile value is never echoed back)."""
    try:
        with open(path, "rb") as f:
            meta = read_file_meta(f)
    except Exception:  # noqa: BLE001 - not a Part 10 file at all: no UIDs to give
        return None, None
    found = []
    for keyword in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
        value = str(meta.get(keyword, "") or "").strip("\0 ")
        found.append(value if value and uid_problem(value, keyword) is None else None)
    return found[0], found[1]


def store_parts(parts: list[Path], admission: Admission, user: str, study_uid: str | None = None) -> StowResult:
    """Admit every staged part of a STOW-RS request from ``user``, each on its own (a refused
    part does not stop the others); one audit line per study stored. Runs off the event loop."""
    result = StowResult()
    batch = admission.batch(Source.STOW, user)
    try:
        for number, path in enumerate(parts, 1):
            try:
                item = admission.inspect(Candidate.staged(path, Source.STOW, user))
            except Refused as exc:
                sop_class, sop_instance = _uids_of(path)
                result.failed.append(Failed(sop_class, sop_instance, int(exc.status), exc.detail))
                log.warning("STOW-RS: refused an instance", sender=user, part=number, status=f"0x{exc.status:04X}",
                            why=exc.detail)
                continue
            if study_uid is not None and item.study_uid != study_uid:
                detail = "its Study Instance UID is not the study of the request's URL"
                result.failed.append(Failed(item.sop_class_uid, item.sop_instance_uid, STUDY_MISMATCH, detail))
                log.warning("STOW-RS: refused an instance", sender=user, part=number,
                            status=f"0x{STUDY_MISMATCH:04X}", why=detail, study_uid=study_uid)
                continue
            verdict = admission.file(item, batch)
            if verdict.admitted:
                result.stored.append(Stored(item.sop_class_uid, item.sop_instance_uid))
                result.study_uids.add(item.study_uid)
            else:
                status = verdict.status if verdict.status != StoreStatus.SUCCESS else StoreStatus.PROCESSING_FAILURE
                result.failed.append(Failed(item.sop_class_uid, item.sop_instance_uid, int(status), verdict.detail))
                log.warning("STOW-RS: an instance was not stored", sender=user, part=number,
                            status=f"0x{status:04X}", why=verdict.detail)
    finally:
        batch.close()
    return result

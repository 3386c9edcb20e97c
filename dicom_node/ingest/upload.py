"""A study uploaded through the web page, taken whole or not at all: every staged file goes
through the admission's checks first (the same as a C-STORE's), then the upload's own rules (one
study, an MR study, not a study the PACS sent); only then is anything filed and recorded. The
first uploader stays the study's uploader; images added to an uploaded study turn its "send to
the PACS" off again, so nothing reaches the PACS without an administrator's action, and the audit
trail says who added what."""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.ingest.admission import Admissible, Admission, Candidate, Outcome, Reason, Refused, Source
from dicom_node.ingest.statuses import StoreStatus
from dicom_node.ingest.upload_reader import EXPECTED, StagedFile, UploadError, UploadProblem, is_dicom
from dicom_node.states import EventKind


@dataclass(frozen=True)
class UploadResult:
    """What an accepted upload came to."""

    study_uid: str
    stored: int  # instances new or replaced
    held: int  # instances the node already held, the same bytes
    size: int  # bytes stored
    uploaded_by: str  # the study's first uploader
    send_stopped: bool  # the study was to be sent to the PACS, and no longer is


def _refusal(name: str, exc: Refused) -> UploadError:
    """An admission's refusal of one file, in the upload's words."""
    if exc.reason in (Reason.NOT_DICOM, Reason.UNREADABLE):
        return UploadError(UploadProblem.WRONG_FORMAT, f"Wrong format: {name} is not a readable DICOM file "
                           f"({exc.detail}); expected {EXPECTED}")
    if exc.reason is Reason.DISK_LOW:
        return UploadError(UploadProblem.DISK_FULL, "Not enough disk space: the node's free disk is under its floor "
                           "(storage.min_free_disk_mb); try again later", 507)
    if exc.reason in (Reason.TOO_LARGE, Reason.TOO_MANY_PIXELS):
        return UploadError(UploadProblem.TOO_LARGE, f"Too large: {name}: {exc.detail}", 413)
    return UploadError(UploadProblem.NOT_ACCEPTED, f"Not accepted: {name}: {exc.detail}")


def inspect_upload(files: list[StagedFile], admission: Admission, user: str) -> list[Admissible]:
    """Every file of an upload checked, nothing filed: the admissible instances, all of one MR
    study; UploadError with a plain message otherwise. DICOMDIR files are ignored."""
    found: list[Admissible] = []
    for staged in files:
        if staged.name.replace(":", "/").rsplit("/", 1)[-1].upper() == "DICOMDIR":
            continue
        if not is_dicom(staged.path):
            raise UploadError(UploadProblem.WRONG_FORMAT, f"Wrong format: {staged.name} is not a DICOM file; "
                              f"expected {EXPECTED}")
        try:
            found.append(admission.inspect(Candidate.staged(staged.path, Source.UPLOAD, user)))
        except Refused as exc:
            raise _refusal(staged.name, exc) from None
    if not found:
        raise UploadError(UploadProblem.NOTHING_CHOSEN if not files else UploadProblem.WRONG_FORMAT,
                          f"Nothing chosen: choose {EXPECTED}" if not files
                          else f"No DICOM files in the upload: expected {EXPECTED}")
    studies = {i.study_uid for i in found}
    if len(studies) > 1:
        raise UploadError(UploadProblem.MORE_THAN_ONE_STUDY, f"More than one study: the upload holds {len(studies)} "
                          "studies (Study Instance UIDs); upload one study at a time")
    if not any(i.modality == "MR" for i in found):
        modalities = ", ".join(sorted({i.modality or "none" for i in found}))
        raise UploadError(UploadProblem.NOT_MR, f"Not an MR study: the files are of modality {modalities}; the node "
                          "grades lumbar spine MRI (Sagittal T1, Sagittal T2/STIR, Axial T2)")
    study_uid = found[0].study_uid
    if admission.ledger.study(study_uid) is not None and admission.ledger.upload(study_uid) is None:
        raise UploadError(UploadProblem.FROM_PACS, f"Study {study_uid} came from the PACS and is already in the node: "
                          "open it from the dashboard (an administrator can grade it again there)")
    return found


def admit_upload(files: list[StagedFile], admission: Admission, user: str) -> UploadResult:
    """Check every file of an upload (``inspect_upload``), then file them all as one study
    uploaded by ``user``, and write the audit trail's line. Nothing is recorded for an upload
    that is refused; UploadError says why."""
    found = inspect_upload(files, admission, user)
    ledger, study_uid = admission.ledger, found[0].study_uid
    new = [i for i in found if not i.resent]
    earlier = ledger.upload(study_uid)
    if earlier is None and not ledger.add_upload(study_uid, user):  # another upload of it came first
        earlier = ledger.upload(study_uid)
    send_stopped = False
    if earlier is not None and new and earlier.send:  # images added: nothing to the PACS without an administrator
        send_stopped = ledger.set_upload_send(study_uid, False)
    stored = size = 0
    for item in new:
        verdict = admission.file(item)
        if verdict.outcome is Outcome.FAILED:
            status = 507 if verdict.status == StoreStatus.OUT_OF_RESOURCES else 500
            raise UploadError(UploadProblem.NOT_STORED, f"Not stored: the node could not store every file "
                              f"({verdict.detail}); {stored} of {len(new)} stored, try again", status)
        if verdict.outcome is Outcome.REFUSED:  # filed under another study since the check
            raise UploadError(UploadProblem.NOT_ACCEPTED, f"Not accepted: {verdict.detail}")
        if verdict.outcome in (Outcome.NEW, Outcome.REPLACED):
            stored += 1
            size += item.size
    uploaded_by = earlier.uploaded_by if earlier is not None else user
    held = len(found) - stored
    if earlier is None:
        detail = f"{stored} instances ({size} bytes) uploaded by {user}"
    else:
        detail = f"{stored} instances ({size} bytes) added by {user} to the study uploaded by {uploaded_by}"
    if held:
        detail += f"; {held} already held"
    if send_stopped:
        detail += "; its results are no longer sent to the PACS until an administrator sends them"
    ledger.add_event(EventKind.UPLOADED, user, study_uid, detail,
                     {"instances": stored, "bytes": size, "files": len(found), "added": earlier is not None,
                      "uploaded_by": uploaded_by, "send_stopped": send_stopped})
    return UploadResult(study_uid, stored, held, size, uploaded_by, send_stopped)

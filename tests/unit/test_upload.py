"""An upload taken whole or not at all, through the same admission as C-STORE: a refused upload
records nothing (no study, no upload row, no spool file); the first uploader stays; images added
to an uploaded study turn its "send to the PACS" off and the audit trail says who added what."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.ingest import Admission, StagedFile, UploadError, UploadProblem, admit_upload
from dicom_node.observability import NodeMetrics
from dicom_node.states import EventKind
from dicom_node.store import Ledger
from tests.unit.test_admission import _settings, image, part10


@pytest.fixture
def admission(tmp_path: Path) -> Admission:
    settings = _settings(tmp_path)
    ledger = Ledger(settings.storage.ledger_path)
    yield Admission(settings, ledger, NodeMetrics())
    ledger.close()


def _files(admission: Admission, *files: tuple[str, bytes]) -> list[StagedFile]:
    admission.staging.root.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (name, data) in enumerate(files):
        path = admission.staging.root / f"{generate_uid()}-{i}"
        path.write_bytes(data)
        out.append(StagedFile(name, path))
    return out


def _mr(study: str, modality: str = "MR") -> bytes:
    ds = image(study)
    ds.Modality = modality
    return part10(ds)


def test_an_upload_is_filed_as_one_study_and_audited(admission: Admission) -> None:
    study = generate_uid()
    files = _files(admission, ("DOE^JANE/a.dcm", _mr(study)), ("b.dcm", _mr(study)), ("DICOMDIR", b"ignored"))
    result = admit_upload(files, admission, "vic")
    assert (result.study_uid, result.stored, result.held, result.uploaded_by) == (study, 2, 0, "vic")
    ledger = admission.ledger
    assert ledger.study(study).instances == 2 and ledger.upload(study).uploaded_by == "vic"
    assert not ledger.upload(study).send
    [event] = ledger.events(study)
    assert event.kind is EventKind.UPLOADED and event.actor == "vic" and "DOE" not in event.detail
    assert event.detail.startswith("2 instances (") and event.detail.endswith("uploaded by vic")
    assert len(list(admission.spool.rglob("*.dcm"))) == 2
    assert admission.metrics.instances_received.labels("upload")._value.get() == 2


@pytest.mark.parametrize("bad", ["truncated", "other study", "not dicom", "not MR", "bad UID"])
def test_a_refused_upload_of_a_new_study_records_nothing(admission: Admission, bad: str) -> None:
    study = generate_uid()
    good = _mr(study)
    wrong = {"truncated": good[:-100], "other study": _mr(generate_uid()), "not dicom": b"hello",
             "not MR": None, "bad UID": None}[bad]
    files = [("a.dcm", good), ("b.dcm", good)]
    if bad == "not MR":
        files = [("a.dcm", _mr(study, "CT"))]
    elif bad == "bad UID":
        ds = image(study)
        ds.SeriesInstanceUID = "1.2.03"
        files.append(("c.dcm", part10(ds)))
    else:
        files.append(("c.dcm", wrong))
    with pytest.raises(UploadError) as refused:
        admit_upload(_files(admission, *files), admission, "vic")
    assert refused.value.kind in {UploadProblem.NOT_ACCEPTED, UploadProblem.MORE_THAN_ONE_STUDY,
                                  UploadProblem.WRONG_FORMAT, UploadProblem.NOT_MR}
    ledger = admission.ledger
    assert ledger.study(study) is None and ledger.upload(study) is None and ledger.events() == []
    assert not list(admission.spool.rglob("*.dcm"))


def test_messages_say_what_is_wrong(admission: Admission) -> None:
    study = generate_uid()
    cases = [([("notes.txt", b"hello")], "Wrong format: notes.txt is not a DICOM file; expected DICOM files"),
             ([("a.dcm", _mr(study)), ("b.dcm", _mr(generate_uid()))], "More than one study"),
             ([("a.dcm", _mr(study, "CT"))], "Not an MR study: the files are of modality CT"),
             ([("a.dcm", _mr(study)[:-100])], "Not accepted: a.dcm: truncated dataset"),
             ([], "Nothing chosen")]
    for files, message in cases:
        with pytest.raises(UploadError, match=f"^{message}"):
            admit_upload(_files(admission, *files), admission, "vic")


def test_a_study_from_the_pacs_is_not_taken_through_the_upload(admission: Admission) -> None:
    study = generate_uid()
    admission.ledger.record_instance(generate_uid(), study, generate_uid(), "1.2.840.10008.5.1.4.1.1.4",
                                     Path("x.dcm"), "PACS")
    with pytest.raises(UploadError) as refused:
        admit_upload(_files(admission, ("a.dcm", _mr(study))), admission, "vic")
    assert refused.value.kind is UploadProblem.FROM_PACS and "came from the PACS" in str(refused.value)


def test_images_added_to_a_sent_upload_stop_the_send_and_keep_the_first_uploader(admission: Admission) -> None:
    study = generate_uid()
    first = _mr(study)
    admit_upload(_files(admission, ("a.dcm", first)), admission, "ada")
    ledger = admission.ledger
    assert ledger.set_upload_send(study, True)  # an administrator sent it to the PACS
    again = admit_upload(_files(admission, ("a.dcm", first)), admission, "vic")  # the same file: nothing changes
    assert (again.stored, again.held, again.send_stopped) == (0, 1, False) and ledger.upload(study).send
    added = admit_upload(_files(admission, ("a.dcm", first), ("b.dcm", _mr(study))), admission, "vic")
    assert (added.stored, added.held, added.uploaded_by, added.send_stopped) == (1, 1, "ada", True)
    upload = ledger.upload(study)
    assert upload.uploaded_by == "ada" and not upload.send
    event = ledger.events(study)[-1]
    assert event.kind is EventKind.UPLOADED and event.actor == "vic"
    assert "added by vic to the study uploaded by ada" in event.detail and "no longer sent to the PACS" in event.detail
    assert event.data["added"] and event.data["send_stopped"]

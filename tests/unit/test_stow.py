"""STOW-RS on the app itself (Starlette's TestClient, the real admission, ledger and spool, a small
double of the node): who may store (a sender, an admin; not a viewer, not anonymous; a sender sees
no page), the statuses (200, 202, 409, 400, 413, 415) and the Store Instances Response in DICOM
JSON, the study of the URL, hostile UIDs, and the request body read as it arrives."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from starlette.testclient import TestClient

from dicom_node.config import load_settings
from dicom_node.dicomweb import STUDY_MISMATCH, RelatedLimits, StowError, boundary_of
from dicom_node.dicomweb.related import RelatedReader
from dicom_node.ingest import Staging, StoreStatus
from dicom_node.states import EventKind
from dicom_node.store.ledger import Ledger
from dicom_node.web.accounts import Role, add_account
from dicom_node.web.app import WebContext, build_app
from dicom_node.web.security import AccountsFile
from tests.support.stow import BOUNDARY, CONTENT_TYPE, headers, related, streamed
from tests.support.uploads import signin_token
from tests.unit.test_web_app import FakeNode

SENDER, ADMIN, VIEWER = ("pacs", "pacs-password"), ("ada", "ada-password"), ("vic", "vic-password")


def _site(tmp_path: Path, **env: str) -> tuple[TestClient, FakeNode, Ledger]:
    accounts = tmp_path / "accounts.yaml"
    for (name, password), role in ((SENDER, Role.SENDER), (ADMIN, Role.ADMIN), (VIEWER, Role.VIEWER)):
        add_account(accounts, name, role, password)
    settings = load_settings(environ={"LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
                                      "LUMBAR_NODE__STORAGE__LEDGER_PATH": str(tmp_path / "ledger.sqlite"),
                                      "LUMBAR_NODE__STORAGE__FSYNC": "false",
                                      "LUMBAR_NODE__STORAGE__MIN_FREE_DISK_MB": "1",
                                      "LUMBAR_NODE__WEB__ACCOUNTS_FILE": str(accounts), **env})
    ledger = Ledger(settings.storage.ledger_path)
    node = FakeNode()
    client = TestClient(build_app(WebContext(settings, ledger, node, AccountsFile(accounts))), follow_redirects=False)
    return client, node, ledger


@pytest.fixture
def site(tmp_path: Path) -> tuple[TestClient, FakeNode, Ledger]:
    client, node, ledger = _site(tmp_path)
    yield client, node, ledger
    ledger.close()


def instance(study: str, series: str | None = None, sop: str | None = None) -> bytes:
    """A small MR image as a PS3.10 file."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop or generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series or generate_uid(), "MR"
    ds.PatientName = "DOE^JANE"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation, ds.PixelData = "MONOCHROME2", bytes(128)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _answer(response: object) -> Dataset:
    assert response.headers["content-type"] == "application/dicom+json", response.text
    return Dataset.from_json(response.json())


def _staged(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "spool").rglob("*") if p.is_file() and ".incoming" in p.parts]


def test_who_may_store(site: tuple, tmp_path: Path) -> None:
    client, _, ledger = site
    body = related([instance(generate_uid())])
    anonymous = client.post("/dicom-web/studies", content=body, headers={"Content-Type": CONTENT_TYPE})
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic realm=")
    wrong = client.post("/dicom-web/studies", content=body, headers=headers("pacs", "nope"))
    assert wrong.status_code == 401
    viewer = client.post("/dicom-web/studies", content=body, headers=headers(*VIEWER))
    assert viewer.status_code == 403
    assert [(e.kind, e.actor) for e in ledger.events()] == [(EventKind.REFUSED, "vic"),
                                                           (EventKind.SIGN_IN_REFUSED, "pacs")]
    assert not list((tmp_path / "spool").rglob("*.dcm"))
    for account in (SENDER, ADMIN):
        assert client.post("/dicom-web/studies", content=related([instance(generate_uid())]),
                           headers=headers(*account)).status_code == 200


def test_a_sender_sees_no_page(site: tuple) -> None:
    client, _, _ = site
    refused = client.post("/signin", data={"name": SENDER[0], "password": SENDER[1], "next": "/",
                                           "csrf": signin_token(client)})
    assert refused.status_code == 401
    assert client.get("/").status_code == 303
    assert client.get("/metrics", auth=SENDER).status_code == 403  # the right password, a role without metrics
    assert client.get("/metrics", auth=VIEWER).status_code == 200


def test_stored_instances_are_admitted_recorded_and_audited(site: tuple, tmp_path: Path) -> None:
    client, node, ledger = site
    study, series = generate_uid(), generate_uid()
    files = [instance(study, series) for _ in range(3)]
    answer = client.post(f"/dicom-web/studies/{study}", content=related(files), headers=headers(*SENDER))
    assert answer.status_code == 200
    response = _answer(answer)
    assert "FailedSOPSequence" not in response
    sent = [pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID for f in files]
    assert [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence] == sent
    assert {item.ReferencedSOPClassUID for item in response.ReferencedSOPSequence} == {MRImageStorage}
    assert ledger.study(study).instances == 3
    spooled = sorted((tmp_path / "spool" / study / series).glob("*.dcm"))
    assert sorted(p.read_bytes() for p in spooled) == sorted(files)  # the bytes as sent, moved into the spool
    received = [e for e in ledger.events(study) if e.kind is EventKind.RECEIVED]
    assert len(received) == 1 and received[0].actor == SENDER[0] and "3 instances" in received[0].detail
    assert node.metrics.instances_received.labels("stow")._value.get() == 3
    assert _staged(tmp_path) == []
    again = client.post("/dicom-web/studies", content=related(files[:1]), headers=headers(*SENDER))
    assert again.status_code == 200 and ledger.study(study).instances == 3  # the same bytes again: held


def test_refused_instances_fail_each_with_its_reason(site: tuple, tmp_path: Path) -> None:
    client, _, ledger = site
    study = generate_uid()
    good, other = instance(study), instance(generate_uid())
    hostile = instance(study, series="1.2.3/../../etc", sop="9" * 70)
    answer = client.post(f"/dicom-web/studies/{study}", content=related([good, other, b"not dicom" * 20, hostile,
                                                                          good[:-40]]), headers=headers(*SENDER))
    assert answer.status_code == 202
    response = _answer(answer)
    assert [item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence] == \
        [pydicom.dcmread(io.BytesIO(good)).SOPInstanceUID]
    failed = response.FailedSOPSequence
    assert [item.FailureReason for item in failed] == [STUDY_MISMATCH, StoreStatus.CANNOT_UNDERSTAND,
                                                       StoreStatus.CANNOT_UNDERSTAND, StoreStatus.CANNOT_UNDERSTAND]
    assert failed[0].ReferencedSOPInstanceUID == pydicom.dcmread(io.BytesIO(other)).SOPInstanceUID
    assert "ReferencedSOPInstanceUID" not in failed[1]  # not DICOM: no UIDs to give
    assert "ReferencedSOPInstanceUID" not in failed[2]  # a hostile UID is never echoed back
    assert "9" * 70 not in answer.text
    assert ledger.study(study).instances == 1
    assert [p.parent.name for p in (tmp_path / "spool").rglob("*.dcm")] != ["etc"]
    none = client.post(f"/dicom-web/studies/{study}", content=related([other]), headers=headers(*SENDER))
    assert none.status_code == 409 and _answer(none).FailedSOPSequence[0].FailureReason == STUDY_MISMATCH
    assert _staged(tmp_path) == []


def test_bodies_that_are_not_a_stow_request(site: tuple, tmp_path: Path) -> None:
    client, _, _ = site
    one = related([instance(generate_uid())])
    cases = [("application/dicom", one, 415),
             ("multipart/form-data; boundary=" + BOUNDARY, one, 415),
             (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', one, 415),
             ('multipart/related; type="application/dicom"', one, 400),  # no boundary
             (CONTENT_TYPE, related([instance(generate_uid())], part_type="application/octet-stream"), 415),
             (CONTENT_TYPE, one[:-30], 400),  # no closing boundary
             (CONTENT_TYPE, f"--{BOUNDARY}--\r\n".encode(), 400),  # no part
             (CONTENT_TYPE, b"garbage without any boundary", 400)]
    for content_type, body, status in cases:
        answer = client.post("/dicom-web/studies", content=body, headers=headers(*SENDER, content_type=content_type))
        assert answer.status_code == status, (content_type, answer.text)
    bad_study = client.post("/dicom-web/studies/1.2.x", content=one, headers=headers(*SENDER))
    assert bad_study.status_code == 400
    assert not list((tmp_path / "spool").rglob("*.dcm")) and _staged(tmp_path) == []
    untyped = related([instance(generate_uid())], part_type=None)  # parts without a Content-Type: the request's
    assert client.post("/dicom-web/studies", content=untyped, headers=headers(*SENDER)).status_code == 200


def test_a_body_over_the_limit_is_refused_while_read(tmp_path: Path) -> None:
    client, _, ledger = _site(tmp_path, LUMBAR_NODE__WEB__UPLOAD_MAX_MB="1")
    try:
        declared = client.post("/dicom-web/studies", content=related([bytes(3 * 2**20)]), headers=headers(*SENDER))
        assert declared.status_code == 413
        chunked = client.post("/dicom-web/studies", content=streamed(8 * 2**20), headers=headers(*SENDER))
        assert chunked.status_code == 413 and "web.upload_max_mb" in chunked.json()["error"]
        assert _staged(tmp_path) == []
    finally:
        ledger.close()


def test_the_reader_splits_parts_as_they_arrive(tmp_path: Path) -> None:
    files = [instance(generate_uid()) for _ in range(3)]
    body = b"preamble\r\n" + related(files) + b"epilogue"
    with Staging(tmp_path).area() as area:
        reader = RelatedReader(boundary_of(CONTENT_TYPE), area, RelatedLimits(max_bytes=2**20))
        for at in range(0, len(body), 7):  # any split of the body, boundaries cut in two included
            reader.feed(body[at:at + 7])
        parts = reader.finish().parts
        assert [p.read_bytes() for p in parts] == files
    assert boundary_of('Multipart/Related; boundary="a b"; type=application/dicom') == b"a b"
    with pytest.raises(StowError) as refused:
        boundary_of("text/plain")
    assert refused.value.http_status == 415

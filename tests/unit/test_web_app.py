"""The web page's rules, on the app itself (Starlette's TestClient, a small double of the node):
anonymous visits, sign-in and its cookie, CSRF on actions, what a viewer may not do, /metrics,
/healthz, the upload's checks of what was sent, and that nothing blocking (the ledger, argon2)
runs on the event loop."""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from starlette.testclient import TestClient

from dicom_node.config import load_settings
from dicom_node.observability.metrics import NodeMetrics
from dicom_node.states import EventKind
from dicom_node.store.ledger import Ledger
from dicom_node.web import site as site_module
from dicom_node.web.accounts import Role, add_account, authenticate
from dicom_node.web.app import WebContext, build_app
from dicom_node.web.routes import auth
from dicom_node.web.security import AccountsFile
from tests.support.stow import CONTENT_TYPE as STOW_CONTENT_TYPE
from tests.support.stow import related


class FakeNode:
    """What the app asks of the node (web.NodeActions), recorded."""

    def __init__(self) -> None:
        self.metrics = NodeMetrics()
        self.graded: list[tuple[str, str]] = []
        self.released: list[str] = []

    def grade_again(self, study_uid: str, actor: str) -> bool:
        self.graded.append((study_uid, actor))
        return True

    def send_again(self, study_uid: str, actor: str) -> int:
        return 0

    def release_now(self, study_uid: str) -> None:
        self.released.append(study_uid)

    def queued(self) -> int:
        return 0


def _site(tmp_path: Path, **env: str) -> tuple[TestClient, FakeNode, Ledger]:
    accounts = tmp_path / "accounts.yaml"
    add_account(accounts, "ada", Role.ADMIN, "ada-password")
    add_account(accounts, "vic", Role.VIEWER, "vic-password")
    settings = load_settings(environ={"LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
                                      "LUMBAR_NODE__STORAGE__LEDGER_PATH": str(tmp_path / "ledger.sqlite"),
                                      "LUMBAR_NODE__STORAGE__FSYNC": "false",
                                      "LUMBAR_NODE__STORAGE__MIN_FREE_DISK_MB": "1",
                                      "LUMBAR_NODE__WEB__ACCOUNTS_FILE": str(accounts), **env})
    ledger = Ledger(settings.storage.ledger_path)
    ledger.record_instance("1.2.3.1", "1.2.3", "1.2.3.0", str(MRImageStorage), tmp_path / "x.dcm", "PACS", None)
    node = FakeNode()
    client = TestClient(build_app(WebContext(settings, ledger, node, AccountsFile(accounts))), follow_redirects=False)
    return client, node, ledger


@pytest.fixture
def site(tmp_path: Path) -> tuple[TestClient, FakeNode, Ledger]:
    client, node, ledger = _site(tmp_path)
    yield client, node, ledger
    ledger.close()


def _signin_token(client: TestClient) -> str:
    """The sign-in form's token (its cookie now in the client), as a browser gets it."""
    return re.search(r'name="csrf" value="([^"]+)"', client.get("/signin").text).group(1)


def _post_signin(client: TestClient, name: str, password: str, target: str = "/") -> httpx.Response:
    return client.post("/signin", data={"name": name, "password": password, "next": target,
                                        "csrf": _signin_token(client)})


def _sign_in(client: TestClient, name: str, password: str) -> str:
    answer = _post_signin(client, name, password)
    assert answer.status_code == 303, answer.text
    page = client.get("/")
    return re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)


def test_anonymous_goes_to_sign_in_except_healthz(site: tuple) -> None:
    client, _, _ = site
    answer = client.get("/")
    assert answer.status_code == 303 and answer.headers["location"] == "/signin?next=%2F"
    assert client.get("/studies/1.2.3").headers["location"] == "/signin?next=%2Fstudies%2F1.2.3"
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/metrics").status_code == 401
    assert client.post("/studies/1.2.3/grade-again").status_code == 401


def test_sign_in_sets_a_strict_http_only_cookie_and_is_audited(site: tuple) -> None:
    client, _, ledger = site
    refused = _post_signin(client, "ada", "nope")
    assert refused.status_code == 401 and "Wrong name or password" in refused.text
    answer = _post_signin(client, "ada", "ada-password", "//evil.example/")
    assert answer.status_code == 303 and answer.headers["location"] == "/"  # never to another site
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert [e.kind for e in ledger.events()] == [EventKind.SIGNED_IN, EventKind.SIGN_IN_REFUSED]
    assert client.get("/").status_code == 200
    assert "content-security-policy" in client.get("/").headers


def test_actions_need_the_csrf_token(site: tuple) -> None:
    client, node, _ = site
    token = _sign_in(client, "ada", "ada-password")
    assert client.post("/studies/1.2.3/grade-again").status_code == 403
    assert client.post("/studies/1.2.3/grade-again", data={"csrf": "forged"}).status_code == 403
    assert node.graded == []
    answer = client.post("/studies/1.2.3/grade-again", data={"csrf": token})
    assert answer.status_code == 303 and node.graded == [("1.2.3", "ada")]


def test_a_viewer_cannot_grade_again_and_the_refusal_is_audited(site: tuple) -> None:
    client, node, ledger = site
    token = _sign_in(client, "vic", "vic-password")
    page = client.get("/studies/1.2.3")
    assert page.status_code == 200 and re.search(r'id="grade-again" disabled', page.text)
    answer = client.post("/studies/1.2.3/grade-again", data={"csrf": token})
    assert answer.status_code == 403 and "Only an administrator" in answer.text
    assert node.graded == []
    assert [(e.kind, e.actor) for e in ledger.events("1.2.3")] == [(EventKind.REFUSED, "vic")]


def test_metrics_with_basic_authentication(site: tuple) -> None:
    client, node, _ = site
    node.metrics.graded.inc()
    assert client.get("/metrics", auth=("ada", "wrong")).status_code == 401
    answer = client.get("/metrics", auth=("vic", "vic-password"))
    assert answer.status_code == 200 and "lumbar_node_studies_graded_total 1.0" in answer.text


def test_unknown_study_is_not_found(site: tuple) -> None:
    client, _, _ = site
    _sign_in(client, "ada", "ada-password")
    assert client.get("/studies/9.9.9").status_code == 404
    assert client.get("/studies/not-a-uid").status_code == 404


def _dicom(study: str, modality: str = "MR") -> bytes:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, generate_uid(), modality
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


def _zipped(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def test_upload_checks(site: tuple, tmp_path: Path) -> None:
    client, node, ledger = site
    token = _sign_in(client, "vic", "vic-password")
    study = generate_uid()

    def post(*files: tuple[str, bytes], headers: dict | None = None, data: dict | None = None) -> object:
        return client.post("/upload", data={"csrf": token} if data is None else data, headers=headers,
                           files=[("files", f) for f in files])

    cases = [((("notes.txt", b"hello"),), 400, r"^Wrong format: notes.txt is not a DICOM file; expected DICOM files"),
             ((("s.zip", _zipped({"in/notes.txt": b"x"})),), 400, r"^Wrong format: s.zip:in/notes.txt is not a DICOM"),
             ((("a.dcm", _dicom(study)), ("b.dcm", _dicom(generate_uid()))), 400, "^More than one study"),
             ((("a.dcm", _dicom(study, "CT")),), 400, "^Not an MR study: the files are of modality CT"),
             ((("a.dcm", _dicom(study)[:-60]),), 400, "^Not accepted: a.dcm: truncated dataset"),
             ((), 400, "^Nothing chosen")]
    for files, status, message in cases:
        answer = post(*files)
        assert answer.status_code == status and re.match(message, answer.json()["error"]), answer.text
    assert ledger.study(study) is None and ledger.upload(study) is None  # nothing recorded for a refused upload
    assert not list((tmp_path / "spool").rglob("*.dcm")) and list((tmp_path / "spool" / ".incoming").iterdir()) == []
    forged = post(("a.dcm", _dicom(study)), data={"csrf": "forged"})
    assert forged.status_code == 403 and forged.json()["error"].startswith("Refused: the form was out of date")
    zipped = _zipped({"x/c.dcm": _dicom(study), "x/.DS_Store": b"", "DICOMDIR": b"ignored"})
    answer = post(("a.dcm", _dicom(study)), ("b.zip", zipped), headers={"X-CSRF-Token": token}, data={})
    assert answer.status_code == 200, answer.text
    assert ledger.study(study).instances == 2 and node.released == [study]


def test_an_upload_over_the_limit_is_refused_while_read(tmp_path: Path) -> None:
    client, _, ledger = _site(tmp_path, LUMBAR_NODE__WEB__UPLOAD_MAX_MB="0.01")  # about 10 kB
    try:
        token = _sign_in(client, "vic", "vic-password")
        study = generate_uid()
        big = _dicom(study) + bytes(20000)
        answer = client.post("/upload", data={"csrf": token}, files=[("files", ("a.dcm", big))])
        assert answer.status_code == 413 and answer.json()["error"].startswith("Too large: the upload is over")

        def chunked() -> object:  # no Content-Length
            yield (f"--b\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{token}\r\n"
                   "--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.dcm\"\r\n\r\n").encode()
            for _ in range(100):
                yield bytes(1024)
            yield b"\r\n--b--\r\n"

        answer = client.post("/upload", content=chunked(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert answer.status_code == 413
        assert ledger.study(study) is None and not list((tmp_path / "spool").rglob("*.dcm"))
    finally:
        ledger.close()


def test_a_viewer_adding_images_to_a_sent_upload_sends_nothing(site: tuple) -> None:
    client, _, ledger = site
    study = generate_uid()
    token = _sign_in(client, "ada", "ada-password")
    assert client.post("/upload", data={"csrf": token}, files=[("files", ("a.dcm", _dicom(study)))]).status_code == 200
    client.post(f"/studies/{study}/send-again", data={"csrf": token})  # the administrator sends it to the PACS
    assert ledger.upload(study).send
    token = _sign_in(client, "vic", "vic-password")
    assert client.post("/upload", data={"csrf": token}, files=[("files", ("b.dcm", _dicom(study)))]).status_code == 200
    upload = ledger.upload(study)
    assert upload.uploaded_by == "ada" and not upload.send
    event = ledger.events(study)[-1]
    assert event.actor == "vic" and "added by vic to the study uploaded by ada" in event.detail


def test_upload_through_the_app_is_recorded_and_released(site: tuple, tmp_path: Path) -> None:
    client, node, ledger = site
    token = _sign_in(client, "vic", "vic-password")
    study = generate_uid()
    answer = client.post("/upload", data={"csrf": token}, files=[("files", ("a.dcm", _dicom(study))),
                                                                 ("files", ("b.dcm", _dicom(study)))])
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"study_uid": study, "url": f"/upload/{study}"}
    assert node.released == [study] and ledger.upload(study).uploaded_by == "vic"
    assert ledger.study(study).instances == 2
    assert [e.kind for e in ledger.events(study)] == [EventKind.UPLOADED]
    refused = client.post("/upload", data={"csrf": token}, files=[("files", ("n.txt", b"text"))])
    assert refused.status_code == 400 and refused.json()["error"].startswith("Wrong format: n.txt")
    assert client.post("/upload", files=[("files", ("a.dcm", _dicom(study)))]).status_code == 403  # no CSRF token
    from_pacs = client.post("/upload", data={"csrf": token}, files=[("files", ("a.dcm", _dicom("1.2.3")))])
    assert from_pacs.status_code == 400 and "came from the PACS" in from_pacs.json()["error"]


# -- nothing blocking on the event loop ------------------------------------------------------------


class LoopWatch:
    """Records each watched call, and those made on the event loop's thread (a running loop there)."""

    def __init__(self) -> None:
        self.calls: set[str] = set()
        self.on_loop: set[str] = set()

    def check(self, name: str) -> None:
        self.calls.add(name)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # a worker thread: fine
        self.on_loop.add(name)

    def wrap(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            self.check(name)
            return call(*args, **kwargs)
        return watched


class WatchedLedger:
    """The real ledger, every method call watched."""

    def __init__(self, ledger: Ledger, watch: LoopWatch) -> None:
        self._ledger, self._watch = ledger, watch

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ledger, name)
        return self._watch.wrap(f"ledger.{name}", attr) if callable(attr) else attr


class WatchedNode(FakeNode):
    """The node's actions that touch the ledger in the real node, watched."""

    def __init__(self, watch: LoopWatch) -> None:
        super().__init__()
        # the methods wrapped on the instance, so that the watch sees where they run
        self.grade_again = watch.wrap("node.grade_again", self.grade_again)  # type: ignore[method-assign]  # see above
        self.send_again = watch.wrap("node.send_again", self.send_again)  # type: ignore[method-assign]  # see above


def test_the_ledger_and_argon2_are_never_called_on_the_event_loop(site: tuple, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    client, _, ledger = site
    watch = LoopWatch()
    for module in (auth, site_module):  # the sign-in form's check, and HTTP Basic's (/metrics, STOW-RS)
        monkeypatch.setattr(module, "authenticate", watch.wrap("authenticate", authenticate))
    ctx = WebContext(load_settings(environ={"LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
                                            "LUMBAR_NODE__STORAGE__FSYNC": "false"}),
                     WatchedLedger(ledger, watch), WatchedNode(watch), AccountsFile(tmp_path / "accounts.yaml"))
    client = TestClient(build_app(ctx), follow_redirects=False)
    assert _post_signin(client, "ada", "nope").status_code == 401
    token = _sign_in(client, "ada", "ada-password")
    for path in ("/", "/studies/1.2.3", "/upload/1.2.3", "/studies/1.2.3/status", "/studies/1.2.3/files/sr.dcm",
                 "/studies/1.2.3/heatmaps/0.png", "/healthz"):
        assert client.get(path).status_code in (200, 404), path
    assert client.get("/metrics", auth=("vic", "vic-password")).status_code == 200
    assert client.post("/studies/1.2.3/grade-again", data={"csrf": token}).status_code == 303
    assert client.post("/studies/1.2.3/send-again", data={"csrf": token}).status_code == 409  # nothing to send
    study = generate_uid()
    assert client.post("/upload", data={"csrf": token}, files=[("files", ("a.dcm", _dicom(study)))]).status_code == 200
    stow = client.post("/dicom-web/studies", auth=("ada", "ada-password"), content=related([_dicom(generate_uid())]),
                       headers={"Content-Type": STOW_CONTENT_TYPE})
    assert stow.status_code == 200, stow.text
    assert client.post("/signout", data={"csrf": token}).status_code == 303
    viewer = _sign_in(client, "vic", "vic-password")
    assert client.post("/studies/1.2.3/grade-again", data={"csrf": viewer}).status_code == 403  # refused: audited
    expected = {"authenticate", "node.grade_again", "node.send_again", "ledger.dashboard", "ledger.state_counts",
                "ledger.study", "ledger.series_counts", "ledger.last_report", "ledger.events", "ledger.add_event",
                "ledger.record_instances", "ledger.upload"}
    assert expected <= watch.calls, expected - watch.calls  # the watch saw them all...
    assert watch.on_loop == set()  # ...and none on the event loop


def test_healthz_answers_while_a_sign_in_hashes_its_password(site: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2 takes a while: while one sign-in is being checked, the node still answers."""
    client, _, _ = site
    hashing, done = threading.Event(), threading.Event()

    def slow_authenticate(*args: Any) -> Any:
        hashing.set()
        done.wait(10)  # held until /healthz answered (on the event loop this would block it for 10 s)
        return authenticate(*args)

    monkeypatch.setattr(auth, "authenticate", slow_authenticate)

    async def scenario() -> tuple[float, bool, int]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as http:
            form = await http.get("/signin")
            token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
            signin = asyncio.create_task(http.post("/signin", data={"name": "ada", "password": "ada-password",
                                                                    "csrf": token}))
            while not hashing.is_set():
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            health = await http.get("/healthz")
            took, pending = time.perf_counter() - started, not signin.done()
            assert health.json() == {"status": "ok"}
            done.set()
            return took, pending, (await signin).status_code

    took, pending, signed_in = asyncio.run(scenario())
    assert pending and took < 5 and signed_in == 303


def test_sign_out_ends_the_session_on_the_server(site: tuple) -> None:
    client, node, _ = site
    token = _sign_in(client, "ada", "ada-password")
    saved = dict(client.cookies)
    assert client.post("/signout", data={"csrf": token}).status_code == 303
    client.cookies.clear()
    client.cookies.update(saved)  # the cookie replayed
    assert client.get("/").status_code == 303
    assert client.post("/studies/1.2.3/grade-again", data={"csrf": token}).status_code == 401
    assert node.graded == []


def test_the_sign_in_form_needs_its_own_token(site: tuple) -> None:
    client, _, ledger = site
    assert client.post("/signin", data={"name": "ada", "password": "ada-password"}).status_code == 403
    token = _signin_token(client)
    assert client.post("/signin", data={"name": "ada", "password": "ada-password", "csrf": "forged"}).status_code == 403
    other = client.post("/signin", data={"name": "ada", "password": "ada-password", "csrf": token},
                        headers={"Sec-Fetch-Site": "cross-site"})
    assert other.status_code == 403 and "another site" in other.text
    assert [e.kind for e in ledger.events()] == []  # not even checked
    assert client.post("/signin", data={"name": "ada", "password": "ada-password", "csrf": token}).status_code == 303


def test_failed_sign_ins_are_throttled_then_the_right_password_works(tmp_path: Path) -> None:
    client, _, ledger = _site(tmp_path, LUMBAR_NODE__WEB__SIGNIN_FREE_ATTEMPTS="2",
                              LUMBAR_NODE__WEB__SIGNIN_WAIT_S="0.3", LUMBAR_NODE__WEB__SIGNIN_WAIT_MAX_S="0.6")
    try:
        statuses = [_post_signin(client, "ada", "wrong").status_code for _ in range(5)]
        assert statuses == [401, 401, 429, 429, 429]
        answer = _post_signin(client, "ada", "ada-password")
        assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
        assert client.get("/metrics", auth=("ada", "ada-password")).status_code == 429  # the same throttle
        time.sleep(0.35)
        assert _post_signin(client, "ada", "ada-password").status_code == 303
        kinds = [e.kind for e in ledger.events()]
        assert kinds.count(EventKind.SIGN_IN_THROTTLED) == 1 and kinds.count(EventKind.SIGN_IN_REFUSED) == 2
    finally:
        ledger.close()


def test_no_page_is_cached_and_page_numbers_are_range_checked(site: tuple) -> None:
    client, _, _ = site
    _sign_in(client, "ada", "ada-password")
    for path in ("/", "/studies/1.2.3", "/studies/1.2.3/heatmaps/0.png", "/signin", "/healthz", "/accounts"):
        assert client.get(path).headers["cache-control"] == "no-store", path
    assert client.get("/static/style.css").headers.get("cache-control") is None
    for asked in ("99999999999999999999999", "1000000000", "2"):
        answer = client.get(f"/?page={asked}")
        assert answer.status_code == 200 and "page 1 of 1" in answer.text, asked
    for asked in ("-1", "abc", "1e5", "٣"):
        assert client.get("/", params={"page": asked}).status_code == 400, asked


def test_only_an_administrator_sees_and_ends_sessions(site: tuple) -> None:
    client, _, ledger = site
    viewer = TestClient(client.app, follow_redirects=False)
    _sign_in(viewer, "vic", "vic-password")
    assert viewer.get("/accounts").status_code == 403
    token = _sign_in(client, "ada", "ada-password")
    page = client.get("/accounts").text
    (vic_session,) = re.findall(r'data-account="vic" data-session="([^"]+)"', page)
    assert client.post(f"/accounts/vic/sessions/{vic_session}/end", data={"csrf": token}).status_code == 303
    assert viewer.get("/").status_code == 303  # ended at once
    assert next(e.kind for e in ledger.events()) == EventKind.SESSIONS_ENDED

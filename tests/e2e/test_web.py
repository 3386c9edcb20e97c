"""The node's web page in a real browser (Debian's headless Chromium, driven by Playwright) against
`lumbar-node serve` as a process, with a real Orthanc as the PACS: sign-in, the dashboard while a
phantom study flows through Orthanc and the node, the study page, the seven upload cases, a
refused action for a read-only user, /metrics parsed before and after, no patient name in the log.

Screenshots go to <pytest's base temp>/web-shots (the path is printed); a person looks at them.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from demo.orthanc import Orthanc, free_port, running_orthanc, storescu
from tests.support.browser import Shots, chromium, require_chromium
from tests.support.served_node import NODE_AET, ServedNode, stop_all, wait_for
from tests.support.tools import normal_study

if TYPE_CHECKING:  # playwright is imported by tests.support.browser when a test runs (skipped without it)
    from playwright.sync_api import Browser, Page

ADMIN, ADMIN_PASSWORD = "ada", "ada-password-1"
VIEWER, VIEWER_PASSWORD = "vic", "vic-password-1"
FINISHED = ("done", "failed", "skipped")
HEATMAPS_LOADED = "() => [...document.querySelectorAll('#heatmaps img')].every(i => i.complete && i.naturalWidth > 0)"


def _complete_studies(phantom_dir: Path) -> list[list[Path]]:
    """The phantom studies with Sagittal T1, Sagittal T2/STIR and Axial T2, each as its files."""
    out = []
    for folder in sorted((phantom_dir / "train_images").iterdir()):
        series = {pydicom.dcmread(next(s.glob("*.dcm")), stop_before_pixels=True).SeriesDescription: s
                  for s in folder.iterdir()}
        if {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"} <= set(series):
            out.append(sorted(folder.rglob("*.dcm")))
    return out


def _series_of(files: list[Path], description: str) -> list[Path]:
    return [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SeriesDescription == description]


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _relabelled(files: list[Path], out: Path, body_part: str) -> list[Path]:
    """A copy of ``files`` as a new study (new UIDs) whose BodyPartExamined is ``body_part``."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), {}
    written = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.BodyPartExamined = body_part
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path)
        written.append(path)
    return written


def _zip(files: list[Path], path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for f in files:
            archive.write(f, f"study/{f.parent.name}/{f.name}")
    return path


def _metrics(node: ServedNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client's parser: {(sample name, labels): value}."""
    text = httpx.get(f"{node.web_url}/metrics", auth=(ADMIN, ADMIN_PASSWORD), timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


class Site:
    """The node, its PACS and what the tests share."""

    def __init__(self, node: ServedNode, pacs: Orthanc, shots: Shots, studies: list[list[Path]], work: Path):
        self.node, self.pacs, self.shots, self.studies, self.work = node, pacs, shots, studies, work


@pytest.fixture(scope="module")
def site(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_chromium()
    work = tmp_path_factory.mktemp("web")
    shots = Shots(tmp_path_factory.getbasetemp() / "web-shots")
    print(f"\nscreenshots: {shots.folder}")
    pacs_port = free_port()
    node = ServedNode(work / "node", pacs_port, quiet_time_s=3)
    node.add_user(ADMIN, "admin", ADMIN_PASSWORD)
    node.add_user(VIEWER, "viewer", VIEWER_PASSWORD)
    with running_orthanc(work / "pacs", peers={"lumbar": (NODE_AET, node.port)}, route_to="lumbar",
                         dicom_port=pacs_port) as pacs:
        node.start()
        try:
            yield Site(node, pacs, shots, _complete_studies(phantom_dir), work)
        finally:
            stop_all()


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Browser]:
    with chromium() as b:
        yield b


def _signed_in(browser: Browser, site: Site, name: str, password: str) -> Page:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(f"{site.node.web_url}/")
    assert "/signin" in page.url, "an anonymous visit goes to the sign-in page"
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site.node.web_url}/")
    return page


def _upload(page: Page) -> None:
    """Press Upload and wait for the result page (failing with the page's message if refused)."""
    page.click("#upload")
    page.wait_for_function("() => location.pathname.startsWith('/upload/') "
                           "|| !document.getElementById('upload-error').hidden", timeout=60000)
    assert "/upload/" in page.url, page.inner_text("#upload-error")


def test_anonymous_gets_sign_in_healthz_and_no_metrics(site: Site, browser: Browser) -> None:
    url = site.node.web_url
    answer = httpx.get(f"{url}/", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"].startswith("/signin")
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{url}/metrics").status_code == 401  # web.metrics_anonymous is false
    assert httpx.get(f"{url}/metrics", auth=(ADMIN, "wrong-password")).status_code == 401
    page = browser.new_page()
    page.goto(f"{url}/studies/1.2.3")
    assert "/signin" in page.url
    page.fill("input[name=name]", ADMIN)
    page.fill("input[name=password]", "not-the-password")
    page.click("button[type=submit]")
    assert "Wrong name or password" in page.inner_text("#error")
    site.shots.take(page, "signin-refused")
    page.close()


def test_dashboard_and_study_page_as_a_study_flows_through_orthanc(site: Site, browser: Browser) -> None:
    node, files = site.node, site.studies[0]
    study_uid = _study_uid(files)
    before = _metrics(node)
    page = _signed_in(browser, site, ADMIN, ADMIN_PASSWORD)
    site.shots.take(page, "dashboard-empty")
    sent = storescu(files, site.pacs.dicom_port, calling="MODALITY")
    assert sent.returncode == 0, sent.stderr[-1000:]
    wait_for("the node to receive the study", lambda: node.study(study_uid), 60)
    page.goto(f"{node.web_url}/")
    assert study_uid in page.inner_text("#studies")
    site.shots.take(page, "dashboard-in-flight")
    done = node.wait_state(study_uid, FINISHED, 120)
    assert done.state == "done", done.reason

    page.goto(f"{node.web_url}/?q={study_uid[-12:]}")
    row = page.inner_text("#studies")
    assert study_uid in row and "done" in row and "Sagittal T1" in row and "Axial T2" in row
    site.shots.take(page, "dashboard-done")

    page.click(f"a[href='/studies/{study_uid}']")
    page.wait_for_selector("#grades")
    timeline = page.inner_text("#timeline")
    for kind in ("instances received", "released", "graded", "delivered"):
        assert kind in timeline, f"{kind!r} missing from the timeline:\n{timeline}"
    assert "from ORTHANC" in timeline, "the instance batch names its sender"
    assert len(page.query_selector_all("#grades tbody td")) == 25
    patient = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(patient.PatientName) in page.inner_text("#patient"), "a signed-in user sees the patient's name"
    images = page.query_selector_all("#heatmaps img")
    assert images, "no Grad-CAM heatmaps"
    page.wait_for_function(HEATMAPS_LOADED)
    site.shots.take(page, "study-page")
    for path in (images[0].get_attribute("src"), f"/studies/{study_uid}/files/result.json",
                 f"/studies/{study_uid}/files/sr.dcm", f"/studies/{study_uid}"):  # patient data: never cached
        answer = page.context.request.get(f"{node.web_url}{path}")
        assert answer.ok and answer.headers.get("cache-control") == "no-store", (path, answer.headers)

    after = _metrics(node)
    assert _value(after, "lumbar_node_instances_received_total", source="dicom") >= \
        _value(before, "lumbar_node_instances_received_total", source="dicom") + len(files)
    assert _value(after, "lumbar_node_cstore_responses_total", status="0x0000") >= \
        _value(before, "lumbar_node_cstore_responses_total", status="0x0000") + len(files)
    assert _value(after, "lumbar_node_studies_graded_total") == _value(before, "lumbar_node_studies_graded_total") + 1
    assert _value(after, "lumbar_node_deliveries_total", destination="pacs") == \
        _value(before, "lumbar_node_deliveries_total", destination="pacs") + 1
    assert _value(after, "lumbar_node_end_to_end_seconds_count") == \
        _value(before, "lumbar_node_end_to_end_seconds_count") + 1
    assert _value(after, "lumbar_node_grading_seconds_count") > _value(before, "lumbar_node_grading_seconds_count")
    assert _value(after, "lumbar_node_studies", state="done") >= 1
    assert _value(after, "lumbar_node_associations_total", result="accepted", reason="") > 0
    assert _value(after, "lumbar_node_spool_free_bytes") > 0
    page.context.close()


def test_read_only_user_cannot_grade_again(site: Site, browser: Browser) -> None:
    node = site.node
    study_uid = _study_uid(site.studies[0])
    node.wait_state(study_uid, ("done",), 120)
    page = _signed_in(browser, site, VIEWER, VIEWER_PASSWORD)
    page.goto(f"{node.web_url}/studies/{study_uid}")
    assert page.is_disabled("#grade-again"), "the button is not offered to a viewer"
    site.shots.take(page, "study-page-viewer")
    # the request the button would make, forged with the viewer's own session and CSRF token
    status = page.evaluate("""async (uid) => {
        const token = document.querySelector('meta[name=csrf-token]').content;
        const body = new URLSearchParams({csrf: token});
        const r = await fetch('/studies/' + uid + '/grade-again', {method: 'POST', body});
        return r.status; }""", study_uid)
    assert status == 403
    ledger = node.ledger()
    try:
        events = ledger.events(study_uid)
        assert any(e.kind == "action refused" and e.actor == VIEWER for e in events)
        assert not any(e.kind == "grade again" for e in events)
        assert ledger.study(study_uid).state == "done"
        signins = [e for e in ledger.events() if e.kind == "signed in"]
        assert {ADMIN, VIEWER} <= {e.actor for e in signins}, "sign-ins are in the audit trail"
    finally:
        ledger.close()
    # without the CSRF token, even an administrator's action is refused
    admin = _signed_in(browser, site, ADMIN, ADMIN_PASSWORD)
    assert admin.evaluate("async (uid) => (await fetch('/studies/' + uid + '/grade-again', {method: 'POST'})).status",
                          study_uid) == 403
    page.context.close()
    admin.context.close()


def test_upload_cases(site: Site, browser: Browser) -> None:
    """The seven upload cases: (4) Upload disabled until something is chosen; (1) a wrong file type
    says "Wrong format: ..." naming what was expected; (2) DICOM files, or a zip, enable Upload;
    (5) a study with findings shows them with probabilities; (7) Save result downloads the JSON,
    the PDF and the SR; (6) Back returns to the first screen; (3) a study with no finding above
    Normal/Mild says so. Also: an incomplete study and a non-lumbar one get a plain message, and
    an upload is not sent to the PACS."""
    node, shots, work = site.node, site.shots, site.work
    page = _signed_in(browser, site, VIEWER, VIEWER_PASSWORD)
    page.goto(f"{node.web_url}/upload")
    # (4)
    assert page.is_disabled("#upload")
    shots.take(page, "upload-first-screen")
    # (1)
    notes = work / "notes.txt"
    notes.write_text("not an image\n")
    page.set_input_files("#files", [str(notes)])
    page.wait_for_selector("#upload-error:not([hidden])")
    message = page.inner_text("#upload-error")
    assert message.startswith("Wrong format: notes.txt") and "expected DICOM files" in message, message
    assert page.is_disabled("#upload")
    shots.take(page, "upload-wrong-format")
    # (2) DICOM files, then a zip of them
    findings = site.studies[1]
    page.set_input_files("#files", [str(f) for f in findings])
    page.wait_for_function("() => !document.getElementById('upload').disabled")
    assert f"{len(findings)} DICOM files chosen" in page.inner_text("#chosen")
    assert page.is_hidden("#upload-error")
    archive = _zip(findings, work / "study.zip")
    page.set_input_files("#files", [str(archive)])
    page.wait_for_function("() => !document.getElementById('upload').disabled")
    assert "1 zip chosen" in page.inner_text("#chosen")
    shots.take(page, "upload-zip-chosen")
    # (5) a study with findings
    _upload(page)
    page.wait_for_selector("#findings", timeout=120000)
    table = page.inner_text("#findings")
    assert re.search(r"(Moderate|Severe)\s+\d+%\s+\d+%\s+\d+%", table), table
    page.wait_for_function(HEATMAPS_LOADED)
    shots.take(page, "upload-result-findings")
    uploaded_uid = _study_uid(findings)
    # (7) Save result
    with page.expect_download() as download:
        page.click("text=Save result (JSON)")
    saved = json.loads(Path(download.value.path()).read_text())
    assert saved["study_uid"] == uploaded_uid and len(saved["labels"]) == 25
    with page.expect_download() as download:
        page.click("text=Save PDF summary")
    assert Path(download.value.path()).read_bytes().startswith(b"%PDF")
    with page.expect_download() as download:
        page.click("text=Save DICOM SR")
    sr = pydicom.dcmread(download.value.path())
    assert sr.Modality == "SR" and sr.StudyInstanceUID == uploaded_uid
    # not sent to the PACS (the user did not ask)
    assert not any(s["MainDicomTags"]["Modality"] == "SR" for s in site.pacs.study_series(uploaded_uid))
    ledger = node.ledger()
    try:
        assert ledger.upload(uploaded_uid) is not None and ledger.deliveries(uploaded_uid) == []
    finally:
        ledger.close()
    # (6) Back
    page.click("#back")
    page.wait_for_url(f"{node.web_url}/upload")
    assert page.is_disabled("#upload") and page.inner_text("#chosen") == "Nothing chosen."
    # (3) no finding above Normal/Mild: a folder of DICOM files
    normal = normal_study(work / "normal")
    page.set_input_files("#folder", str(normal[0].parent.parent))
    page.wait_for_function("() => !document.getElementById('upload').disabled")
    _upload(page)
    verdict = page.wait_for_selector("#verdict, #findings", timeout=120000)
    assert verdict.get_attribute("id") == "verdict", page.inner_text("#summary")
    assert "No finding above Normal/Mild" in page.inner_text("#verdict")
    shots.take(page, "upload-result-normal")
    # an incomplete study: its Sagittal T2/STIR series only
    page.goto(f"{node.web_url}/upload")
    page.set_input_files("#files", [str(f) for f in _series_of(site.studies[2], "Sagittal T2/STIR")])
    page.wait_for_function("() => !document.getElementById('upload').disabled")
    _upload(page)
    page.wait_for_selector("#incomplete", timeout=120000)
    assert "no Sagittal T1, Axial T2 series found" in page.inner_text("#incomplete")
    assert "no Sagittal T1 series in the study" in page.inner_text("#not-assessed")
    shots.take(page, "upload-result-incomplete")
    # a study that is not a lumbar spine: graded never, the reason said plainly
    head = _relabelled(_series_of(site.studies[2], "Sagittal T1"), work / "head", "HEAD")
    page.goto(f"{node.web_url}/upload")
    page.set_input_files("#files", [str(f) for f in head])
    page.wait_for_function("() => !document.getElementById('upload').disabled")
    _upload(page)
    page.wait_for_selector("#verdict", timeout=120000)
    assert "Not graded: not a lumbar spine study (BodyPartExamined HEAD)" in page.inner_text("#verdict")
    shots.take(page, "upload-result-not-lumbar")
    # a non-DICOM file inside a zip is refused by the node too (the page's check aside)
    bad = io.BytesIO()
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("a.dcm", b"not dicom")
    token = page.get_attribute("meta[name=csrf-token]", "content")
    answer = page.request.post(f"{node.web_url}/upload", multipart={
        "csrf": token, "files": {"name": "bad.zip", "mimeType": "application/zip", "buffer": bad.getvalue()}})
    assert answer.status == 400 and answer.json()["error"].startswith("Wrong format: bad.zip:a.dcm is not a DICOM file")
    page.goto(f"{node.web_url}/")
    shots.take(page, "dashboard-with-uploads")
    page.context.close()


def test_an_administrator_sends_an_upload_to_the_pacs(site: Site, browser: Browser) -> None:
    node = site.node
    uploaded_uid = _study_uid(site.studies[1])
    page = _signed_in(browser, site, ADMIN, ADMIN_PASSWORD)
    page.goto(f"{node.web_url}/upload/{uploaded_uid}")
    assert page.inner_text("#send-again") == "Send to the PACS"
    page.click("#send-again")
    page.wait_for_url(f"{node.web_url}/upload/{uploaded_uid}")
    wait_for("the upload's SR in Orthanc", lambda: any(
        s["MainDicomTags"]["Modality"] == "SR" for s in site.pacs.study_series(uploaded_uid)), 60)
    node.wait_state(uploaded_uid, ("done",), 60)
    page.goto(f"{node.web_url}/studies/{uploaded_uid}")
    timeline = page.inner_text("#timeline")
    assert "send again" in timeline and f"requested by {ADMIN}" in timeline and "delivered" in timeline
    site.shots.take(page, "upload-sent-timeline")
    page.context.close()


def test_a_web_port_in_use_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    import socket

    node = ServedNode(tmp_path / "node", free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", node.web_port))
        taken.listen()
        done = node.command("serve")
    assert done.returncode == 1
    assert f"cannot start the node: OSError: [Errno 98] the web page cannot listen on 127.0.0.1:{node.web_port}" \
        in done.stderr, done.stderr[-2000:]
    assert '"node stopped"' in done.stderr


def test_log_holds_no_patient_name(site: Site) -> None:
    log = site.node.log_text()
    assert '"signed in"' in log and '"study uploaded"' in log
    for files in site.studies[:3]:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        for value in (str(ds.PatientName), str(ds.PatientID)):
            assert value not in log, f"patient data {value!r} in the node's log"
    assert "PHANTOM^" not in log

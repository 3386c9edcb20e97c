"""Query/retrieve, one part at a time: the ``query_retrieve`` and ``retrieve`` settings, the C-FIND
identifiers, the ledger's record that a study was asked (once, across restarts), the reason a
missing series gets, the release asking before it grades, and the web page's fetch form."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from dicom_node.config import ConfigError, RetrieveMethod, load_settings
from dicom_node.dicom.qr import StudyQuery, series_identifier, study_identifier
from dicom_node.observability.metrics import NodeMetrics
from dicom_node.pipeline import NOT_ON_PACS, Releaser, missing_note, note_missing
from dicom_node.states import EventKind
from dicom_node.store import Ledger, PacsAnswer, PacsQuery
from dicom_node.web.accounts import Role, add_account
from dicom_node.web.app import WebContext, build_app
from dicom_node.web.routes.fetch import accession_problem
from dicom_node.web.security import AccountsFile
from inference.analyze import NotAssessedLabel, NotAssessedReason, StudyResult
from inference.labels import LABELS, SeriesRole
from tests.support.uploads import signin_token

PACS = {"name": "pacs", "ae_title": "ORTHANC", "host": "10.0.0.5", "port": 4242}


def _load(tmp_path: Path, sources: Any, **more: Any) -> Any:
    import yaml

    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump({"query_retrieve": sources, **more}))
    return load_settings(path, environ={})


# -- settings --------------------------------------------------------------------------------------


def test_sources_are_dimse_or_dicomweb_with_c_move_by_default(tmp_path: Path) -> None:
    web = {"name": "archive", "dicomweb": {"url": "https://archive.example.org/dicom-web", "token": "t0k"}}
    settings = _load(tmp_path, [PACS, {**PACS, "name": "get", "method": "c-get"}, web])
    pacs, get, archive = settings.query_retrieve
    assert pacs.method is RetrieveMethod.C_MOVE and get.method is RetrieveMethod.C_GET
    assert archive.dicomweb.url.endswith("/dicom-web") and archive.ae_title is None
    assert settings.retrieve.missing_series and settings.retrieve.wait_s == 120
    assert load_settings(environ={}).query_retrieve == []


@pytest.mark.parametrize(("source", "says"), [
    ({"name": "x", "ae_title": "ORTHANC", "host": "h"}, "needs ae_title, host and port"),
    ({**PACS, "dicomweb": {"url": "http://h/dicom-web"}}, "not both"),
    ({**PACS, "method": "c-store"}, "method"),
    ({**PACS, "ae_title": "A\\B"}, "AE title"),
    ({"name": "w", "dicomweb": {"url": "ftp://h/"}}, "url"),
    ({"name": "w", "dicomweb": {"url": "http://h/", "username": "u"}}, "username and password go together"),
    ({"name": "w", "dicomweb": {"url": "http://h/", "username": "u", "password": "p", "token": "t"}}, "not both"),
])
def test_a_source_that_cannot_be_used_is_refused_at_load(tmp_path: Path, source: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        _load(tmp_path, [source])


def test_source_names_are_unique_and_the_wait_is_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="source names must be unique"):
        _load(tmp_path, [PACS, PACS])
    with pytest.raises(ConfigError, match=re.escape("retrieve.wait_s")):
        _load(tmp_path, [PACS], retrieve={"wait_s": 0})


# -- the C-FIND identifiers ------------------------------------------------------------------------


def test_a_query_names_one_key_and_asks_for_what_the_node_reads() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StudyQuery(study_uid="1.2", accession="A1")
    with pytest.raises(ValueError, match="exactly one"):
        StudyQuery()
    query = StudyQuery(patient_id="P-7", since=date(2024, 3, 1))
    ds = study_identifier(query)
    assert ds.QueryRetrieveLevel == "STUDY" and ds.PatientID == "P-7" and ds.StudyDate == "20240301-"
    assert ds.StudyInstanceUID == "" and ds.AccessionNumber == "" and "NumberOfStudyRelatedInstances" in ds
    assert "P-7" not in query.describe()  # a patient ID is not repeated in logs or messages
    series = series_identifier("1.2.3")
    assert series.QueryRetrieveLevel == "SERIES" and series.StudyInstanceUID == "1.2.3"
    assert {"SeriesInstanceUID", "Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances"} <= set(series.dir())


# -- the ledger: asked once, across restarts -------------------------------------------------------


def test_a_study_is_asked_about_once_and_a_restart_remembers(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    assert ledger.pacs_query("1.2.3") is None
    assert ledger.ask_pacs("1.2.3") is True
    assert ledger.ask_pacs("1.2.3") is False
    assert ledger.pacs_query("1.2.3").outcome is PacsAnswer.ASKING
    ledger.close()
    ledger = Ledger(path)  # a restart
    try:
        assert ledger.ask_pacs("1.2.3") is False
        ledger.pacs_answered("1.2.3", PacsAnswer.UNREACHABLE, None, "pacs: no association")
        query = ledger.pacs_query("1.2.3")
        assert query.outcome is PacsAnswer.UNREACHABLE and query.detail == "pacs: no association"
    finally:
        ledger.close()


# -- the reason a missing series gets --------------------------------------------------------------


def _result(roles: set[SeriesRole], why: NotAssessedReason, reason: str) -> StudyResult:
    labels = tuple(NotAssessedLabel(label, why, reason) for label in LABELS)
    return StudyResult("1.2.3", labels, None, {}, dict.fromkeys(roles, ("1.2.9",)), {})  # type: ignore[arg-type]  # no model: only the reasons are read


def test_missing_series_say_they_were_not_found_on_the_pacs() -> None:
    assert missing_note(None) is None
    answered = PacsQuery("1.2.3", 0.0, PacsAnswer.RETRIEVED, "pacs", "")
    assert missing_note(answered) == NOT_ON_PACS == "not sent and not found on the PACS"
    down = answered._replace(outcome=PacsAnswer.UNREACHABLE)
    assert missing_note(down) == f"{NOT_ON_PACS} (no source could be asked)"
    noted = note_missing(_result({SeriesRole.AX_T2}, NotAssessedReason.MISSING_SERIES, "no Sagittal T1 series"),
                         NOT_ON_PACS)
    assert {r.reason for r in noted.labels} == {f"no Sagittal T1 series: {NOT_ON_PACS}"}
    no_sagittal = note_missing(_result({SeriesRole.AX_T2}, NotAssessedReason.NO_SAGITTAL, "no usable sagittal"),
                               NOT_ON_PACS)
    assert all(r.reason.endswith(NOT_ON_PACS) for r in no_sagittal.labels)
    unusable = note_missing(_result({SeriesRole.SAG_T1, SeriesRole.AX_T2}, NotAssessedReason.NO_SAGITTAL, "x"), "n")
    assert {r.reason for r in unusable.labels} == {"x"}  # a sagittal series was there: not a missing one


# -- the release asks first, once ------------------------------------------------------------------


@dataclass
class _Fetcher:
    sources: list[str] = field(default_factory=lambda: ["pacs"])
    asked: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def missing_roles(self, study_uid: str) -> set[SeriesRole]:
        return {SeriesRole.SAG_T1}

    def complete(self, study_uid: str, missing: set[SeriesRole]) -> Any:
        from dicom_node.pipeline import MissingAnswer

        self.asked.append(study_uid)
        self.done.set()
        return MissingAnswer(PacsAnswer.NOT_FOUND, None, "pacs: does not hold the study")


def _releaser(tmp_path: Path, ledger: Ledger, fetcher: _Fetcher) -> Releaser:
    release = object.__new__(Releaser)  # the release's asking only: no worker pool
    release.settings = load_settings(environ={})
    release.ledger, release.fetcher = ledger, fetcher  # type: ignore[assignment]  # a double of Fetcher
    release.asking, release._release_now = set(), {}
    return release


def test_the_release_asks_once_in_the_background_then_releases(tmp_path: Path) -> None:
    from dicom_node.states import StudyState
    from dicom_node.store import Study

    ledger = Ledger(tmp_path / "ledger.sqlite")
    fetcher = _Fetcher()
    release = _releaser(tmp_path, ledger, fetcher)
    study = Study("1.2.3", StudyState.RECEIVING, None, 26, 0.0)
    try:
        assert release._ask_first(study) is True
        assert fetcher.done.wait(10)
        for _ in range(200):
            if "1.2.3" not in release.asking:
                break
            threading.Event().wait(0.01)
        assert release._release_now == {"1.2.3": "after asking the PACS"} and release.asking == set()
        assert ledger.pacs_query("1.2.3").outcome is PacsAnswer.NOT_FOUND
        assert [e.kind for e in ledger.events("1.2.3")] == [EventKind.ASKED_PACS]
        assert release._ask_first(study) is False  # asked once: released as it is
        ledger.close()
        ledger = Ledger(tmp_path / "ledger.sqlite")  # and after a restart
        assert _releaser(tmp_path, ledger, fetcher)._ask_first(study) is False
        assert fetcher.asked == ["1.2.3"]
        release.settings = load_settings(environ={"LUMBAR_NODE__RETRIEVE__MISSING_SERIES": "false"})
        release.ledger = ledger
        assert release._ask_first(Study("1.2.4", StudyState.RECEIVING, None, 1, 0.0)) is False  # turned off
    finally:
        ledger.close()


# -- the web page's fetch form ---------------------------------------------------------------------


@dataclass
class _Job:
    id: int
    query: str
    actor: str
    started_at: float = 0.0
    state: str = "finding"
    detail: str = ""
    studies: list[Any] = field(default_factory=list)
    finished_at: float | None = None


class _FetchingNode:
    def __init__(self, sources: bool = True) -> None:
        self.metrics = NodeMetrics()
        self.jobs: list[_Job] = []
        self.sources = sources

    def grade_again(self, study_uid: str, actor: str) -> bool:
        return True

    def send_again(self, study_uid: str, actor: str) -> int:
        return 0

    def release_now(self, study_uid: str) -> None:
        pass

    def queued(self) -> int:
        return 0

    def fetch(self, accession: str, actor: str) -> _Job:
        job = _Job(len(self.jobs) + 1, f"accession number {accession}", actor)
        self.jobs.insert(0, job)
        return job

    def fetches(self) -> list[_Job]:
        return self.jobs

    def can_fetch(self) -> bool:
        return self.sources


def _client(tmp_path: Path, node: _FetchingNode) -> tuple[TestClient, Ledger]:
    accounts = tmp_path / "accounts.yaml"
    add_account(accounts, "ada", Role.ADMIN, "ada-password")
    add_account(accounts, "vic", Role.VIEWER, "vic-password")
    settings = load_settings(environ={"LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
                                      "LUMBAR_NODE__STORAGE__LEDGER_PATH": str(tmp_path / "ledger.sqlite"),
                                      "LUMBAR_NODE__WEB__ACCOUNTS_FILE": str(accounts)})
    ledger = Ledger(settings.storage.ledger_path)
    app = build_app(WebContext(settings, ledger, node, AccountsFile(accounts)))
    return TestClient(app, follow_redirects=False), ledger


def _sign_in(client: TestClient, name: str) -> str:
    assert client.post("/signin", data={"name": name, "password": f"{name}-password", "next": "/",
                                        "csrf": signin_token(client)}).status_code == 303
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get("/fetch").text).group(1)


def test_an_administrator_fetches_by_accession_number_with_the_csrf_token(tmp_path: Path) -> None:
    node = _FetchingNode()
    client, ledger = _client(tmp_path, node)
    try:
        assert client.get("/fetch").status_code == 303  # signed-in users only
        token = _sign_in(client, "ada")
        page = client.get("/fetch").text
        assert 'id="accession"' in page and "No fetch since the node started" in page
        assert client.post("/fetch", data={"accession": "A1"}).status_code == 403
        assert client.post("/fetch", data={"accession": "A1", "csrf": "forged"}).status_code == 403
        for bad in ("", "x" * 17, "A*", "A\\B", "A\x01"):
            answer = client.post("/fetch", data={"accession": bad, "csrf": token})
            assert answer.status_code == 400 and 'id="fetch-error"' in answer.text, bad
        assert node.jobs == []
        answer = client.post("/fetch", data={"accession": " ACC-42 ", "csrf": token})
        assert answer.status_code == 303 and answer.headers["location"] == "/fetch"
        assert [(j.query, j.actor) for j in node.jobs] == [("accession number ACC-42", "ada")]
        page = client.get("/fetch").text
        assert "accession number ACC-42" in page and 'http-equiv="refresh"' in page  # running: the page refreshes
    finally:
        ledger.close()


def test_a_viewer_may_look_but_not_fetch_and_the_refusal_is_audited(tmp_path: Path) -> None:
    node = _FetchingNode()
    client, ledger = _client(tmp_path, node)
    try:
        token = _sign_in(client, "vic")
        assert "disabled" in client.get("/fetch").text
        answer = client.post("/fetch", data={"accession": "ACC-42", "csrf": token})
        assert answer.status_code == 403 and node.jobs == []
        [event] = ledger.events()[:1]
        assert event.kind is EventKind.REFUSED and "fetch a study from the PACS" in (event.detail or "")
    finally:
        ledger.close()


def test_without_a_source_the_form_says_so(tmp_path: Path) -> None:
    node = _FetchingNode(sources=False)
    client, ledger = _client(tmp_path, node)
    try:
        token = _sign_in(client, "ada")
        assert 'id="no-source"' in client.get("/fetch").text
        answer = client.post("/fetch", data={"accession": "ACC-42", "csrf": token})
        assert answer.status_code == 400 and node.jobs == []
    finally:
        ledger.close()


def test_accession_numbers_are_checked() -> None:
    assert accession_problem("ACC-42") is None
    assert accession_problem("") and accession_problem("A" * 17) and accession_problem("A?")

"""The query/retrieve SCU against a real Orthanc: C-FIND at study and series level, C-MOVE into the
node's own storage SCP, C-GET and WADO-RS through the node's admission, QIDO-RS, and a source that
is down (refused at once) or silent (bounded by the timeout); DCMTK's findscu agrees with C-FIND."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
import yaml

from demo.orthanc import ORTHANC_AET, Orthanc, free_port, running_orthanc, storescu
from dicom_node.config import QueryRetrieveSource, Settings, load_settings
from dicom_node.dicom import DimseSource, SourceError, StorageSCP, StudyQuery
from dicom_node.dicomweb import DicomWebSource
from dicom_node.ingest import Admission, Candidate, Source
from dicom_node.observability import NodeMetrics
from dicom_node.pipeline import Fetcher
from dicom_node.states import EventKind
from dicom_node.store import Ledger, PacsAnswer
from inference.labels import SeriesRole
from tests.support.tools import normal_study, require_tool

NODE_AET = "LUMBAR_AI"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return normal_study(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="module")
def pacs(study: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, int]]:
    """Orthanc (DICOMweb on) holding the whole study, knowing the node (for C-MOVE) on a free port."""
    node_port = free_port()
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), peers={"lumbar": (NODE_AET, node_port)},
                         dicomweb=True) as orthanc:
        sent = storescu(study, orthanc.dicom_port)
        assert sent.returncode == 0, sent.stderr[-2000:]
        yield orthanc, node_port


def _settings(root: Path, node_port: int, sources: list[dict]) -> Settings:
    config = {"node": {"ae_title": NODE_AET, "bind_address": "127.0.0.1", "port": node_port,
                       "allowed_peers": [{"ae_title": ORTHANC_AET, "host": "127.0.0.1"}]},
              "storage": {"spool_dir": str(root / "spool"), "results_dir": str(root / "results"),
                          "ledger_path": str(root / "ledger.sqlite"), "min_free_disk_mb": 10, "fsync": False},
              "query_retrieve": sources, "retrieve": {"timeout_s": 5, "wait_s": 60}}
    (root / "node.yaml").write_text(yaml.safe_dump(config))
    return load_settings(root / "node.yaml", environ={})


def _dimse(pacs: Orthanc, method: str = "c-move") -> dict:
    return {"name": "pacs", "ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": pacs.dicom_port, "method": method}


def _uids(study: list[Path]) -> tuple[str, str, dict[str, int]]:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in study]
    per_series: dict[str, int] = {}
    for ds in headers:
        per_series[str(ds.SeriesInstanceUID)] = per_series.get(str(ds.SeriesInstanceUID), 0) + 1
    return str(headers[0].StudyInstanceUID), str(headers[0].AccessionNumber), per_series


def test_c_find_finds_the_study_by_accession_uid_and_date_and_lists_its_series(
        pacs: tuple[Orthanc, int], study: list[Path], tmp_path: Path) -> None:
    orthanc, _ = pacs
    study_uid, accession, per_series = _uids(study)
    source = DimseSource(QueryRetrieveSource(**_dimse(orthanc)), NODE_AET, 5)
    [match] = source.find_studies(StudyQuery(accession=accession))
    assert match.study_uid == study_uid and match.accession == accession and match.instances == len(study)
    assert "MR" in match.modalities
    assert [m.study_uid for m in source.find_studies(StudyQuery(study_uid=study_uid))] == [study_uid]
    study_date = datetime.strptime(str(pydicom.dcmread(study[0], stop_before_pixels=True).StudyDate), "%Y%m%d").date()
    assert [m.study_uid for m in source.find_studies(StudyQuery(accession=accession, since=study_date))] == [study_uid]
    assert source.find_studies(StudyQuery(accession=accession, since=study_date + timedelta(days=1))) == []
    series = source.find_series(study_uid)
    assert {s.series_uid: s.instances for s in series} == per_series
    assert {s.description for s in series} == {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
    assert source.find_series("1.2.3.4.5.6.7") == []
    # DCMTK's findscu, asked the same, finds the same study
    findscu = require_tool("findscu")
    out = subprocess.run([findscu, "-S", "-aet", NODE_AET, "-aec", ORTHANC_AET, "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"AccessionNumber={accession}", "-k", "StudyInstanceUID", "127.0.0.1",
                          str(orthanc.dicom_port)], capture_output=True, text=True, timeout=60)
    assert study_uid in out.stdout + out.stderr


def test_c_move_sends_a_series_to_the_nodes_own_storage_scp(pacs: tuple[Orthanc, int], study: list[Path],
                                                              tmp_path: Path) -> None:
    orthanc, node_port = pacs
    study_uid, _, per_series = _uids(study)
    settings = _settings(tmp_path, node_port, [_dimse(orthanc)])
    ledger = Ledger(settings.storage.ledger_path)
    scp = StorageSCP(settings, ledger)
    scp.start()
    try:
        source = DimseSource(settings.query_retrieve[0], NODE_AET, 5)
        sagittal = [s for s in source.find_series(study_uid) if s.description == "Sagittal T1"]
        seen: list[int] = []
        tally = source.retrieve(study_uid, sagittal, time.monotonic() + 60, lambda t: seen.append(t.done))
        assert tally.completed == per_series[sagittal[0].series_uid] and tally.failed == 0
        assert seen == sorted(seen) and seen[-1] == tally.completed  # progress as it came
        assert len(ledger.instance_paths(study_uid)) == tally.completed
        assert ledger.study_senders(study_uid) == [ORTHANC_AET]  # through the storage SCP, from the PACS
    finally:
        scp.stop()
        ledger.close()


def test_c_get_and_wado_rs_go_through_the_nodes_admission(pacs: tuple[Orthanc, int], study: list[Path],
                                                          tmp_path: Path) -> None:
    orthanc, node_port = pacs
    study_uid, accession, per_series = _uids(study)
    web = {"name": "archive", "dicomweb": {"url": f"http://127.0.0.1:{orthanc.http_port}/dicom-web"}}
    settings = _settings(tmp_path, node_port, [_dimse(orthanc, "c-get"), web])
    ledger = Ledger(settings.storage.ledger_path)
    admission = Admission(settings, ledger, NodeMetrics())
    try:
        get = DimseSource(settings.query_retrieve[0], NODE_AET, 5, admission)
        series = get.find_series(study_uid)
        tally = get.retrieve(study_uid, series[:1], time.monotonic() + 60)
        assert tally.completed == per_series[series[0].series_uid] == len(ledger.instance_paths(study_uid))
        wado = DicomWebSource(settings.query_retrieve[1], 5, admission)
        [match] = wado.find_studies(StudyQuery(accession=accession))
        assert match.study_uid == study_uid
        found = {s.series_uid for s in wado.find_series(study_uid)}
        assert found == set(per_series)
        rest = series[1:]
        tally = wado.retrieve(study_uid, rest, time.monotonic() + 60)
        assert tally.completed == sum(per_series[s.series_uid] for s in rest)
        assert len(ledger.instance_paths(study_uid)) == len(study)
        assert ledger.study_senders(study_uid) == [ORTHANC_AET, "archive"]
        received = [e for e in ledger.events(study_uid) if e.kind is EventKind.RECEIVED]
        assert [e.actor for e in received] == [ORTHANC_AET, "archive"]  # one audit line per retrieve
        assert admission.staging.root.exists() and not any(admission.staging.root.iterdir())  # nothing left staged
    finally:
        ledger.close()


def test_the_fetcher_completes_a_study_from_the_sender_after_a_source_that_is_down(
        pacs: tuple[Orthanc, int], study: list[Path], tmp_path: Path) -> None:
    orthanc, node_port = pacs
    study_uid, _, per_series = _uids(study)
    down = {"name": "down", "ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}
    settings = _settings(tmp_path, node_port, [down, _dimse(orthanc, "c-get")])
    ledger = Ledger(settings.storage.ledger_path)
    admission = Admission(settings, ledger, NodeMetrics())
    axial = [p for p in study if pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription == "Axial T2"]
    for path in axial:  # the study as a router sent it: the axial series only
        assert admission.admit(Candidate(Source.DICOM, "STORESCU", path.read_bytes())).admitted
    try:
        fetcher = Fetcher(settings, ledger, admission)
        assert fetcher.missing_roles(study_uid) == {SeriesRole.SAG_T1, SeriesRole.SAG_T2}
        assert [s.name for s in fetcher.in_order(["STORESCU"])] == ["down", "pacs"]
        assert [s.name for s in fetcher.in_order([ORTHANC_AET])] == ["pacs", "down"]
        answer = fetcher.complete(study_uid, {SeriesRole.SAG_T1, SeriesRole.SAG_T2})
        assert answer.outcome is PacsAnswer.RETRIEVED and answer.source == "pacs", answer
        assert answer.retrieved == len(study) - len(axial)
        assert len(ledger.instance_paths(study_uid)) == len(study) == sum(per_series.values())
        assert fetcher.missing_roles(study_uid) == set()
        # asked again: nothing more to retrieve
        assert fetcher.complete(study_uid, {SeriesRole.SAG_T1}).outcome is PacsAnswer.NOTHING_MORE
        # a study no source holds
        assert fetcher.complete("1.2.3.4.5", {SeriesRole.SAG_T1}).outcome is PacsAnswer.NOT_FOUND
    finally:
        ledger.close()


def test_a_source_that_is_down_or_silent_fails_within_its_timeout(tmp_path: Path) -> None:
    refused = DimseSource(QueryRetrieveSource(name="down", ae_title="DOWN", host="127.0.0.1", port=free_port()),
                          NODE_AET, 2)
    started = time.monotonic()
    with pytest.raises(SourceError, match="no association"):
        refused.find_series("1.2.3")
    assert time.monotonic() - started < 2
    # a peer that accepts the connection and never answers the A-ASSOCIATE-RQ
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    try:
        source = DimseSource(QueryRetrieveSource(name="silent", ae_title="SILENT", host="127.0.0.1",
                                                 port=silent.getsockname()[1]), NODE_AET, 2)
        started = time.monotonic()
        with pytest.raises(SourceError):
            source.find_studies(StudyQuery(accession="X"))
        assert time.monotonic() - started < 10
        web = DicomWebSource(QueryRetrieveSource(name="web", dicomweb={"url": f"http://127.0.0.1:{free_port()}/"}), 2)
        with pytest.raises(SourceError, match="QIDO-RS"):
            web.find_series("1.2.3")
    finally:
        for s in held:
            s.close()
        silent.close()

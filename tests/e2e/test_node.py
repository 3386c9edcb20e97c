"""The node end to end, as a process (`lumbar-node serve`), with real peers: DCMTK storescu/echoscu as
the modality, a real Orthanc as the PACS (routing studies to the node and receiving its results)."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE

from demo.orthanc import Orthanc, free_port, running_orthanc, storescu
from dicom_node.results import RunFolder
from tests.support.served_node import (
    NODE_AET,
    SENDER_AET,
    ServedNode,
    stop_all,
    wait_for,
)
from tests.support.tools import complete_study

FINISHED = ("done", "failed", "skipped")


_study_files = complete_study


def _uids(files: list[Path]) -> tuple[str, set[str]]:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return str(headers[0].StudyInstanceUID), {str(ds.SOPInstanceUID) for ds in headers}


def _send(files: list[Path], port: int, called: str = NODE_AET, extra: tuple[str, ...] = ()) -> None:
    sent = storescu(files, port, called=called, calling=SENDER_AET, extra=extra)
    assert sent.returncode == 0, sent.stdout[-1000:] + sent.stderr[-1000:]


def _results(pacs: Orthanc, study_uid: str) -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    """The SR and SC instances Orthanc holds in the study, newest SR last (the PDF summary, DOC, and the
    key images, KO, aside)."""
    sr, sc = [], []
    for series in pacs.study_series(study_uid):
        modality = series["MainDicomTags"]["Modality"]
        if modality in ("MR", "DOC", "KO"):
            continue
        for instance_id in series["Instances"]:
            ds = pydicom.dcmread(__import__("io").BytesIO(pacs.get_bytes(f"/instances/{instance_id}/file")))
            (sr if modality == "SR" else sc).append(ds)
    return sorted(sr, key=lambda d: int(d.InstanceNumber)), sc


def _check_results(pacs: Orthanc, study_uid: str, sources: set[str], patient_id: str) -> pydicom.Dataset:
    """One SR (newest) and its SCs are in the source study with references to the source images."""
    srs, scs = _results(pacs, study_uid)
    assert srs and scs, "no SR or SC in Orthanc"
    sr = srs[-1]
    assert {d.StudyInstanceUID for d in [*srs, *scs]} == {study_uid}
    assert {d.PatientID for d in [*srs, *scs]} == {patient_id}
    evidence = {ref.ReferencedSOPInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence and evidence <= sources
    assert all(sc.SourceImageSequence[0].ReferencedSOPInstanceUID in sources for sc in scs)
    pdfs = [s for s in pacs.study_series(study_uid) if s["MainDicomTags"]["Modality"] == "DOC"]
    assert len(pdfs) == 1 and len(pdfs[0]["Instances"]) == len(srs), "the PDF summary: one series, one per report"
    kos = [s for s in pacs.study_series(study_uid) if s["MainDicomTags"]["Modality"] == "KO"]
    assert len(kos) <= 1 and all(len(s["Instances"]) <= len(srs) for s in kos), "the key images: one series"
    return sr


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _assert_no_phi(node: ServedNode, files: list[Path]) -> None:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    log = node.log_text()
    assert log, "the node logged nothing"
    for value in (str(ds.PatientName), str(ds.PatientID), "PHANTOM^"):
        assert value not in log, f"patient data {value!r} in the node's log"


@pytest.fixture(autouse=True)
def _no_node_left_running() -> Iterator[None]:
    yield
    stop_all()


@pytest.fixture
def study(phantom_dir: Path) -> list[Path]:
    return _study_files(phantom_dir)


def test_storescu_to_node_to_orthanc_released_when_complete(study: list[Path], tmp_path: Path) -> None:
    study_uid, sources = _uids(study)
    patient_id = str(pydicom.dcmread(study[0], stop_before_pixels=True).PatientID)
    with running_orthanc(tmp_path / "pacs") as pacs:
        # a quiet time far beyond the wait below: only the complete-study rule can release it in time
        node = ServedNode(tmp_path / "node", pacs.dicom_port, quiet_time_s=600).start()
        _send(study, node.port)
        state = node.wait_state(study_uid, FINISHED, timeout=60)
        assert state.state == "done", state.reason
        assert '"why": "complete"' in node.log_text()
        sr = _check_results(pacs, study_uid, sources, patient_id)
        assert "not for diagnosis" in sr.SeriesDescription
        # the report was recorded (and sent) before the rest of its run; the run is one delivery, delivered once
        log = node.log_text()
        assert log.index('"report recorded ahead of its run"') < log.index('"results ready"')
        assert log.count('"results delivered"') == 1
        ledger = node.ledger()
        try:
            [delivery] = ledger.deliveries(study_uid)
            report = ledger.last_report(study_uid)
        finally:
            ledger.close()
        assert delivery.state == "delivered" and not delivery.open and delivery.sent == len(delivery.paths)
        assert delivery.paths == [str(p) for p in RunFolder.of_sr(report.sr_path).files_to_send(Path(report.sr_path))]
        assert delivery.paths[0] == report.sr_path and len(delivery.paths) > 20
        status = node.command("status")
        assert study_uid in status.stdout and " done " in status.stdout
        assert node.stop() == 0
        assert '"node stopped"' in node.log_text()
    _assert_no_phi(node, study)


def test_orthanc_routes_stable_studies_and_a_late_instance_gets_a_superseding_report(
        study: list[Path], tmp_path: Path) -> None:
    study_uid, sources = _uids(study)
    patient_id = str(pydicom.dcmread(study[0], stop_before_pixels=True).PatientID)
    pacs_port = free_port()
    node = ServedNode(tmp_path / "node", pacs_port, quiet_time_s=3).start()
    with running_orthanc(tmp_path / "pacs", peers={"lumbar": (NODE_AET, node.port)}, route_to="lumbar",
                         dicom_port=pacs_port) as pacs:
        _send(study, pacs.dicom_port, called="ORTHANC")  # the modality sends to the PACS only
        assert node.wait_state(study_uid, FINISHED).state == "done"
        first = _check_results(pacs, study_uid, sources, patient_id)

        late = pydicom.dcmread(study[-1])  # one more image of the same series, arriving late
        late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        late.InstanceNumber = 999
        late.save_as(tmp_path / "late.dcm")
        _send([tmp_path / "late.dcm"], pacs.dicom_port, called="ORTHANC")

        def second_report() -> bool:
            ledger = node.ledger()
            try:
                report = ledger.last_report(study_uid)
                return report is not None and report.run == 2 and ledger.study(study_uid).state == "done"
            finally:
                ledger.close()

        wait_for(lambda: f"a second report; log:\n{node.log_text()[-3000:]}", second_report, 120)
        newest = _check_results(pacs, study_uid, sources | {str(late.SOPInstanceUID)}, patient_id)
        assert newest.SOPInstanceUID != first.SOPInstanceUID
        assert newest.SeriesInstanceUID == first.SeriesInstanceUID and newest.InstanceNumber == 2
        predecessor = newest.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert predecessor.ReferencedSOPInstanceUID == first.SOPInstanceUID
        time.sleep(5)  # the results coming back must not bounce the study back to the node
        srs, _ = _results(pacs, study_uid)
        assert len(srs) == 2
        # the key images follow their reports into one series (the study has Moderate/Severe findings)
        [kos_series] = [s for s in pacs.study_series(study_uid) if s["MainDicomTags"]["Modality"] == "KO"]
        numbers = sorted(int(pacs.get(f"/instances/{i}/simplified-tags")["InstanceNumber"])
                         for i in kos_series["Instances"])
        assert numbers == [1, 2]
    assert node.stop() == 0
    _assert_no_phi(node, study)


def test_kill_9_while_a_study_arrives_loses_no_acknowledged_instance_and_reports_once(
        study: list[Path], tmp_path: Path) -> None:
    study_uid, sources = _uids(study)
    patient_id = str(pydicom.dcmread(study[0], stop_before_pixels=True).PatientID)
    with running_orthanc(tmp_path / "pacs") as pacs:
        # the quiet time restarts with the node: the study is released once complete, not half of it
        node = ServedNode(tmp_path / "node", pacs.dicom_port, quiet_time_s=30).start()
        ae = AE(ae_title=SENDER_AET)
        ae.dimse_timeout = ae.network_timeout = 5
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
        assert assoc.is_established
        workers = _children(node.process.pid)
        assert workers, "the node has no grading worker processes"
        killer = threading.Timer(0.25, node.process.send_signal, args=[signal.SIGKILL])  # mid-transfer
        acknowledged = []
        killer.start()
        for path in study:
            status = assoc.send_c_store(path)
            if not assoc.is_established:
                break
            if status and status.Status == 0x0000:
                acknowledged.append(pydicom.dcmread(path))
        killer.join()
        assoc.abort()
        assert node.stop() == -signal.SIGKILL
        wait_for("the killed node's workers to exit", lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers),
                 15)
        assert 0 < len(acknowledged) < len(study), f"the kill landed after {len(acknowledged)} of {len(study)} images"

        ledger = node.ledger()
        recorded = {f"{p.parent.name}/{p.name}" for p in ledger.instance_paths(study_uid)}
        ledger.close()
        for ds in acknowledged:  # every instance answered Success is complete in the spool and the ledger
            name = f"{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
            spooled = pydicom.dcmread(tmp_path / "node" / "spool" / study_uid / name)
            assert spooled.PixelData == ds.PixelData
            assert name in recorded

        node.start()
        _send(study, node.port)  # the sender retries the whole study
        assert node.wait_state(study_uid, FINISHED).state == "done"
        srs, _ = _results(pacs, study_uid)
        assert len(srs) == 1
        _check_results(pacs, study_uid, sources, patient_id)
        ledger = node.ledger()
        assert ledger.last_report(study_uid).run == 1 and len(ledger.deliveries(study_uid)) == 1
        ledger.close()
        assert node.stop() == 0
    _assert_no_phi(node, study)


def test_sigterm_while_studies_arrive_finishes_the_writes_and_exits_cleanly(phantom_dir: Path, tmp_path: Path) -> None:
    files = sorted((phantom_dir / "train_images").rglob("*.dcm"))  # all the phantom studies: a few seconds
    node = ServedNode(tmp_path / "node", free_port(), quiet_time_s=600).start()
    ae = AE(ae_title=SENDER_AET)
    ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    assert assoc.is_established
    stopper = threading.Timer(0.5, node.process.send_signal, args=[signal.SIGTERM])
    acknowledged = []
    stopper.start()
    for path in files:
        status = assoc.send_c_store(path)
        if status and status.Status == 0x0000:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            acknowledged.append(f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm")
        if not assoc.is_established:
            break
    stopper.join()
    assert node.stop() == 0  # exit code 0 after SIGTERM
    assert 0 < len(acknowledged) < len(files), f"SIGTERM landed after {len(acknowledged)} of {len(files)} images"
    ledger = node.ledger()
    recorded = {f"{p.parent.parent.name}/{p.parent.name}/{p.name}" for s in ledger.studies()
                for p in ledger.instance_paths(s.study_uid)}
    ledger.close()
    assert set(acknowledged) <= recorded
    assert all((tmp_path / "node" / "spool" / name).is_file() for name in acknowledged)
    assert not list((tmp_path / "node" / "spool").rglob(".incoming-*"))  # no write was cut in half
    assert '"node stopped"' in node.log_text()
    with pytest.raises(OSError):  # nothing listens any more
        socket.create_connection(("127.0.0.1", node.port), timeout=2).close()


def test_results_wait_for_orthanc_and_are_delivered_after_a_node_restart(study: list[Path], tmp_path: Path) -> None:
    study_uid, sources = _uids(study)
    patient_id = str(pydicom.dcmread(study[0], stop_before_pixels=True).PatientID)
    pacs_port = free_port()  # nothing listens there yet: the PACS is down
    node = ServedNode(tmp_path / "node", pacs_port, quiet_time_s=2).start()
    _send(study, node.port)

    def retrying() -> bool:
        ledger = node.ledger()
        try:
            return any(d.state == "pending" and d.attempts >= 2 for d in ledger.deliveries(study_uid))
        finally:
            ledger.close()

    wait_for("failed delivery attempts", retrying, 90)
    state = node.study(study_uid)
    assert state.state == "sending" and "retry" in state.reason
    assert "retry" in node.command("status").stdout
    assert node.stop() == 0  # SIGTERM with results still due
    with running_orthanc(tmp_path / "pacs", dicom_port=pacs_port) as pacs:
        node.start()
        assert node.wait_state(study_uid, FINISHED).state == "done"
        _check_results(pacs, study_uid, sources, patient_id)
        assert node.stop() == 0
    _assert_no_phi(node, study)


def _as_ct(files: list[Path], out: Path) -> list[Path]:
    """The same images relabelled as a CT study (new UIDs): not something the node grades."""
    study_uid, series_uids, written = generate_uid(), {}, []
    out.mkdir()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.Modality, ds.SOPClassUID = "CT", CTImageStorage
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uids.setdefault(ds.SeriesInstanceUID, generate_uid())
        written.append(out / f"{len(written)}.dcm")
        ds.save_as(written[-1])
    return written


def test_bad_input_gets_the_right_answer_and_never_stops_the_node(study: list[Path], tmp_path: Path) -> None:
    node = ServedNode(tmp_path / "node", free_port(), quiet_time_s=1).start()
    echo = ["/usr/bin/echoscu", "-aec", NODE_AET, "127.0.0.1", str(node.port)]

    refused = subprocess.run([*echo[:1], "-aet", "INTRUDER", *echo[1:]], capture_output=True, text=True)
    assert refused.returncode != 0
    assert '"calling_aet": "INTRUDER"' in node.log_text() and "rejected an association" in node.log_text()

    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as raw:  # not DICOM at all
        raw.sendall(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n" * 50)
        raw.settimeout(10)
        try:
            while raw.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass

    truncated = pydicom.dcmread(study[0])
    truncated.SOPInstanceUID = generate_uid()
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 2]
    ae = AE(ae_title=SENDER_AET)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=NODE_AET)
    status = assoc.send_c_store(truncated)
    assoc.release()
    assert status.Status == 0xC000
    assert "truncated dataset: Pixel Data holds" in node.log_text()
    assert not list((tmp_path / "node" / "spool").rglob(f"{truncated.SOPInstanceUID}.dcm"))

    ct = _as_ct(study[:12], tmp_path / "ct")
    ct_uid, _ = _uids(ct)
    _send(ct, node.port)
    state = node.wait_state(ct_uid, FINISHED, timeout=60)
    assert state.state == "skipped" and state.reason == "not an MR study (modality CT)"
    assert len(list((tmp_path / "node" / "spool" / ct_uid).rglob("*.dcm"))) == 12  # kept, not dropped

    assert subprocess.run([*echo[:1], "-aet", SENDER_AET, *echo[1:]], capture_output=True).returncode == 0
    assert node.process.poll() is None
    assert node.stop() == 0
    _assert_no_phi(node, study)


def test_the_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    from tests.support.tools import lumbar_node

    done = lumbar_node("demo", "--workdir", str(tmp_path / "demo"), check=False)
    assert done.returncode == 0, f"the demo failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    out = done.stdout
    assert "results back in Orthanc" in out and "AI result - not for diagnosis" in out
    assert " SR    1 instances" in out and "AI Grad-CAM heatmaps" in out
    assert " KO    1 instances" in out and "Key images (Key Object Selection): " in out  # the demo study has some
    levels = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
    assert len([line for line in out.splitlines() if line.startswith(levels)]) == 25
    sr_path = Path(out.split("Structured Report: ")[1].splitlines()[0])
    sr = pydicom.dcmread(sr_path)
    assert sr.Modality == "SR" and sr.StudyInstanceUID in out


def test_a_compressed_study_is_stored_as_received_and_graded(study: list[Path], tmp_path: Path) -> None:
    """JPEG-LS, RLE and JPEG lossless files (compressed by DCMTK) go through storescu, the spool keeps
    their transfer syntax, and the study is graded from them."""
    # compressor, and the storescu option that offers that syntax with the uncompressed ones
    kinds = {"jpeg-ls": ("/usr/bin/dcmcjpls", "-xt"), "rle": ("/usr/bin/dcmcrle", "-xr"),
             "jpeg": ("/usr/bin/dcmcjpeg", "-xs")}
    compressed, groups = [], {kind: [] for kind in kinds}
    for i, path in enumerate(study):
        kind = list(kinds)[i % 3]
        out = tmp_path / "compressed" / f"{i:03d}.dcm"
        out.parent.mkdir(exist_ok=True)
        subprocess.run([kinds[kind][0], str(path), str(out)], check=True, capture_output=True)
        compressed.append(out)
        groups[kind].append(out)
    study_uid, _ = _uids(compressed)
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in compressed}
    assert len(syntaxes) == 3
    node = ServedNode(tmp_path / "node", free_port(), quiet_time_s=600).start()
    for kind, files in groups.items():  # one presentation context offering the compressed and uncompressed
        _send(files, node.port, extra=(kinds[kind][1], "--combine", "--required"))  # syntaxes: we pick lossless
    state = node.wait_state(study_uid, ("sending", *FINISHED), timeout=60)
    spooled = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
               for p in (tmp_path / "node" / "spool" / study_uid).rglob("*.dcm")}
    assert spooled == syntaxes
    # graded (then delivery is retried: no PACS listens in this test)
    assert state.state == "sending" and '"assessed": 25' in node.log_text()
    assert node.stop() == 0


def test_a_port_in_use_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    node = ServedNode(tmp_path / "node", free_port())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", node.port))
        taken.listen()
        done = node.command("serve")
    assert done.returncode == 1
    assert "cannot start the node: OSError: [Errno 98] Address already in use" in done.stderr
    assert '"node stopped"' in done.stderr

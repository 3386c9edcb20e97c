"""The node as it is served, sent the studies the independent fuzz run found graded from impossible
input (issue 23): each is graded without the bad series or images, or skipped, with the reason in the
ledger and in results.json; the worker never decodes the lying codestreams; an unknown character
set writes a bounded number of log lines."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGLSLossless

from tests.support.defects import Defect, defective_study
from tests.support.procfs import children, proc_status
from tests.support.raw_dicom import encode, raw_store
from tests.support.served_node import SENDER_AET, ServedNode, stop_all

FINAL = ("done", "failed", "skipped")


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    yield
    stop_all()


def _send(node: ServedNode, datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        status = raw_store(node.port, encode(ds), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                           str(ds.file_meta.TransferSyntaxUID), SENDER_AET)
        assert status == 0, f"0x{status or 0:04X} for {ds.SOPClassUID} in {ds.file_meta.TransferSyntaxUID}"


def _results(node: ServedNode, study_uid: str) -> dict:
    path = next((node.root / "results" / study_uid).rglob("results.json"))
    return json.loads(path.read_text())


def test_each_defect_is_graded_without_the_bad_series_or_skipped_with_the_reason(phantom_dir: Path,
                                                                                 tmp_path: Path) -> None:
    folder = sorted((phantom_dir / "train_images").iterdir())[0]
    study = [pydicom.dcmread(p) for p in sorted(folder.rglob("*.dcm"))]
    node = ServedNode(tmp_path / "node", destination_port=1, quiet_time_s=1.0, destinations=[]).start()
    assert node.process is not None
    cases = {
        Defect.HUGE_SPACING: defective_study(study, Defect.HUGE_SPACING),
        Defect.SAME_POSITION: defective_study(study, Defect.SAME_POSITION),
        Defect.LYING_JPEG_LS: defective_study(study, Defect.LYING_JPEG_LS, chosen={3, 8, 13}),
        Defect.SECONDARY_CAPTURE: defective_study(study, Defect.SECONDARY_CAPTURE),
        Defect.BAD_CHARSET: defective_study(study, Defect.BAD_CHARSET),
    }
    assert sum(str(ds.file_meta.TransferSyntaxUID) == JPEGLSLossless for ds in cases[Defect.LYING_JPEG_LS]) == 3
    worker_peak = 0
    for datasets in cases.values():
        _send(node, datasets)
        state = node.wait_state(str(datasets[0].StudyInstanceUID), FINAL, timeout=180)
        worker_peak = max([worker_peak, *(proc_status(c)["VmHWM"] for c in children(node.process.pid))])
        assert state.state in FINAL
    states = {defect: node.study(str(ds[0].StudyInstanceUID)) for defect, ds in cases.items()}

    for defect, why in ((Defect.HUGE_SPACING, "PixelSpacing 1e+06 x 1e+06 mm is outside 0.1 to 5 mm"),
                        (Defect.SAME_POSITION, "slices lie at 1 distinct position along the slice normal")):
        study_uid = str(cases[defect][0].StudyInstanceUID)
        axial = {str(ds.SeriesInstanceUID) for ds in cases[defect] if "Axial" in ds.SeriesDescription}
        assert states[defect] is not None and states[defect].state == "done", states[defect]
        labels = _results(node, study_uid)["labels"]
        subarticular = [item for item in labels if "subarticular" in item["label"]]
        assert subarticular and all(not item["assessed"] and why in item["reason"] for item in subarticular)
        assert not [item for item in labels if item["assessed"] and item["series_uid"] in axial]
        assert not [item for item in labels if item["assessed"] and item["pixel_xy"] == [0.0, 0.0]]

    liars = {str(ds.SOPInstanceUID) for ds in cases[Defect.LYING_JPEG_LS]
             if str(ds.file_meta.TransferSyntaxUID) == JPEGLSLossless}
    state = states[Defect.LYING_JPEG_LS]
    assert state is not None and state.state == "done", state
    labels = _results(node, str(cases[Defect.LYING_JPEG_LS][0].StudyInstanceUID))["labels"]
    assert sum(item["assessed"] for item in labels) >= 20
    assert not {item.get("sop_instance_uid") for item in labels} & liars
    log = node.log_text()
    assert "the JPEG-LS codestream declares 20000 x 20000 (columns x rows)" in log
    assert worker_peak < 1024 * 1024, f"a worker peaked at {worker_peak // 1024} MB"  # 2.4 GB when decoded

    state = states[Defect.SECONDARY_CAPTURE]
    assert state is not None and state.state == "skipped"
    assert state.reason == ("not an MR study (modality MR, SOP class Secondary Capture Image Storage: "
                            "no MR image storage class)")

    state = states[Defect.BAD_CHARSET]
    assert state is not None and state.state == "done", state
    charset_lines = [line for line in log.splitlines() if "ISO_IR 999" in line]
    assert len(charset_lines) <= 24, f"{len(charset_lines)} lines name the character set"  # 1,646 unbounded
    assert any('"times"' in line for line in charset_lines)

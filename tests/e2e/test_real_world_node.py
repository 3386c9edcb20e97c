"""The node on real-world DICOM: a PACS-style copy of a Kaggle-style phantom study (the RSNA 2024
encoding: Enhanced MR class for single-frame images, RLE Lossless, no patient name or dates, the
same SOP Instance UIDs in every series) sent with DCMTK's storescu to ``lumbar-node serve``, graded,
and its SR and SC delivered to a real Orthanc."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from demo.orthanc import running_orthanc, storescu
from tests.support.kaggle import (
    assert_heatmaps_on_their_own_series,
    kaggle_study,
    make_kaggle_phantom,
    pacs_style_copy,
)
from tests.support.served_node import SENDER_AET, ServedNode, stop_all

REPEATS_LOGGED = "SOP Instance UIDs repeat across the series of a study"


@pytest.fixture(autouse=True)
def _no_node_left_running() -> Iterator[None]:
    yield
    stop_all()


def test_a_pacs_style_kaggle_study_is_kept_whole_graded_and_its_results_delivered(tmp_path: Path) -> None:
    files = pacs_style_copy(kaggle_study(make_kaggle_phantom(tmp_path / "kaggle")), tmp_path / "pacs-copy")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    study_uid = str(headers[0].StudyInstanceUID)
    assert len({str(ds.SOPInstanceUID) for ds in headers}) < len(files), "the SOP Instance UIDs do not repeat"
    with running_orthanc(tmp_path / "pacs") as pacs:
        node = ServedNode(tmp_path / "node", pacs.dicom_port, quiet_time_s=3).start()
        sent = storescu(files, node.port, called="LUMBAR_AI", calling=SENDER_AET, extra=("-xr",))  # RLE, as stored
        assert sent.returncode == 0, sent.stdout[-1000:] + sent.stderr[-1000:]
        state = node.wait_state(study_uid, ("done", "failed", "skipped"), timeout=120)
        assert state.state == "done", state.reason

        # every instance kept, none taken for a re-send: in the ledger and in the spool
        assert node.study(study_uid).instances == len(files)
        ledger = node.ledger()
        try:
            spooled = ledger.instance_paths(study_uid)
        finally:
            ledger.close()
        assert len(spooled) == len(files) and all(p.is_file() for p in spooled)
        assert len(list((tmp_path / "node" / "spool" / study_uid).rglob("*.dcm"))) == len(files)
        assert node.log_text().count(REPEATS_LOGGED) == 1  # once per study, not per image

        srs, scs = [], []
        for series in pacs.study_series(study_uid):
            modality = series["MainDicomTags"]["Modality"]
            for instance_id in series["Instances"]:
                if modality in ("SR", "OT"):
                    ds = pydicom.dcmread(io.BytesIO(pacs.get_bytes(f"/instances/{instance_id}/file")))
                    (srs if modality == "SR" else scs).append(ds)
        assert len(srs) == 1 and len(scs) == 25
        assert {d.StudyInstanceUID for d in [*srs, *scs]} == {study_uid}
        results = next((tmp_path / "node" / "results" / study_uid).rglob("results.json"))
        assert_heatmaps_on_their_own_series(scs, results, files)

        # the sender retries the whole study: each (series, SOP instance) is a re-send, nothing re-opens
        sent = storescu(files, node.port, called="LUMBAR_AI", calling=SENDER_AET, extra=("-xr",))
        assert sent.returncode == 0, sent.stderr[-1000:]
        again = node.study(study_uid)
        assert again.state == "done" and again.instances == len(files) and again.generation == state.generation
        assert node.stop() == 0

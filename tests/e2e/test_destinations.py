"""Destinations are served in parallel: a destination that accepts the connection and then never
answers (a hung PACS) holds up no other. The node as a process (`lumbar-node serve`), a real Orthanc
as the healthy destination, DCMTK storescu as the modality."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from demo.orthanc import ORTHANC_AET, running_orthanc, storescu
from dicom_node.states import DeliveryState
from tests.support.served_node import NODE_AET, SENDER_AET, ServedNode, stop_all, wait_for
from tests.support.tools import complete_study

HUNG_TIMEOUT_S = 120.0  # the node's delivery timeout: the hung destination's attempt lasts this long


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    yield
    stop_all()


@pytest.fixture
def hung_destination() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers on them."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def test_a_hung_destination_holds_up_no_other(phantom_dir: Path, tmp_path: Path, hung_destination: int) -> None:
    files = complete_study(phantom_dir)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with running_orthanc(tmp_path / "pacs") as pacs:
        destinations = [  # the hung one first: were destinations served in turn, the PACS would wait
            {"name": "hung", "ae_title": "HUNG", "host": "127.0.0.1", "port": hung_destination},
            {"name": "pacs", "ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": pacs.dicom_port},
        ]
        node = ServedNode(tmp_path / "node", pacs.dicom_port, quiet_time_s=30, destinations=destinations,
                          study={"release_when_complete": True},
                          delivery={"timeout_s": HUNG_TIMEOUT_S}).start()
        sent = storescu(files, node.port, called=NODE_AET, calling=SENDER_AET)
        assert sent.returncode == 0, sent.stdout[-1000:] + sent.stderr[-1000:]
        started = time.monotonic()

        def delivered_to_pacs() -> bool:
            ledger = node.ledger()
            try:
                return any(d.destination == "pacs" and d.state is DeliveryState.DELIVERED
                           for d in ledger.deliveries(study_uid))
            finally:
                ledger.close()

        wait_for(lambda: f"the PACS's delivery; log tail:\n{node.log_text()[-3000:]}", delivered_to_pacs,
                 timeout=HUNG_TIMEOUT_S / 2)
        assert time.monotonic() - started < HUNG_TIMEOUT_S / 2
        assert any(s["MainDicomTags"].get("Modality") == "SR" for s in pacs.study_series(study_uid))
        ledger = node.ledger()
        try:
            [hung] = [d for d in ledger.deliveries(study_uid) if d.destination == "hung"]
        finally:
            ledger.close()
        assert hung.state is DeliveryState.PENDING and hung.attempts == 0  # its first attempt still waits

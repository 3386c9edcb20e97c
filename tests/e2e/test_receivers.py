"""The node receiving in several processes on one port (``node.receivers``): connections spread
evenly over them, the association limits hold across them, senders racing on one study lose
nothing and record nothing twice, a receiver killed with SIGKILL hands its slots back and is
started again, the metrics count every process, and SIGTERM stops them all."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # a name made at import

from demo.orthanc import storescu
from dicom_node.dicom.peers import SharedSlots
from tests.support.procfs import children
from tests.support.served_node import NODE_AET, SENDER_AET, ServedNode, stop_all, wait_for

RECEIVERS = 3


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    yield
    stop_all()


def _node(tmp_path: Path, **limits: int) -> ServedNode:
    node = ServedNode(tmp_path / "node", destination_port=1, quiet_time_s=60.0, destinations=[],
                      node={"receivers": RECEIVERS}, web={"metrics_anonymous": True},
                      limits={"acse_timeout_s": 5, **limits})
    node.start()
    wait_for("every receiver process to listen",
             lambda: node.log_text().count('"receiver process started"') >= RECEIVERS - 1, timeout=120)
    return node


def _associate(port: int) -> Association:
    ae = AE(SENDER_AET)
    ae.acse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title=NODE_AET)


def _held_slots(node: ServedNode) -> int:
    slots = SharedSlots(node.root / "ledger-associations.sqlite", 1, 1)
    try:
        return sum(slots.counts().values())
    finally:
        slots.close()


def _slots_per_process(node: ServedNode) -> list[int]:
    """How many associations each process holds now, sorted."""
    with sqlite3.connect(node.root / "ledger-associations.sqlite") as db:
        return sorted(n for (n,) in db.execute("SELECT count(*) FROM slots GROUP BY pid"))


def _receiver_pids(node: ServedNode) -> list[int]:
    """The receiver processes now running (each logs its process id when it starts)."""
    assert node.process is not None
    started = [json.loads(line)["pid"] for line in node.log_text().splitlines()
               if '"receiver process started"' in line]
    return [pid for pid in started if pid in children(node.process.pid)]


def test_the_association_limits_hold_across_receiver_processes(tmp_path: Path) -> None:
    node = _node(tmp_path, max_associations_per_address=3, max_associations=16)
    held = [_associate(node.port) for _ in range(3 * RECEIVERS)]  # enough to reach every process
    try:
        accepted = [a for a in held if a.is_established]
        assert len(accepted) == 3, f"{len(accepted)} associations accepted from one address, limit 3"
        assert _held_slots(node) == 3
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    wait_for("the slots to be handed back", lambda: _held_slots(node) == 0, timeout=20)
    again = _associate(node.port)
    assert again.is_established
    again.release()
    started = time.monotonic()
    assert node.stop(signal.SIGTERM, timeout=60) == 0
    assert time.monotonic() - started < 30


def test_a_receiver_killed_with_sigkill_hands_its_slots_back_and_is_started_again(tmp_path: Path) -> None:
    node = _node(tmp_path)
    receivers = _receiver_pids(node)
    assert len(receivers) == RECEIVERS - 1, receivers
    held = [_associate(node.port) for _ in range(6)]
    assert all(a.is_established for a in held)
    assert _held_slots(node) == 6
    assert _slots_per_process(node) == [2, 2, 2]  # handed to the least busy process: evenly spread
    for pid in receivers:
        os.kill(pid, signal.SIGKILL)
    wait_for("the killed receivers to be started again",
             lambda: node.log_text().count('"a receiver process ended: started again"') >= len(receivers), timeout=60)
    time.sleep(1.0)  # the sender's side of the killed connections notices they are gone
    alive = [a for a in held if a.is_established]
    wait_for(lambda: f"the slots of the killed receivers to be freed: {_held_slots(node)} held, {len(alive)} alive",
             lambda: _held_slots(node) == len(alive), timeout=20)
    for assoc in alive:
        assoc.release()
    wait_for("every slot to be free", lambda: _held_slots(node) == 0, timeout=20)
    wait_for("the new receivers to listen",
             lambda: node.log_text().count('"receiver process started"') >= 2 * (RECEIVERS - 1), timeout=120)
    echoes = [_associate(node.port) for _ in range(6)]
    assert all(a.is_established for a in echoes)
    for assoc in echoes:
        assoc.release()
    assert node.stop(signal.SIGTERM, timeout=60) == 0


def test_senders_racing_on_one_study_lose_nothing_and_record_nothing_twice(tmp_path: Path,
                                                                          phantom_dir: Path) -> None:
    node = _node(tmp_path)
    folder = sorted((phantom_dir / "train_images").iterdir())[0]
    files = sorted(folder.rglob("*.dcm"))
    results: list[subprocess.CompletedProcess] = []
    senders = [threading.Thread(target=lambda: results.append(storescu(files, node.port, called=NODE_AET,
                                                                       calling=SENDER_AET)))
               for _ in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert [r.returncode for r in results] == [0] * 4, [r.stderr[-800:] for r in results]
    [study] = node.ledger().studies()
    assert study.instances == len(files)
    assert len(list((node.root / "spool").rglob("*.dcm"))) == len(files)

    def stored_responses() -> float:
        with urllib.request.urlopen(f"{node.web_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('lumbar_node_cstore_responses_total{status="0x0000"}'))

    wait_for(lambda: f"/metrics to count every process's C-STOREs ({stored_responses()} of {4 * len(files)})",
             lambda: stored_responses() == 4 * len(files), timeout=20)
    started = time.monotonic()
    assert node.stop(signal.SIGTERM, timeout=60) == 0
    assert time.monotonic() - started < 30

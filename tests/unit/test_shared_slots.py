"""The association counts shared by the receiver processes (``SharedSlots``) and their counters
merged into one /metrics (``NodeMetrics.add_source``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dicom_node.dicom.peers import SharedSlots
from dicom_node.observability import NodeMetrics


def test_the_limits_hold_and_a_slot_is_handed_back_once(tmp_path: Path) -> None:
    slots = SharedSlots(tmp_path / "slots.sqlite", max_total=3, max_per_address=2)
    assert slots.acquire(1, "10.0.0.1").granted and slots.acquire(2, "10.0.0.1").granted
    refused = slots.acquire(3, "10.0.0.1")
    assert not refused.granted and (refused.total, refused.from_address) == (2, 2)
    assert slots.acquire(4, "10.0.0.2").granted
    assert not slots.acquire(5, "10.0.0.3").granted  # the total
    assert slots.release(1) and not slots.release(1)
    assert slots.counts() == {"10.0.0.1": 1, "10.0.0.2": 1}
    slots.close()


def test_the_slots_of_a_process_that_is_gone_count_for_nothing(tmp_path: Path) -> None:
    path = tmp_path / "slots.sqlite"
    code = ("import sys; from dicom_node.dicom.peers import SharedSlots; "
            "s = SharedSlots(sys.argv[1], 8, 8); s.acquire(1, '10.0.0.1'); s.acquire(2, '10.0.0.1')")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)  # took 2 slots, then exited
    slots = SharedSlots(path, max_total=2, max_per_address=2)
    assert slots.counts() == {}
    assert slots.acquire(7, "10.0.0.1").granted
    slots.close()


def test_other_processes_counters_are_added_to_the_exposition() -> None:
    node, receiver = NodeMetrics(), NodeMetrics()
    node.cstore_status.labels("0x0000").inc(2)
    receiver.cstore_status.labels("0x0000").inc(3)
    receiver.cstore_status.labels("0xC000").inc()
    receiver.cstore_seconds.observe(0.002)
    node.add_source(lambda: [receiver.snapshot()])
    text = node.exposition().decode()
    assert 'lumbar_node_cstore_responses_total{status="0x0000"} 5.0' in text
    assert 'lumbar_node_cstore_responses_total{status="0xC000"} 1.0' in text
    assert "lumbar_node_cstore_seconds_count 1.0" in text

"""dicom_node.dicom.handoff: accepted connections go to the least busy process, and a receiver's
reports of ended connections are what makes it less busy again."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from dicom_node.dicom.handoff import Handoff, accept_handed, report_closed


def _connection() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on the loopback: (the node's accepted end, the sender's end)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return accepted, sender


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_handed_connection_reaches_the_receiver_with_its_address() -> None:
    handoff = Handoff()
    lane = handoff.open_lane(1)
    accepted, sender = _connection()
    try:
        assert handoff.pass_on(accepted, ("127.0.0.1", 4242), kept_open=0)
        accepted.close()  # the node's copy: the receiver holds its own
        taken, address = accept_handed(lane)
        assert address == ("127.0.0.1", 4242)
        sender.sendall(b"ping")
        assert taken.recv(4) == b"ping"  # the very connection the sender opened
        taken.close()
    finally:
        sender.close()
        lane.close()
        handoff.close()


def test_connections_go_to_the_least_busy_process_and_ties_to_a_receiver() -> None:
    handoff = Handoff()
    lanes = {i: handoff.open_lane(i) for i in (1, 2)}
    kept = 0
    placed: list[int | None] = []
    opened = []
    try:
        for _ in range(6):
            accepted, sender = _connection()
            opened.append(sender)
            before = handoff.loads()
            if handoff.pass_on(accepted, ("127.0.0.1", 1), kept_open=kept):
                placed.append(next(i for i, n in handoff.loads().items() if n > before[i]))
            else:
                placed.append(None)
                kept += 1
            accepted.close()
        # receivers first on a tie, then the node's own process: two each
        assert placed == [1, 2, None, 1, 2, None]
        assert handoff.loads() == {1: 2, 2: 2}
        report_closed(lanes[2], 2)  # receiver 2's two connections ended
        _wait(lambda: handoff.loads()[2] == 0)
        report_closed(lanes[2], 1)  # a late, smaller total changes nothing
        time.sleep(0.1)
        assert handoff.loads() == {1: 2, 2: 0}
        accepted, sender = _connection()
        opened.append(sender)
        assert handoff.pass_on(accepted, ("127.0.0.1", 1), kept_open=kept)
        assert handoff.loads() == {1: 2, 2: 1}
        accepted.close()
    finally:
        for s in opened:
            s.close()
        for lane in lanes.values():
            lane.close()
        handoff.close()


def test_a_receiver_that_is_gone_gets_nothing_more() -> None:
    handoff = Handoff()
    lane = handoff.open_lane(1)
    lane.close()  # the receiver died
    _wait(lambda: handoff.loads() == {})
    accepted, sender = _connection()
    try:
        assert not handoff.pass_on(accepted, ("127.0.0.1", 1), kept_open=5)  # the node keeps it
    finally:
        accepted.close()
        sender.close()
        handoff.close()


def test_a_restarted_receiver_gets_a_new_lane() -> None:
    handoff = Handoff()
    old = handoff.open_lane(1)
    new = handoff.open_lane(1)
    accepted, sender = _connection()
    try:
        assert handoff.pass_on(accepted, ("127.0.0.1", 1), kept_open=0)
        accepted.close()
        taken, _ = accept_handed(new)
        taken.close()
        old.setblocking(False)
        with pytest.raises(BlockingIOError):
            old.recv(64)  # nothing went to the old lane
    finally:
        sender.close()
        old.close()
        new.close()
        handoff.close()


def test_the_receiver_sees_the_node_end_close() -> None:
    handoff = Handoff()
    lane = handoff.open_lane(1)
    handoff.close()
    with pytest.raises(OSError):
        accept_handed(lane)
    lane.close()

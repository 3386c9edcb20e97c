"""dicom_node.dicom.wakeups: pynetdicom's reactors wait for their work (data on the socket, a
primitive to send, a DIMSE message) instead of polling, and never longer than the cap."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from dicom_node.dicom import wakeups


def _dul(sock: socket.socket | None) -> Any:
    """What ``wait_dul`` reads of a DUL provider (a small test double)."""
    return SimpleNamespace(socket=SimpleNamespace(socket=sock), to_provider_queue=queue.Queue(),
                           event_queue=queue.Queue(), _kill_thread=False)


def _assoc() -> Any:
    return SimpleNamespace(dimse=SimpleNamespace(msg_queue=queue.Queue()), _kill=False)


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_a_dul_without_a_wake_up_pipe_is_left_to_sleep() -> None:
    assert wakeups.wait_dul(_dul(None)) is False


def test_a_dul_waits_until_its_socket_has_data() -> None:
    mine, peer = socket.socketpair()
    dul = _dul(mine)
    wakeups.open_dul(dul)
    try:
        assert _timed(lambda: wakeups.wait_dul(dul, cap_s=0.2)) >= 0.15  # nothing came: the cap
        threading.Timer(0.05, lambda: peer.sendall(b"x")).start()
        assert _timed(lambda: wakeups.wait_dul(dul, cap_s=5.0)) < 1.0
    finally:
        wakeups.close_dul(dul)
        mine.close()
        peer.close()


def test_a_dul_is_woken_for_what_it_must_send_and_never_waits_with_work_queued() -> None:
    mine, peer = socket.socketpair()
    dul = _dul(mine)
    wakeups.open_dul(dul)
    try:
        threading.Timer(0.05, lambda: wakeups.wake_dul(dul)).start()
        assert _timed(lambda: wakeups.wait_dul(dul, cap_s=5.0)) < 1.0
        dul.to_provider_queue.put("A-RELEASE")
        assert _timed(lambda: wakeups.wait_dul(dul, cap_s=5.0)) < 0.05
    finally:
        wakeups.close_dul(dul)
        mine.close()
        peer.close()
    wakeups.wake_dul(dul)  # after the reactor ended: nothing, no error


def test_an_acceptor_waits_for_a_wake_up_and_serves_a_queued_message_at_once() -> None:
    assoc = _assoc()
    assert _timed(lambda: wakeups.wait_acceptor(assoc, cap_s=0.2)) >= 0.15
    threading.Timer(0.05, lambda: wakeups.wake_acceptor(assoc)).start()
    assert _timed(lambda: wakeups.wait_acceptor(assoc, cap_s=5.0)) < 1.0
    wakeups.wake_acceptor(assoc)  # woken before it waits: the wake-up is not lost
    assert _timed(lambda: wakeups.wait_acceptor(assoc, cap_s=5.0)) < 0.05
    assoc.dimse.msg_queue.put((1, "C-STORE-RQ"))  # a second message queued behind the one just served
    assert _timed(lambda: wakeups.wait_acceptor(assoc, cap_s=5.0)) < 0.05

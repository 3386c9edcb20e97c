"""Event-driven waits for pynetdicom's reactors, used by ``tuning``'s clock.

pynetdicom's reactors poll: each association's DUL thread sleeps between ``select`` calls of zero
timeout on its socket, and an acceptor's association thread sleeps 1 ms before every look at its
DIMSE message queue. Under load that costs both CPU (every open association wakes thousands of
times a second, all under the one interpreter lock) and latency (each C-STORE waits for a poll of
the association thread, then its response for a poll of the DUL thread). Here the two sleeps wait
for the thing they poll for instead:

- a DUL thread waits in ``select`` on its socket and on a wake-up pipe of its own (``Waker``),
  written to when a primitive is queued for it to send (``send_pdu``), when it is told to stop
  (``stop_dul``, ``kill_dul``) and by ``wake_dul``;
- an acceptor's association thread waits on an ``Event`` set after every action of its DUL's
  state machine (a complete DIMSE message, a release request, an abort: everything it looks for
  arrives through one) and when its DUL thread ends; a message already queued is served at once.

Both waits are capped (``CAP_S``), so a condition nobody signals (a timer that expired, a flag set
by code that does not wake) is still seen within the cap, as pynetdicom's polling would see it.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading

from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

__all__ = ["CAP_S", "REACTOR_SLEEP_S", "Waker", "close_dul", "open_dul", "wait_acceptor", "wait_dul", "wake_acceptor",
           "wake_dul"]

CAP_S = 0.02  # the longest a waiting reactor goes without looking at its timers and flags
REACTOR_SLEEP_S = 0.001  # the sleep of pynetdicom's reactor loops (the DUL's and the acceptor's)


class Waker:
    """A pipe one thread waits on in ``select`` and any thread writes a byte to; closed once."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()  # a write never meets a closed (and maybe reused) descriptor
        self._closed = False

    @property
    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(BlockingIOError):  # full: the waiter has wake-ups pending anyway
                    os.write(self._write, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._read, 4096)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read)
                os.close(self._write)


_DUL_WAKER = "_node_waker"
_ASSOC_EVENT = "_node_wake"
_create_lock = threading.Lock()


def open_dul(dul: DULServiceProvider) -> None:
    """A DUL reactor starts: its wake-up pipe (``close_dul`` closes it when the reactor ends)."""
    setattr(dul, _DUL_WAKER, Waker())


def close_dul(dul: DULServiceProvider) -> None:
    """The DUL reactor has ended: its wake-up pipe is closed (later wake-ups do nothing)."""
    waker = getattr(dul, _DUL_WAKER, None)
    if waker is not None:
        waker.close()


def wake_dul(dul: DULServiceProvider) -> None:
    """Make a DUL reactor waiting in ``wait_dul`` look again now (it has something to send, or to stop)."""
    waker = getattr(dul, _DUL_WAKER, None)
    if waker is not None:
        waker.wake()


def wait_dul(dul: DULServiceProvider, cap_s: float = CAP_S) -> bool:
    """The DUL reactor's idle sleep: until its socket has data, a wake-up, or ``cap_s``; not at all
    while it has a primitive to send, an event to act on or is told to stop. False if this DUL has
    no wake-up pipe (its reactor was not started through ``open_dul``): the caller sleeps instead."""
    waker = getattr(dul, _DUL_WAKER, None)
    if waker is None:
        return False
    if dul.to_provider_queue.qsize() or dul.event_queue.qsize() or dul._kill_thread:
        return True
    transport = dul.socket
    raw = getattr(transport, "socket", None) if transport is not None else None
    watched = [waker.fileno]
    if raw is not None and raw.fileno() >= 0:
        watched.append(raw.fileno())
    try:
        ready, _, _ = select.select(watched, [], [], cap_s)
    except (OSError, ValueError):  # closed meanwhile: the reactor sees it on its next look
        return True
    if waker.fileno in ready:
        waker.drain()
    return True


def _event(assoc: Association) -> threading.Event:
    event = getattr(assoc, _ASSOC_EVENT, None)
    if event is None:
        with _create_lock:
            event = getattr(assoc, _ASSOC_EVENT, None)
            if event is None:
                event = threading.Event()
                setattr(assoc, _ASSOC_EVENT, event)
    return event


def wait_acceptor(assoc: Association, cap_s: float = CAP_S) -> None:
    """An acceptor's reactor sleep: until its DUL did something (``wake_acceptor``) or ``cap_s``; not
    at all while a DIMSE message waits in its queue. Cleared after the wait, before the reactor
    looks: whatever arrives after that look sets it again, so no wake-up is lost."""
    event = _event(assoc)
    if not (assoc.dimse.msg_queue.qsize() or assoc._kill):
        event.wait(cap_s)
    event.clear()


def wake_acceptor(assoc: Association) -> None:
    """Make an acceptor's reactor waiting in ``wait_acceptor`` look again now."""
    _event(assoc).set()

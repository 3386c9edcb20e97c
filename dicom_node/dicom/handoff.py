"""Accepted connections handed from the node's listening socket to its receiver processes, the least
busy first.

The node's process alone listens on the DICOM port. For each connection it accepts, ``Handoff.pick``
chooses the process with the fewest connections open, the node's own included (on a tie a receiver
process, so that the node's process keeps its time for grading): the node keeps the connection, or
passes its descriptor to that receiver over a Unix socket pair (``SCM_RIGHTS``, ``Lane``), where
``HandedServer`` takes it as if it had accepted it (TLS, timeouts and the association limits
unchanged). Each receiver reports how many of its connections have ended (a running total, so a lost
or repeated report does no harm), which is how the node knows how busy it is. Unlike SO_REUSEPORT,
whose hash of the addresses may put three of four senders on one process, the load is spread evenly.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_node.observability import get_logger

__all__ = ["Handoff", "Lane", "accept_handed", "report_closed"]

log = get_logger(__name__)

_CLOSED = struct.Struct("<Q")  # a receiver's report: how many handed connections have ended so far
_MAX_ADDRESS = 512  # bytes of a handed connection's message: the peer's address as JSON


@dataclass
class Lane:
    """The node's end of one receiver process's socket pair, and what it knows of that receiver's load."""

    index: int
    sock: socket.socket
    handed: int = 0  # connections handed over so far
    closed: int = 0  # of them, how many the receiver has reported ended
    alive: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def open(self) -> int:
        return self.handed - self.closed

    def hand(self, connection: socket.socket, address: tuple[object, ...]) -> bool:
        """Pass the connection's descriptor to the receiver; False if it cannot take it (gone)."""
        with self.lock:
            if not self.alive:
                return False
            try:
                socket.send_fds(self.sock, [json.dumps(list(address)).encode()], [connection.fileno()])
            except OSError:
                self.alive = False
                return False
            self.handed += 1
            return True

    def read_reports(self) -> None:
        """The lane's reader thread: the receiver's reports until its end of the pair closes."""
        while True:
            try:
                message = self.sock.recv(64)
            except OSError:
                message = b""
            if len(message) != _CLOSED.size:
                break
            (closed,) = _CLOSED.unpack(message)
            with self.lock:
                self.closed = max(self.closed, closed)
        with self.lock:
            self.alive = False
        with contextlib.suppress(OSError):
            self.sock.close()


class Handoff:
    """The node's side: one ``Lane`` per receiver process, and the choice of where a connection goes."""

    def __init__(self) -> None:
        self._lanes: dict[int, Lane] = {}
        self._lock = threading.Lock()

    def open_lane(self, index: int) -> socket.socket:
        """A new socket pair for receiver ``index`` (replacing the lane of a receiver it restarts);
        the receiver's end is returned, for the receiver process (the caller closes its copy)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lane = Lane(index, mine)
        with self._lock:
            old = self._lanes.get(index)
            self._lanes[index] = lane
        if old is not None:
            with old.lock:
                old.alive = False
        threading.Thread(target=lane.read_reports, name=f"handoff-lane-{index}", daemon=True).start()
        return theirs

    def close(self) -> None:
        """Every lane ends (the receivers see their socket pair close)."""
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            with lane.lock:
                lane.alive = False
            with contextlib.suppress(OSError):
                lane.sock.shutdown(socket.SHUT_RDWR)

    def loads(self) -> dict[int, int]:
        """Connections open per receiver process that can take more (index -> count)."""
        with self._lock:
            return {lane.index: lane.open for lane in self._lanes.values() if lane.alive}

    def pass_on(self, connection: socket.socket, address: tuple[object, ...], kept_open: int) -> bool:
        """Hand the connection to the least busy receiver process unless the node's own process
        (``kept_open`` connections open) is less busy than every one; whether it was handed over."""
        with self._lock:
            lanes = sorted((lane for lane in self._lanes.values() if lane.alive), key=lambda lane: lane.open)
        for lane in lanes:
            if lane.open > kept_open:
                return False
            if lane.hand(connection, address):
                return True
        return False


def accept_handed(lane: socket.socket) -> tuple[socket.socket, tuple[object, ...]]:
    """A receiver process's accept: the next connection the node handed over, and its peer's address.
    OSError when the node's end has closed (the receiver is stopping, or the node is gone)."""
    message, fds, _flags, _address = socket.recv_fds(lane, _MAX_ADDRESS, 1)
    if not fds:
        time.sleep(0.05)  # the pair stays readable at its end: no busy loop while the receiver stops
        raise ConnectionAbortedError("the node's end of the handoff socket closed")
    connection = socket.socket(fileno=fds[0])
    try:
        address = tuple(json.loads(message))
    except ValueError:
        address = ("?", 0)
    return connection, address


def report_closed(lane: socket.socket, closed: int, on_error: Callable[[OSError], None] | None = None) -> None:
    """A receiver process tells the node how many handed connections have ended so far."""
    try:
        lane.send(_CLOSED.pack(closed))
    except OSError as exc:  # the node is gone or stopping: nothing to tell
        if on_error is not None:
            on_error(exc)

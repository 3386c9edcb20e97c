"""The node's process-wide changes to pynetdicom, applied together by ``apply()`` when the storage
SCP starts and undone together by ``restore()`` when it stops:

- the reactors wait for their work (``wakeups``): a DUL reactor in ``select`` on its socket and a
  wake-up pipe (written to by ``send_pdu``, ``kill_dul``, ``stop_dul``), an acceptor's association
  reactor on an event set after every action of its DUL's state machine; instead of pynetdicom's
  1 ms polls, which cost CPU under the interpreter lock and delay every C-STORE and its response;
- the poll clock for pynetdicom's other sleeps (a requestor's reactor, the waits for a reactor to
  pause): every ``node.poll_interval_ms`` instead of every 1 ms, slower once idle (``_PollClock``);
- a filter on the root log handlers that lets one pynetdicom error per association thread through
  and counts the rest (``ERRORS``);
- a guard on pynetdicom's state machine (``StateMachine.do_action``): an exception in a protocol
  action, or an event its table does not allow (a second A-RELEASE-RQ, an A-ASSOCIATE-RQ that
  cannot be read, ...), ends the connection with an A-ABORT (``abort_connection``) instead of
  killing the DUL reactor thread and leaving the association half alive;
- the DUL reactor (``DULServiceProvider.run_reactor``) wakes the association acceptor when it ends
  before an A-ASSOCIATE-RQ was read, so that connection ends at once;
- a check on every received P-DATA (``DIMSEServiceProvider.receive_primitive``): a PDV on a
  presentation context that was not accepted, or a command set that cannot be decoded, is answered
  with an A-ABORT and one warning line;
- a PDU is read from the socket in reads of up to 256 KB (``AssociationSocket.recv``), not 4 KB;
- a plain C-STORE response is encoded directly, the same bytes as pynetdicom's
  (``DIMSEServiceProvider.send_msg``, ``responses``);
- ``threading.excepthook``: a pynetdicom reactor thread that meets an exception anyway ends its
  connection (A-ABORT, socket closed) without ever blocking in that thread;
- pynetdicom's own "standard" event handlers (``_config.LOG_HANDLER_LEVEL``) are not bound to new
  associations: they only write debug dumps of every PDU and DIMSE message (a cost per message),
  and one that raises (a C-STORE without a Message ID) keeps the node's own EVT_DIMSE_RECV handler
  from running, so the request would go unanswered.

They change pynetdicom for the whole process (every AE in it, the delivery SCU included). Calls
nest: each ``apply()`` needs its ``restore()``; the last one puts everything back as it was.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import pynetdicom._config
import pynetdicom.association
import pynetdicom.dul
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

from dicom_node.dicom import wakeups
from dicom_node.dicom.responses import encode_store_response
from dicom_node.dicom.statuses import AbortReason
from dicom_node.observability import get_logger

__all__ = ["ERRORS", "IDLE_AFTER_S", "IDLE_POLL_S", "OncePerConnection", "abort_connection", "applied", "apply",
           "restore", "restore_poll_interval", "set_poll_interval"]

log = get_logger(__name__)

P_DATA_RECEIVED = "Evt10"  # the state machine's event for a P-DATA-TF PDU received (PS3.8 9.2)
IDLE_POLL_S = 0.1  # an association idle for IDLE_AFTER_S polls ten times a second
IDLE_AFTER_S = 1.0


class _PollClock:
    """``time`` for pynetdicom's association and DUL modules: their sleeps capped at ``poll_s``
    while a reactor has work, and ``idle_s`` long once it has had none for ``idle_after_s``.

    pynetdicom's acceptor reactor sleeps a fixed 1 ms between polls of its DIMSE queue, and each
    association's DUL reactor 1 ms between polls of its socket; neither has a public setting, and
    each C-STORE waits for such polls: at 4 to 5 ms per image that is a large share. A reactor
    that calls ``sleep`` again right after the last one returned found nothing to do; once that
    has lasted ``idle_after_s`` its polls slow down to ``idle_s``, so an idle association costs
    (near) no CPU, and the first message after the pause waits at most ``idle_s``.
    """

    BUSY_GAP_S = 0.0005  # more than this between two sleeps of a thread: it did some work

    def __init__(self, poll_s: float, idle_s: float = IDLE_POLL_S, idle_after_s: float = IDLE_AFTER_S):
        self.poll_s, self.idle_s, self.idle_after_s = poll_s, idle_s, idle_after_s
        self._threads = threading.local()

    def sleep(self, seconds: float) -> None:
        if seconds == wakeups.REACTOR_SLEEP_S and _waited_for_work(threading.current_thread()):
            return
        state, now = self._threads, time.monotonic()
        if now - getattr(state, "last_wake", 0.0) > self.BUSY_GAP_S:
            state.idle_since = now
        idle = now - getattr(state, "idle_since", now) >= self.idle_after_s
        time.sleep(max(seconds, self.idle_s) if idle else min(seconds, self.poll_s))
        state.last_wake = time.monotonic()

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def _waited_for_work(thread: threading.Thread) -> bool:
    """A reactor's idle sleep made a wait for its work (``wakeups``): a DUL reactor's, and an
    acceptor's association reactor's while it runs (not paused, not ending). Whether it was."""
    if isinstance(thread, DULServiceProvider):
        return wakeups.wait_dul(thread)
    if (isinstance(thread, Association) and thread.is_acceptor and not thread._kill
            and not getattr(thread, "_is_paused", True)):
        wakeups.wait_acceptor(thread)
        return True
    return False


def set_poll_interval(poll_s: float) -> None:
    """Poll pynetdicom's association and DUL reactors every ``poll_s`` seconds instead of every 1 ms
    (for the whole process; ``restore_poll_interval`` undoes it). ``apply()`` calls it."""
    clock = _PollClock(poll_s)  # stands in for the `time` module: its sleep, and time's own for the rest
    pynetdicom.association.time = clock  # type: ignore[assignment]  # a duck-typed module, see _PollClock
    pynetdicom.dul.time = clock  # type: ignore[assignment]  # the same


def restore_poll_interval() -> None:
    """pynetdicom's own polling again (1 ms)."""
    pynetdicom.association.time = time
    pynetdicom.dul.time = time


class OncePerConnection(logging.Filter):
    """Lets the first pynetdicom error of each association thread through and counts the rest,
    so that protocol garbage costs a bounded number of log lines (the count is logged when the
    connection closes)."""

    def __init__(self) -> None:
        super().__init__()
        self.suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith("pynetdicom"):
            return True
        name = threading.current_thread().name
        with self._lock:
            if name in self.suppressed:
                self.suppressed[name] += 1
                return False
            self.suppressed[name] = 0
        record.exc_info, record.exc_text = None, None  # the first line says what; no traceback per PDU
        return True

    def closed(self, thread_name: str) -> int:
        """Forget a connection's thread; how many of its errors were suppressed."""
        with self._lock:
            return self.suppressed.pop(thread_name, 0)


#: The process's one error filter (the patches are process-wide): on the root handlers while applied.
ERRORS = OncePerConnection()


def abort_connection(assoc: Association, reason: AbortReason = AbortReason.NOT_SPECIFIED) -> bool:
    """End an association's connection now, from any thread (its own DUL reactor included): an
    A-ABORT PDU (source: service provider) written straight to the socket, the socket closed, the
    association and DUL reactors told to stop. It never waits on those reactors (``Association.abort``
    does, which deadlocks when called from the DUL thread). Whether the connection was still open."""
    dul = assoc.dul
    transport = dul.socket
    raw = getattr(transport, "socket", None)
    if raw is not None:
        pdu = A_ABORT_RQ()
        pdu.source, pdu.reason_diagnostic = 0x02, int(reason)
        with contextlib.suppress(Exception):  # the peer may be gone already: closing is what matters
            raw.sendall(pdu.encode())
        with contextlib.suppress(Exception):
            transport.close()  # type: ignore[union-attr]  # raw is not None: so is the transport
    assoc.is_aborted, assoc.is_established = True, False
    assoc._kill = True  # the association reactor returns at its next poll
    dul._kill_thread = True  # and the DUL reactor
    assoc._reactor_checkpoint.set()
    wakeups.wake_dul(dul)
    wakeups.wake_acceptor(assoc)
    if assoc.is_acceptor and assoc.requestor.primitive is None:
        _wake_acceptor(dul)
    return raw is not None


def _wake_acceptor(dul: DULServiceProvider) -> None:
    """An acceptor waiting for its A-ASSOCIATE-RQ gets None, "none came", and ends now (not after
    its ACSE timeout)."""
    dul.to_user_queue.put(None)  # None is what its timed-out wait returns too


class ProtocolViolation(Exception):
    """A PDU the node answers with an A-ABORT; its message says what was wrong (no patient data)."""

    def __init__(self, why: str, reason: AbortReason):
        super().__init__(why)
        self.reason = reason


def _peer(dul: DULServiceProvider) -> str:
    info = dul.assoc.requestor.address_info if dul.assoc.is_acceptor else dul.assoc.acceptor.address_info
    return str(getattr(info, "address", "?"))


def _checked_receive(original: Callable[[DIMSEServiceProvider, P_DATA], None]) -> Callable[..., None]:
    def receive_primitive(self: DIMSEServiceProvider, primitive: P_DATA) -> None:
        accepted = self.assoc._accepted_cx
        for context_id, _ in primitive.presentation_data_value_list:
            if context_id not in accepted:
                raise ProtocolViolation(f"a P-DATA on presentation context {context_id}, which was not accepted",
                                        AbortReason.INVALID_PDU_PARAMETER_VALUE)
        try:
            original(self, primitive)
        except Exception as exc:
            self.message = None  # the half-decoded message goes with the association
            raise ProtocolViolation(f"a DIMSE message that cannot be decoded ({type(exc).__name__}: "
                                    f"{str(exc)[:120]})", AbortReason.INVALID_PDU_PARAMETER_VALUE) from exc

    return receive_primitive


def _guarded_action(original: Callable[[StateMachine, str], None]) -> Callable[[StateMachine, str], None]:
    def do_action(self: StateMachine, event: str) -> None:
        try:
            original(self, event)
            assoc = self.dul.assoc
            if event != P_DATA_RECEIVED or assoc.dimse.msg_queue.qsize():  # not a fragment of a message
                wakeups.wake_acceptor(assoc)  # whatever the action queued for it
        except Exception as exc:  # noqa: BLE001 - the reactor would die with it: the connection ends instead
            dul = self.dul
            if isinstance(exc, ProtocolViolation):
                why, reason = str(exc), exc.reason
            else:
                why, reason = f"{type(exc).__name__}: {str(exc)[:160]}", AbortReason.UNEXPECTED_PDU
            log.warning("aborted an association: a protocol error", address=_peer(dul), state=self.current_state,
                        fsm_event=event, why=why)
            abort_connection(dul.assoc, reason)

    return do_action


def _dul_reactor(original: Callable[[DULServiceProvider], None]) -> Callable[[DULServiceProvider], None]:
    """``run_reactor``: its wake-up pipe opened and closed around it (``wakeups``); when it ends, the
    acceptor is told at once (and one still waiting for its A-ASSOCIATE-RQ ends)."""
    def run_reactor(self: DULServiceProvider) -> None:
        wakeups.open_dul(self)
        try:
            original(self)
        finally:  # ended before an A-ASSOCIATE-RQ was read (pynetdicom aborted a PDU it could not decode):
            assoc = self.assoc  # the acceptor waiting for that request ends now, not after its ACSE timeout
            if assoc.is_acceptor and assoc.requestor.primitive is None:
                _wake_acceptor(self)
            wakeups.close_dul(self)
            wakeups.wake_acceptor(assoc)  # its reactor sees the DUL gone now

    return run_reactor


def _waking_dul(original: Callable[..., object]) -> Callable[..., object]:
    """``send_pdu``, ``kill_dul``: then the DUL reactor looks at once (it may be waiting in ``wakeups``)."""
    def wrapped(self: DULServiceProvider, *args: object) -> object:
        result = original(self, *args)
        wakeups.wake_dul(self)
        return result

    return wrapped


def _stopping_dul(original: Callable[[DULServiceProvider], bool]) -> Callable[[DULServiceProvider], bool]:
    """``stop_dul``: the DUL reactor is woken to see its stop flag before pynetdicom waits for it to end."""
    def stop_dul(self: DULServiceProvider) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            wakeups.wake_dul(self)
        return original(self)

    return stop_dul


def _plain_store_responses(original: Callable[..., None]) -> Callable[..., None]:
    """``DIMSEServiceProvider.send_msg``: a plain C-STORE response is encoded directly
    (``responses.encode_store_response``, the same bytes) unless someone listens to EVT_DIMSE_SENT
    (which wants pynetdicom's message object)."""
    def send_msg(self: DIMSEServiceProvider, primitive: object, context_id: int) -> None:
        if (isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            encoded = encode_store_response(primitive)
            if encoded is not None and (not self.maximum_pdu_size or len(encoded) + 6 <= self.maximum_pdu_size):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))  # last command fragment
                self.dul.send_pdu(pdata)
                return
        original(self, primitive, context_id)

    return send_msg


RECV_CHUNK = 256 * 1024  # the most one read of a PDU asks the socket for


def _larger_reads(original: Callable[..., bytearray]) -> Callable[..., bytearray]:
    """``AssociationSocket.recv``: read what the socket holds, up to ``RECV_CHUNK`` a call, instead
    of pynetdicom's 4 KB a call (32 reads and copies per 128 KB PDU, each under the interpreter
    lock). Memory still grows only with what the peer sends, never with what a PDU header claims."""
    def recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
        sock = self.socket
        if sock is None:
            return original(self, nr_bytes)
        received = bytearray()
        while len(received) < nr_bytes:
            data = sock.recv(min(nr_bytes - len(received), RECV_CHUNK))
            if not data:  # the connection is broken: what came so far (as pynetdicom's own)
                break
            received += data
        return received

    return recv


def _thread_died(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: a pynetdicom reactor thread (an association or its DUL) that meets an
    exception ends its connection (``abort_connection``: A-ABORT, socket closed, reactors stopped)
    instead of leaving the peer waiting or the thread stuck; logged once."""
    thread = args.thread
    assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
    log.error("a thread ended with an exception", thread=getattr(thread, "name", "?"),
              error=f"{args.exc_type.__name__}: {args.exc_value}", association=assoc is not None)
    if isinstance(assoc, Association):
        with contextlib.suppress(Exception):  # the association is already broken: any error here is moot
            abort_connection(assoc)


_lock = threading.Lock()
_depth = 0
_saved_excepthook: Callable[[threading.ExceptHookArgs], object] | None = None
_filtered: list[logging.Handler] = []
_saved_methods: list[tuple[type, str, object]] = []
_saved_log_handler_level = "standard"


def apply(poll_s: float) -> None:
    """Apply the poll clock (``poll_s`` seconds), the error filter on the root log handlers, the
    state machine's guard, the P-DATA check and the excepthook; nested calls only update the poll
    interval."""
    global _depth, _saved_excepthook, _saved_log_handler_level
    with _lock:
        set_poll_interval(poll_s)
        _depth += 1
        if _depth > 1:
            return
        for handler in logging.getLogger().handlers:  # a logger's own filter would miss pynetdicom.dul & co
            handler.addFilter(ERRORS)
            _filtered.append(handler)
        _saved_excepthook = threading.excepthook
        threading.excepthook = _thread_died
        for owner, name, wrap in ((StateMachine, "do_action", _guarded_action),
                                  (DIMSEServiceProvider, "receive_primitive", _checked_receive),
                                  (DIMSEServiceProvider, "send_msg", _plain_store_responses),
                                  (AssociationSocket, "recv", _larger_reads),
                                  (DULServiceProvider, "run_reactor", _dul_reactor),
                                  (DULServiceProvider, "send_pdu", _waking_dul),
                                  (DULServiceProvider, "kill_dul", _waking_dul),
                                  (DULServiceProvider, "stop_dul", _stopping_dul)):
            original = owner.__dict__[name]
            _saved_methods.append((owner, name, original))
            setattr(owner, name, wrap(original))
        _saved_log_handler_level = pynetdicom._config.LOG_HANDLER_LEVEL
        pynetdicom._config.LOG_HANDLER_LEVEL = "none"


def restore() -> None:
    """Undo ``apply()``: the last call puts pynetdicom's polling, the log handlers, its state machine,
    its P-DATA intake and ``threading.excepthook`` back as they were (a call without an ``apply()`` does nothing)."""
    global _depth, _saved_excepthook
    with _lock:
        if _depth == 0:
            return
        _depth -= 1
        if _depth > 0:
            return
        restore_poll_interval()
        for handler in _filtered:
            handler.removeFilter(ERRORS)
        _filtered.clear()
        if threading.excepthook is _thread_died and _saved_excepthook is not None:
            threading.excepthook = _saved_excepthook
        _saved_excepthook = None
        for owner, name, original in reversed(_saved_methods):
            setattr(owner, name, original)
        _saved_methods.clear()
        pynetdicom._config.LOG_HANDLER_LEVEL = _saved_log_handler_level


def applied() -> bool:
    """Whether the changes are in place (some ``apply()`` not yet restored)."""
    return _depth > 0

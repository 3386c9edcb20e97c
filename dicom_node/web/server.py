"""The web page's server: uvicorn in a thread of its own (its own event loop), on a socket bound
before the node reports ready (a port in use stops the start with a clear error)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from dicom_node.config import Settings
from dicom_node.observability import get_logger
from dicom_node.store import Ledger
from dicom_node.web.app import build_app
from dicom_node.web.context import NodeActions, WebContext
from dicom_node.web.security import AccountsFile
from dicom_node.web.sessions import SessionStore

__all__ = ["WebServer"]

log = get_logger(__name__)


class WebServer:
    """The node's web page; ``start()`` binds and serves in the background, ``stop()`` ends it."""

    def __init__(self, settings: Settings, node: NodeActions):
        self.web = settings.web
        self.ledger = Ledger(Path(settings.storage.ledger_path))  # its own connection: never waits on C-STORE's
        node.metrics.watch(self.ledger.state_counts, Path(settings.storage.spool_dir), node.queued)
        self.sessions = SessionStore.of(settings)  # the sessions file (opened here: a bad path stops the start)
        app = build_app(WebContext(settings, self.ledger, node, AccountsFile(Path(self.web.accounts_file)),
                                   self.sessions))
        config = uvicorn.Config(app, host=self.web.bind_address, port=self.web.port or 0, log_config=None,
                                access_log=False, lifespan="off", server_header=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self) -> None:
        """Bind (OSError if the address is taken), then serve in a thread."""
        family = socket.AF_INET6 if ":" in self.web.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.web.bind_address, self.web.port or 0))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"the web page cannot listen on {self.web.bind_address}:{self.web.port}: "
                                     f"{exc.strerror}") from None
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="web", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise OSError(f"the web page did not start on {self.web.bind_address}:{self.port}")
        log.info("web page listening", address=self.web.bind_address, port=self.port,
                 url=f"http://{self.web.bind_address}:{self.port}/")

    def stop(self) -> None:
        if self.thread is not None:
            self.server.should_exit = True
            self.thread.join(10)
        self.ledger.close()
        self.sessions.close()
        log.info("web page stopped")

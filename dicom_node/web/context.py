"""What the web page works with: the settings, its own ledger connection, the accounts file, the
server-side sessions, and the running node's actions (``NodeActions``: the service's ``Node``
provides them; tests pass a small double)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from dicom_node.config import Settings
from dicom_node.observability import NodeMetrics
from dicom_node.store import Ledger
from dicom_node.web.security import AccountsFile
from dicom_node.web.sessions import SessionStore

__all__ = ["NodeActions", "WebContext"]


class NodeActions(Protocol):
    """What the web page asks of the running node (``dicom_node.service.Node`` provides it)."""

    metrics: NodeMetrics

    def grade_again(self, study_uid: str, actor: str) -> bool: ...

    def send_again(self, study_uid: str, actor: str) -> int: ...

    def release_now(self, study_uid: str) -> None: ...

    def queued(self) -> int:
        """How many studies are with the grading workers (for ``/metrics``)."""
        ...


@dataclass
class WebContext:
    settings: Settings
    ledger: Ledger  # the web page's own connection to the node's ledger
    node: NodeActions
    accounts: AccountsFile
    sessions: SessionStore | None = field(default=None)  # None: the store the settings name (``SessionStore.of``)

    def session_store(self) -> SessionStore:
        """The server-side sessions (opened on first use)."""
        if self.sessions is None:
            self.sessions = SessionStore.of(self.settings)
        return self.sessions

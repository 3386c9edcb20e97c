"""What the web page works with: the settings, its own ledger connection, the accounts file, the
server-side sessions, and the running node's actions (``NodeActions``: the service's ``Node``
provides them; tests pass a small double)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dicom_node.config import Settings
from dicom_node.observability import NodeMetrics
from dicom_node.store import Ledger
from dicom_node.web.security import AccountsFile
from dicom_node.web.sessions import SessionStore

__all__ = ["FetchView", "FetchedStudyView", "NodeActions", "WebContext"]


class FetchedStudyView(Protocol):
    """A study a fetch found, as the page shows it (``pipeline.FetchedStudy``)."""

    @property
    def study_uid(self) -> str: ...
    @property
    def series(self) -> int: ...
    @property
    def error(self) -> str | None: ...
    @property
    def retrieved(self) -> int: ...
    @property
    def expected(self) -> int | None: ...


class FetchView(Protocol):
    """A fetch requested on the page, as it goes (``pipeline.FetchJob``)."""

    @property
    def id(self) -> int: ...
    @property
    def query(self) -> str: ...
    @property
    def actor(self) -> str: ...
    @property
    def started_at(self) -> float: ...
    @property
    def state(self) -> str: ...
    @property
    def detail(self) -> str: ...
    @property
    def studies(self) -> Sequence[FetchedStudyView]: ...
    @property
    def finished_at(self) -> float | None: ...


class NodeActions(Protocol):
    """What the web page asks of the running node (``dicom_node.service.Node`` provides it)."""

    metrics: NodeMetrics

    def grade_again(self, study_uid: str, actor: str) -> bool: ...

    def send_again(self, study_uid: str, actor: str) -> int: ...

    def release_now(self, study_uid: str) -> None: ...

    def queued(self) -> int:
        """How many studies are with the grading workers (for ``/metrics``)."""
        ...

    def fetch(self, accession: str, actor: str) -> FetchView:
        """Fetch the study with this accession number from the PACS and grade it (in the background)."""
        ...

    def fetches(self) -> Sequence[FetchView]:
        """The fetches requested on the page, newest first."""
        ...

    def can_fetch(self) -> bool:
        """Whether a query/retrieve source is configured."""
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

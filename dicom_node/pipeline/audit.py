"""One line of the audit trail, written by the pipeline: a failure to write it is logged, never raised."""

from __future__ import annotations

from typing import Any

from dicom_node.observability import get_logger
from dicom_node.states import EventKind
from dicom_node.store import Ledger

__all__ = ["audit"]

log = get_logger(__name__)


def audit(ledger: Ledger, kind: EventKind, study_uid: str | None, detail: str, data: dict[str, Any] | None = None,
          actor: str = "node") -> None:
    """One line of the audit trail (a failure to write it is logged, never raised)."""
    try:
        ledger.add_event(kind, actor, study_uid, detail, data)
    except Exception as exc:  # noqa: BLE001 - the audit line is lost (logged), what it records is not
        log.error("could not write the audit trail", study_uid=study_uid, error=f"{type(exc).__name__}: {exc}")

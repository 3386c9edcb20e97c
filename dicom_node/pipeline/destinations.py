"""The kinds of destination the results go to, behind one small interface: a ``Sender`` stores a
run's files on its destination (``send``), raising a ``NodeError`` that says why when not all
were stored. A storage SCP is sent to by C-STORE (``dicom.send_files``), a DICOMweb origin server
by STOW-RS (``dicomweb.store_files``); the retries, the ledger's rows, the audit trail and the
metrics are the same for both (``pipeline.delivery``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicom_node.config import Destination as DimseDestination
from dicom_node.config import DicomWebDestination, Settings
from dicom_node.dicom import send_files
from dicom_node.dicomweb import store_files

__all__ = ["DicomWebSender", "DimseSender", "Sender", "sender_for"]


class Sender(Protocol):
    """Stores files on one destination: returns when every file is stored, raises otherwise."""

    def send(self, paths: list[Path]) -> None: ...


@dataclass(frozen=True)
class DimseSender:
    """C-STORE over one association (``dicom.send_files``)."""

    destination: DimseDestination
    calling_aet: str
    timeout: float

    def send(self, paths: list[Path]) -> None:
        send_files(self.destination, self.calling_aet, paths, timeout=self.timeout)


@dataclass(frozen=True)
class DicomWebSender:
    """STOW-RS in one request (``dicomweb.store_files``)."""

    destination: DicomWebDestination
    timeout: float

    def send(self, paths: list[Path]) -> None:
        store_files(self.destination, paths, timeout=self.timeout)


def sender_for(destination: DimseDestination | DicomWebDestination, settings: Settings) -> Sender:
    """The sender of a configured destination, with the delivery's timeout."""
    timeout = settings.delivery.timeout_s
    if isinstance(destination, DicomWebDestination):
        return DicomWebSender(destination, timeout)
    return DimseSender(destination, settings.node.ae_title, timeout)

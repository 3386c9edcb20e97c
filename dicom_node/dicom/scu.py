"""Sending result files (SR, SC, PDF) to a destination by C-STORE (pynetdicom as the SCU). The
retry schedule is the pipeline's (``pipeline.delivery``)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # a name made at import

from dicom_node.config import Destination
from dicom_node.dicom.statuses import STORED
from dicom_node.errors import NodeError
from dicom_node.tls import client_context

__all__ = ["DeliveryError", "send_files"]


class DeliveryError(NodeError, RuntimeError):
    """A destination did not store every file; the message says why (for the ledger and the log)."""


def _sop_class(path: Path) -> str:
    """A file's SOP Class UID from its file meta (no data set read), else from its data set."""
    meta = read_file_meta_info(path)
    if "MediaStorageSOPClassUID" in meta:
        return str(meta.MediaStorageSOPClassUID)
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)


def send_files(destination: Destination, calling_aet: str, paths: list[Path], timeout: float = 30.0) -> None:
    """C-STORE every file to ``destination`` over one association, which proposes a presentation
    context for every SOP class among the files at once; raise DeliveryError unless all are stored.

    Only the files' meta is read before associating; each file is read just before it is sent, so
    the first one (a run's SR) leaves without waiting for the rest to be read."""
    sop_classes = sorted({_sop_class(p) for p in paths})
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    # Verification too, which every SCP accepts: a destination that accepts none of the files' SOP
    # classes (the rest of a run, sent after its SR: SCs, a PDF) still associates, and the refusal
    # names the SOP class it would not take instead of reading as an unreachable peer
    ae.add_requested_context(Verification)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    tls_args = (client_context(destination.tls), destination.host) if destination.tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "no association (peer unreachable or aborted)"
        if tls_args is not None and not assoc.is_rejected:
            why = "no association (peer unreachable, aborted, or the TLS handshake failed: see the log)"
        raise DeliveryError(f"{where}: {why}")
    try:
        for path in paths:
            status = assoc.send_c_store(pydicom.dcmread(path))
            code = getattr(status, "Status", None)
            if code not in STORED:
                detail = "no response" if code is None else f"status 0x{int(code):04X}"
                raise DeliveryError(f"{where}: {path.name} not stored ({detail})")
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()

"""DIMSE bytes in and out: the storage SCP (``scp``: C-ECHO, and C-STORE through the node's one
admission, ``dicom_node.ingest``, into the spool and the ledger), who may associate (``peers``),
the process-wide pynetdicom tuning applied and restored together (``tuning``), association reject
codes by name and the C-STORE statuses (``statuses``: the admission's ``StoreStatus``) and the
delivery SCU (``scu``), and the query/retrieve SCU (``qr``: C-FIND, C-MOVE, C-GET; ``qr_dicomweb``:
QIDO-RS and WADO-RS). TLS contexts come from the shared ``dicom_node.tls`` (the configuration
checks its files with it at load)."""

from dicom_node.dicom.peers import GuardedServer, PeerGate
from dicom_node.dicom.qr import (
    DimseSource,
    QRSource,
    RetrieveTally,
    RetrieveTimeout,
    SeriesMatch,
    SourceError,
    StudyMatch,
    StudyQuery,
)
from dicom_node.dicom.qr_dicomweb import DicomWebSource
from dicom_node.dicom.scp import TRANSFER_SYNTAXES, StorageSCP
from dicom_node.dicom.scu import DeliveryError, send_files
from dicom_node.dicom.statuses import (
    STORED,
    ProviderRejectReason,
    RejectReason,
    RejectResult,
    RejectSource,
    StoreStatus,
)

__all__ = ["STORED", "TRANSFER_SYNTAXES", "DeliveryError", "DicomWebSource", "DimseSource", "GuardedServer", "PeerGate",
           "ProviderRejectReason", "QRSource", "RejectReason", "RejectResult", "RejectSource", "RetrieveTally",
           "RetrieveTimeout", "SeriesMatch", "SourceError", "StorageSCP", "StoreStatus", "StudyMatch", "StudyQuery",
           "send_files"]

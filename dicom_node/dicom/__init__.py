"""DIMSE bytes in and out: the storage SCP (``scp``: C-ECHO, and C-STORE through the node's one
admission, ``dicom_node.ingest``, into the spool and the ledger), run in several processes on one
port (``receivers``; the node's process accepts and hands connections on: ``handoff``), who may
associate and how many at once (``peers``),
the process-wide pynetdicom tuning applied and restored together (``tuning``; its reactors wait
for their work instead of polling: ``wakeups``), association reject
codes by name and the C-STORE statuses (``statuses``: the admission's ``StoreStatus``) and the
delivery SCU (``scu``), and the query/retrieve SCU (``qr``: C-FIND, C-MOVE, C-GET; its
DICOMweb twin, QIDO-RS and WADO-RS, is ``dicomweb.retrieve``). TLS contexts come from the shared
``dicom_node.tls`` (the configuration checks its files with it at load)."""

from dicom_node.dicom.handoff import Handoff
from dicom_node.dicom.peers import AssociationSlots, GuardedServer, PeerGate, SharedSlots
from dicom_node.dicom.qr import (
    DimseSource,
    Progress,
    QRSource,
    RetrieveTally,
    RetrieveTimeout,
    SeriesMatch,
    SourceError,
    StudyMatch,
    StudyQuery,
    series_match,
    study_match,
)
from dicom_node.dicom.receivers import Receivers, receiver_count, slots_path
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

__all__ = ["STORED", "TRANSFER_SYNTAXES", "AssociationSlots", "DeliveryError", "DimseSource", "GuardedServer",
           "Handoff", "PeerGate", "Progress", "ProviderRejectReason", "QRSource", "Receivers", "RejectReason",
           "RejectResult", "RejectSource", "RetrieveTally", "RetrieveTimeout", "SeriesMatch", "SharedSlots",
           "SourceError", "StorageSCP", "StoreStatus", "StudyMatch", "StudyQuery", "receiver_count", "send_files",
           "series_match", "slots_path", "study_match"]

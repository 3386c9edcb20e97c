"""DIMSE bytes in and out: the storage SCP (``scp``: C-ECHO, and C-STORE through the node's one
admission, ``dicom_node.ingest``, into the spool and the ledger), run in several processes on one
port (``receivers``), who may associate and how many at once (``peers``),
the process-wide pynetdicom tuning applied and restored together (``tuning``), association reject
codes by name and the C-STORE statuses (``statuses``: the admission's ``StoreStatus``) and the
delivery SCU (``scu``). TLS contexts come from the shared ``dicom_node.tls`` (the configuration
checks its files with it at load)."""

from dicom_node.dicom.peers import AssociationSlots, GuardedServer, PeerGate, SharedSlots
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

__all__ = ["STORED", "TRANSFER_SYNTAXES", "AssociationSlots", "DeliveryError", "GuardedServer", "PeerGate",
           "ProviderRejectReason", "Receivers", "RejectReason", "RejectResult", "RejectSource", "SharedSlots",
           "StorageSCP", "StoreStatus", "receiver_count", "send_files", "slots_path"]

"""DIMSE bytes in and out: the storage SCP (``scp``: C-ECHO, C-STORE into the spool and the
ledger), who may associate (``peers``), the process-wide pynetdicom tuning applied and restored
together (``tuning``), status and reject codes by name (``statuses``) and the delivery SCU
(``scu``). TLS contexts come from the shared ``dicom_node.tls`` (the configuration checks its files
with it at load)."""

from dicom_node.dicom.peers import GuardedServer, PeerGate
from dicom_node.dicom.scp import TRANSFER_SYNTAXES, Refused, StorageSCP
from dicom_node.dicom.scu import DeliveryError, send_files
from dicom_node.dicom.statuses import (
    STORED,
    ProviderRejectReason,
    RejectReason,
    RejectResult,
    RejectSource,
    StoreStatus,
)

__all__ = ["STORED", "TRANSFER_SYNTAXES", "DeliveryError", "GuardedServer", "PeerGate", "ProviderRejectReason",
           "Refused", "RejectReason", "RejectResult", "RejectSource", "StorageSCP", "StoreStatus", "send_files"]

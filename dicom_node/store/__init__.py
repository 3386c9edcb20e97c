"""The store: what must survive a crash. The ledger (``ledger``: studies, instances, reports,
deliveries, uploads, the audit trail, in SQLite), the spool's layout (``spool``), durable writes
(``durable``: fsync, access rights) and paths checked to lie under the node's own folders (``paths``)."""

from dicom_node.store.commit import GroupCommit
from dicom_node.store.durable import Syncer, fsync_dir, fsync_files, restrict_access, write_beside, write_durably
from dicom_node.store.ledger import (
    Delivery,
    DeliveryProgress,
    Event,
    InstanceRecord,
    KnownInstance,
    Ledger,
    LedgerVersionError,
    PacsAnswer,
    PacsQuery,
    Purgeable,
    Recorded,
    Report,
    SeriesCount,
    Study,
    StudyRow,
    Upload,
)
from dicom_node.store.paths import UnsafePath, remove_tree, uid_problem, under
from dicom_node.store.spool import spool_path

__all__ = ["Delivery", "DeliveryProgress", "Event", "GroupCommit", "InstanceRecord", "KnownInstance", "Ledger",
           "LedgerVersionError", "PacsAnswer", "PacsQuery", "Purgeable", "Recorded", "Report", "SeriesCount",
           "Study", "StudyRow", "Syncer", "UnsafePath", "Upload", "fsync_dir", "fsync_files", "remove_tree",
           "restrict_access", "spool_path", "uid_problem", "under", "write_beside", "write_durably"]

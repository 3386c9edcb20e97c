"""Retention: the spool files and results of finished studies removed past ``storage.retention_days``,
and, oldest first, while free disk is under ``storage.purge_below_free_mb``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from dicom_node.config import Settings
from dicom_node.observability import get_logger
from dicom_node.store import Ledger, UnsafePath, remove_tree, under

__all__ = ["PURGE_INTERVAL_S", "purge"]

log = get_logger(__name__)

PURGE_INTERVAL_S = 10.0


def purge(settings: Settings, ledger: Ledger) -> int:
    """Remove the spool files and results of finished studies past ``storage.retention_days``,
    and, oldest first, while free disk is under ``storage.purge_below_free_mb``. Only the files
    the ledger lists are removed (an instance arriving meanwhile stays); a study in work never
    is a candidate. Returns how many studies were purged."""
    storage, now = settings.storage, time.time()
    settle = settings.study.quiet_time_s  # nothing that may still be arriving
    candidates = ledger.purgeable(now - settle)
    spool, results = Path(storage.spool_dir), Path(storage.results_dir)
    purged = 0
    for candidate in candidates:
        study_uid, files = candidate.study_uid, candidate.files
        too_old = (storage.retention_days is not None
                   and _last_received(ledger, study_uid) < now - storage.retention_days * 86400)
        disk_low = storage.purge_below_free_mb and shutil.disk_usage(spool).free < storage.purge_below_free_mb * 2**20
        if not (too_old or disk_low):
            continue
        try:
            for path in files:
                under(spool, *path.resolve().relative_to(spool.resolve()).parts).unlink(missing_ok=True)
            # the series folders, then the study's (spool/<study>/<series>/<sop>.dcm)
            for folder in sorted({p.parent for p in files} | {p.parent.parent for p in files},
                                 key=lambda f: len(f.parts), reverse=True):
                if folder.resolve() != spool.resolve() and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            remove_tree(results, under(results, study_uid))
        except (UnsafePath, ValueError, OSError) as exc:
            log.error("could not purge a study", study_uid=study_uid, error=f"{type(exc).__name__}: {exc}")
            continue
        why = "retention" if too_old else "disk watermark"
        ledger.purged(study_uid, files, f"{len(files)} spooled instances and the results ({why})")
        log.info("study purged", study_uid=study_uid, instances=len(files), why=why)
        purged += 1
    return purged


def _last_received(ledger: Ledger, study_uid: str) -> float:
    study = ledger.study(study_uid)
    return study.last_received if study is not None else time.time()

"""The spool's layout: spool/<study>/<series>/<SOP instance>.dcm, every part a checked UID and the
path checked to lie under the spool (the RSNA Kaggle files repeat SOP Instance UIDs across
series, so an instance is filed by series and SOP Instance UID)."""

from __future__ import annotations

from pathlib import Path

from dicom_node.store.paths import under

__all__ = ["spool_path"]


def spool_path(spool: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    """Where an instance is spooled: spool/<study>/<series>/<SOP instance>.dcm (the RSNA Kaggle
    files repeat SOP Instance UIDs across series); UnsafePath unless it lies under the spool."""
    return under(spool, study_uid, series_uid, f"{sop_uid}.dcm")

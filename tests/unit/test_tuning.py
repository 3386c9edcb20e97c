"""dicom_node.dicom.tuning: pynetdicom's process-wide patches applied together and undone together."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pynetdicom.association
import pynetdicom.dul

from demo.orthanc import free_port
from dicom_node.config import load_settings
from dicom_node.dicom import StorageSCP, tuning
from dicom_node.store import Ledger


def _pristine(hook: object) -> bool:
    """Nothing of the tuning in place; ``threading.excepthook`` is ``hook`` (pytest installs its own)."""
    handlers = logging.getLogger().handlers
    return (pynetdicom.association.time is time and pynetdicom.dul.time is time
            and threading.excepthook is hook and not tuning.applied()
            and all(tuning.ERRORS not in h.filters for h in handlers))


def test_apply_patches_everything_and_restore_undoes_everything() -> None:
    logging.getLogger().addHandler(handler := logging.NullHandler())
    hook = threading.excepthook
    try:
        assert _pristine(hook)
        tuning.apply(0.0002)
        assert pynetdicom.association.time is not time and pynetdicom.dul.time is not time
        assert threading.excepthook is not hook
        assert tuning.ERRORS in handler.filters
        tuning.apply(0.0005)  # nested: the inner restore keeps the patches
        tuning.restore()
        assert tuning.applied() and threading.excepthook is not hook
        tuning.restore()
        assert _pristine(hook)
        tuning.restore()  # one restore too many does nothing
        assert _pristine(hook)
    finally:
        logging.getLogger().removeHandler(handler)


def test_the_storage_scp_restores_what_it_applied(tmp_path: Path) -> None:
    settings = load_settings(environ={"LUMBAR_NODE__NODE__PORT": str(free_port()),
                                      "LUMBAR_NODE__NODE__BIND_ADDRESS": "127.0.0.1",
                                      "LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool")})
    ledger = Ledger(tmp_path / "ledger.sqlite")
    scp = StorageSCP(settings, ledger)
    hook = threading.excepthook
    assert _pristine(hook)
    scp.start()
    try:
        assert tuning.applied() and threading.excepthook is not hook
    finally:
        scp.stop()
        ledger.close()
    assert _pristine(hook)

"""The storage SCP against real DCMTK peers (storescu, echoscu): spool, ledger, statuses."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from demo.orthanc import free_port, storescu
from dicom_node.config import load_settings
from dicom_node.dicom.scp import StorageSCP
from dicom_node.store.ledger import Ledger

CALLING = "LUMBAR_TEST"
Node = tuple[StorageSCP, Ledger]


def _scp(tmp_path: Path, **env: str) -> Node:
    environ = {"LUMBAR_NODE__NODE__PORT": str(free_port()), "LUMBAR_NODE__NODE__BIND_ADDRESS": "127.0.0.1",
               "LUMBAR_NODE__NODE__ALLOWED_PEERS": f"[{{ae_title: {CALLING}}}]",
               "LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
               "LUMBAR_NODE__STORAGE__LEDGER_PATH": str(tmp_path / "ledger.sqlite"), **env}
    settings = load_settings(environ=environ)
    ledger = Ledger(settings.storage.ledger_path)
    scp = StorageSCP(settings, ledger)
    scp.start()
    return scp, ledger


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    scp, ledger = _scp(tmp_path)
    yield scp, ledger
    scp.stop()
    ledger.close()


def _study(phantom_dir: Path) -> list[Path]:
    return sorted(sorted((phantom_dir / "train_images").iterdir())[0].rglob("*.dcm"))


def test_a_study_sent_by_storescu_is_spooled_byte_for_byte_and_recorded(node: Node, phantom_dir: Path) -> None:
    scp, ledger = node
    files = _study(phantom_dir)
    sent = storescu(files, scp.settings.node.port, called=scp.settings.node.ae_title, calling=CALLING)
    assert sent.returncode == 0, sent.stderr[-1500:]
    [study] = ledger.studies()
    assert study.state == "receiving" and study.instances == len(files)
    source = pydicom.dcmread(files[0])
    spooled = pydicom.dcmread(scp.spool / source.StudyInstanceUID / source.SeriesInstanceUID /
                              f"{source.SOPInstanceUID}.dcm")
    assert spooled.PixelData == source.PixelData and spooled.StudyInstanceUID == study.study_uid
    # sending the same study again records nothing twice
    storescu(files[:3], scp.settings.node.port, called=scp.settings.node.ae_title, calling=CALLING)
    assert ledger.studies()[0].instances == len(files)


def test_echo_and_an_unknown_calling_ae_is_refused(node: Node) -> None:
    scp, _ = node
    port, aet = str(scp.settings.node.port), scp.settings.node.ae_title
    ok = subprocess.run(["/usr/bin/echoscu", "-aet", CALLING, "-aec", aet, "127.0.0.1", port],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(["/usr/bin/echoscu", "-aet", "STRANGER", "-aec", aet, "127.0.0.1", port],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "Rejected" in (refused.stdout + refused.stderr)


def test_low_disk_answers_out_of_resources_and_stores_nothing(tmp_path: Path, phantom_dir: Path) -> None:
    scp, ledger = _scp(tmp_path, LUMBAR_NODE__STORAGE__MIN_FREE_DISK_MB=str(10**9))
    try:
        sent = subprocess.run(["/usr/bin/storescu", "-v", "-aet", CALLING, "-aec", scp.settings.node.ae_title,
                               "127.0.0.1", str(scp.settings.node.port), str(_study(phantom_dir)[0])],
                              capture_output=True, text=True, env={"TCP_NODELAY": "1"})
        output = sent.stdout + sent.stderr
        assert sent.returncode != 0 and "refused: outofresources" in output.lower(), output
        assert ledger.studies() == []
        assert not any(scp.spool.rglob("*.dcm"))
    finally:
        scp.stop()
        ledger.close()


def test_a_dataset_that_cannot_be_understood_is_refused_and_the_node_keeps_running(node: Node) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    from pynetdicom import AE

    scp, ledger = node
    ds = Dataset()  # an MR instance without its study and series: nothing to file it under
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    scu = AE(ae_title=CALLING)
    scu.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = scu.associate("127.0.0.1", scp.settings.node.port, ae_title=scp.settings.node.ae_title)
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xC000
    assert ledger.studies() == [] and not any(scp.spool.rglob("*.dcm"))
    echo = subprocess.run(["/usr/bin/echoscu", "-aet", CALLING, "-aec", scp.settings.node.ae_title, "127.0.0.1",
                           str(scp.settings.node.port)], capture_output=True, text=True)
    assert echo.returncode == 0


def test_status_lists_the_ledger_studies(node: Node, phantom_dir: Path) -> None:
    import json
    import os
    import sys

    scp, _ = node
    files = _study(phantom_dir)[:4]
    storescu(files, scp.settings.node.port, called=scp.settings.node.ae_title, calling=CALLING)
    env = {**os.environ, "LUMBAR_NODE__STORAGE__LEDGER_PATH": str(scp.settings.storage.ledger_path)}
    exe = Path(sys.executable).with_name("lumbar-node")
    out = subprocess.run([str(exe), "status", "--json"], capture_output=True, text=True, env=env, check=True).stdout
    [study] = json.loads(out)
    assert study["state"] == "receiving" and study["instances"] == 4
    assert study["study_uid"] == pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID

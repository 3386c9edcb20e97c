"""Real MR studies that are not lumbar spines, in many transfer syntaxes, sent to the node as it is
served: every instance is stored, every study ends `skipped` with its reason, nothing reaches the
destination (a real DCMTK storescp). A radiologist must never find an AI lumbar report on a brain MR.

The images are the real MR files shipped in the pydicom and pydicom-data wheels (a 64x64 MR in
seven transfer syntaxes; three small MR studies; abdominal MR; a 1024x1024 MR in four encodings;
an Enhanced MR multi-frame head in five) and a phantom study whose three series are
replaced by uniform noise (a case a fuzz run found graded as if it were a spine)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import data_store
import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from demo.orthanc import free_port, storescu
from dicom_node.states import StudyState
from tests.support.served_node import NODE_AET, SENDER_AET, ServedNode, stop_all, wait_for
from tests.support.tools import complete_study, require_tool

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
PYDICOM_DATA_FILES = Path(data_store.__file__).parent / "data"  # the pydicom-data wheel
MR_SMALL = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
            "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"]
MR2 = ["MR2_J2KI.dcm", "MR2_J2KR.dcm", "MR2_UNCI.dcm", "MR2_UNCR.dcm"]
ENHANCED_HEAD = ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_2k_lossless.dcm",
                 "emri_small_jpeg_ls_lossless.dcm"]


# storescu's option that proposes a transfer syntax (uncompressed little endian is its default)
PROPOSE = {RLELossless: ("-xr",), JPEG2000Lossless: ("-xv",), JPEG2000: ("-xw",), JPEGLSLossless: ("-xt",),
           ExplicitVRBigEndian: ("-xb",)}


def _by_transfer_syntax(files: list[Path]) -> dict[UID, list[Path]]:
    groups: dict[UID, list[Path]] = {}
    for path in files:
        groups.setdefault(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID, []).append(path)
    return groups


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    yield
    stop_all()


def _encodings(folder: Path, names: list[str], out: Path) -> list[Path]:
    """One real image in several encodings, as distinct instances of one series (the files share a
    SOP Instance UID: each gets its own)."""
    files = []
    for i, name in enumerate(names):
        ds = pydicom.dcmread(folder / name)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name])
        ds.InstanceNumber = i + 1
        path = out / name
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _real_mr(out: Path) -> list[Path]:
    """The real MR files of the pydicom and pydicom-data wheels."""
    files = _encodings(PYDICOM_FILES, MR_SMALL, out) + _encodings(PYDICOM_DATA_FILES, MR2, out)
    files += _encodings(PYDICOM_DATA_FILES, ENHANCED_HEAD, out)
    head = out / "dicomdirtests"
    shutil.copytree(PYDICOM_FILES / "dicomdirtests" / "98892003", head)
    files += sorted(p for p in head.rglob("*") if p.is_file())
    files.append(Path(shutil.copy(PYDICOM_FILES / "examples_overlay.dcm", out / "abdomen.dcm")))
    files.append(Path(shutil.copy(PYDICOM_DATA_FILES / "MR-SIEMENS-DICOM-WithOverlays.dcm", out / "abdomen2.dcm")))
    return files


def _noise_study(phantom_dir: Path, out: Path) -> list[Path]:
    """A phantom study's headers (three series, lumbar geometry) over pixels of uniform noise."""
    rng = np.random.default_rng(3)
    study_uid = generate_uid()
    files = []
    for path in complete_study(phantom_dir):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study_uid, str(path.parent.name)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PixelData = rng.integers(0, 4096, int(ds.Rows) * int(ds.Columns), dtype=np.uint16).tobytes()
        target = out / f"noise_{len(files):03d}.dcm"
        ds.save_as(target)
        files.append(target)
    return files


def test_non_lumbar_mr_is_stored_and_skipped_and_nothing_is_sent(tmp_path: Path, phantom_dir: Path) -> None:
    require_tool("storescp")
    received = tmp_path / "received"
    received.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-od", str(received), str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        node = ServedNode(tmp_path / "node", pacs_port, quiet_time_s=1.0,
                          destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}])
        node.start()
        (tmp_path / "in").mkdir()
        files = _real_mr(tmp_path / "in") + _noise_study(phantom_dir, tmp_path / "in")
        for syntax, group in _by_transfer_syntax(files).items():  # each sent as it is encoded
            sent = storescu(group, node.port, called=NODE_AET, calling=SENDER_AET, extra=PROPOSE.get(syntax, ()))
            assert sent.returncode == 0, (syntax.name, sent.stderr)
        studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
        assert len(studies) == 8  # MR_small and MR2, three in dicomdirtests, the abdomen, the head, the noise
        finished = {uid: node.wait_state(uid, tuple(s.value for s in StudyState if s.final), timeout=180)
                    for uid in studies}
        ledger = node.ledger()
        try:
            stored = sum(len(ledger.instance_paths(uid)) for uid in studies)
            reports = [ledger.last_report(uid) for uid in studies]
        finally:
            ledger.close()
        assert stored == len(files)  # every instance kept
        for uid, study in finished.items():
            assert study.state == StudyState.SKIPPED, (uid, study.state, study.reason)
            assert study.reason
        assert reports == [None] * len(studies)
        reasons = sorted(s.reason for s in finished.values())
        assert any(r.startswith("not a lumbar spine study (BodyPartExamined ABDOMEN") for r in reasons), reasons
        assert any(r.startswith("nothing could be assessed") for r in reasons), reasons
        assert any(r.startswith("not a lumbar spine study (BodyPartExamined HEAD") for r in reasons), reasons
        wait_for("no delivery", lambda: True)
        assert not list(received.iterdir())  # nothing sent to the PACS
        assert "study skipped" in node.log_text()
    finally:
        pacs.terminate()
        pacs.wait(10)

"""The one admission, on bytes (as C-STORE hands them) and on files staged under the spool (as an
upload or STOW-RS hands them): each refusal with its DICOM status, the conflict, the re-send and
the replacement, the free-disk floor, the Deflate bound (and the memory it costs: a subprocess's
peak RSS), the ledger row, the metrics and the audit trail's line."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from dicom_node.config import Settings, load_settings
from dicom_node.ingest import Admission, Candidate, Outcome, Reason, Source, Staging, StoreStatus
from dicom_node.observability import NodeMetrics
from dicom_node.states import EventKind
from dicom_node.store import Ledger, uid_problem

ROOT = Path(__file__).resolve().parents[2]


def _settings(tmp_path: Path, **env: str) -> Settings:
    return load_settings(environ={"LUMBAR_NODE__STORAGE__SPOOL_DIR": str(tmp_path / "spool"),
                                  "LUMBAR_NODE__STORAGE__LEDGER_PATH": str(tmp_path / "ledger.sqlite"),
                                  "LUMBAR_NODE__STORAGE__FSYNC": "false",
                                  "LUMBAR_NODE__STORAGE__MIN_FREE_DISK_MB": "1", **env})


@pytest.fixture
def admission(tmp_path: Path) -> Admission:
    settings = _settings(tmp_path, LUMBAR_NODE__LIMITS__MAX_INSTANCE_MB="4", LUMBAR_NODE__LIMITS__MAX_PIXELS="1000000")
    ledger = Ledger(settings.storage.ledger_path)
    yield Admission(settings, ledger, NodeMetrics())
    ledger.close()


def image(study: str | None = None, rows: int = 16, patient: str = "DOE^JANE") -> Dataset:
    """A small MR image (native 16-bit pixels)."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.ImagesInAcquisition = "MR", patient, 12
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(256)) * (rows * rows * 2 // 256) + bytes(rows * rows * 2 % 256)
    return ds


def bare(ds: Dataset, implicit: bool = False) -> bytes:
    """A dataset as C-STORE carries it (no file meta)."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def part10(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian, body: bytes | None = None) -> bytes:
    """A Part 10 file of ``ds`` (or of the given dataset bytes) in this transfer syntax."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    if body is None:
        body = bare(ds, transfer_syntax == ImplicitVRLittleEndian)
        body = deflate(body) if transfer_syntax == DeflatedExplicitVRLittleEndian else body
    return out.getvalue() + body


def received(ds: Dataset, data: bytes | None = None, transfer_syntax: str = ExplicitVRLittleEndian,
             sop_uid: str | None = None, sop_class: str = MRImageStorage) -> Candidate:
    """A C-STORE candidate, its file meta as pynetdicom would write it."""
    sop_uid = str(ds.SOPInstanceUID) if sop_uid is None else sop_uid
    data = bare(ds) if data is None else data

    def head() -> bytes:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
        meta.TransferSyntaxUID = transfer_syntax
        out = io.BytesIO()
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, meta)
        return out.getvalue()

    return Candidate.received(data, transfer_syntax, sop_class, sop_uid, "STORESCU", head)


def staged(admission: Admission, data: bytes, name: str = "x.part") -> Candidate:
    admission.staging.root.mkdir(parents=True, exist_ok=True)
    path = admission.staging.root / name
    path.write_bytes(data)
    return Candidate.staged(path, Source.UPLOAD, "vic")


def test_uid_problem_uses_pydicoms_rules() -> None:
    assert uid_problem("1.2.840.10008.5.1.4.1.1.4", "X") is None
    assert uid_problem("", "Study Instance UID") == "Study Instance UID is empty"
    assert uid_problem("1." + "2" * 70, "X") == "X is 72 characters long (at most 64)"
    for bad in ("1.02.3", "../../x", "1.2.", "1..2", "1.2.3a"):
        assert uid_problem(bad, "X").startswith("X is not a UID (digits and dots, no leading zeros)")


def test_a_received_instance_is_spooled_recorded_counted_and_audited(admission: Admission) -> None:
    ds = image()
    candidate = received(ds)
    batch = admission.batch(Source.DICOM, "STORESCU")
    verdict = admission.admit(candidate, batch)
    assert verdict.outcome is Outcome.NEW and verdict.status == StoreStatus.SUCCESS and verdict.admitted
    item = verdict.instance
    spool = admission.spool.resolve()
    assert item.target == spool / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert item.target.read_bytes() == candidate.file_meta() + candidate.body  # byte for byte, pynetdicom's meta
    assert pydicom.dcmread(item.target).PatientName == "DOE^JANE" and item.series_size == 12
    assert admission.ledger.study(ds.StudyInstanceUID).instances == 1
    assert admission.metrics.instances_received.labels("dicom")._value.get() == 1
    batch.close()
    [event] = admission.ledger.events(ds.StudyInstanceUID)
    assert event.kind is EventKind.RECEIVED and event.actor == "STORESCU"
    assert event.data == {"instances": 1, "bytes": item.size, "calling_aet": "STORESCU"}


def test_the_same_bytes_again_are_a_resend_and_new_bytes_a_replacement(admission: Admission) -> None:
    ds = image()
    assert admission.admit(received(ds)).outcome is Outcome.NEW
    again = admission.admit(received(ds))
    assert again.outcome is Outcome.RESENT and again.status == StoreStatus.SUCCESS
    changed = copy.deepcopy(ds)
    changed.WindowCenter = 1234
    assert admission.admit(received(changed)).outcome is Outcome.REPLACED
    assert admission.ledger.study(ds.StudyInstanceUID).instances == 1
    assert admission.metrics.instances_received.labels("dicom")._value.get() == 2


def test_an_instance_of_a_series_filed_under_another_study_is_refused(admission: Admission) -> None:
    ds = image()
    assert admission.admit(received(ds)).outcome is Outcome.NEW
    other = copy.deepcopy(ds)
    other.StudyInstanceUID = generate_uid()
    verdict = admission.admit(received(other))
    assert (verdict.outcome, verdict.status, verdict.reason) == (Outcome.REFUSED, StoreStatus.CANNOT_UNDERSTAND,
                                                                 Reason.OTHER_STUDY)
    assert f"already filed under another study ({ds.StudyInstanceUID})" in verdict.detail
    assert not (admission.spool / other.StudyInstanceUID).exists()


def test_a_staged_file_is_moved_into_the_spool_not_copied(admission: Admission) -> None:
    ds = image()
    data = part10(ds)
    candidate = staged(admission, data)
    verdict = admission.admit(candidate)
    assert verdict.outcome is Outcome.NEW
    assert not candidate.body.exists() and verdict.instance.target.read_bytes() == data
    study = admission.ledger.study(ds.StudyInstanceUID)
    assert study.instances == 1 and verdict.instance.modality == "MR"
    assert admission.metrics.received_bytes.labels("upload")._value.get() == len(data)
    assert admission.admit(staged(admission, data)).outcome is Outcome.RESENT


@pytest.mark.parametrize("transfer_syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_other_transfer_syntaxes_are_read_from_bytes_and_from_files(admission: Admission, transfer_syntax: str) -> None:
    ds = image(rows=64)
    body = bare(ds, transfer_syntax == ImplicitVRLittleEndian)
    body = deflate(body) if transfer_syntax == DeflatedExplicitVRLittleEndian else body
    assert admission.admit(received(ds, body, transfer_syntax)).outcome is Outcome.NEW
    ds2 = image(rows=64)
    verdict = admission.admit(staged(admission, part10(ds2, transfer_syntax)))
    assert verdict.outcome is Outcome.NEW and pydicom.dcmread(verdict.instance.target).Rows == 64
    assert [p.name for p in admission.staging.root.iterdir()] == []  # the inflated copy is gone


def _cut(data: bytes, by: int) -> bytes:
    return data[:-by]


REFUSALS = {
    # what is wrong: (how to make the candidate, status, reason, words of the detail)
    "command UID": (lambda a, ds: received(ds, sop_uid="1.02.3"), StoreStatus.CANNOT_UNDERSTAND, Reason.INVALID_UID,
                    "Affected SOP Instance UID is not a UID"),
    "command differs": (lambda a, ds: received(ds, sop_uid=generate_uid()), StoreStatus.CANNOT_UNDERSTAND,
                        Reason.UIDS_DIFFER, "differs from the command's"),
    "study UID": (lambda a, ds: received(_with(ds, StudyInstanceUID="../../x")), StoreStatus.CANNOT_UNDERSTAND,
                  Reason.INVALID_UID, "StudyInstanceUID is not a UID"),
    "empty series UID": (lambda a, ds: staged(a, part10(_with(ds, SeriesInstanceUID=""))),
                         StoreStatus.CANNOT_UNDERSTAND, Reason.INVALID_UID, "SeriesInstanceUID is empty"),
    "file's SOP UID": (lambda a, ds: staged(a, part10(_with(ds, SOPInstanceUID="1.2.3.04"))),
                       StoreStatus.CANNOT_UNDERSTAND, Reason.INVALID_UID, "SOPInstanceUID is not a UID"),
    "truncated pixels": (lambda a, ds: received(ds, _cut(bare(ds), 100)), StoreStatus.CANNOT_UNDERSTAND,
                         Reason.TRUNCATED, "holds 412 of its 512 bytes"),
    "truncated file": (lambda a, ds: staged(a, _cut(part10(ds), 100)), StoreStatus.CANNOT_UNDERSTAND,
                       Reason.TRUNCATED, "holds 412 of its 512 bytes"),
    "no pixels": (lambda a, ds: received(_without(ds, "PixelData")), StoreStatus.CANNOT_UNDERSTAND, Reason.TRUNCATED,
                  "an image without Pixel Data"),
    "short pixels": (lambda a, ds: received(_with(ds, PixelData=b"\0" * 100)), StoreStatus.CANNOT_UNDERSTAND,
                     Reason.TRUNCATED, "Pixel Data holds 100 of the 512 bytes"),
    "too many pixels": (lambda a, ds: staged(a, part10(_with(ds, Rows=2000, Columns=2000), RLELossless,
                                                       bare(_with(ds, Rows=2000, Columns=2000)))),
                        StoreStatus.OUT_OF_RESOURCES, Reason.TOO_MANY_PIXELS, "an image of 4000000 pixels"),
    "too large": (lambda a, ds: received(ds, bare(_with(ds, PixelData=bytes(5 * 2**20)))), StoreStatus.OUT_OF_RESOURCES,
                  Reason.TOO_LARGE, "an instance of"),
    "deflate bomb": (lambda a, ds: received(ds, deflate(bare(_with(ds, PixelData=bytes(64 * 2**20)))),
                                            DeflatedExplicitVRLittleEndian),
                     StoreStatus.OUT_OF_RESOURCES, Reason.TOO_LARGE, "inflates beyond 4 MiB"),
    "staged deflate bomb": (lambda a, ds: staged(a, part10(ds, DeflatedExplicitVRLittleEndian,
                                                           deflate(bare(_with(ds, PixelData=bytes(64 * 2**20)))))),
                            StoreStatus.OUT_OF_RESOURCES, Reason.TOO_LARGE, "inflates beyond 4 MiB"),
    "not deflate": (lambda a, ds: received(ds, b"\xff" * 64, DeflatedExplicitVRLittleEndian),
                    StoreStatus.CANNOT_UNDERSTAND, Reason.UNREADABLE, "does not inflate"),
    "deflate cut short": (lambda a, ds: received(ds, deflate(bare(ds))[:-40], DeflatedExplicitVRLittleEndian),
                          StoreStatus.CANNOT_UNDERSTAND, Reason.UNREADABLE, "cut short"),
    "garbage": (lambda a, ds: received(ds, b"\x08\x00\x18\x00UI\xff\x7f" + b"1" * 20), StoreStatus.CANNOT_UNDERSTAND,
                None, ""),
    "no DICM": (lambda a, ds: staged(a, b"\0" * 200), StoreStatus.CANNOT_UNDERSTAND, Reason.NOT_DICOM,
                "not a DICOM Part 10 file"),
    "unknown syntax": (lambda a, ds: staged(a, part10(ds, "1.2.3.4.5", bare(ds))), StoreStatus.CANNOT_UNDERSTAND,
                       Reason.UNREADABLE, "unknown transfer syntax"),
}


def _with(ds: Dataset, **values: object) -> Dataset:
    out = copy.deepcopy(ds)
    for keyword, value in values.items():
        setattr(out, keyword, value)
    return out


def _without(ds: Dataset, keyword: str) -> Dataset:
    out = copy.deepcopy(ds)
    delattr(out, keyword)
    return out


@pytest.mark.parametrize("case", REFUSALS)
def test_each_refusal_answers_its_status_and_stores_nothing(admission: Admission, case: str) -> None:
    make, status, reason, words = REFUSALS[case]
    ds = image()
    verdict = admission.admit(make(admission, ds))
    assert (verdict.outcome, verdict.status) == (Outcome.REFUSED, status), verdict
    if reason is not None:
        assert verdict.reason is reason and words in verdict.detail, verdict.detail
    assert not list(admission.spool.rglob("*.dcm"))
    assert admission.ledger.studies() == []


def test_the_free_disk_floor_refuses_before_reading(tmp_path: Path) -> None:
    settings = _settings(tmp_path, LUMBAR_NODE__STORAGE__MIN_FREE_DISK_MB=str(2**40))
    ledger = Ledger(settings.storage.ledger_path)
    try:
        verdict = Admission(settings, ledger, NodeMetrics()).admit(received(image()))
        assert (verdict.status, verdict.reason) == (StoreStatus.OUT_OF_RESOURCES, Reason.DISK_LOW)
        assert ledger.studies() == []
    finally:
        ledger.close()


def test_staging_leftovers_are_cleared(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "spool")
    with staging.area() as area:
        path, f = area.new_file()
        f.close()
        assert path.parent.parent == staging.root and path.exists()
    assert not path.parent.exists()
    (staging.root / "left-by-a-crash").mkdir()
    assert staging.clear() == 1 and list(staging.root.iterdir()) == []


_PEAK_PROBE = """
import json, resource, sys, zlib
from pathlib import Path
from tests.unit.test_admission import Admission, Candidate, Ledger, NodeMetrics, Source, _settings, bare, image, part10
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

tmp = Path(sys.argv[1])
settings = _settings(tmp, LUMBAR_NODE__LIMITS__MAX_INSTANCE_MB="128", LUMBAR_NODE__LIMITS__MAX_PIXELS="33554432")
admission = Admission(settings, Ledger(settings.storage.ledger_path), NodeMetrics())
admission.staging.root.mkdir(parents=True)

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # MiB

def header(rows, bits):  # a dataset up to its Pixel Data's value (declared rows x rows x bits)
    ds = image(rows=1)
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = bits
    ds.PixelData = b""
    return ds, bare(ds)[:-4] + (rows * rows * bits // 8).to_bytes(4, "little")

ds, prefix = header(16384, 32)  # 1 GiB of zeros as pixel data, deflated: about 1 MiB
bomb = admission.staging.root / "bomb"
with open(bomb, "wb") as f:
    f.write(part10(ds, DeflatedExplicitVRLittleEndian, b""))
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    f.write(packer.compress(prefix))
    zeros = bytes(2**20)
    for _ in range(1024):
        f.write(packer.compress(zeros))
    f.write(packer.flush())
ds, prefix = header(4096, 16)  # 32 MiB of native pixels
big = admission.staging.root / "big"
with open(big, "wb") as f:
    f.write(part10(ds, ExplicitVRLittleEndian, prefix))
    for _ in range(32):
        f.write(zeros)
before = peak()
bomb_verdict = admission.admit(Candidate.staged(bomb, Source.UPLOAD, "vic"))
after_bomb = peak()
big_verdict = admission.admit(Candidate.staged(big, Source.UPLOAD, "vic"))
print(json.dumps({"bomb_bytes": bomb.stat().st_size, "bomb": bomb_verdict.detail, "big": big_verdict.outcome,
                  "big_detail": big_verdict.detail, "before": before, "after_bomb": after_bomb, "after_big": peak()}))
"""


def test_a_deflate_bomb_and_a_large_file_cost_no_memory(tmp_path: Path) -> None:
    """A 1 MiB staged file that inflates to 1 GiB is refused, and a 32 MiB native image admitted,
    without the process's peak RSS growing by more than a few MiB (the header is read with the
    Pixel Data deferred; the Deflate bound is counted in 1 MiB steps)."""
    done = subprocess.run([sys.executable, "-c", _PEAK_PROBE, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    assert numbers["bomb_bytes"] < 2 * 2**20 and "inflates beyond 128 MiB" in numbers["bomb"]
    assert numbers["big"] == "new", numbers
    assert numbers["after_bomb"] - numbers["before"] < 16, numbers
    assert numbers["after_big"] - numbers["before"] < 16, numbers

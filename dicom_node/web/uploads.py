"""A study uploaded through the web page: the files (DICOM Part 10, or zips of them) checked,
one study, each UID valid, within the size limit; then spooled and recorded in the ledger like a
received study, marked as an upload (graded by the node's workers, not sent unless asked)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.errors import NodeError
from dicom_node.ingest import reopens_study
from dicom_node.observability import PHI_VALUES
from dicom_node.states import EventKind
from dicom_node.store import Ledger, Recorded, UnsafePath, spool_path, uid_problem, write_durably

EXPECTED = "DICOM files (Part 10, with the 'DICM' marker), a folder of them, or a .zip of them"
UPLOAD_AET = "UPLOAD"


class UploadError(NodeError, ValueError):
    """An upload that is refused; the message is shown to the user as it is."""


@dataclass(frozen=True)
class UploadedInstance:
    name: str
    data: bytes
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    series_size: int | None
    modality: str


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _members(name: str, data: bytes, max_bytes: int) -> Iterable[tuple[str, bytes]]:
    """The files of one uploaded part: itself, or the files of a zip (its size checked before inflating)."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        yield name, data
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = [e for e in archive.infolist() if not e.is_dir()]
            if sum(e.file_size for e in entries) > max_bytes:
                raise UploadError(f"{name}: the zip holds more than the upload limit of {max_bytes // 2**20} MiB")
            for entry in entries:
                base = entry.filename.rsplit("/", 1)[-1]
                if base.startswith(".") or entry.filename.startswith("__MACOSX/"):
                    continue  # macOS and editor droppings
                yield f"{name}:{entry.filename}", archive.read(entry)
    except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
        raise UploadError(f"Wrong format: {name} is a zip that cannot be read ({exc}); expected {EXPECTED}") from None


def parse_upload(parts: list[tuple[str, bytes]], max_bytes: int) -> list[UploadedInstance]:
    """The instances of an upload, all of one study; UploadError with a plain message otherwise.

    Files whose name starts with a dot (.DS_Store) are ignored; DICOMDIR files too."""
    if not parts:
        raise UploadError(f"Nothing chosen: choose {EXPECTED}")
    if sum(len(d) for _, d in parts) > max_bytes:
        raise UploadError(f"Too large: the upload is over the limit of {max_bytes // 2**20} MiB (web.upload_max_mb)")
    found: list[UploadedInstance] = []
    for part_name, part in parts:
        for name, data in _members(part_name, part, max_bytes):
            if name.replace(":", "/").rsplit("/", 1)[-1].upper() == "DICOMDIR":
                continue
            if not _is_dicom(data):
                raise UploadError(f"Wrong format: {name} is not a DICOM file; expected {EXPECTED}")
            try:
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                PHI_VALUES.add_from(ds)
                uids = {k: str(ds.get(k, "") or "") for k in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID",
                                                              "SeriesInstanceUID")}
                size = ds.get("ImagesInAcquisition")
                modality = str(ds.get("Modality", "") or "")
            except (InvalidDicomError, ValueError, TypeError, AttributeError, KeyError, OSError, EOFError) as exc:
                raise UploadError(f"Wrong format: {name} is not a readable DICOM file ({type(exc).__name__}); "
                                  f"expected {EXPECTED}") from None
            for key, value in uids.items():
                if (problem := uid_problem(value, key)) is not None:
                    raise UploadError(f"{name}: {problem}")
            try:
                series_size = int(str(size).strip()) if size not in (None, "") else None
            except ValueError:
                series_size = None
            found.append(UploadedInstance(name, data, uids["SOPInstanceUID"], uids["SOPClassUID"],
                                          uids["StudyInstanceUID"], uids["SeriesInstanceUID"], series_size, modality))
    if not found:
        raise UploadError(f"No DICOM files in the upload: expected {EXPECTED}")
    studies = {i.study_uid for i in found}
    if len(studies) > 1:
        raise UploadError(f"More than one study: the upload holds {len(studies)} studies (Study Instance UIDs); "
                          "upload one study at a time")
    if not any(i.modality == "MR" for i in found):
        modalities = ", ".join(sorted({i.modality or "none" for i in found}))
        raise UploadError(f"Not an MR study: the files are of modality {modalities}; the node grades lumbar "
                          "spine MRI (Sagittal T1, Sagittal T2/STIR, Axial T2)")
    return found


def store_upload(instances: list[UploadedInstance], ledger: Ledger, spool: Path, user: str, fsync: bool) -> str:
    """Spool and record an upload's instances as a study uploaded by ``user``; its Study Instance UID.

    A study the node received from the PACS is not taken again through the upload."""
    study_uid = instances[0].study_uid
    if ledger.study(study_uid) is not None and ledger.upload(study_uid) is None:
        raise UploadError(f"Study {study_uid} came from the PACS and is already in the node: open it from the "
                          "dashboard (an administrator can grade it again there)")
    ledger.add_upload(study_uid, user)
    stored = size = 0
    for item in instances:
        try:
            target = spool_path(spool, study_uid, item.series_uid, item.sop_instance_uid)
        except UnsafePath as exc:
            raise UploadError(str(exc)) from None
        digest = hashlib.blake2b(item.data, digest_size=16).hexdigest()
        known = ledger.instance(item.series_uid, item.sop_instance_uid)
        if known is not None and known.study_uid != study_uid:
            raise UploadError(f"{item.name}: SOP Instance UID {item.sop_instance_uid} is already filed under another study")
        if known is not None and known.digest == digest:
            continue
        write_durably(item.data, target, fsync)
        recorded = ledger.record_instance(item.sop_instance_uid, study_uid, item.series_uid, item.sop_class_uid,
                                          target, UPLOAD_AET, item.series_size, reopens_study(item.sop_class_uid),
                                          digest)
        if recorded in (Recorded.NEW, Recorded.REPLACED):
            stored += 1
            size += len(item.data)
    ledger.add_event(EventKind.UPLOADED, user, study_uid, f"{stored} instances ({size} bytes) uploaded by {user}"
                     + (f"; {len(instances) - stored} already held" if stored < len(instances) else ""),
                     {"instances": stored, "bytes": size, "files": len(instances)})
    return study_uid

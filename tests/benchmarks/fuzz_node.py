"""Fuzz the node as it is served: malformed files, studies and protocol garbage, deterministic for a seed.

    .venv/bin/python tests/benchmarks/fuzz_node.py [--cases 1000] [--seed 0] [--json]

Starts ``lumbar-node serve`` (tests/support/served_node.py, no destinations, quiet time 2 s) in a
fresh folder and sends ``--cases`` cases, drawn from a seeded generator:
  bytes      byte mutations of valid files: bit flips, truncations, corrupted lengths, inserted bytes
  fields     one attribute changed: Rows/Columns/BitsAllocated/PixelSpacing/orientation/position
             missing, zero, negative, NaN or of the wrong kind; Pixel Data short or long; 65535 x
             65535 declared with tiny data (RLE); long and non-ASCII strings; bad character sets;
             hostile UIDs in the data set and in the command set (traversal, absolute paths, empty,
             over-long, leading zeros)
  studies    whole phantom studies made malformed in one way that reaches grading: noise pixels,
             ImagePositionPatient 1e300, NaN orientation, mixed matrix sizes, WindowCenter "abc", a
             bad character set, a Deflate bomb, a study whose instances repeat another study's UIDs
  protocol   random bytes, HTTP, an A-ASSOCIATE-RQ followed by garbage, huge PDU lengths, half a
             data set then a closed socket, silent sockets, bursts of connect-and-close; P-DATA on a
             presentation context never negotiated, a command set that cannot be decoded, two
             A-RELEASE-RQ in a row, an A-ASSOCIATE-RQ with odd presentation contexts (ID 0, even IDs,
             no transfer syntax), a C-STORE with a command element missing
  guards     (after the cases, --guard-studies of them, default one per defect) whole studies that
             must be graded without their bad part or skipped with the reason: PixelSpacing 1e6 or
             one ImagePositionPatient on every slice of a series, JPEG-LS codestreams declaring
             20000 x 20000 in images declaring their own size, Secondary Captures holding MR images,
             SpecificCharacterSet "ISO_IR 999" (tests/support/defects.py); each outcome is checked
Before the cases, the regressions of earlier fuzz runs, each checked: eight P-DATA on an
unnegotiated context from one address then a C-ECHO (the slot leak that locked an address out),
an A-ASSOCIATE-RQ with context ID 0 answered, a C-STORE without a Message ID answered 0xC000.
Every 50 cases it sends a C-ECHO. At the end it waits for every study to reach a final state and
reports: node alive, C-ECHO answered every time, no file outside the node's folder, every study
final with a reason, tracebacks that escaped a handler (raw lines in the node's log), log lines
per protocol-garbage case, RSS of the node and its workers before / peak / after, CPU seconds.
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.config import IGNORE, settings
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.support

from dicom_node.store.ledger import Ledger
from tests.support.defects import Defect, defective_study
from tests.support.procfs import children, cpu_seconds, proc_status
from tests.support.raw_dicom import (
    A_ABORT,
    A_RELEASE_RQ_PDU,
    EXPLICIT_LE,
    VERIFICATION,
    RawAssociation,
    associate_rq,
    c_store_command,
    echo,
    encode,
    p_data,
    raw_bytes,
    raw_store,
)
from tests.support.served_node import SENDER_AET, ServedNode, wait_for

settings.writing_validation_mode = IGNORE  # the fuzzer writes what a careless peer would
settings.reading_validation_mode = IGNORE

FINAL = ("done", "failed", "skipped")
Case = Callable[[], object]


class Fuzzer:
    """The cases, drawn from one generator, sent to one served node."""

    def __init__(self, node: ServedNode, study_dir: Path, rng: np.random.Generator, outside: Path):
        self.node, self.rng, self.outside = node, rng, outside
        self.files = sorted(study_dir.rglob("*.dcm"))
        self.study = [pydicom.dcmread(p) for p in self.files]
        self.extra = [pydicom.dcmread(get_testdata_file(n)) for n in
                      ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "image_dfl.dcm")]
        self.statuses: Counter[str] = Counter()
        self.garbage_cases = 0

    # -- helpers -------------------------------------------------------------------------------------

    def _pick(self) -> Dataset:
        return copy.deepcopy(self.study[int(self.rng.integers(len(self.study)))])

    def _store(self, ds: Dataset, sop_uid: str | None = None, data: bytes | None = None,
               syntax: str = ExplicitVRLittleEndian) -> None:
        uid = str(ds.get("SOPInstanceUID", "")) if sop_uid is None else sop_uid
        status = raw_store(self.node.port, encode(ds) if data is None else data, uid,
                           str(ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.4")), syntax, SENDER_AET)
        self.statuses["none" if status is None else f"0x{status:04X}"] += 1

    def _fresh(self, ds: Dataset, study_uid: str | None = None) -> Dataset:
        ds.SOPInstanceUID = generate_uid()
        series_uid = str(ds.SeriesInstanceUID)
        ds.SeriesInstanceUID = series_uid + ".9" if len(series_uid) < 62 else generate_uid()
        if study_uid is not None:
            ds.StudyInstanceUID = study_uid
        return ds

    # -- bytes -----------------------------------------------------------------------------------

    def bytes_case(self) -> None:
        ds = self._pick()
        data = bytearray(encode(ds))
        kind = self.rng.integers(4)
        if kind == 0:
            for _ in range(int(self.rng.integers(1, 20))):
                i = int(self.rng.integers(len(data)))
                data[i] ^= 1 << int(self.rng.integers(8))
        elif kind == 1:
            data = data[: int(self.rng.integers(1, len(data)))]
        elif kind == 2:
            i = int(self.rng.integers(0, min(len(data) - 4, 4000)))
            data[i:i + 4] = self.rng.choice([b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00"])
        else:
            i = int(self.rng.integers(len(data)))
            data[i:i] = self.rng.bytes(int(self.rng.integers(1, 64)))
        self._store(ds, data=bytes(data))

    # -- fields ------------------------------------------------------------------------------------

    def field_case(self) -> None:
        ds = self._fresh(self._pick())
        kind = int(self.rng.integers(12))
        value_choices: list[object] = [None, 0, -1, float("nan"), "abc", 65535, [1, 2, 3]]
        if kind <= 4:
            name = ["Rows", "Columns", "BitsAllocated", "PixelSpacing", "SamplesPerPixel"][kind]
            value = value_choices[int(self.rng.integers(len(value_choices)))]
            if value is None:
                del ds[name]
            else:
                ds[name].value = value
        elif kind == 5:
            name = ["ImageOrientationPatient", "ImagePositionPatient"][int(self.rng.integers(2))]
            choice = int(self.rng.integers(5))
            if choice == 0:
                del ds[name]
            else:
                values = {1: [float("nan")] * (6 if "Orient" in name else 3), 2: [1e300] * 3, 3: [0] * 6,
                          4: [1]}[choice]
                ds[name].value = values
        elif kind == 6:
            pixels = ds.PixelData
            ds.PixelData = pixels[: len(pixels) // 3] if self.rng.random() < 0.5 else pixels + pixels
        elif kind == 7:  # 65535 x 65535 declared in a small RLE file
            rle = copy.deepcopy(self.extra[1])
            rle.SOPInstanceUID, rle.StudyInstanceUID = generate_uid(), ds.StudyInstanceUID
            rle.Rows = rle.Columns = 65535
            self._store(rle, syntax=RLELossless, data=encode(rle))
            return
        elif kind == 8:
            names = ["PatientName", "SeriesDescription", "InstitutionName", "StudyDescription"]
            name = names[int(self.rng.integers(4))]
            codes = self.rng.integers(32, 0x2FFF, int(self.rng.integers(1, 3000)))
            setattr(ds, name, "".join(chr(int(c)) for c in codes))  # the phantom lacks InstitutionName
        elif kind == 9:
            ds.SpecificCharacterSet = ["FOO_BAR", "ISO_IR 999", "", "ISO 2022 IR 87\\BAD"][int(self.rng.integers(4))]
        elif kind == 10:  # hostile UIDs in the data set
            name = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"][int(self.rng.integers(3))]
            value = self._hostile_uid()
            ds[name].value = value
            self._store(ds, sop_uid=value if name == "SOPInstanceUID" else str(ds.SOPInstanceUID))
            return
        else:  # hostile UID in the command set only
            self._store(ds, sop_uid=self._hostile_uid())
            return
        self._store(ds)

    def _hostile_uid(self) -> str:
        return ["../../x", f"{self.outside}/fuzz-x", "", ".", "1.02.3", "1." + "2" * 70, "1.2.3\u00e9",
                "../../../victim", "1.2..3", "1.2.3 "][int(self.rng.integers(10))]

    # -- studies -----------------------------------------------------------------------------------

    def study_case(self) -> None:
        kind = int(self.rng.integers(8))
        study_uid = generate_uid()
        series = {str(ds.SeriesInstanceUID): generate_uid() for ds in self.study}
        for original in self.study:
            ds = copy.deepcopy(original)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series[str(original.SeriesInstanceUID)]
            ds.SOPInstanceUID = generate_uid() if kind != 7 else original.SOPInstanceUID  # 7: UIDs of another study
            syntax = ExplicitVRLittleEndian
            if kind == 0:
                ds.PixelData = self.rng.integers(0, 4096, int(ds.Rows) * int(ds.Columns), dtype=np.uint16).tobytes()
            elif kind == 1:
                ds.ImagePositionPatient = [1e300, 1e300, 1e300]
            elif kind == 2 and "Sagittal T1" in str(ds.get("SeriesDescription", "")):
                ds.ImageOrientationPatient = [float("nan")] * 6
            elif kind == 3 and int(ds.InstanceNumber) % 2:
                ds.Rows, ds.Columns = int(ds.Rows) // 2, int(ds.Columns) // 2
                ds.PixelData = ds.PixelData[: len(ds.PixelData) // 4]
            elif kind == 4:
                ds.WindowCenter, ds.WindowWidth = "abc", "1\\2\\x"
            elif kind == 5:
                ds.SpecificCharacterSet = "FOO_BAR"
            elif kind == 6:  # a Deflate bomb: a small data set that inflates to hundreds of MiB
                bomb = copy.deepcopy(ds)
                bomb.PixelData = bytes(200 * 2**20)
                packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
                data = packer.compress(encode(bomb)) + packer.flush()
                self._store(bomb, data=data, syntax=DeflatedExplicitVRLittleEndian)
                return
            self._store(ds, syntax=syntax)

    # -- protocol ------------------------------------------------------------------------------------

    def protocol_case(self) -> None:
        self.garbage_cases += 1
        port, kind = self.node.port, int(self.rng.integers(12))
        if kind == 0:
            raw_bytes(port, [self.rng.bytes(int(self.rng.integers(1, 100_000)))])
        elif kind == 1:
            raw_bytes(port, [b"GET / HTTP/1.1\r\nHost: node\r\n\r\n"])
        elif kind == 2:  # an A-ASSOCIATE-RQ header followed by garbage
            body = self.rng.bytes(int(self.rng.integers(10, 400)))
            raw_bytes(port, [struct.pack(">BBI", 0x01, 0, len(body)) + body])
        elif kind == 3:  # a PDU that says it is 4 GiB long
            raw_bytes(port, [struct.pack(">BBI", int(self.rng.choice([1, 4])), 0, 0xFFFFFFF0) + b"\x00" * 64])
        elif kind == 4:  # half a data set, then the socket is closed
            ds = self._fresh(self._pick())
            data = encode(ds)
            self._half_store(data[: len(data) // 2])
        elif kind == 5:  # silent sockets held open while a real peer is served
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(int(self.rng.integers(5, 21)))]
            try:
                if not echo(port, SENDER_AET):
                    self.statuses["echo refused while sockets were silent"] += 1
            finally:
                for s in socks:
                    s.close()
        elif kind == 6:  # a burst of connect-and-close
            for _ in range(int(self.rng.integers(5, 30))):
                socket.create_connection(("127.0.0.1", port)).close()
        elif kind == 7:  # a P-DATA on a presentation context that was never negotiated
            context = int(self.rng.choice([5, 77, 255, 0]))
            self._raw_session([p_data(context, 0x03, self.rng.bytes(int(self.rng.integers(1, 40))))])
        elif kind == 8:  # a command set that cannot be decoded
            self._raw_session([p_data(1, 0x03, self.rng.bytes(int(self.rng.integers(1, 200))))])
        elif kind == 9:  # two A-RELEASE-RQ in a row
            self._raw_session([A_RELEASE_RQ_PDU, A_RELEASE_RQ_PDU])
        elif kind == 10:  # an A-ASSOCIATE-RQ with odd presentation contexts
            contexts = [[(0, VERIFICATION, [EXPLICIT_LE])], [(2, VERIFICATION, [EXPLICIT_LE])],
                        [(1, VERIFICATION, [])], [], [(1, VERIFICATION, [EXPLICIT_LE])] * 2][int(self.rng.integers(5))]
            with RawAssociation(port, timeout=15) as a:
                a.send(associate_rq(contexts, SENDER_AET))
                if a.read_pdu() is None:
                    self.statuses["association request not answered"] += 1
        else:  # a C-STORE with one command element missing
            ds = self._fresh(self._pick())
            missing = ["MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "CommandDataSetType",
                       "Priority", "CommandField"][int(self.rng.integers(6))]
            command = c_store_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID), omit=(missing,))
            with RawAssociation(port, timeout=15) as a:
                if a.associate(calling_aet=SENDER_AET) != 0x02:
                    self.statuses["association refused"] += 1
                    return
                a.send(p_data(3, 0x03, command))
                a.send(p_data(3, 0x02, encode(ds)))
                status, _ = a.response()
                self.statuses[f"missing {missing}: " + ("A-ABORT" if status is None else f"0x{status:04X}")] += 1

    def _raw_session(self, pdus: list[bytes]) -> None:
        """Associate (raw PDUs), send these, read the answer: an A-ABORT is what each must get."""
        with RawAssociation(self.node.port, timeout=15) as a:
            if a.associate(calling_aet=SENDER_AET) != 0x02:
                self.statuses["association refused"] += 1
                return
            for pdu in pdus:
                a.send(pdu)
            answer = a.read_pdu()
            self.statuses[f"raw session: {'none' if answer is None else f'PDU {answer[0]}'}"] += 1

    def _half_store(self, data: bytes) -> None:
        """Associate, send the first P-DATA fragments of a C-STORE, then drop the connection."""
        from pynetdicom import AE

        ae = AE(SENDER_AET)
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4", [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", self.node.port, ae_title="LUMBAR_AI")
        if not assoc.is_established:
            return
        sock = assoc.dul.socket.socket  # the raw socket under the association: write half a PDU on it
        pdu = struct.pack(">BBI", 0x04, 0, len(data) + 6) + struct.pack(">IBB", len(data) + 2, 1, 0x00) + data
        with contextlib.suppress(OSError):
            sock.sendall(pdu[: len(pdu) // 2])
        assoc.abort()

    def cases(self, n: int) -> list[Case]:
        """``n`` cases: about 30 % bytes, 33 % fields, 4 % whole studies, 33 % protocol garbage."""
        weights = {self.bytes_case: 0.30, self.field_case: 0.33, self.study_case: 0.04, self.protocol_case: 0.33}
        kinds = list(weights)
        return [kinds[i] for i in self.rng.choice(len(kinds), size=n, p=list(weights.values()))]


# -- guards: studies that reached grading in an earlier run, each with its outcome checked -----------

#: The series a geometry defect may be put on (a whole series: every one of its images).
GUARD_SERIES = ("Axial", "Sagittal T2", "Sagittal T1")
# lines naming the bad character set in the whole log, per receiving process (each summarises pydicom's
# warnings per study on its own; 1,646 for one study unbounded)
CHARSET_LINE_BOUND = 60


def guard_studies(node: ServedNode, study_dir: Path, rng: np.random.Generator, n: int) -> dict[str, tuple[Defect, str]]:
    """Send ``n`` defective studies (the defects in turn, their series and images drawn from ``rng``);
    study UID -> (defect, the series description it was put on)."""
    study = [pydicom.dcmread(p) for p in sorted(study_dir.rglob("*.dcm"))]
    sent: dict[str, tuple[Defect, str]] = {}
    defects = list(Defect)
    for i in range(n):
        defect = defects[i % len(defects)]
        series = str(rng.choice(GUARD_SERIES)) if defect in (Defect.HUGE_SPACING, Defect.SAME_POSITION) else "Axial"
        chosen = None
        if defect is Defect.LYING_JPEG_LS:
            axial = sum("Axial" in str(ds.SeriesDescription) for ds in study)
            chosen = {int(k) for k in rng.choice(axial, size=min(3, axial), replace=False)}
        datasets = defective_study(study, defect, series, chosen)
        for ds in datasets:
            raw_store(node.port, encode(ds), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                      str(ds.file_meta.TransferSyntaxUID), SENDER_AET)
        sent[str(datasets[0].StudyInstanceUID)] = (defect, series)
    return sent


def _guard_failure(node: ServedNode, ledger: Ledger, study_uid: str, defect: Defect, series: str) -> str | None:
    """Why this guard study's outcome is wrong, or None."""
    state = ledger.study(study_uid)
    if state is None:
        return "never filed"
    if defect is Defect.SECONDARY_CAPTURE:
        ok = state.state == "skipped" and "no MR image storage class" in (state.reason or "")
        return None if ok else f"{state.state} ({state.reason}): Secondary Captures taken for MR"
    if state.state == "skipped" and defect in (Defect.HUGE_SPACING, Defect.SAME_POSITION):
        return None if "implausible geometry" in (state.reason or "") else f"skipped ({state.reason})"
    if state.state != "done":
        return f"{state.state} ({state.reason})"
    found = sorted((node.root / "results" / study_uid).rglob("results.json"))
    if not found:
        return "done without results.json"
    labels = json.loads(found[-1].read_text())["labels"]
    graded = [item for item in labels if item["assessed"]]
    if defect in (Defect.HUGE_SPACING, Defect.SAME_POSITION):
        spool = node.root / "spool" / study_uid
        bad = {p.parent.name for p in spool.rglob("*.dcm")
               if series in str(pydicom.dcmread(p, stop_before_pixels=True).get("SeriesDescription", ""))}
        if any(item["series_uid"] in bad for item in graded):
            return f"graded from the {series} series whose geometry is impossible"
        if not any("implausible geometry" in item.get("reason", "") for item in labels):
            return "no label says why it is not assessed"
    if defect is Defect.LYING_JPEG_LS and "codestream declares 20000 x 20000" not in node.log_text():
        return "the lying codestreams were not refused by their header"
    if defect is Defect.BAD_CHARSET and f'"study_uid": "{study_uid}"' not in node.log_text():
        return "no line of this study at all"
    return None


def guard_failures(node: ServedNode, ledger: Ledger, sent: dict[str, tuple[Defect, str]]) -> list[str]:
    """The guard studies whose outcome is wrong, and the character-set lines beyond their bound."""
    failures = [f"{defect.value} on {series}: {why}" for uid, (defect, series) in sent.items()
                if (why := _guard_failure(node, ledger, uid, defect, series)) is not None]
    log = node.log_text()
    lines = sum("ISO_IR 999" in line for line in log.splitlines())
    bound = CHARSET_LINE_BOUND * (1 + log.count('"receiver process started"'))  # the node's process and the others
    if lines > bound:
        failures.append(f"{lines} log lines name the bad character set (at most {bound})")
    return failures


def regressions(port: int) -> list[str]:
    """The cases earlier fuzz runs found, each checked; the names of those that failed."""
    failed = []
    aborted = 0
    for _ in range(8):  # 8 = the per-address limit: a slot leaked per connection locked the address out
        with RawAssociation(port, timeout=15) as a:
            a.associate(calling_aet=SENDER_AET)
            a.send(p_data(77, 0x03, b"\x00\x00\x00\x00\x04\x00\x00\x00\x30\x00"))
            answer = a.read_pdu()
            aborted += answer is not None and answer[0] == A_ABORT
    if aborted < 8 or not echo(port, SENDER_AET):
        failed.append("lockout: 8 P-DATA on an unnegotiated context, then a C-ECHO")
    with RawAssociation(port, timeout=15) as a:
        a.send(associate_rq([(0, VERIFICATION, [EXPLICIT_LE])], SENDER_AET))
        if a.read_pdu() is None:
            failed.append("an A-ASSOCIATE-RQ with context ID 0 not answered")
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    with RawAssociation(port, timeout=15) as a:
        a.associate(calling_aet=SENDER_AET)
        a.send(p_data(3, 0x03, c_store_command(str(ds.SOPClassUID), str(ds.SOPInstanceUID), omit=("MessageID",))))
        a.send(p_data(3, 0x02, encode(ds)))
        if a.response()[0] != 0xC000:
            failed.append("a C-STORE without a Message ID not answered 0xC000")
    return failed


def run(cases: int, seed: int, workdir: Path, guards: int = len(Defect)) -> dict[str, object]:
    """Send the cases and check the node; the report."""
    rng = np.random.default_rng(seed)
    data, outside = workdir / "data", workdir / "outside"
    outside.mkdir()
    exe = Path(sys.executable).with_name("lumbar-node")
    subprocess.run([str(exe), "phantom", "--studies", "1", "--seed", "3", "--out", str(data)], check=True,
                   capture_output=True)
    node = ServedNode(workdir / "node", destination_port=1, quiet_time_s=2.0, destinations=[],
                      limits={"socket_timeout_s": 5, "acse_timeout_s": 10, "grading_timeout_s": 120})
    node.start()
    assert node.process is not None
    pid = node.process.pid
    rss_before = proc_status(pid)["VmRSS"]
    cpu_before = cpu_seconds(pid)
    regressions_failed = regressions(node.port)
    fuzzer = Fuzzer(node, data / "train_images", rng, outside)
    plan = fuzzer.cases(cases)
    echo_failures, kinds = 0, Counter()
    worker_peak, garbage_lines = 0, 0
    started = time.monotonic()
    for i in range(cases):
        case = plan[i]
        kinds[case.__name__] += 1
        lines_before = _lines(node.log_path) if case.__name__ == "protocol_case" else 0
        try:
            case()
        except Exception as exc:  # noqa: BLE001 - a client-side failure (the node refused hard): counted
            fuzzer.statuses[f"client {type(exc).__name__}"] += 1
        if case.__name__ == "protocol_case":
            garbage_lines += _lines(node.log_path) - lines_before
        worker_peak = max([worker_peak, *(proc_status(c)["VmHWM"] for c in children(pid))])
        if (i + 1) % 50 == 0 and not echo(node.port, SENDER_AET):
            echo_failures += 1
    guards_sent = guard_studies(node, data / "train_images", np.random.default_rng([seed, 23]), guards)
    if not echo(node.port, SENDER_AET):
        echo_failures += 1
    sent_s = time.monotonic() - started
    ledger = Ledger(node.root / "ledger.sqlite")
    try:
        wait_for("every study to reach a final state",
                 lambda: all(s.state in FINAL for s in ledger.studies()), timeout=600, every=1.0)
        studies = ledger.studies()
        guards_failed = guard_failures(node, ledger, guards_sent)
    finally:
        ledger.close()
    alive = node.process.poll() is None
    rss = proc_status(pid)
    cpu = cpu_seconds(pid) - cpu_before
    log = node.log_text()
    node.stop()
    raw_lines = [line for line in log.splitlines() if line and not line.startswith("{")]
    strays = sorted(str(p.relative_to(workdir)) for p in workdir.iterdir() if p.name not in ("data", "node", "outside"))
    strays += sorted(str(p) for p in outside.iterdir())
    report: dict[str, object] = {
        "cases": cases, "seed": seed, "kinds": dict(kinds), "seconds_sending": round(sent_s, 1),
        "guard_studies": {uid: f"{defect.value} on {series}" for uid, (defect, series) in guards_sent.items()},
        "charset_log_lines": sum("ISO_IR 999" in line for line in log.splitlines()),
        "statuses": dict(fuzzer.statuses),
        "checks": {
            "node_alive": alive,
            "echo_failures": echo_failures,
            "files_outside_node_folders": strays,
            "studies_not_final": [s.study_uid for s in studies if s.state not in FINAL],
            "final_without_reason": [s.study_uid for s in studies if s.state in ("failed", "skipped") and not s.reason],
            "tracebacks_escaped": sum("Traceback" in line for line in raw_lines),
            "guard_failures": guards_failed,
            "regressions_failed": regressions_failed,
            "association_requests_unanswered": fuzzer.statuses["association request not answered"],
        },
        "studies": dict(Counter(str(s.state) for s in studies)),
        "reasons": dict(Counter((s.reason or "")[:100] for s in studies if s.state != "done")),
        "log_lines": len(log.splitlines()), "raw_log_lines": len(raw_lines),
        "log_lines_per_garbage_case": round(garbage_lines / max(1, fuzzer.garbage_cases), 1),
        "node_rss_mb": {"before": round(rss_before / 1024), "peak": round(rss["VmHWM"] / 1024),
                        "after": round(rss["VmRSS"] / 1024)},
        "worker_peak_rss_mb": round(worker_peak / 1024),
        "node_cpu_s": round(cpu, 1),
    }
    return report


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def failed_checks(report: dict[str, object]) -> list[str]:
    checks = report["checks"]
    assert isinstance(checks, dict)
    return [name for name, value in checks.items() if (value is not True if name == "node_alive" else bool(value))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--guard-studies", type=int, default=len(Defect),
                        help="defective whole studies sent after the cases, the defects in turn (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lumbar-fuzz-") as tmp:
        report = run(args.cases, args.seed, Path(tmp), args.guard_studies)
    failed = failed_checks(report)
    report["failed_checks"] = failed
    print(json.dumps(report, indent=None if args.json else 1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""Benchmark: end-to-end time from a study's last instance sent to the node until its SR is in Orthanc,
broken down per step.

    .venv/bin/python tests/benchmarks/bench_end_to_end.py [--studies 5] [--data DIR] [--modes complete] [--json]

One real Orthanc (the node's only destination) and one ``lumbar-node serve`` process (tests/support/served_node.py,
JSON log) per mode; the phantom studies (``lumbar-node phantom --seed 11``, or the RSNA-layout folder
--data names) that hold Sagittal T1, Sagittal T2/STIR and Axial T2 are sent one after the other, each
as one DCMTK storescu association, the next one only once the previous one is delivered. Per study:
  t0          storescu exits (every C-STORE acknowledged; send = storescu start -> exit)
  t_release   "study released for grading" in the node's log     wait   = t_release - t0
  t_report    "report recorded ahead of its run" (the SR in the ledger, its delivery started; a node
              without it: t_graded)
  t_graded    "results ready" (every file written, in the ledger)  grade  = t_graded - t_release
  t_delivered "results delivered" (the last C-STORE of the run ended) deliver = t_delivered - t_report
  t_orthanc   the script first sees an SR instance of the study in Orthanc's REST API (polled every 20 ms
              once the report is recorded; the SR is sent first, so this may precede t_delivered)
  total = t_orthanc - t0; worker = the grading worker's own "seconds" ("study graded"); cstore = the
  node's own "seconds" of the last delivery association ("results delivered").
The SR's path, step by step (the worker's "study graded" line; a node that does not log a step shows -):
queue = from the release to the worker starting (t_worker_end - worker - t_release); headers (read and
checked), analysis (the model), read (the located images in full), sr (built and written), report (its
fsync and the notice to the node), record = the node's "waited_s" from the notice to the report
recorded (a node without notices: from the worker's end to "results ready"); pacs = t_orthanc - t_report.
Off the SR's path (the rest of the run, drawn while the SR is sent; a node without notices draws the
heatmaps during sr and records everything at once): sc (the heatmaps, wrapped and written), pdf, kos,
text, fsync (waiting for the files' fsyncs), ready = t_graded - t_report, deliver.
Log timestamps are UTC from time.time() on this machine, as are t0 and t_orthanc. Modes:
  complete  release_when_complete=true, quiet_time_s=30: released when every series is complete
  quiet     release_when_complete=false, quiet_time_s=2: released by the quiet time (+ <=0.1 s sweep)
Prints the median and max over studies per mode (seconds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.support
from demo.orthanc import Orthanc, running_orthanc, storescu
from tests.support.served_node import NODE_AET, SENDER_AET, ServedNode, wait_for

ROLES = {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
MODES: dict[str, dict[str, Any]] = {
    "complete": {"quiet_time_s": 30, "study": {"release_when_complete": True}},
    "quiet": {"quiet_time_s": 2, "study": {"release_when_complete": False}},
}
COLUMNS = ["images", "send", "wait", "grade", "deliver", "orthanc", "total", "worker", "cstore"]
#: The per-step breakdown (see the module's docstring), in the order the steps happen.
STEPS = ["wait", "queue", "headers", "analysis", "read", "sr", "report", "record", "pacs", "total",
         "sc", "pdf", "kos", "text", "fsync", "ready", "deliver"]
POLL_S = 0.02


def complete_studies(data: Path) -> list[list[Path]]:
    """The files of every study under data/train_images that has the three series roles."""
    studies = []
    for folder in sorted((data / "train_images").iterdir()):
        descriptions = {pydicom.dcmread(next(s.glob("*.dcm")), stop_before_pixels=True).SeriesDescription
                        for s in folder.iterdir() if s.is_dir()}
        if descriptions >= ROLES:
            studies.append(sorted(folder.rglob("*.dcm")))
    return studies


class LogTail:
    """The node's JSON log events, read incrementally."""

    def __init__(self, node: ServedNode) -> None:
        self.path, self.offset, self.events = node.log_path, 0, []

    def find(self, event: str, study_uid: str) -> dict[str, Any] | None:
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind("\n") + 1]  # a line still being written waits for the next read
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            if line.startswith("{"):
                self.events.append(json.loads(line))
        return next((e for e in self.events if e.get("event") == event and e.get("study_uid") == study_uid), None)


def stamp(event: dict[str, Any]) -> float:
    """An event's ISO UTC timestamp as time.time() seconds."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def sr_in_orthanc(pacs: Orthanc, study_uid: str) -> bool:
    return any(s["MainDicomTags"].get("Modality") == "SR" and s["Instances"] for s in pacs.study_series(study_uid))


def measure(files: list[Path], node: ServedNode, log: LogTail, pacs: Orthanc) -> dict[str, Any]:
    """Send one study to the node and time each stage until its SR is in Orthanc."""
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    started = time.time()
    sent = storescu(files, node.port, called=NODE_AET, calling=SENDER_AET)
    t0 = time.time()
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed: {sent.stdout[-1000:]}{sent.stderr[-1000:]}")

    def tail() -> str:
        return f"study {study_uid}; node log tail:\n{node.log_text()[-3000:]}"

    wait_for(tail, lambda: log.find("report recorded ahead of its run", study_uid)
             or log.find("results ready", study_uid), timeout=300, every=POLL_S)
    wait_for(tail, lambda: sr_in_orthanc(pacs, study_uid), timeout=60, every=POLL_S)
    t_orthanc = time.time()
    ready = wait_for(tail, lambda: log.find("results ready", study_uid), timeout=300, every=POLL_S)
    delivered = wait_for(tail, lambda: log.find("results delivered", study_uid), timeout=60, every=POLL_S)
    released = log.find("study released for grading", study_uid)
    graded = log.find("study graded", study_uid)
    ahead = log.find("report recorded ahead of its run", study_uid)
    assert released is not None and graded is not None, tail()
    t_release, t_graded, t_delivered = stamp(released), stamp(ready), stamp(delivered)
    t_report = stamp(ahead) if ahead is not None else t_graded
    t_worker_end, worker = stamp(graded), float(graded["seconds"])
    steps = {step: (float(graded[f"{step}_s"]) if f"{step}_s" in graded else None)
             for step in ("headers", "analysis", "read", "sr", "report", "sc", "pdf", "kos", "text", "fsync")}
    record = float(ahead["waited_s"]) if ahead is not None else t_graded - t_worker_end
    return {"images": len(files), "send": t0 - started, "wait": t_release - t0, "grade": t_graded - t_release,
            "deliver": t_delivered - t_report, "orthanc": t_orthanc - t_delivered, "total": t_orthanc - t0,
            "worker": worker, "cstore": float(delivered["seconds"]), "why": released["why"],
            "files_delivered": delivered["files"], "queue": t_worker_end - worker - t_release, **steps,
            "record": record, "pacs": t_orthanc - t_report, "ready": t_graded - t_report}


def run_mode(mode: str, studies: list[list[Path]], work: Path) -> list[dict[str, Any]]:
    with running_orthanc(work / mode / "pacs") as pacs:
        node = ServedNode(work / mode / "node", pacs.dicom_port, **MODES[mode]).start()
        try:
            log = LogTail(node)
            rows = []
            for files in studies:
                rows.append(measure(files, node, log, pacs))
                print(f"  {mode}: " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in rows[-1].items()), file=sys.stderr)
            return rows
        finally:
            node.stop()


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Median and max of each column and step over the studies (None where the node logs no such step)."""
    out: dict[str, dict[str, float | None]] = {}
    for c in dict.fromkeys([*COLUMNS, *STEPS]):
        values = [r[c] for r in rows if r.get(c) is not None]
        out[c] = {"median": statistics.median(values) if values else None, "max": max(values) if values else None}
    return out


def _cell(stats: dict[str, float | None], digits: int = 2) -> str:
    if stats["median"] is None or stats["max"] is None:
        return "-"
    return f"{stats['median']:.{digits}f} / {stats['max']:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=5, help="phantom studies to make and send (default 5)")
    parser.add_argument("--data", type=Path, help="reuse this RSNA-layout folder instead of making phantoms")
    parser.add_argument("--json", action="store_true", help="print every measurement as JSON instead of a table")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="release modes to run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "phantom"
            exe = Path(sys.executable).with_name("lumbar-node")
            made = str(2 * args.studies)  # not every phantom study has all three series roles
            subprocess.run([str(exe), "phantom", "--studies", made, "--seed", "11", "--out", str(data)],
                           check=True, capture_output=True)
        studies = complete_studies(data)[:args.studies]
        if len(studies) < args.studies:
            print(f"only {len(studies)} complete studies under {data}", file=sys.stderr)
        if not studies:
            raise SystemExit(f"no study with {sorted(ROLES)} under {data}/train_images")
        results = {mode: run_mode(mode, studies, work) for mode in args.modes}

    if args.json:
        print(json.dumps({m: {"studies": rows, "summary": summary(rows)} for m, rows in results.items()}, indent=1))
        return
    print(f"{len(studies)} studies, seconds (median / max); orthanc = t_orthanc - t_delivered, polled every "
          f"{POLL_S * 1000:.0f} ms")
    print(f"{'mode':<9}" + "".join(f"{c:>15}" for c in COLUMNS))
    for mode, rows in results.items():
        stats = summary(rows)
        cells = [_cell(stats[c], 0 if c == "images" else 2) for c in COLUMNS]
        whys = ",".join(sorted({r["why"] for r in rows}))
        print(f"{mode:<9}" + "".join(f"{c:>15}" for c in cells) + f"   (released by: {whys})")
    print("\nper step, seconds (median / max): from the last image acknowledged to the SR in the PACS (to total),"
          " then the rest of the run")
    print(f"{'step':<10}" + "".join(f"{mode:>16}" for mode in results))
    for step in STEPS:
        print(f"{step:<10}" + "".join(f"{_cell(summary(rows)[step], 3):>16}" for rows in results.values()))


if __name__ == "__main__":
    main()

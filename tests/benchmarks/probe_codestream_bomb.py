"""The worker's memory on a lying JPEG-LS codestream, probed as issue 23 found it: a real node
(`lumbar-node serve`), one phantom study whose ``--liars`` axial slices declare their own size
(Rows x Columns) but carry a JPEG-LS codestream whose frame header (SOF55) declares
``--size`` x ``--size`` x 16 bit (only the header lies: tests/support/defects.py). Prints the
study's state and reason, the labels graded, whether a lying image was graded from, the log line
that refused them, and the peak RSS (VmHWM) of the node's workers and of the node.

    .venv/bin/python tests/benchmarks/probe_codestream_bomb.py [--liars 3] [--size 20000] [--json]

To measure the code before a change, put its tree first on PYTHONPATH (the node inherits it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.support
from tests.support.defects import lie_about_size, with_fresh_uids
from tests.support.procfs import children, proc_status
from tests.support.raw_dicom import encode, raw_store
from tests.support.served_node import SENDER_AET, ServedNode, stop_all


def probe(liars: int, size: int, workdir: Path) -> dict[str, object]:
    exe = Path(sys.executable).with_name("lumbar-node")
    subprocess.run([str(exe), "phantom", "--studies", "1", "--seed", "3", "--out", str(workdir / "data")],
                   check=True, capture_output=True)
    study = [pydicom.dcmread(p) for p in sorted((workdir / "data" / "train_images").rglob("*.dcm"))]
    datasets = with_fresh_uids(study)
    axial = [ds for ds in datasets if "Axial" in str(ds.SeriesDescription)]
    lying = {str(ds.SOPInstanceUID) for ds in axial[2:2 + liars]}
    for ds in axial[2:2 + liars]:
        lie_about_size(ds, size, size)
    node = ServedNode(workdir / "node", destination_port=1, quiet_time_s=1.0, destinations=[]).start()
    try:
        assert node.process is not None
        pid = node.process.pid
        worker_before = max([0, *(proc_status(c)["VmHWM"] for c in children(pid))])
        for ds in datasets:
            raw_store(node.port, encode(ds), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                      str(ds.file_meta.TransferSyntaxUID), SENDER_AET)
        study_uid = str(datasets[0].StudyInstanceUID)
        worker_peak, started = worker_before, time.monotonic()
        while (state := node.study(study_uid)) is None or state.state not in ("done", "failed", "skipped"):
            worker_peak = max([worker_peak, *(proc_status(c)["VmHWM"] for c in children(pid))])
            if time.monotonic() - started > 300:
                break
            time.sleep(0.05)
        worker_peak = max([worker_peak, *(proc_status(c)["VmHWM"] for c in children(pid))])
        results = sorted((node.root / "results" / study_uid).rglob("results.json"))
        labels = json.loads(results[-1].read_text())["labels"] if results else []
        log = node.log_text()
        refused = [line for line in log.splitlines() if "codestream declares" in line]
        return {
            "liars": liars, "declared": f"{size} x {size} x 16",
            "codestream_bytes": max([0, *(len(ds.PixelData) for ds in axial[2:2 + liars])]),
            "state": state.state if state else None, "reason": state.reason if state else None,
            "labels_graded": sum(item["assessed"] for item in labels),
            "graded_from_a_lying_image": any(item.get("sop_instance_uid") in lying for item in labels),
            "refusal_logged": refused[0][:300] if refused else None,
            "worker_peak_rss_mb": {"before": round(worker_before / 1024), "during": round(worker_peak / 1024)},
            "node_peak_rss_mb": round(proc_status(pid)["VmHWM"] / 1024),
        }
    finally:
        node.stop()
        stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--liars", type=int, default=3, help="axial slices whose codestream lies")
    parser.add_argument("--size", type=int, default=20000, help="rows and columns the codestream declares")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lumbar-bomb-") as tmp:
        report = probe(args.liars, args.size, Path(tmp))
    print(json.dumps(report, indent=None if args.json else 1))


if __name__ == "__main__":
    main()

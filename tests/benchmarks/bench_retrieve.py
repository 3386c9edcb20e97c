"""Benchmark: retrieving a study from a real Orthanc into the node, by each query/retrieve method.

    .venv/bin/python tests/benchmarks/bench_retrieve.py [--repeats 3] [--json]

One phantom study (the all-Normal/Mild one of the tests, 3 series) is stored in Orthanc (DICOMweb
plugin on); for each method (C-MOVE into the node's own storage SCP, C-GET and WADO-RS through the
node's admission, all with storage.fsync on, the product default) a fresh spool and ledger receive
the whole study: its three series found by C-FIND / QIDO-RS and retrieved on one association (one
request per series). Timed: from the series query to the last instance recorded in the ledger.
Prints the median of --repeats runs, interleaved across methods.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.support

from demo.orthanc import ORTHANC_AET, free_port, running_orthanc, storescu
from dicom_node.config import load_settings
from dicom_node.dicom import DimseSource, StorageSCP
from dicom_node.dicomweb import DicomWebSource
from dicom_node.ingest import Admission
from dicom_node.observability import NodeMetrics, configure_logging
from dicom_node.store import Ledger
from tests.support.tools import normal_study

METHODS = ("c-move", "c-get", "wado-rs")


def one_run(method: str, work: Path, pacs_dicom: int, pacs_http: int, node_port: int, study_uid: str) -> float:
    """Seconds to bring the whole study into a fresh spool and ledger by ``method``."""
    root = work / f"{method}-{time.monotonic_ns()}"
    source = ({"name": "web", "dicomweb": {"url": f"http://127.0.0.1:{pacs_http}/dicom-web"}} if method == "wado-rs"
              else {"name": "pacs", "ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": pacs_dicom,
                    "method": method})
    config = {"node": {"ae_title": "LUMBAR_AI", "bind_address": "127.0.0.1", "port": node_port,
                       "allowed_peers": [{"ae_title": ORTHANC_AET, "host": "127.0.0.1"}]},
              "storage": {"spool_dir": str(root / "spool"), "results_dir": str(root / "results"),
                          "ledger_path": str(root / "ledger.sqlite"), "min_free_disk_mb": 10},
              "logging": {"format": "json", "level": "WARNING"}, "query_retrieve": [source]}
    root.mkdir(parents=True)
    (root / "node.yaml").write_text(yaml.safe_dump(config))
    settings = load_settings(root / "node.yaml", environ={})
    ledger = Ledger(settings.storage.ledger_path)
    admission = Admission(settings, ledger, NodeMetrics())
    scp = StorageSCP(settings, ledger) if method == "c-move" else None
    if scp is not None:
        scp.start()
    try:
        client = (DicomWebSource(settings.query_retrieve[0], 30, admission) if method == "wado-rs"
                  else DimseSource(settings.query_retrieve[0], "LUMBAR_AI", 30, admission))
        started = time.perf_counter()
        series = client.find_series(study_uid)
        tally = client.retrieve(study_uid, series, time.monotonic() + 600)
        seconds = time.perf_counter() - started
        held = len(ledger.instance_paths(study_uid))
        if tally.failed or held != tally.completed:
            raise RuntimeError(f"{method}: {tally}, {held} in the ledger")
        return seconds
    finally:
        if scp is not None:
            scp.stop()
        ledger.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    configure_logging("json", "WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = normal_study(work / "phantom")
        import pydicom

        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        size = sum(p.stat().st_size for p in files)
        node_port = free_port()
        with running_orthanc(work / "orthanc", peers={"lumbar": ("LUMBAR_AI", node_port)}, dicomweb=True) as pacs:
            sent = storescu(files, pacs.dicom_port)
            if sent.returncode != 0:
                raise SystemExit(sent.stderr)
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            for _ in range(args.repeats):
                for method in METHODS:
                    times[method].append(one_run(method, work, pacs.dicom_port, pacs.http_port, node_port, study_uid))
    rows = {m: {"seconds": statistics.median(t), "images_per_s": len(files) / statistics.median(t),
                "mb_per_s": size / 2**20 / statistics.median(t)} for m, t in times.items()}
    if args.json:
        print(json.dumps({"images": len(files), "bytes": size, "methods": rows}, indent=1))
        return
    print(f"one study, {len(files)} images, {size / 2**20:.1f} MiB, median of {args.repeats}")
    print(f"{'method':8} {'seconds':>8} {'images/s':>9} {'MiB/s':>7}")
    for method, row in rows.items():
        print(f"{method:8} {row['seconds']:8.2f} {row['images_per_s']:9.1f} {row['mb_per_s']:7.2f}")


if __name__ == "__main__":
    main()

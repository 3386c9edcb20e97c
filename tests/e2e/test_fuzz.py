"""A deterministic slice of the fuzz script (tests/benchmarks/fuzz_node.py): 100 malformed inputs
against the node as it is served, and every check of the full run, the regressions of earlier runs
included (8 P-DATA on an unnegotiated context then a C-ECHO, a context-ID-0 request, a C-STORE
without a Message ID)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_node.py"


def test_a_hundred_malformed_inputs_leave_the_node_answering_and_every_study_final() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--cases", "100", "--seed", "1", "--json"],
                         capture_output=True, text=True, timeout=900)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    checks = report["checks"]
    assert checks == {"node_alive": True, "echo_failures": 0, "files_outside_node_folders": [],
                      "studies_not_final": [], "final_without_reason": [], "tracebacks_escaped": 0,
                      "guard_failures": [], "regressions_failed": [], "association_requests_unanswered": 0}, checks
    assert out.returncode == 0
    assert sum(report["kinds"].values()) == 100 and len(report["kinds"]) >= 3
    assert report["node_rss_mb"]["peak"] < 1024 and report["worker_peak_rss_mb"] < 1024
    assert report["log_lines_per_garbage_case"] < 20

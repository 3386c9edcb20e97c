"""STOW-RS memory, probed as the issue asks: a real node (`lumbar-node serve` in its own process), a
``sender`` account, then hostile STOW-RS requests, one fresh node each, with the node's peak RSS
(VmHWM of /proc/<pid>/status) read before and after:

- ``normal``: one small MR instance, for the baseline;
- ``deflate-bomb``: a ~1 MiB Part 10 file in Deflated Explicit VR Little Endian that inflates to
  ``--bomb-mib`` (1 GiB) of pixel data;
- ``over-limit``: one part of ``--over-mib`` (2 GiB) with ``web.upload_max_mb`` at ``--limit-mib``
  (64), with a Content-Length;
- ``chunked``: the same without a Content-Length (Transfer-Encoding: chunked).

    .venv/bin/python tests/benchmarks/probe_stow_memory.py [--cases deflate-bomb,chunked] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from demo.orthanc import free_port
from tests.support.procfs import proc_status
from tests.support.served_node import ServedNode, stop_all
from tests.support.stow import MiB, headers, related, streamed
from tests.support.uploads import deflate_bomb, image, part10

USER, PASSWORD = "pacs", "pacs-password-1"
CASES = ("normal", "deflate-bomb", "over-limit", "chunked")


def run_case(case: str, root: Path, args: argparse.Namespace) -> dict:
    node = ServedNode(root / case, free_port(), web={"upload_max_mb": args.limit_mib})
    node.add_user(USER, "sender", PASSWORD)
    node.start()
    try:
        client = httpx.Client(base_url=node.web_url, timeout=600)
        pid = node.process.pid
        before = proc_status(pid)["VmHWM"] // 1024
        sent_headers = headers(USER, PASSWORD)
        if case in ("over-limit", "chunked"):
            body: object = streamed(args.over_mib * MiB)
            sent = args.over_mib * MiB
            if case == "over-limit":
                sent_headers["Content-Length"] = str(len(b"".join(streamed(0))) + sent)
        else:
            body = related([part10(image(64)) if case == "normal" else deflate_bomb(args.bomb_mib)])
            sent = len(body)
        started = time.perf_counter()
        try:
            answer = client.post("/dicom-web/studies", content=body, headers=sent_headers)
            status, message = answer.status_code, answer.text[:160]
        except httpx.HTTPError as exc:  # the node closed the connection while the body was being sent
            status, message = None, f"{type(exc).__name__}: {exc}"[:160]
        seconds = time.perf_counter() - started
        after = proc_status(pid)["VmHWM"] // 1024
        spooled = [p for p in (node.root / "spool").rglob("*") if p.is_file()]
        return {"case": case, "body_mib": round(sent / MiB, 2), "status": status, "answer": message,
                "seconds": round(seconds, 2), "peak_rss_before_mib": before, "peak_rss_after_mib": after,
                "node_alive": node.process.poll() is None, "spool_files": len(spooled)}
    finally:
        stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--bomb-mib", type=int, default=1024, help="what the deflate bomb inflates to (MiB)")
    parser.add_argument("--over-mib", type=int, default=2048, help="the over-limit and chunked bodies (MiB)")
    parser.add_argument("--limit-mib", type=float, default=64, help="web.upload_max_mb of the probed node")
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-stow-") as tmp:
        for case in args.cases.split(","):
            result = run_case(case.strip(), Path(tmp), args)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                print(f"{result['case']:>13}: {result['body_mib']:8.2f} MiB sent -> HTTP {result['status']} in "
                      f"{result['seconds']:6.2f} s; node peak RSS {result['peak_rss_before_mib']} -> "
                      f"{result['peak_rss_after_mib']} MiB; alive {result['node_alive']}; spool files "
                      f"{result['spool_files']}; {result['answer']!r}", flush=True)


if __name__ == "__main__":
    main()

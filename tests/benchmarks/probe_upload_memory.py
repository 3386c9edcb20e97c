"""The web upload's memory, probed as issue 18 found it: a real node (`lumbar-node serve` in its own
process), a viewer signed in over HTTP on loopback, then hostile uploads, one fresh node each,
with the node's peak RSS (VmHWM of /proc/<pid>/status) read before and after:

- ``deflate-bomb``: a ~1 MiB Part 10 file in Deflated Explicit VR Little Endian that inflates to
  ``--bomb-mib`` (1 GiB) of pixel data;
- ``over-limit``: ``--over-mib`` (200 MiB) with ``web.upload_max_mb`` at ``--limit-mib`` (64), the
  CSRF token in the header and a Content-Length;
- ``chunked``: the same without a Content-Length (Transfer-Encoding: chunked), the token in the form;
- ``zips``: six ~60 kB zips, each of one DICOM file of 60 MiB (zero pixels);
- ``normal``: a small valid upload, for the baseline.

    .venv/bin/python tests/benchmarks/probe_upload_memory.py [--cases deflate-bomb,chunked] [--json]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.procfs import proc_status
from tests.support.served_node import ServedNode, stop_all
from tests.support.uploads import (
    CONTENT_TYPE,
    MiB,
    deflate_bomb,
    image,
    multipart,
    part10,
    sign_in,
    streamed,
    zip_of_one_image,
)

USER, PASSWORD = "vic", "vic-password-1"
CASES = ("normal", "deflate-bomb", "over-limit", "chunked", "zips")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_case(case: str, root: Path, args: argparse.Namespace) -> dict:
    node = ServedNode(root / case, _free_port(), web={"upload_max_mb": args.limit_mib})
    node.add_user(USER, "viewer", PASSWORD)
    node.start()
    try:
        client, token = sign_in(node.web_url, USER, PASSWORD)
        pid = node.process.pid
        before = proc_status(pid)["VmHWM"] // 1024
        headers = {"Content-Type": CONTENT_TYPE}
        started = time.perf_counter()
        try:
            if case == "chunked":
                sent = args.over_mib * MiB
                answer = client.post("/upload", content=streamed(token, sent), headers=headers)
            else:
                if case == "over-limit":
                    body = multipart(None, [("big.dcm", bytes(args.over_mib * MiB))])
                    headers["X-CSRF-Token"] = token
                else:
                    files = {"normal": [("a.dcm", part10(image(64)))],
                             "deflate-bomb": [("bomb.dcm", deflate_bomb(args.bomb_mib))],
                             "zips": [(f"{i}.zip", zip_of_one_image(60)) for i in range(6)]}[case]
                    body = multipart(token, files)
                sent = len(body)
                answer = client.post("/upload", content=body, headers=headers)
            status, message = answer.status_code, answer.text[:160]
        except httpx.HTTPError as exc:  # the node closed the connection while the body was being sent
            status, message = None, f"{type(exc).__name__}: {exc}"[:160]
        seconds = time.perf_counter() - started
        after = proc_status(pid)["VmHWM"] // 1024
        alive = node.process.poll() is None
        spooled = [p for p in (node.root / "spool").rglob("*") if p.is_file()]
        return {"case": case, "body_mib": round(sent / MiB, 2), "status": status, "answer": message,
                "seconds": round(seconds, 2), "peak_rss_before_mib": before, "peak_rss_after_mib": after,
                "node_alive": alive, "spool_files": len(spooled)}
    finally:
        stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--bomb-mib", type=int, default=1024, help="what the deflate bomb inflates to (MiB)")
    parser.add_argument("--over-mib", type=int, default=200, help="the over-limit and chunked uploads (MiB)")
    parser.add_argument("--limit-mib", type=float, default=64, help="web.upload_max_mb of the probed node")
    parser.add_argument("--json", action="store_true", help="one JSON line per case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="probe-upload-") as tmp:
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

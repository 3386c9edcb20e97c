"""The web page with a large ledger: fill a ledger with N studies (default 10,000; their instances
and audit events too), then time the dashboard's first and a deep page, a search by Study Instance
UID, a state filter and a study page, through the real app (Starlette, templates rendered).

    .venv/bin/python tests/benchmarks/bench_web.py [--studies 10000] [--instances 60] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from starlette.testclient import TestClient

from dicom_node.config import load_settings
from dicom_node.observability.metrics import NodeMetrics
from dicom_node.states import EventKind, StudyState
from dicom_node.store.ledger import Ledger
from dicom_node.web.accounts import Role, add_account
from dicom_node.web.app import WebContext, build_app
from dicom_node.web.security import AccountsFile

MR = "1.2.840.10008.5.1.4.1.1.4"
STATES = [StudyState.DONE] * 8 + [StudyState.SKIPPED, StudyState.FAILED]


class _Node:
    metrics = NodeMetrics()

    def grade_again(self, study_uid: str, actor: str) -> bool:
        return False

    def send_again(self, study_uid: str, actor: str) -> int:
        return 0

    def release_now(self, study_uid: str) -> None:
        pass

    def queued(self) -> int:
        return 0


def fill(ledger_path: Path, studies: int, instances: int) -> float:
    """Write ``studies`` studies with ``instances`` instances in 3 series and 4 events each; seconds taken."""
    started = time.perf_counter()
    ledger = Ledger(ledger_path)  # creates the schema, the migrations and the indexes
    ledger.close()
    import sqlite3

    db = sqlite3.connect(ledger_path)
    now = time.time() - studies * 60
    with db:
        for n in range(studies):
            uid = f"1.2.826.0.1.3680043.8.498.{10**9 + n}"
            t = now + n * 60
            state = STATES[n % len(STATES)]
            db.execute("INSERT INTO studies (study_uid, state, reason, first_received, last_received, updated_at, "
                       "generation) VALUES (?, ?, ?, ?, ?, ?, 1)",
                       (uid, state, "not a lumbar spine study" if state is StudyState.SKIPPED else None,
                        t, t + 5, t + 9))
            db.executemany("INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid, path, "
                           "calling_aet, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(f"{uid}.{i}", uid, f"{uid}.0.{i % 3}", MR, f"/spool/{uid}/{i}.dcm", "ORTHANC", t)
                            for i in range(instances)])
            roles = json.dumps({"series_roles": {"Sagittal T1": [f"{uid}.0.0"], "Sagittal T2/STIR": [f"{uid}.0.1"],
                                                 "Axial T2": [f"{uid}.0.2"]}})
            db.executemany("INSERT INTO events (study_uid, at, kind, actor, detail, data) VALUES (?, ?, ?, ?, ?, ?)",
                           [(uid, t + 1, EventKind.RECEIVED, "ORTHANC", f"{instances} instances", None),
                            (uid, t + 6, EventKind.RELEASED, "node", "run 1: complete", None),
                            (uid, t + 8, EventKind.GRADED, "node", "run 1: 25 of 25", roles),
                            (uid, t + 9, EventKind.DELIVERED, "node", "run 1 to pacs", None)])
    db.close()
    return time.perf_counter() - started


def timed(client: TestClient, url: str, repeats: int) -> tuple[float, float]:
    """(median, max) milliseconds of GET ``url``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        answer = client.get(url)
        times.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200, (url, answer.status_code)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--instances", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        seconds = fill(root / "ledger.sqlite", args.studies, args.instances)
        print(f"filled a ledger with {args.studies} studies, {args.studies * args.instances} instances, "
              f"{args.studies * 4} events in {seconds:.1f} s")
        accounts = root / "accounts.yaml"
        add_account(accounts, "bench", Role.ADMIN, "bench-password")
        settings = load_settings(environ={"LUMBAR_NODE__STORAGE__LEDGER_PATH": str(root / "ledger.sqlite"),
                                          "LUMBAR_NODE__STORAGE__SPOOL_DIR": str(root / "spool"),
                                          "LUMBAR_NODE__WEB__ACCOUNTS_FILE": str(accounts)})
        ledger = Ledger(settings.storage.ledger_path)
        client = TestClient(build_app(WebContext(settings, ledger, _Node(), AccountsFile(accounts))))
        token = re.search(r'name="csrf" value="([^"]+)"', client.get("/signin").text).group(1)  # the form's token
        assert client.post("/signin", data={"name": "bench", "password": "bench-password",
                                            "csrf": token}).status_code == 200
        middle = f"1.2.826.0.1.3680043.8.498.{10**9 + args.studies // 2}"
        pages = args.studies // settings.web.page_size
        cases = [("dashboard, first page", "/"),
                 (f"dashboard, page {pages} (the oldest)", f"/?page={pages}"),
                 ("search: a full Study Instance UID", f"/?q={middle}"),
                 ("search: a UID fragment", f"/?q={str(10**9 + 4242)[-6:]}"),
                 ("filter: state failed", "/?state=failed"),
                 ("filter: state done, page 50", "/?state=done&page=50"),
                 ("a study page", f"/studies/{middle}"),
                 ("/metrics", "/metrics")]
        print(f"{'request':40} {'median ms':>10} {'max ms':>8}   ({args.repeats} requests each)")
        for name, url in cases:
            median, worst = timed(client, url, args.repeats)
            print(f"{name:40} {median:10.1f} {worst:8.1f}")
        ledger.close()


if __name__ == "__main__":
    main()

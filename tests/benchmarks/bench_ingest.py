"""Benchmark: DICOM C-STORE ingest throughput of three receivers, same studies, same sender.

    .venv/bin/python tests/benchmarks/bench_ingest.py [--studies 4] [--repeats 3] [--data DIR] [--json]

Receivers: (a) the node as it runs, `lumbar-node serve` (storage SCP + ledger; nothing released
for grading during the run), with storage.fsync on (the product default) and off; (b) DCMTK storescp (--fork, +B
bit-preserving, default 16 KB PDU, no fsync); (c) a real Orthanc (demo.orthanc.running_orthanc,
its defaults: SyncStorageArea=true, i.e. fdatasync of each file, SQLite index, 4 DICOM threads, 16 KB PDU).
storage.fsync=false skips the node's file and folder fsyncs only: the ledger (SQLite WAL,
synchronous=FULL) still syncs each C-STORE's commit.
Sender: DCMTK storescu (TCP_NODELAY=1), once as one association with every file, once as 4 storescu
processes at the same time, each with a quarter of the files. Every measurement gets a freshly started
receiver on an empty folder (a fresh spool and ledger for the node, a fresh workdir for Orthanc), so
nothing is deduplicated. Timed: from starting storescu to the last storescu exiting (storescu waits for
every C-STORE response, so the receiver has stored each image). Prints the median of --repeats runs;
measurements are interleaved across receivers so background load affects them alike.
The phantom studies are made with ``lumbar-node phantom --seed 5`` unless --data names a folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from demo.orthanc import ORTHANC_AET, free_port, running_orthanc, storescu

CALLING = "BENCH"
NODE_AET = "LUMBAR_AI"
DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
RECEIVERS = ["node-fsync", "node-nofsync", "node-fsync-1ms", "storescp", "orthanc"]
# What each receiver syncs per image (checked with strace -f -e fsync,fdatasync on this machine).
FSYNC = {"node-fsync": "file+dir+ledger", "node-nofsync": "ledger only", "node-fsync-1ms": "file+dir+ledger",
         "storescp": "none",
         "orthanc": "file (fdatasync)"}


@dataclass
class Target:
    """A running receiver: where to send, and how many images it holds now."""

    port: int
    aet: str
    received: Callable[[], int]


def _wait_echo(port: int, aet: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until the receiver answers a C-ECHO (DCMTK echoscu)."""
    deadline = time.monotonic() + timeout
    cmd = ["/usr/bin/echoscu", "-aet", CALLING, "-aec", aet, "127.0.0.1", str(port)]
    while subprocess.run(cmd, check=False, capture_output=True, env=DCMTK_ENV).returncode != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"receiver on port {port} did not answer C-ECHO (exit {proc.poll()})")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextmanager
def receiver(name: str, workdir: Path) -> Iterator[Target]:
    """Start one receiver on an empty folder under ``workdir``; stop it afterwards."""
    port = free_port()
    if name.startswith("node"):
        spool, ledger = workdir / "spool", workdir / "ledger.sqlite"
        env = {**os.environ, "LUMBAR_NODE__NODE__PORT": str(port), "LUMBAR_NODE__NODE__AE_TITLE": NODE_AET,
               "LUMBAR_NODE__NODE__BIND_ADDRESS": "127.0.0.1",
               "LUMBAR_NODE__NODE__ALLOWED_PEERS": f"[{{ae_title: {CALLING}}}]",
               "LUMBAR_NODE__STORAGE__SPOOL_DIR": str(spool), "LUMBAR_NODE__STORAGE__LEDGER_PATH": str(ledger),
               "LUMBAR_NODE__STORAGE__FSYNC": "false" if name.startswith("node-nofsync") else "true",
               "LUMBAR_NODE__LOGGING__LEVEL": "WARNING",
               # ingest only: nothing is released for grading while the benchmark runs
               "LUMBAR_NODE__STUDY__QUIET_TIME_S": "86400", "LUMBAR_NODE__STUDY__RELEASE_WHEN_COMPLETE": "false",
               "LUMBAR_NODE__STORAGE__RESULTS_DIR": str(workdir / "results"), "LUMBAR_NODE__DESTINATIONS": "[]",
               "LUMBAR_NODE__WEB__PORT": "null"}
        if name.endswith("-1ms"):  # pynetdicom's own poll interval, for comparison
            env["LUMBAR_NODE__NODE__POLL_INTERVAL_MS"] = "1"
        log = open(workdir / "node.log", "w")  # noqa: SIM115 - closed below
        exe = Path(sys.executable).with_name("lumbar-node")
        proc = subprocess.Popen([str(exe), "serve"], env=env, stdout=log, stderr=log)

        def count() -> int:
            with sqlite3.connect(ledger) as db:
                recorded = db.execute("SELECT count(*) FROM instances").fetchone()[0]
            return min(recorded, sum(1 for _ in spool.rglob("*.dcm")))
        try:
            _wait_echo(port, NODE_AET, proc)
            yield Target(port, NODE_AET, count)
        finally:
            _stop(proc)
            log.close()
    elif name == "storescp":
        out = workdir / "storescp"
        out.mkdir()
        proc = subprocess.Popen(["/usr/bin/storescp", "--fork", "+B", "-aet", "STORESCP", "-od", str(out), str(port)],
                                env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_echo(port, "STORESCP", proc)
            yield Target(port, "STORESCP", lambda: sum(1 for _ in out.iterdir()))
        finally:
            _stop(proc)
    elif name == "orthanc":
        with running_orthanc(workdir / "orthanc") as orthanc:
            _wait_echo(orthanc.dicom_port, ORTHANC_AET, orthanc.process)
            yield Target(orthanc.dicom_port, ORTHANC_AET, lambda: orthanc.get("/statistics")["CountInstances"])
    else:
        raise ValueError(name)


def send(files: list[Path], target: Target, associations: int) -> float:
    """Seconds for ``associations`` storescu processes at once to send a share of the files each."""
    shares = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        results = list(pool.map(lambda share: storescu(share, target.port, target.aet, CALLING), shares))
    seconds = time.perf_counter() - t0
    for r in results:
        if r.returncode != 0:
            raise RuntimeError(f"storescu failed ({r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
    return seconds


def fsync_cost_ms(folder: Path, size: int, n: int = 20) -> float:
    """Median ms to write ``size`` bytes, fsync the file and its folder (what the node does per image)."""
    data, times = os.urandom(size), []
    for i in range(n):
        t0 = time.perf_counter()
        with open(folder / f"fsync-probe-{i}", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4, help="phantom studies to make (without --data)")
    parser.add_argument("--data", type=Path, default=None, help="reuse this phantom folder (has train_images/)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", type=int, default=4, help="storescu processes in the parallel mode")
    parser.add_argument("--receivers", nargs="+", default=RECEIVERS, choices=RECEIVERS)
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "phantom"
            exe = Path(sys.executable).with_name("lumbar-node")
            subprocess.run([str(exe), "phantom", "--studies", str(args.studies), "--seed", "5", "--out", str(data),
                            "--workers", str(min(2, os.cpu_count() or 1))], check=True, capture_output=True)
        files = sorted((data / "train_images").rglob("*.dcm"))
        n_studies = sum(1 for d in (data / "train_images").iterdir() if d.is_dir())
        n_bytes = sum(len(f.read_bytes()) for f in files)  # also warms the page cache for the sender
        megabytes = n_bytes / 1e6
        modes = {"1 assoc": 1, f"{args.associations} assoc": args.associations}
        runs: dict[tuple[str, str], list[float]] = {(r, m): [] for r in args.receivers for m in modes}
        for rep in range(args.repeats):
            for name in args.receivers:
                for mode, associations in modes.items():
                    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
                    with receiver(name, workdir) as target:
                        seconds = send(files, target, associations)
                        got = target.received()
                    if got != len(files):
                        raise RuntimeError(f"{name} {mode}: {got} of {len(files)} images stored")
                    runs[name, mode].append(seconds)
                    print(f"  repeat {rep + 1} {name:12} {mode:8} {seconds:7.2f} s", file=sys.stderr, flush=True)
                    subprocess.run(["rm", "-rf", str(workdir)], check=True)
        probe = Path(tempfile.mkdtemp(dir=tmp))
        fsync_ms = fsync_cost_ms(probe, n_bytes // len(files))

    rows = []
    for (name, mode), seconds in runs.items():
        s = statistics.median(seconds)
        rows.append({"receiver": name, "fsync": FSYNC[name], "mode": mode, "images": len(files),
                     "mb": round(megabytes, 1), "seconds": round(s, 3), "images_per_s": round(len(files) / s, 1),
                     "mb_per_s": round(megabytes / s, 1), "runs_s": [round(x, 3) for x in seconds]})
    print(f"\n{len(files)} images, {megabytes:.1f} MB ({n_bytes / len(files) / 1e3:.0f} KB each), "
          f"{n_studies} studies; "
          f"median of {args.repeats} run(s); sender DCMTK storescu, TCP_NODELAY=1")
    print(f"{'receiver':13} {'synced per image':17} {'mode':8} {'images':>6} {'MB':>6} {'s':>7} {'img/s':>7} "
          f"{'MB/s':>6}  runs (s)")
    for r in rows:
        print(f"{r['receiver']:13} {r['fsync']:17} {r['mode']:8} {r['images']:>6} {r['mb']:>6.1f} {r['seconds']:>7.2f} "
              f"{r['images_per_s']:>7.1f} {r['mb_per_s']:>6.1f}  {' '.join(f'{x:.2f}' for x in r['runs_s'])}")
    machine = {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
               "kernel": os.uname().release, "fsync_ms_per_image_file": round(fsync_ms, 2)}
    print(f"machine: {machine['nproc']} CPUs ({machine['usable_cpus']} usable), kernel {machine['kernel']}, "
          f"Python {machine['python']}; write+fsync(file)+fsync(dir) of one {n_bytes // len(files) // 1000} KB file "
          f"in the temp folder: {fsync_ms:.2f} ms (median of 20)")
    print("storescp options: --fork +B -aet STORESCP -od DIR (one child process per association, no fsync)")
    if args.json:
        print(json.dumps({"machine": machine, "results": rows}))


if __name__ == "__main__":
    main()

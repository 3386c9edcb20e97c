"""Benchmark: DICOM C-STORE ingest throughput of the node, Orthanc and DCMTK storescp with 1, 2, 4 and 8
senders at once, side by side in one run; and a backlog: 20 studies from 4 senders at once, timed until
the last SR is in Orthanc.

    .venv/bin/python tests/benchmarks/bench_ingest.py [--studies 8] [--senders 1 2 4 8] [--repeats 3]
        [--backlog-studies 20] [--backlog-senders 4] [--data DIR] [--node-env KEY=VALUE ...] [--base DIR] [--json]

Receivers: (a) the node as it runs, `lumbar-node serve` (storage SCP + ledger; nothing released
for grading during the ingest runs), with storage.fsync on (the product default: "node"), and, when
asked (--receivers), off ("node-nofsync") or with pynetdicom's own 1 ms poll ("node-fsync-1ms"), and
with --base DIR the node's code of another checkout ("node-base", e.g. a worktree of main: a "before");
(b) DCMTK storescp (--fork, +B bit-preserving, default 16 KB PDU, no fsync); (c) a real Orthanc
(demo.orthanc.running_orthanc, its defaults: SyncStorageArea=true, i.e. fdatasync of each file, SQLite
index, 4 DICOM threads, 16 KB PDU). storage.fsync=false skips the node's file and folder fsyncs only:
the ledger (SQLite WAL, synchronous=FULL) still syncs each C-STORE's commit. --node-env passes
settings to the node (e.g. LUMBAR_NODE__WORKERS=2).
Senders: N DCMTK storescu processes (TCP_NODELAY=1) at the same time, one association each, the files
dealt round-robin (sorted by path) so that each sends 1/N of them. Every measurement gets a freshly
started receiver on an empty folder (a fresh spool and ledger for the node, a fresh workdir for
Orthanc), so nothing is deduplicated. Timed: from starting the senders to the last storescu exiting
(storescu waits for every C-STORE response, so the receiver has stored each image). "CPU ms/img": the
receiver's CPU time (user + system, with its child processes: the node's receiver processes) over the
run, per image. Prints the median of --repeats runs; measurements are interleaved across receivers and sender counts so
background load affects them alike.
Backlog (unless --backlog-studies 0): the node with grading on (study.release_when_complete, one
destination: a real Orthanc), 4 senders each sending 5 whole studies (studies with the three series
roles, so each gets a report); timed from starting the senders to the last image acknowledged
(ingest) and to the last study's SR seen in Orthanc's REST API (polled every 0.1 s).
The phantom studies are made with ``lumbar-node phantom --seed 5`` unless --data names a folder; the
ingest runs send the first --studies of them.
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

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for demo when run as a script
from demo.orthanc import ORTHANC_AET, Orthanc, free_port, running_orthanc, storescu

CALLING = "BENCH"
NODE_AET = "LUMBAR_AI"
DCMTK_ENV = {"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}
RECEIVERS = ["node", "node-base", "node-nofsync", "node-fsync-1ms", "storescp", "orthanc"]
DEFAULT_RECEIVERS = ["node", "orthanc", "storescp"]
# What each receiver syncs per image (checked with strace -f -e fsync,fdatasync on this machine).
FSYNC = {"node": "file+dir+ledger", "node-base": "file+dir+ledger", "node-nofsync": "ledger only",
         "node-fsync-1ms": "file+dir+ledger",
         "storescp": "none", "orthanc": "file (fdatasync)"}
ROLES = {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
BASE: list[Path] = []  # --base: the checkout whose dicom_node the receiver "node-base" runs (PYTHONPATH)


@dataclass
class Target:
    """A running receiver: where to send, how many images it holds now, and its process (whose CPU
    time, its children's included, is counted per image; None: storescp, a process per association)."""

    port: int
    aet: str
    received: Callable[[], int]
    pid: int | None = None


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its living descendants (Linux /proc)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) * TICK_S
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return total


def _wait_echo(port: int, aet: str, proc: subprocess.Popen, timeout: float = 120) -> None:
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
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _node_env(name: str, workdir: Path, port: int, extra: dict[str, str], pacs_port: int | None) -> dict[str, str]:
    """The node's settings: ingest only (nothing released), or with ``pacs_port`` grading on and
    delivering to that Orthanc."""
    env = {**os.environ, "LUMBAR_NODE__NODE__PORT": str(port), "LUMBAR_NODE__NODE__AE_TITLE": NODE_AET,
           "LUMBAR_NODE__NODE__BIND_ADDRESS": "127.0.0.1",
           "LUMBAR_NODE__NODE__ALLOWED_PEERS": f"[{{ae_title: {CALLING}}}]",
           "LUMBAR_NODE__STORAGE__SPOOL_DIR": str(workdir / "spool"),
           "LUMBAR_NODE__STORAGE__LEDGER_PATH": str(workdir / "ledger.sqlite"),
           "LUMBAR_NODE__STORAGE__RESULTS_DIR": str(workdir / "results"),
           "LUMBAR_NODE__STORAGE__FSYNC": "false" if name == "node-nofsync" else "true",
           "LUMBAR_NODE__LOGGING__LEVEL": "WARNING", "LUMBAR_NODE__WEB__PORT": "null"}
    if pacs_port is None:  # ingest only: nothing is released for grading while the benchmark runs
        env |= {"LUMBAR_NODE__STUDY__QUIET_TIME_S": "86400", "LUMBAR_NODE__STUDY__RELEASE_WHEN_COMPLETE": "false",
                "LUMBAR_NODE__DESTINATIONS": "[]"}
    else:  # its JSON log says why each study was released and how long its grading took
        env |= {"LUMBAR_NODE__STUDY__QUIET_TIME_S": "10", "LUMBAR_NODE__STUDY__RELEASE_WHEN_COMPLETE": "true",
                "LUMBAR_NODE__LOGGING__LEVEL": "INFO", "LUMBAR_NODE__LOGGING__FORMAT": "json",
                "LUMBAR_NODE__DESTINATIONS":
                    f"[{{name: pacs, ae_title: {ORTHANC_AET}, host: 127.0.0.1, port: {pacs_port}}}]"}
    if name == "node-base":  # another checkout's code (a "before"), with this venv's packages
        env["PYTHONPATH"] = str(BASE[0])
    if name == "node-fsync-1ms":  # pynetdicom's own poll interval, for comparison
        env["LUMBAR_NODE__NODE__POLL_INTERVAL_MS"] = "1"
    return {**env, **extra}


@contextmanager
def running_node(name: str, workdir: Path, extra_env: dict[str, str],
                 pacs_port: int | None = None) -> Iterator[Target]:
    """``lumbar-node serve`` on an empty folder under ``workdir``, until the block ends."""
    port = free_port()
    spool, ledger = workdir / "spool", workdir / "ledger.sqlite"
    log = open(workdir / "node.log", "w")  # noqa: SIM115 - closed below
    exe = Path(sys.executable).with_name("lumbar-node")
    proc = subprocess.Popen([str(exe), "serve"], env=_node_env(name, workdir, port, extra_env, pacs_port),
                            stdout=log, stderr=log)

    def count() -> int:
        with sqlite3.connect(ledger) as db:
            recorded = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        return min(recorded, sum(1 for _ in spool.rglob("*.dcm")))
    try:
        _wait_echo(port, NODE_AET, proc)
        yield Target(port, NODE_AET, count, proc.pid)
    finally:
        _stop(proc)
        log.close()


@contextmanager
def receiver(name: str, workdir: Path, node_env: dict[str, str]) -> Iterator[Target]:
    """Start one receiver on an empty folder under ``workdir``; stop it afterwards."""
    if name.startswith("node"):
        with running_node(name, workdir, node_env) as target:
            yield target
    elif name == "storescp":
        port = free_port()
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
            yield Target(orthanc.dicom_port, ORTHANC_AET, lambda: orthanc.get("/statistics")["CountInstances"],
                         orthanc.process.pid)
    else:
        raise ValueError(name)


def send(shares: list[list[Path]], target: Target) -> float:
    """Seconds for one storescu process per share, all at once, to send their files."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(shares)) as pool:
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


def complete_studies(data: Path) -> list[list[Path]]:
    """The files of every study under data/train_images that has the three series roles (each gets a report)."""
    studies = []
    for folder in sorted((data / "train_images").iterdir()):
        descriptions = {pydicom.dcmread(next(s.glob("*.dcm")), stop_before_pixels=True).SeriesDescription
                        for s in folder.iterdir() if s.is_dir()}
        if descriptions >= ROLES:
            studies.append(sorted(folder.rglob("*.dcm")))
    return studies


def _sr_in(pacs: Orthanc, study_uid: str) -> bool:
    return any(s["MainDicomTags"].get("Modality") == "SR" and s["Instances"] for s in pacs.study_series(study_uid))


def backlog(studies: list[list[Path]], senders: int, work: Path, node_env: dict[str, str],
            timeout_s: float = 1800.0) -> dict[str, float | int]:
    """The node grading and delivering to a real Orthanc: ``senders`` storescu processes each send
    their share of whole studies at once; seconds until the last image is acknowledged and until
    the last study's SR is in Orthanc."""
    uids = [str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID) for files in studies]
    shares = [[f for files in studies[i::senders] for f in files] for i in range(senders)]
    with running_orthanc(work / "backlog-pacs") as pacs:
        (work / "backlog-node").mkdir()
        with running_node("node", work / "backlog-node", node_env, pacs_port=pacs.dicom_port) as target:
            waiting, first_sr, last_sr = set(uids), None, None
            t0 = time.perf_counter()
            with ThreadPoolExecutor(1) as sender:
                sending = sender.submit(send, shares, target)
                while waiting and time.perf_counter() - t0 < timeout_s:
                    done = {uid for uid in waiting if _sr_in(pacs, uid)}
                    if done:
                        first_sr = first_sr or time.perf_counter() - t0
                        waiting -= done
                        last_sr = time.perf_counter() - t0
                    time.sleep(0.1)
                ingest = sending.result()
            if waiting:
                raise RuntimeError(f"backlog: {len(waiting)} of {len(uids)} studies got no SR in {timeout_s:.0f} s; "
                                   f"node log tail:\n{(work / 'backlog-node' / 'node.log').read_text()[-3000:]}")
        events = [json.loads(line) for line in (work / "backlog-node" / "node.log").read_text().splitlines()
                  if line.startswith("{")]
    assert last_sr is not None and first_sr is not None
    whys = [e["why"] for e in events if e.get("event") == "study released for grading"]
    graded = [float(e["seconds"]) for e in events if e.get("event") == "study graded"]
    return {"studies": len(studies), "senders": senders, "images": sum(len(s) for s in studies),
            "ingest_s": round(ingest, 2), "first_sr_s": round(first_sr, 2), "last_sr_s": round(last_sr, 2),
            "after_ingest_s": round(last_sr - ingest, 2),
            "released_by": {why: whys.count(why) for why in sorted(set(whys))},
            "grading_s_median": round(statistics.median(graded), 2) if graded else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=8, help="phantom studies the ingest runs send")
    parser.add_argument("--data", type=Path, default=None, help="reuse this phantom folder (has train_images/)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 2, 4, 8], help="storescu processes at once")
    parser.add_argument("--receivers", nargs="+", default=DEFAULT_RECEIVERS, choices=RECEIVERS)
    parser.add_argument("--backlog-studies", type=int, default=20, help="studies of the backlog case (0: none)")
    parser.add_argument("--backlog-senders", type=int, default=4)
    parser.add_argument("--node-env", nargs="*", default=[], metavar="KEY=VALUE", help="settings for the node")
    parser.add_argument("--base", type=Path, default=None,
                        help="a checkout (e.g. a worktree of main) run as receiver node-base, interleaved with node")
    parser.add_argument("--base-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="settings for node-base only (over --node-env)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    if args.base is not None:
        BASE.append(args.base.resolve())
        if "node-base" not in args.receivers:
            args.receivers = [args.receivers[0], "node-base", *args.receivers[1:]]
    node_env = dict(item.split("=", 1) for item in args.node_env)
    base_env = node_env | dict(item.split("=", 1) for item in args.base_env)

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "phantom"
            made = max(args.studies, args.backlog_studies + args.backlog_studies // 3)  # some lack a series role
            exe = Path(sys.executable).with_name("lumbar-node")
            subprocess.run([str(exe), "phantom", "--studies", str(made), "--seed", "5", "--out", str(data),
                            "--workers", str(min(2, os.cpu_count() or 1))], check=True, capture_output=True)
        folders = sorted(d for d in (data / "train_images").iterdir() if d.is_dir())[:args.studies]
        files = sorted(f for d in folders for f in d.rglob("*.dcm"))
        n_bytes = sum(len(f.read_bytes()) for f in files)  # also warms the page cache for the sender
        megabytes = n_bytes / 1e6
        runs: dict[tuple[str, int], list[float]] = {(r, n): [] for n in args.senders for r in args.receivers}
        cpu_ms: dict[tuple[str, int], list[float]] = {key: [] for key in runs}  # receiver CPU ms per image
        for rep in range(args.repeats):
            for n in args.senders:
                for name in args.receivers:
                    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
                    with receiver(name, workdir, base_env if name == "node-base" else node_env) as target:
                        time.sleep(1.0)  # a node's receiver processes have started and settled
                        cpu_before = cpu_seconds(target.pid) if target.pid is not None else None
                        seconds = send([files[i::n] for i in range(n)], target)
                        if target.pid is not None and cpu_before is not None:
                            cpu_ms[name, n].append(1000 * (cpu_seconds(target.pid) - cpu_before) / len(files))
                        got = target.received()
                    if got != len(files):
                        raise RuntimeError(f"{name} {n} senders: {got} of {len(files)} images stored")
                    runs[name, n].append(seconds)
                    print(f"  repeat {rep + 1} {name:14} {n} senders {seconds:7.2f} s "
                          f"{len(files) / seconds:7.1f} img/s", file=sys.stderr, flush=True)
                    subprocess.run(["rm", "-rf", str(workdir)], check=True)
        late = None
        if args.backlog_studies:
            studies = complete_studies(data)[:args.backlog_studies]
            if len(studies) < args.backlog_studies:
                print(f"backlog: only {len(studies)} studies with the three series roles under {data}", file=sys.stderr)
            late = backlog(studies, args.backlog_senders, Path(tmp), node_env)
            print(f"  backlog {late}", file=sys.stderr, flush=True)
        probe = Path(tempfile.mkdtemp(dir=tmp))
        fsync_ms = fsync_cost_ms(probe, n_bytes // len(files))

    rate = {key: len(files) / statistics.median(seconds) for key, seconds in runs.items()}
    cpu = {key: statistics.median(ms) if ms else None for key, ms in cpu_ms.items()}
    rows = [{"receiver": name, "fsync": FSYNC[name], "senders": n, "images": len(files), "mb": round(megabytes, 1),
             "seconds": round(statistics.median(seconds), 3), "images_per_s": round(rate[name, n], 1),
             "cpu_ms_per_image": None if (c := cpu[name, n]) is None else round(c, 2),
             "runs_s": [round(x, 3) for x in seconds]} for (name, n), seconds in runs.items()]
    print(f"\n{len(files)} images, {megabytes:.1f} MB ({n_bytes / len(files) / 1e3:.0f} KB each), {len(folders)} "
          f"studies; median of {args.repeats} run(s); senders: DCMTK storescu, TCP_NODELAY=1, one association each")
    print(f"{'receiver':15} {'synced per image':17} {'senders':>7} {'s':>7} {'img/s':>7} {'CPU ms/img':>10}  runs (s)")
    for r in rows:
        cpu_text = "-" if r["cpu_ms_per_image"] is None else f"{r['cpu_ms_per_image']:.2f}"
        print(f"{r['receiver']:15} {r['fsync']:17} {r['senders']:>7} {r['seconds']:>7.2f} {r['images_per_s']:>7.1f} "
              f"{cpu_text:>10}  {' '.join(f'{x:.2f}' for x in r['runs_s'])}")
    print("\nimages per second (median), side by side")
    others = [name for name in args.receivers if name != "node"] if "node" in args.receivers else []
    print(f"{'senders':>7}" + "".join(f"{name:>16}" for name in args.receivers)
          + "".join(f"{'node/' + other:>16}" for other in others)
          + (f"{'node vs 1':>11}" if ("node", 1) in rate else ""))
    for n in args.senders:
        line = f"{n:>7}" + "".join(f"{rate[name, n]:>16.1f}" for name in args.receivers)
        line += "".join(f"{rate['node', n] / rate[other, n]:>15.2f}x" for other in others)
        if ("node", 1) in rate:
            line += f"{rate['node', n] / rate['node', 1]:>10.2f}x"
        print(line)
    if late is not None:
        print(f"\nbacklog: {late['studies']} studies ({late['images']} images) from {late['senders']} senders at once "
              f"to the node (grading on, one Orthanc as destination): last image acknowledged after "
              f"{late['ingest_s']:.1f} s, first SR in Orthanc after {late['first_sr_s']:.1f} s, the last after "
              f"{late['last_sr_s']:.1f} s ({late['after_ingest_s']:.1f} s after the last image); released by "
              f"{late['released_by']}, grading {late['grading_s_median']} s per study (median)")
    machine = {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0],
               "kernel": os.uname().release, "fsync_ms_per_image_file": round(fsync_ms, 2),
               "load_average": os.getloadavg()}
    print(f"machine: {machine['nproc']} CPUs ({machine['usable_cpus']} usable), kernel {machine['kernel']}, "
          f"Python {machine['python']}, load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"write+fsync(file)+fsync(dir) of one {n_bytes // len(files) // 1000} KB file in the temp folder: "
          f"{fsync_ms:.2f} ms (median of 20)")
    print("storescp options: --fork +B -aet STORESCP -od DIR (one child process per association, no fsync)")
    if node_env:
        print(f"node settings: {' '.join(f'{k}={v}' for k, v in node_env.items())}")
    if args.base is not None:
        print(f"node-base: the code of {args.base}; settings: {' '.join(f'{k}={v}' for k, v in base_env.items())}")
    if args.json:
        print(json.dumps({"machine": machine, "results": rows, "backlog": late}))


if __name__ == "__main__":
    main()

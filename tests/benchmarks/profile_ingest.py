"""Profile the node's per-instance C-STORE path: where the receiving process spends its time.

    .venv/bin/python tests/benchmarks/profile_ingest.py [--studies 4] [--rounds 3] [--senders 1] [--top 25]
        [--data DIR] [--receivers 1]

Starts ``lumbar-node serve`` with one receiver process (``node.receivers: 1``, no destinations, a long
quiet time: nothing is graded meanwhile), samples it with py-spy (``pip install py-spy``; all threads,
idle samples left out) while DCMTK storescu sends the phantom studies ``--rounds`` times (a fresh
SOP Instance UID per round would change the data: each round after the first is a re-send, which
the node answers without writing again, so round 1 is the one that writes), and prints the
functions by samples where they are running (self) and anywhere on the stack (total), as % of
the samples.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.support

from demo.orthanc import storescu
from tests.support.served_node import NODE_AET, SENDER_AET, ServedNode


def _frames(line: str) -> tuple[list[str], int]:
    stack, _, count = line.rpartition(" ")
    return [f for f in stack.split(";") if not f.startswith(("thread (", "process "))], int(count)


def top(raw: Path, n: int) -> str:
    """The py-spy raw (collapsed) profile as two tables: self and total samples per function."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        frames, count = _frames(line)
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            anywhere[frame] += count
    rows = [f"samples: {total}", "self %   function"]
    rows += [f"{100 * c / total:6.1f}   {f}" for f, c in own.most_common(n)]
    rows += ["total %  function"]
    rows += [f"{100 * c / total:6.1f}   {f}" for f, c in anywhere.most_common(n)]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--senders", type=int, default=1, help="storescu processes at once (the files dealt out)")
    parser.add_argument("--receivers", type=int, default=1, help="node.receivers (py-spy samples the node's own)")
    parser.add_argument("--cpu", action="store_true",
                        help="every thread that is running (py-spy's default) instead of the one holding the GIL")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path, help="keep the raw profile here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lumbar-profile-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "data"
            exe = Path(sys.executable).with_name("lumbar-node")
            subprocess.run([str(exe), "phantom", "--studies", str(args.studies), "--seed", "5", "--out", str(data)],
                           check=True, capture_output=True)
        files = sorted(data.rglob("*.dcm"))
        node = ServedNode(work / "node", destination_port=1, quiet_time_s=3600, destinations=[],
                          node={"receivers": args.receivers}, logging={"format": "json", "level": "INFO"})
        node.start()
        assert node.process is not None
        raw = args.out or work / "profile.txt"
        spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw",
                                "--rate", "250", *([] if args.cpu else ["--gil"]), "--nonblocking", "-o", str(raw),
                                "-p", str(node.process.pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        started = time.monotonic()
        for _ in range(args.rounds):
            with ThreadPoolExecutor(args.senders) as pool:
                shares = [files[i::args.senders] for i in range(args.senders)]
                for sent in pool.map(lambda share: storescu(share, node.port, called=NODE_AET, calling=SENDER_AET),
                                     shares):
                    assert sent.returncode == 0, sent.stderr[-1000:]
        seconds = time.monotonic() - started
        spy.send_signal(2)  # SIGINT: py-spy writes the profile and exits
        spy.wait(60)
        node.stop()
        print(f"{len(files) * args.rounds} C-STOREs in {seconds:.1f} s: {len(files) * args.rounds / seconds:.0f} img/s "
              f"(under py-spy)")
        print(top(raw, args.top))


if __name__ == "__main__":
    main()

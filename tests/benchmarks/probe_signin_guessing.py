"""/healthz while passwords are being guessed (issue 22): a real node (`lumbar-node serve` in its
own process, loopback), /healthz timed alone, then while ``--clients`` (4) anonymous clients guess
passwords as fast as they can, through the sign-in form and /metrics' Basic authentication (half
each). Run once with the node's throttle as configured by default (``throttle``) and once with
the throttle out of the way (``unthrottled``: ``web.signin_free_attempts`` huge), so that every
guess costs an argon2 check: what the hashing threads alone do for /healthz.

    .venv/bin/python tests/benchmarks/probe_signin_guessing.py [--seconds 15] [--clients 4] \
        [--modes throttle,unthrottled]

Prints per mode: /healthz median, p95 and max ms alone and under guessing, the guesses made and
their answers (401: checked and wrong; 429: throttled, unchecked).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from demo.orthanc import free_port
from tests.support.served_node import ServedNode, stop_all

USER, PASSWORD = "ada", "ada-password-1"
MODES = {"throttle": {}, "unthrottled": {"signin_free_attempts": 10**9}}


def _healthz(url: str, seconds: float, every: float = 0.05) -> list[float]:
    """/healthz timed (ms), one request every ``every`` s for ``seconds``."""
    out: list[float] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            out.append((time.perf_counter() - started) * 1000)
            time.sleep(every)
    return out


def _guess(url: str, index: int, stop: threading.Event, answers: Counter[int]) -> None:
    """Guess passwords until ``stop``: even clients by the sign-in form, odd ones by /metrics."""
    with httpx.Client(base_url=url, timeout=60) as client:
        found = re.search(r'name="csrf" value="([^"]+)"', client.get("/signin").text)
        token = found.group(1) if found else ""
        n = 0
        while not stop.is_set():
            n += 1
            if index % 2 == 0:
                status = client.post("/signin", data={"name": USER, "password": f"guess-{index}-{n}",
                                                      "csrf": token}).status_code
            else:
                status = client.get("/metrics", auth=(USER, f"guess-{index}-{n}")).status_code
            answers[status] += 1


def _summary(ms: list[float]) -> str:
    ms = sorted(ms)
    p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
    return f"median {statistics.median(ms):6.1f}  p95 {p95:6.1f}  max {max(ms):6.1f}  (n={len(ms)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--modes", default="throttle,unthrottled")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            node = ServedNode(Path(tmp) / "node", free_port(), web=MODES[mode])
            node.add_user(USER, "admin", PASSWORD)
            node.start()
            try:
                alone = _healthz(node.web_url, min(5.0, args.seconds))
                stop, answers = threading.Event(), Counter[int]()
                guessers = [threading.Thread(target=_guess, args=(node.web_url, i, stop, answers), daemon=True)
                            for i in range(args.clients)]
                for thread in guessers:
                    thread.start()
                time.sleep(1)  # the guessing under way
                busy = _healthz(node.web_url, args.seconds)
                stop.set()
                for thread in guessers:
                    thread.join(60)
            finally:
                stop_all()
        print(f"{mode}: /healthz ms alone        {_summary(alone)}")
        print(f"{mode}: /healthz ms, {args.clients} guessing  {_summary(busy)}")
        print(f"{mode}: guesses {sum(answers.values())} in ~{args.seconds + 1:.0f} s, "
              f"answers {dict(sorted(answers.items()))}")


if __name__ == "__main__":
    main()

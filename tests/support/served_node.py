"""The node as its users run it: ``lumbar-node --config FILE serve`` in its own process, with its
JSON log in a file, stopped by SIGTERM or killed by SIGKILL; and a few polling helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

from demo.orthanc import ORTHANC_AET, free_port
from dicom_node.store.ledger import Ledger, Study

_RUNNING: list[ServedNode] = []  # started and not stopped: stopped by stop_all() after each test
NODE_AET = "LUMBAR_AI"
SENDER_AET = "STORESCU"
T = TypeVar("T")


def wait_for(what: str | Callable[[], str], probe: Callable[[], T | None], timeout: float = 90.0,
             every: float = 0.25) -> T:
    """Poll ``probe`` until it returns something truthy; fail saying ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what if isinstance(what, str) else what()}")
        time.sleep(every)


class ServedNode:
    """One node installation (config, spool, ledger, results) under ``root``; start/stop it at will."""

    def __init__(self, root: Path, destination_port: int, quiet_time_s: float = 3.0, **sections: dict | list):
        self.root = root
        self.port = free_port()
        self.web_port = free_port()  # the web page (dicom_node.web) on a free loopback port
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "node": {"ae_title": NODE_AET, "bind_address": "127.0.0.1", "port": self.port,
                     "allowed_peers": [{"ae_title": SENDER_AET}, {"ae_title": ORTHANC_AET, "host": "127.0.0.1"}]},
            "destinations": [{"name": "pacs", "ae_title": ORTHANC_AET, "host": "127.0.0.1", "port": destination_port}],
            "storage": {"spool_dir": str(root / "spool"), "results_dir": str(root / "results"),
                        "ledger_path": str(root / "ledger.sqlite"), "min_free_disk_mb": 10},
            "study": {"quiet_time_s": quiet_time_s},
            "delivery": {"backoff_initial_s": 0.5, "backoff_max_s": 2, "max_attempts": 100},
            "logging": {"format": "json", "level": "INFO"},
            "web": {"bind_address": "127.0.0.1", "port": self.web_port, "accounts_file": str(root / "accounts.yaml")},
        }
        for name, values in sections.items():  # a section's keys merge; a list (destinations) replaces
            config[name] = values if isinstance(values, list) else {**config.get(name, {}), **values}
        self.config = root / "node.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log_path = root / "node.log"
        self.process: subprocess.Popen | None = None

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        exe = Path(sys.executable).with_name("lumbar-node")
        return subprocess.run([str(exe), "--config", str(self.config), *args], capture_output=True, text=True,
                              timeout=120)

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def add_user(self, name: str, role: str, password: str) -> None:
        """An account of the web page, through `lumbar-node user add` (the password on standard input)."""
        exe = Path(sys.executable).with_name("lumbar-node")
        done = subprocess.run([str(exe), "--config", str(self.config), "user", "add", name, "--role", role],
                              input=password + "\n", capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    def start(self) -> ServedNode:
        exe = Path(sys.executable).with_name("lumbar-node")
        log = open(self.log_path, "a")  # noqa: SIM115 - the child holds it; closed with the process
        mark = self.log_path.stat().st_size
        self.process = subprocess.Popen([str(exe), "--config", str(self.config), "serve"], stdout=log,
                                        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        _RUNNING.append(self)
        wait_for("the node to be ready", lambda: '"node ready"' in self.log_text()[mark:] or self._died(), 120)
        assert self.process.poll() is None, f"the node exited: {self.log_text()[-3000:]}"
        return self

    def _died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the process; its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        _RUNNING.remove(self)
        return code

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def ledger(self) -> Ledger:
        return Ledger(self.root / "ledger.sqlite")

    def study(self, study_uid: str) -> Study | None:
        ledger = self.ledger()
        try:
            return ledger.study(study_uid)
        finally:
            ledger.close()

    def wait_state(self, study_uid: str, states: tuple[str, ...], timeout: float = 120.0) -> Study:
        return wait_for(lambda: f"study {study_uid} to reach {states}; log tail:\n{self.log_text()[-3000:]}",
                        lambda: (s := self.study(study_uid)) is not None and s.state in states and s, timeout)


def stop_all() -> None:
    """Stop the nodes a test started and left running (it failed half-way); SIGKILL if SIGTERM hangs."""
    for node in list(_RUNNING):
        try:
            node.stop(timeout=30)
        except subprocess.TimeoutExpired:
            node.stop(signal.SIGKILL)

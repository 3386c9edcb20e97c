"""A real Orthanc PACS (Debian's package) started for a test on loopback ports, and its REST API."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import require_tool

ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    process: subprocess.Popen

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())


@contextmanager
def running_orthanc(workdir: Path, peers: dict[str, tuple[str, int]] | None = None) -> Iterator[Orthanc]:
    """Start Orthanc with its own storage under ``workdir``; stop it afterwards."""
    exe = require_tool("Orthanc")
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "lumbar-node-test", "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"), "DicomAet": ORTHANC_AET, "DicomPort": dicom_port,
        "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "Plugins": [], "StableAge": 2,
        "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in (peers or {}).items()},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = open(workdir / "orthanc.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([exe, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                               env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin:/usr/sbin"})
    server = Orthanc(dicom_port, http_port, process)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get("/system")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {(workdir / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def storescu(files: list[Path], port: int, called: str = ORTHANC_AET, calling: str = "LUMBAR_TEST") -> subprocess.CompletedProcess:
    """Send files with DCMTK's storescu (not pynetdicom's script of the same name)."""
    exe = "/usr/bin/storescu"
    require_tool("dcmdump")  # DCMTK is installed
    return subprocess.run([exe, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1"})

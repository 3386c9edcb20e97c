"""A real Orthanc PACS (Debian's ``orthanc`` package) on loopback ports, for the demo, the tests and the
benchmarks: its configuration, optional routing of stable studies to the node, and its REST API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORTHANC_AET = "ORTHANC"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian orthanc-dicomweb
DICOMWEB_ROOT = "/dicom-web/"

# Orthanc's own routing (Lua, built into Orthanc): when a study is stable, forward its MR series to
# the node. A study is forwarded again only when it holds more MR instances than last time, so the
# results the node sends back (SR, SC) do not bounce a study back and forth.
ROUTING_LUA = """
forwarded = {}
function OnStableStudy(studyId, tags, metadata)
  local mr, count = {}, 0
  for _, series in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    if series['MainDicomTags']['Modality'] == 'MR' then
      table.insert(mr, series['ID'])
      count = count + #series['Instances']
    end
  end
  if count > 0 and forwarded[studyId] ~= count then
    -- a store job (REST) rather than SendToModality(), which in Orthanc 1.10 fails to read the files
    RestApiPost('/modalities/%(modality)s/store', DumpJson({Resources = mr, Asynchronous = true}, true))
    forwarded[studyId] = count
    print('routed study ' .. studyId .. ' to %(modality)s: ' .. count .. ' MR instances')
  end
end
"""


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc: its DICOM and HTTP ports, its process and its folder."""

    dicom_port: int
    http_port: int
    process: subprocess.Popen
    workdir: Path

    def get(self, path: str) -> Any:
        """GET a REST resource as JSON."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        """GET a REST resource as bytes (e.g. /instances/{id}/file)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return response.read()

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """The series Orthanc holds for a StudyInstanceUID (expanded), or [] if it has none."""
        found = self._post("/tools/lookup", study_uid.encode())
        studies = [item["ID"] for item in found if item["Type"] == "Study"]
        return self.get(f"/studies/{studies[0]}/series?expand") if studies else []

    def _post(self, path: str, body: bytes) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def orthanc_executable() -> str:
    """The Orthanc server installed from Debian's packages."""
    exe = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if exe is None:
        raise FileNotFoundError("Orthanc is not installed: run scripts/setup.sh (apt package 'orthanc')")
    return exe


@contextmanager
def running_orthanc(workdir: Path, peers: dict[str, tuple[str, int]] | None = None, route_to: str | None = None,
                    stable_age: int = 2, dicom_port: int | None = None, dicomweb: bool = False) -> Iterator[Orthanc]:
    """Start Orthanc with its own storage under ``workdir`` and stop it afterwards.

    ``peers`` maps modality names to (AE title, port) on 127.0.0.1; ``route_to`` names the peer that
    each stable study's MR series are forwarded to (Orthanc's Lua routing); ``dicomweb`` loads the
    DICOMweb plugin (QIDO-RS, WADO-RS under ``/dicom-web/``, WADO-URI under ``/wado``), as web
    viewers such as OHIF read a PACS.
    """
    exe = orthanc_executable()
    dicom_port, http_port = dicom_port or free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "Name": "lumbar-node-pacs", "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"), "DicomAet": ORTHANC_AET, "DicomPort": dicom_port,
        "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "Plugins": [], "StableAge": stable_age,
        "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in (peers or {}).items()},
    }
    if route_to is not None:
        if route_to not in (peers or {}):
            raise ValueError(f"route_to={route_to!r} is not one of the peers")
        (workdir / "routing.lua").write_text(ROUTING_LUA % {"modality": route_to})
        config["LuaScripts"] = [str(workdir / "routing.lua")]
    if dicomweb:
        if not DICOMWEB_PLUGIN.is_file():
            raise FileNotFoundError(f"{DICOMWEB_PLUGIN} is missing: "
                                    "run scripts/setup.sh (apt package 'orthanc-dicomweb')")
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": True, "WadoRoot": "/wado",
                              "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = open(workdir / "orthanc.log", "a")  # noqa: SIM115 - closed below
    process = subprocess.Popen([exe, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                               env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin:/usr/sbin"})
    server = Orthanc(dicom_port, http_port, process, workdir)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get("/system")
                break
            except OSError as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_tail = (workdir / "orthanc.log").read_text()[-2000:]
                    raise RuntimeError(f"Orthanc did not start: {log_tail}") from exc
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def storescu(files: list[Path], port: int, called: str = ORTHANC_AET, calling: str = "LUMBAR_TEST",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Send files with DCMTK's storescu (not pynetdicom's script of the same name), TCP_NODELAY set."""
    return subprocess.run(["/usr/bin/storescu", *extra, "-aet", calling, "-aec", called, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1"})

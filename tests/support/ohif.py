"""OHIF v3's built app (npm ``@ohif/app``, installed by scripts/setup.sh) served on loopback against a
real Orthanc's DICOMweb plugin, and headless Debian Chromium driven through it by ``playwright-core``
(tests/support/viewer/): a radiologist's view of the node's results, as the tests see it.

    browser --> http://127.0.0.1:<port>/            OHIF's dist/ (SPA: unknown paths -> index.html)
                http://127.0.0.1:<port>/app-config.js  one DICOMweb data source, /dicom-web
                http://127.0.0.1:<port>/dicom-web/...  proxied to Orthanc's DICOMweb plugin
"""

from __future__ import annotations

import json
import mimetypes
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

VIEWER_DIR = Path(__file__).parent / "viewer"
OHIF_DIST = VIEWER_DIR / "ohif" / "dist"  # npm pack @ohif/app (scripts/setup.sh), gitignored
CHECK_SCRIPT = VIEWER_DIR / "ohif_check.mjs"
CHROMIUM = "/usr/bin/chromium"
PROXIED = ("/dicom-web/", "/wado")

APP_CONFIG = """window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  customizationService: {},
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  investigationalUseDialog: { option: 'never' },
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (lumbar-node tests)',
      name: 'orthanc',
      wadoUriRoot: '/wado',
      qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
"""


def require_viewer() -> None:
    """OHIF's dist, playwright-core and Chromium, as scripts/setup.sh installs them; fail (not skip)."""
    missing = [what for what, ok in [
        (f"OHIF's built app ({OHIF_DIST})", (OHIF_DIST / "index.html").is_file()),
        (f"playwright-core ({VIEWER_DIR / 'node_modules'})",
         (VIEWER_DIR / "node_modules" / "playwright-core").is_dir()),
        (f"Chromium ({CHROMIUM}, Debian chromium)", Path(CHROMIUM).is_file()),
        ("node (Node.js)", shutil.which("node") is not None),
    ] if not ok]
    if missing:
        pytest.fail(f"the viewer harness is not installed: {', '.join(missing)}; run scripts/setup.sh")


class _Handler(BaseHTTPRequestHandler):
    """Static files from OHIF's dist, our app-config.js, and the DICOMweb paths proxied to Orthanc."""

    server: _ViewerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # the base class's signature
        pass

    def do_GET(self) -> None:  # http.server's naming
        if self.path.startswith(PROXIED):
            self._proxy()
        elif self.path.split("?")[0] == "/app-config.js":
            self._send(200, APP_CONFIG.encode(), "application/javascript")
        else:
            self._static()

    def _proxy(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
        headers["Host"] = self.headers.get("Host", "")  # Orthanc builds its BulkDataURIs on this host
        request = urllib.request.Request(f"{self.server.orthanc}{self.path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body, status, kind = response.read(), response.status, response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            body, status, kind = error.read(), error.code, error.headers.get("Content-Type", "text/plain")
        self._send(status, body, kind)

    def _static(self) -> None:
        name = self.path.split("?")[0].lstrip("/")
        path = (OHIF_DIST / name).resolve()
        if not name or not path.is_file() or OHIF_DIST.resolve() not in path.parents:
            path = OHIF_DIST / "index.html"  # the app's own routes (/viewer, /) are index.html
        kind = "application/wasm" if path.suffix == ".wasm" else mimetypes.guess_type(path.name)[0]
        self._send(200, path.read_bytes(), kind or "application/octet-stream")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.end_headers()
        self.wfile.write(body)


class _ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, orthanc: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.orthanc = orthanc


@contextmanager
def serving_ohif(orthanc_http_port: int) -> Iterator[str]:
    """OHIF on a free loopback port against Orthanc's DICOMweb; yields its base URL."""
    require_viewer()
    server = _ViewerServer(f"http://127.0.0.1:{orthanc_http_port}")
    thread = threading.Thread(target=server.serve_forever, name="ohif-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class ViewerCheck:
    """What the browser saw: the script's JSON report, its screenshots' folder and the seconds it took."""

    report: dict[str, Any]
    screenshots: Path
    seconds: float


def check_in_ohif(base_url: str, study_uid: str, screenshots: Path, *, sr_description: str, sc_description: str,
                  sc_series_uid: str, points: dict[str, tuple[float, float]], pdf_description: str | None = None,
                  max_findings: int = 30, timeout_s: float = 150) -> ViewerCheck:
    """Open the study in OHIF in headless Chromium (a fresh profile), open the SR (the series whose
    description starts with ``sr_description``), step through its findings, then open the heatmaps;
    report what was shown (tests/support/viewer/ohif_check.mjs) and leave screenshots in
    ``screenshots``. ``points``
    maps each finding's tracking UID to its (column, row) on its image: the report says where each
    falls on the viewport's canvas, to compare with the circle drawn. With ``pdf_description`` the
    PDF summary is opened last."""
    require_viewer()
    screenshots.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    args = {"baseUrl": base_url, "studyUid": study_uid, "srDescription": sr_description,
            "scDescription": sc_description, "scSeriesUid": sc_series_uid, "points": points,
            "pdfDescription": pdf_description, "maxFindings": max_findings, "screenshots": str(screenshots),
            "chromium": CHROMIUM, "userDataDir": str(screenshots.parent / f"{screenshots.name}-chromium-profile")}
    out = subprocess.run([shutil.which("node") or "node", str(CHECK_SCRIPT), json.dumps(args)],
                         capture_output=True, text=True, timeout=timeout_s, cwd=VIEWER_DIR, check=False)
    (screenshots / "ohif_check.log").write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise AssertionError(f"the viewer check failed (exit {out.returncode}); log in "
                             f"{screenshots / 'ohif_check.log'}:\n{out.stderr[-3000:]}")
    return ViewerCheck(json.loads(lines[-1]), screenshots, time.monotonic() - started)

"""The STOW-RS user of a DICOMweb destination (``dicomweb.store_files`` through ``pipeline``'s
destination kinds) against a small origin server on loopback (http.server over TLS, with a CA and
certificate made by openssl): credentials (Basic or bearer) sent, TLS verified against ``ca_certificates``
(refused without it), each way a server can fail said in one line without the credentials."""

from __future__ import annotations

import io
import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from dicom_node.config import DicomWebDestination, load_settings
from dicom_node.dicomweb import StowClientError, store_files
from dicom_node.dicomweb.related import boundary_of
from dicom_node.pipeline.destinations import DicomWebSender, DimseSender, sender_for
from tests.support.certs import CertificateAuthority
from tests.support.stow import parts_of
from tests.unit.test_stow import instance


class Origin(BaseHTTPRequestHandler):
    """Answers STOW-RS as ``server.mode`` says; records what it was sent."""

    def do_POST(self) -> None:
        server = self.server
        length = self.headers.get("Content-Length")
        body = self.rfile.read(int(length)) if length else _dechunk(self.rfile)
        server.seen.append((self.path, dict(self.headers), body))
        if server.mode == "slow":
            time.sleep(3)
        parts = parts_of(body, self.headers["Content-Type"])
        uids = [pydicom.dcmread(io.BytesIO(p), stop_before_pixels=True).SOPInstanceUID for p in parts]
        answer = Dataset()
        status = {"ok": 200, "partial": 202, "refused": 409, "unauthorised": 401, "slow": 200}[server.mode]
        if server.mode in ("ok", "slow", "partial"):
            answer.ReferencedSOPSequence = [_ref(u) for u in (uids if server.mode != "partial" else uids[1:])]
        if server.mode in ("partial", "refused"):
            answer.FailedSOPSequence = [_ref(uids[0], FailureReason=0xA700)]
        payload = json.dumps(answer.to_json_dict()).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def _ref(uid: str, **values: object) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = MRImageStorage, uid
    for key, value in values.items():
        setattr(item, key, value)
    return item


def _dechunk(stream: io.BufferedIOBase) -> bytes:
    out = b""
    while True:
        size = int(stream.readline().strip() or b"0", 16)
        if size == 0:
            stream.readline()
            return out
        out += stream.read(size)
        stream.readline()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateAuthority, object]:
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder, "origin")
    return ca, ca.issue("origin")


@pytest.fixture
def origin(pki: tuple) -> Iterator[ThreadingHTTPServer]:
    _, leaf = pki
    server = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf.certificate, leaf.private_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.mode, server.seen = "ok", []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _destination(server: ThreadingHTTPServer, **service: object) -> DicomWebDestination:
    url = f"https://127.0.0.1:{server.server_address[1]}/dicom-web"
    return DicomWebDestination.model_validate({"name": "vna", "dicomweb": {"url": url, **service}})


def _files(tmp_path: Path, count: int = 2) -> list[Path]:
    study, out = generate_uid(), []
    for i in range(count):
        path = tmp_path / f"{i}.dcm"
        path.write_bytes(instance(study))
        out.append(path)
    return out


def test_files_are_stored_with_basic_credentials_over_verified_tls(origin: ThreadingHTTPServer, pki: tuple,
                                                                  tmp_path: Path) -> None:
    ca, _ = pki
    files = _files(tmp_path)
    store_files(_destination(origin, username="node", password="s3cret", ca_certificates=ca.certificate), files)
    [(path, headers, body)] = origin.seen
    assert path == "/dicom-web/studies"
    assert headers["Authorization"].startswith("Basic ") and boundary_of(headers["Content-Type"])
    assert parts_of(body, headers["Content-Type"]) == [f.read_bytes() for f in files]  # the files as written


def test_a_bearer_token_and_the_servers_refusals(origin: ThreadingHTTPServer, pki: tuple, tmp_path: Path) -> None:
    ca, _ = pki
    destination = _destination(origin, token="t0ken", ca_certificates=ca.certificate)
    files = _files(tmp_path)
    store_files(destination, files)
    assert origin.seen[-1][1]["Authorization"] == "Bearer t0ken"
    for mode, words in (("partial", "1 of 2 not stored"), ("refused", "HTTP 409 Conflict; 1 failed (0xA700)"),
                        ("unauthorised", "HTTP 401")):
        origin.mode = mode
        with pytest.raises(StowClientError) as refused:
            store_files(destination, files)
        assert words in str(refused.value) and "t0ken" not in str(refused.value)
        assert str(refused.value).startswith(f"{destination.dicomweb.url} (STOW-RS): ")


def test_tls_is_verified_and_a_hang_ends_at_the_timeout(origin: ThreadingHTTPServer, pki: tuple,
                                                        tmp_path: Path) -> None:
    ca, _ = pki
    files = _files(tmp_path, 1)
    with pytest.raises(StowClientError, match="TLS handshake failed"):
        store_files(_destination(origin), files)  # the system's CAs do not know the test CA
    assert origin.seen == []
    store_files(_destination(origin, verify=False), files)  # verification off, as configured
    origin.mode = "slow"
    started = time.monotonic()
    with pytest.raises(StowClientError, match="no answer within 1 s"):
        store_files(_destination(origin, ca_certificates=ca.certificate), files, timeout=1)
    assert time.monotonic() - started < 3
    with pytest.raises(StowClientError, match="unreachable"):
        store_files(DicomWebDestination.model_validate({"name": "x", "dicomweb": {"url": "http://127.0.0.1:9"}}),
                    files)


def test_each_destination_gets_the_sender_of_its_kind(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("destinations:\n  - {name: pacs, ae_title: PACS, host: 127.0.0.1, port: 104}\n"
                      "  - {name: vna, dicomweb: {url: 'https://vna.example/dicom-web'}}\n"
                      "delivery: {timeout_s: 7}\n")
    settings = load_settings(config, environ={})
    dimse, web = (sender_for(d, settings) for d in settings.destinations)
    assert isinstance(dimse, DimseSender) and dimse.calling_aet == settings.node.ae_title and dimse.timeout == 7
    assert isinstance(web, DicomWebSender) and web.timeout == 7

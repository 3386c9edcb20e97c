"""TLS against the node as it is served (`lumbar-node serve`): DCMTK's own TLS tools as the modality
(echoscu/storescu +tls) and as the destination (storescp +tls, client certificate required), with
a CA, node, client and rogue certificates made by openssl for each test session."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from demo.orthanc import free_port, storescu
from dicom_node.config import Destination, TLSSettings
from dicom_node.dicom.scu import DeliveryError, send_files
from tests.support.certs import CertificateAuthority, KeyPair
from tests.support.served_node import (
    NODE_AET,
    SENDER_AET,
    ServedNode,
    stop_all,
    wait_for,
)
from tests.support.tools import complete_study, require_tool

DESTINATION_AET = "TLS_PACS"
SR_PREFIX, SC_PREFIX = "1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7"
NO_DESTINATIONS: list = []


@dataclass(frozen=True)
class Certs:
    """The site CA and what it signed, and a second CA (not trusted by anyone) with its client."""

    ca: Path
    other_ca: Path
    node: KeyPair
    modality: KeyPair
    destination: KeyPair
    rogue: KeyPair


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("certs")
    site, other = CertificateAuthority(folder, "site"), CertificateAuthority(folder, "other")
    return Certs(site.certificate, other.certificate, site.issue("node"), site.issue("modality"),
                 site.issue("destination"), other.issue("rogue"))


@pytest.fixture(autouse=True)
def _stop_nodes() -> Iterator[None]:
    yield
    stop_all()


def _tls(pair: KeyPair | None, ca: Path) -> list[str]:
    """DCMTK options: TLS with ``pair`` as our certificate (anonymous TLS if None), peer verified against ``ca``."""
    mine = ["+tls", str(pair.private_key), str(pair.certificate)] if pair else ["+tla"]
    return [*mine, "+cf", str(ca)]


def _echo(port: int, *options: str, called: str = NODE_AET) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("echoscu"), *options, "-to", "10", "-ta", "10", "-aet", SENDER_AET,
                           "-aec", called, "127.0.0.1", str(port)], check=False, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def _node_tls(certs: Certs, mutual: bool = True) -> dict[str, str]:
    tls = {"certificate": str(certs.node.certificate), "private_key": str(certs.node.private_key)}
    return {**tls, "ca_certificates": str(certs.ca)} if mutual else tls


_study = complete_study


@pytest.fixture
def tls_destination(tmp_path: Path, certs: Certs) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp over TLS that requires a client certificate signed by the site CA: (port, folder)."""
    port, received = free_port(), tmp_path / "received"
    received.mkdir()
    process = subprocess.Popen([require_tool("storescp"), *_tls(certs.destination, certs.ca), "-rc",
                                "-aet", DESTINATION_AET, "-od", str(received), str(port)],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("storescp +tls to answer", lambda: _echo(port, *_tls(certs.node, certs.ca),
                                                          called=DESTINATION_AET).returncode == 0, 30, 0.3)
        yield port, received
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_mutual_tls_store_and_delivery_to_a_tls_destination(tmp_path: Path, certs: Certs, phantom_dir: Path,
                                                            tls_destination: tuple[int, Path]) -> None:
    port, received = tls_destination
    destination = {"name": "pacs", "ae_title": DESTINATION_AET, "host": "127.0.0.1", "port": port,
                   "tls": {"ca_certificates": str(certs.ca), "certificate": str(certs.node.certificate),
                           "private_key": str(certs.node.private_key)}}
    node = ServedNode(tmp_path / "node", port, node={"tls": _node_tls(certs)}, destinations=[destination]).start()
    assert '"tls": "mutual"' in node.log_text()
    assert "AE title alone" not in node.log_text()

    echo = _echo(node.port, *_tls(certs.modality, certs.ca))
    assert echo.returncode == 0, echo.stdout + echo.stderr
    files = _study(phantom_dir)
    sent = storescu(files, node.port, called=NODE_AET, calling=SENDER_AET, extra=tuple(_tls(certs.modality, certs.ca)))
    assert sent.returncode == 0, sent.stdout[-1000:] + sent.stderr[-1000:]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    study = node.wait_state(study_uid, ("done", "failed", "skipped"), timeout=60)
    assert study.state == "done", (study, node.log_text()[-3000:])

    delivered = [pydicom.dcmread(f, stop_before_pixels=True) for f in received.iterdir() if f.is_file()]
    classes = {str(ds.SOPClassUID) for ds in delivered}
    assert any(c.startswith(SR_PREFIX) for c in classes) and any(c.startswith(SC_PREFIX) for c in classes), classes
    assert {str(ds.StudyInstanceUID) for ds in delivered} == {study_uid}

    # The delivery SCU verifies the destination: a certificate from a CA it does not trust is refused.
    untrusted = Destination(name="pacs", ae_title=DESTINATION_AET, host="127.0.0.1", port=port,
                            tls=TLSSettings(ca_certificates=certs.other_ca, certificate=certs.node.certificate,
                                            private_key=certs.node.private_key))
    sr = next(f for f in received.iterdir() if f.name.startswith("SR"))
    with pytest.raises(DeliveryError, match="TLS handshake"):
        send_files(untrusted, NODE_AET, [sr], timeout=10)


def test_clients_without_a_trusted_certificate_or_without_tls_are_refused(tmp_path: Path, certs: Certs) -> None:
    node = ServedNode(tmp_path / "node", 1, node={"tls": _node_tls(certs)}, destinations=NO_DESTINATIONS).start()
    good = _tls(certs.modality, certs.ca)
    with socket.create_connection(("127.0.0.1", node.port)):  # silent: its handshake must not hold up others
        first = _echo(node.port, *good)
    assert first.returncode == 0, first.stdout + first.stderr
    refused = {
        "TLS without a client certificate": _echo(node.port, *_tls(None, certs.ca)),
        "a client certificate from another CA": _echo(node.port, *_tls(certs.rogue, certs.ca)),
        "plain TCP": _echo(node.port),
    }
    let_in = [name for name, echo in refused.items() if echo.returncode == 0]
    assert not let_in, f"associations that should have been refused: {let_in}"
    again = _echo(node.port, *good)
    assert again.returncode == 0, again.stdout + again.stderr
    assert node.process is not None and node.process.poll() is None


def test_server_side_tls_without_ca_certificates(tmp_path: Path, certs: Certs) -> None:
    node = ServedNode(tmp_path / "node", 1, node={"tls": _node_tls(certs, mutual=False)},
                      destinations=NO_DESTINATIONS).start()
    assert '"tls": "server"' in node.log_text()
    assert "AE title alone" in node.log_text()  # STORESCU is allowed from any address (ServedNode's peers)
    anonymous = _echo(node.port, *_tls(None, certs.ca))
    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
    assert _echo(node.port).returncode != 0


@pytest.mark.parametrize(("section", "key"), [
    ("node", "node.tls.certificate"),
    ("node-mismatch", "node.tls"),
    ("node-no-cert", "node.tls"),
    ("destination", "destinations.0.tls.ca_certificates"),
])
def test_a_bad_tls_setting_stops_serve_with_one_line_naming_the_key(tmp_path: Path, certs: Certs, section: str,
                                                                    key: str) -> None:
    missing = str(tmp_path / "missing.pem")
    sections: dict = {"destinations": NO_DESTINATIONS}
    if section == "node":
        sections["node"] = {"tls": {**_node_tls(certs), "certificate": missing}}
    elif section == "node-mismatch":
        sections["node"] = {"tls": {**_node_tls(certs), "private_key": str(certs.rogue.private_key)}}
    elif section == "node-no-cert":
        sections["node"] = {"tls": {"ca_certificates": str(certs.ca)}}
    else:
        sections["destinations"] = [{"name": "pacs", "ae_title": DESTINATION_AET, "host": "127.0.0.1", "port": 1,
                                     "tls": {"ca_certificates": missing}}]
    served = ServedNode(tmp_path / "node", 1, **sections)
    done = served.command("serve")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip().startswith(f"{key}:")]
    assert len(lines) == 1, done.stderr
    assert "[from" in lines[0]

"""Test certificates made with the ``openssl`` command line: a CA and leaf certificates it signs
(RSA 2048, PEM, unencrypted keys), valid for two days, naming 127.0.0.1 and localhost."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.tools import require_tool

LEAF_EXTENSIONS = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key (PEM files)."""

    certificate: Path
    private_key: Path


def _openssl(*args: str | Path) -> None:
    done = subprocess.run([require_tool("openssl"), *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, f"openssl {args[0]} failed: {done.stderr[-1500:]}"


class CertificateAuthority:
    """A self-signed CA in ``folder`` (``<name>-ca.pem``, ``<name>-ca.key``) that signs leaves."""

    def __init__(self, folder: Path, name: str):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.name = folder, name
        self.certificate, self.private_key = folder / f"{name}-ca.pem", folder / f"{name}-ca.key"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.private_key,
                 "-out", self.certificate, "-days", "2", "-subj", f"/O=lumbar-node tests/CN={name} CA",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name: str) -> KeyPair:
        """A leaf certificate for ``name`` (server and client use), signed by this CA."""
        key, csr, cert = (self.folder / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem"))
        extensions = self.folder / f"{name}.ext"
        extensions.write_text(LEAF_EXTENSIONS)
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                 "-subj", f"/O=lumbar-node tests/CN={name}")
        _openssl("x509", "-req", "-in", csr, "-CA", self.certificate, "-CAkey", self.private_key,
                 "-CAcreateserial", "-out", cert, "-days", "2", "-sha256", "-extfile", extensions)
        return KeyPair(cert, key)

"""TLS for DICOM associations: ``ssl.SSLContext``s built from ``node.tls`` (the storage SCP) and a
destination's ``tls`` (the delivery SCU). TLS 1.2 at least; PEM files; an encrypted private key is
refused (a service cannot type a password).

Server: the node's ``certificate`` and ``private_key``; with ``ca_certificates`` a client
certificate signed by one of them is required (mutual TLS), without it any client that speaks TLS
may connect (and is then authenticated by its AE title and address only).

Client (delivery): the destination's certificate is always verified. With ``ca_certificates``
(the site's own CA, or the destination's own certificate) it must chain to one of them and its
host name is not checked: DICOM peers are addressed by IP and their certificates seldom name it,
and that CA list names the peers the site trusts (DCMTK and Orthanc check the same way). Without
``ca_certificates`` the system's public CAs are used and the certificate must name the
destination's ``host`` (a DNS name or an IP address in its subjectAltName). ``certificate`` and
``private_key``, if given, are presented as the node's client certificate.
"""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.config import TLSSettings

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class _HandshakeInAssociationThread(ssl.SSLContext):
    """A server context whose sockets shake hands on their first read, in the association's own
    thread and under its socket timeout. pynetdicom wraps each accepted socket in its acceptor
    thread; a handshake there would let one silent client stop every other from connecting."""

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def _no_password() -> bytes:
    raise ValueError("the private key is encrypted: store it unencrypted, readable by the node's user only")


def _load(context: ssl.SSLContext, tls: TLSSettings) -> ssl.SSLContext:
    """Load the certificate chain and the CA list into ``context``; ValueError naming the key."""
    context.minimum_version = MINIMUM_VERSION
    if tls.certificate is not None and tls.private_key is not None:
        try:
            context.load_cert_chain(tls.certificate, tls.private_key, password=_no_password)
        except ssl.SSLError as exc:
            raise ValueError(f"certificate {tls.certificate} and private_key {tls.private_key} cannot be "
                             f"used together (not a key pair, or not PEM): {exc.reason or exc}") from None
    if tls.ca_certificates is not None:
        try:
            context.load_verify_locations(cafile=tls.ca_certificates)
        except ssl.SSLError as exc:
            raise ValueError(f"ca_certificates {tls.ca_certificates}: no usable PEM certificate "
                             f"({exc.reason or exc})") from None
    return context


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The storage SCP's context: mutual TLS when ``ca_certificates`` is set, else server-side only."""
    context = _load(_HandshakeInAssociationThread(ssl.PROTOCOL_TLS_SERVER), tls)
    context.verify_mode = ssl.CERT_REQUIRED if tls.ca_certificates is not None else ssl.CERT_NONE
    return context


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """The delivery SCU's context for one destination (see the module docstring for the rule)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, host name checked
    if tls.ca_certificates is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
    return _load(context, tls)


def check(tls: TLSSettings) -> None:
    """Load every file of ``tls`` once, so that a bad one stops the node at start (ValueError)."""
    _load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tls)


def describe(tls: TLSSettings | None) -> str:
    """For the log: ``off``, ``server`` (TLS, any client) or ``mutual`` (client certificate required)."""
    if tls is None:
        return "off"
    return "mutual" if tls.ca_certificates is not None else "server"

"""TLS for the public listener, and how `https://` upstreams are verified.

The listener's pair is checked when the rule file is loaded (so `strangler
check` reports a wrong key), and the listener refuses anything older than
TLS 1.2. Upstream certificates are always verified, hostname included:
against the system's trust store (which honours `SSL_CERT_FILE`), or
against the CAs named by the upstream's `tls.ca`.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from strangler.model import Tls, UpstreamTls

__all__ = [
    "UpstreamTrust",
    "ca_problem",
    "check_tls_pair",
    "client_tls_options",
    "handshake_problem",
    "tls_factory",
]


def check_tls_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Raise ValueError unless `key_pem` is the private key of the first certificate."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ValueError(f"tls.cert is not a PEM certificate: {exc}") from exc
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"tls.key is not an unencrypted PEM private key: {exc}"
        ) from exc
    public = key.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    expected = certificate.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    if public != expected:
        raise ValueError("tls.key does not belong to the certificate in tls.cert")


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTls:
    """One OpenSSL context for every client connection; TLS 1.2 or newer."""

    def __init__(self, tls: Tls) -> None:
        from OpenSSL import SSL

        cert_pem = tls.cert.read_bytes()
        certificates = x509.load_pem_x509_certificates(cert_pem)
        key = load_pem_private_key(tls.key.read_bytes(), password=None)
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        context.use_certificate(certificates[0])
        for extra in certificates[1:]:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(key)  # type: ignore[arg-type]
        context.check_privatekey()
        self._context = context

    def serverConnectionForTLS(self, tls_protocol: Any) -> Any:
        from OpenSSL import SSL

        return SSL.Connection(self._context, None)


class _TlsTransport(BufferingTLSTransport):
    """A TLS transport whose `producer` is the producer the proxy registered.

    The proxy compares `transport.producer` with the producer it registered
    before unregistering it; Twisted's TLS wrapper would otherwise answer
    with the underlying TCP transport's wrapped producer, and a connection
    asked to close would wait for a producer nobody unregisters.
    """

    @property
    def producer(self) -> Any:
        membrane = self._producer
        return membrane._producer if membrane is not None else None


def tls_factory(tls: Tls, wrapped: Any) -> TLSMemoryBIOFactory:
    """Wrap the gateway's factory so every accepted connection speaks TLS first."""
    creator: Any = _ServerTls(tls)  # zope's @implementer is invisible to mypy
    factory = TLSMemoryBIOFactory(creator, False, wrapped)
    factory.protocol = _TlsTransport
    return factory


def ca_problem(pem: bytes) -> str | None:
    """Why `pem` cannot serve as an upstream's `tls.ca`, or None when it can."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return "expected PEM certificates (-----BEGIN CERTIFICATE-----), got none"
    if not certificates:
        return "the file holds no certificate"
    return None


def client_tls_options(host: str, tls: UpstreamTls | None) -> Any:
    """Options for one `https://` target: verify its certificate and its name."""
    from twisted.internet import ssl

    if tls is None:
        return ssl.optionsForClientTLS(host)
    return ssl.optionsForClientTLS(host, trustRoot=_trust_root(tls))


def _trust_root(tls: UpstreamTls) -> Any:
    from OpenSSL import crypto
    from twisted.internet import ssl

    certificates = [
        ssl.Certificate(crypto.X509.from_cryptography(cert))
        for cert in x509.load_pem_x509_certificates(tls.ca_pem)
    ]
    return ssl.trustRootFromCertificates(certificates)


@implementer(IPolicyForHTTPS)
class UpstreamTrust:
    """The same verification for treq/Agent clients (health checks)."""

    def __init__(self, tls: UpstreamTls | None) -> None:
        self._tls = tls

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return client_tls_options(hostname.decode("ascii"), self._tls)


def handshake_problem(reason: Failure) -> str | None:
    """What went wrong in a failed TLS handshake, in words; None if it was not TLS."""
    from OpenSSL import SSL
    from service_identity import VerificationError

    if reason.check(VerificationError):
        # Said without the names involved: the answer goes to the client.
        return "the certificate does not name the target's host"
    if reason.check(SSL.Error):
        details = reason.value.args[0] if reason.value.args else None
        if isinstance(details, list) and details:
            return "; ".join(str(entry[-1]) for entry in details if entry)
        return str(reason.value) or "handshake failed"
    return None

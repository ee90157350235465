"""TLS for the public listener: check a certificate and key pair, build the options.

The pair is checked when the rule file is loaded (so `strangler check`
reports a wrong key), and the listener refuses anything older than TLS 1.2.
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
from zope.interface import implementer

from strangler.model import Tls

__all__ = ["check_tls_pair", "tls_factory"]


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

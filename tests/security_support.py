"""Keys, tokens, rule files and raw requests for the security tests.

Keys are generated here at import time with `cryptography`; tokens are
signed with PyJWT, and the forged ones are put together by hand so a test
controls every byte of the header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from support import client_exchange, header_values, raw_exchange, status_of
from twisted.internet import defer, protocol, reactor

ISSUER = "https://id.example.test"
AUDIENCE = "strangler"
MOBILE_KEY = "mobile-key-0123456789abcdef"
ADMIN_KEY = "admin-key-fedcba9876543210"

SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwks(*pairs: tuple[rsa.RSAPrivateKey, str]) -> bytes:
    """A JWKS document with the public halves of `(key, kid)` pairs."""
    keys = []
    for key, kid in pairs:
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        keys.append(jwk)
    return json.dumps({"keys": keys}).encode()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-42",
        "iat": now,
        "exp": now + 300,
        "scope": "users:read",
    }
    base.update(extra)
    return {key: value for key, value in base.items() if value is not None}


def token(
    payload: dict[str, Any] | None = None,
    key: rsa.RSAPrivateKey = SIGNING_KEY,
    kid: str | None = "k1",
    **headers: Any,
) -> str:
    extra = dict(headers)
    if kid is not None:
        extra["kid"] = kid
    return jwt.encode(payload or claims(), key, algorithm="RS256", headers=extra)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], payload: dict[str, Any], signature: bytes) -> str:
    """A token assembled by hand, signed or not as the caller decides."""
    head = b64(orjson.dumps(header)) + "." + b64(orjson.dumps(payload))
    return head + "." + b64(signature)


def hs256_with(secret: bytes, payload: dict[str, Any], kid: str = "k1") -> str:
    """The key-confusion attack: HS256 with a public key's PEM as the secret."""
    head = b64(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}))
    body = b64(orjson.dumps(payload))
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def write_keys(directory: Path) -> None:
    """The key files the rule files below name, written beside them."""
    (directory / "jwks.json").write_bytes(jwks((SIGNING_KEY, "k1")))
    (directory / "admin-keys.txt").write_text(f"# admin tool\n{ADMIN_KEY}\n")


def auth_rules(backend: str, extra: str = "", routes: str = "") -> str:
    return f"""
listen: 127.0.0.1:0
access_log: false
upstreams:
  monolith:
    targets: [{backend}]
default: monolith
consumers:
  mobile-app:
    api_keys: [{MOBILE_KEY}]
    scopes: [users:read]
  admin-tool:
    api_keys_file: admin-keys.txt
    scopes: [users:read, users:write]
    roles: [admin]
auth:
  api_key: {{header: X-Api-Key}}
  jwt:
    issuers:
      - issuer: {ISSUER}
        audience: {AUDIENCE}
        algorithms: [RS256]
        jwks_file: jwks.json
    leeway: 5s
  identity_headers: {{consumer: X-Consumer, claims: {{sub: X-User-Id}}}}
{extra}
routes:
  - name: users
    match: {{path: /api/v1/users}}
    to: monolith
    auth: any
    require: {{scopes: [users:read]}}
  - name: admin
    match: {{path: /admin}}
    to: monolith
    auth: any
    require: {{roles: [admin]}}
  - name: keys-only
    match: {{path: /keys}}
    to: monolith
    auth: api_key
  - name: tokens-only
    match: {{path: /tokens}}
    to: monolith
    auth: jwt
  - name: open
    match: {{path: /open}}
    to: monolith
    auth: none
{routes}
"""


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    """A raw request that closes the connection after the answer."""
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: gw.test",
        *headers,
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send(port: int, payload: bytes | list[bytes]) -> tuple[int, bytes]:
    raw = await raw_exchange(port, payload)
    return status_of(raw), raw


def seen_headers(request: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in request["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def www_authenticate(raw: bytes) -> list[bytes]:
    return header_values(raw, b"www-authenticate")


def body_of(raw: bytes) -> dict[str, Any]:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


class _Paced(protocol.Protocol):
    """Writes each piece in its own TCP send, `gap` seconds apart."""

    def __init__(
        self, pieces: list[bytes], gap: float, done: defer.Deferred[bytes]
    ) -> None:
        self.pieces = pieces
        self.gap = gap
        self.done = done
        self.received = bytearray()
        self.calls: list[Any] = []

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        for i, piece in enumerate(self.pieces):
            self.calls.append(reactor.callLater(i * self.gap, self._write, piece))

    def _write(self, piece: bytes) -> None:
        if self.transport.connected:
            self.transport.write(piece)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()
        if not self.done.called:
            self.done.callback(bytes(self.received))


def paced_exchange(
    port: int, pieces: list[bytes], gap: float, wait: float = 5.0
) -> defer.Deferred[bytes]:
    """Send `pieces` one by one, `gap` seconds apart; all received until close/`wait`.

    Unlike `raw_exchange`, which writes everything at once, each piece here
    leaves in a TCP segment of its own, so the gateway sees split reads.
    """
    return client_exchange(port, lambda done: _Paced(pieces, gap, done), wait)

"""Valid and hostile requests together, TLS on the public listener, and the CLI."""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
from typing import Any

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from security_support import (
    ADMIN_KEY,
    MOBILE_KEY,
    OTHER_KEY,
    SIGNING_KEY,
    auth_rules,
    claims,
    forged,
    get,
    hs256_with,
    public_pem,
    seen_headers,
    token,
    write_keys,
)
from support import raw_exchange, status_of
from twisted.internet import defer, protocol, reactor, ssl

ensure = pytest_twisted.ensureDeferred


def _cases() -> list[tuple[str, bytes, int]]:
    """(request id, raw request, expected status); valid ones carry `ok` in the id."""
    cases: list[tuple[str, bytes, int]] = []
    hostile = [
        (get("/keys/{i}", "X-Api-Key: wrong-key-0000000000000"), 401),
        (get("/tokens/{i}", f"Authorization: Bearer {token(key=OTHER_KEY)}"), 401),
        (
            get(
                "/tokens/{i}",
                "Authorization: Bearer " + forged({"alg": "none"}, claims(), b""),
            ),
            401,
        ),
        (
            get(
                "/tokens/{i}",
                "Authorization: Bearer "
                + hs256_with(public_pem(SIGNING_KEY), claims()),
            ),
            401,
        ),
        (get("/admin/{i}", f"X-Api-Key: {MOBILE_KEY}"), 403),
        (get("/open/../admin/{i}"), 401),
        (get("/keys/%2e%2e/%2e%2e/{i}"), 400),
        (
            b"POST /keys/{i} HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"GET /keys/{i} HTTP/1.1\r\nHost: gw.test\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"GET /keys/{i} HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ]
    valid = [
        get("/keys/{i}", f"X-Api-Key: {MOBILE_KEY}"),
        get("/admin/{i}", f"X-Api-Key: {ADMIN_KEY}"),
        get("/tokens/{i}", f"Authorization: Bearer {token()}"),
        get("/api/v1/users/{i}", f"Authorization: Bearer {token(claims(sub='u-9'))}"),
        get("/open/{i}"),
    ]
    for i in range(30):
        for j, template in enumerate(valid):
            rid = f"ok-{i}-{j}"
            cases.append((rid, template.replace(b"{i}", rid.encode()), 200))
        for j, (template, status) in enumerate(hostile):
            rid = f"bad-{i}-{j}"
            cases.append((rid, template.replace(b"{i}", rid.encode()), status))
    return cases


@ensure
async def test_mixed_load_never_lets_a_hostile_request_through_or_fails_a_valid_one(
    tmp_path, backends, gateway
):
    write_keys(tmp_path)
    backend = backends("monolith")
    gw = gateway(auth_rules(backend.url))
    cases = _cases()

    results: dict[str, int] = {}
    for start in range(0, len(cases), 25):
        batch = cases[start : start + 25]
        answers = await defer.gatherResults(
            [raw_exchange(gw.port, payload) for _rid, payload, _status in batch]
        )
        for (rid, _payload, _status), raw in zip(batch, answers, strict=True):
            results[rid] = status_of(raw)

    assert {rid: results[rid] for rid, _p, _s in cases} == {
        rid: s for rid, _p, s in cases
    }
    reached = sorted(r["uri"].rsplit("/", 1)[1] for r in backend.requests)
    assert reached == sorted(rid for rid, _p, _s in cases if rid.startswith("ok-"))
    for request in backend.requests:
        headers = seen_headers(request)
        assert len(headers.get("x-consumer", [])) <= 1


def _self_signed(tmp_path: Any) -> tuple[bytes, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_pem, key


class _Collect(protocol.Protocol):
    def __init__(self, payload: bytes, done: defer.Deferred[bytes]) -> None:
        self.payload = payload
        self.done = done
        self.received = b""

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(self.received)


@ensure
async def test_tls_on_the_public_listener(tmp_path, backends, gateway):
    cert_pem, _key = _self_signed(tmp_path)
    backend = backends("monolith")
    gw = gateway(f"""
listen: 127.0.0.1:0
access_log: false
tls: {{cert: cert.pem, key: key.pem}}
upstreams: {{monolith: {{targets: [{backend.url}]}}}}
default: monolith
""")
    options = ssl.optionsForClientTLS(
        "localhost", trustRoot=ssl.Certificate.loadPEM(cert_pem)
    )
    done: defer.Deferred[bytes] = defer.Deferred()

    class Factory(protocol.ClientFactory):
        def buildProtocol(self, addr: Any) -> _Collect:
            return _Collect(get("/secure"), done)

    reactor.connectSSL("127.0.0.1", gw.port, Factory(), options)
    timer = reactor.callLater(5, lambda: done.called or done.callback(b""))
    over_tls = await done
    if timer.active():
        timer.cancel()
    plain = await raw_exchange(gw.port, get("/plain"), wait=1.0)

    assert status_of(over_tls) == 200
    assert seen_headers(backend.requests[0])["x-forwarded-proto"] == ["https"]
    assert not plain.startswith(b"HTTP/1.1 200")
    assert [r["uri"] for r in backend.requests] == ["/secure"]


def test_cli_check_reports_security_problems_with_file_and_line(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        "upstreams: {m: {targets: ['http://127.0.0.1:9']}}\n"
        "default: m\n"
        "consumers: {app: {api_keys: [tiny]}}\n"
        "routes:\n"
        "  - {name: r, to: m, rate_limit: {rate: fast}}\n"
    )

    done = subprocess.run(
        [sys.executable, "-m", "strangler", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 1
    lines = (done.stdout + done.stderr).splitlines()
    assert (
        f"{path}:3: consumers.app.api_keys[0]: an API key must be at least 16 "
        "characters, got one of 4" in lines
    )
    assert (
        f"{path}:5: routes[0].rate_limit.rate: expected a rate like 100/s, 10/m or "
        "50/10s, got 'fast'" in lines
    )
    assert "tiny" not in json.dumps(lines).replace("got one of 4", "")

"""Valid and hostile requests together, TLS on the public listener, and the CLI."""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import pytest_twisted
from cli_support import ServeProcess, run_cli
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
    paced_exchange,
    public_pem,
    seen_headers,
    token,
    write_keys,
)
from support import EchoResource, raw_exchange, status_of
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.task import deferLater
from twisted.web import server

from strangler.model import Tls
from strangler.security.tls import tls_factory

ensure = pytest_twisted.ensureDeferred


SPOOF = ("X-Consumer: admin-tool", "X-User-Id: root", "X-CONSUMER: root")
LIMITED_ROUTE = """
  - name: limited
    match: {path: /limited}
    to: monolith
    auth: none
    rate_limit: {rate: 1/m, burst: 5, per: ip}
"""
LIMITED_BURST = 5


@dataclass(frozen=True)
class _Case:
    """One request of the mixed load and what must come of it.

    `status` None means 200 or 429, decided by the order the limited route
    sees them in. `identity` is what the upstream must see in `X-Consumer`
    and `X-User-Id` (absent when None). `split` sends the request in
    several TCP segments, cut in the request line, in a header and in the
    blank line.
    """

    rid: str
    payload: bytes
    status: int | None
    identity: tuple[str | None, str | None] = (None, None)
    split: bool = False


def _pieces(payload: bytes) -> list[bytes]:
    cuts = sorted({2, len(payload) // 3, len(payload) // 2, len(payload) - 3})
    return [
        payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)
    ]


def _cases() -> list[_Case]:
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
        # Claiming an identity instead of proving one.
        (get("/admin/{i}", *SPOOF), 401),
        (get("/tokens/{i}", "X-Consumer: u-9", "X-User-Id: u-9"), 401),
    ]
    valid: list[tuple[bytes, tuple[str | None, str | None]]] = [
        (get("/keys/{i}", f"X-Api-Key: {MOBILE_KEY}"), ("mobile-app", None)),
        (get("/admin/{i}", f"X-Api-Key: {ADMIN_KEY}"), ("admin-tool", None)),
        (
            get("/tokens/{i}", f"Authorization: Bearer {token()}"),
            ("user-42", "user-42"),
        ),
        (
            get(
                "/api/v1/users/{i}", f"Authorization: Bearer {token(claims(sub='u-9'))}"
            ),
            ("u-9", "u-9"),
        ),
        (get("/open/{i}"), (None, None)),
        # Spoofed identity headers on valid requests: removed, never believed.
        (get("/keys/{i}", f"X-Api-Key: {MOBILE_KEY}", *SPOOF), ("mobile-app", None)),
        (
            get(
                "/keys/{i}",
                f"X-Api-Key: {MOBILE_KEY}",
                "X-Consumer: admin-tool",
                "Connection: X-Consumer",
            ),
            ("mobile-app", None),
        ),
        (
            get(
                "/tokens/{i}",
                f"Authorization: Bearer {token(claims(sub='u-5'))}",
                *SPOOF,
            ),
            ("u-5", "u-5"),
        ),
        (get("/open/{i}", *SPOOF), (None, None)),
    ]
    cases: list[_Case] = []
    for i in range(30):
        for j, (template, identity) in enumerate(valid):
            rid = f"ok-{i}-{j}"
            payload = template.replace(b"{i}", rid.encode())
            cases.append(_Case(rid, payload, 200, identity, split=(i + j) % 3 == 0))
        for j, (template, status) in enumerate(hostile):
            rid = f"bad-{i}-{j}"
            cases.append(_Case(rid, template.replace(b"{i}", rid.encode()), status))
        # A client rotating X-Forwarded-For to dodge a per-IP limit.
        rid = f"xff-{i}"
        rotating = get(f"/limited/{rid}", f"X-Forwarded-For: 198.51.100.{i + 1}")
        cases.append(_Case(rid, rotating, None))
    return cases


@ensure
async def test_mixed_load_never_lets_a_hostile_request_through_or_fails_a_valid_one(
    tmp_path, backends, gateway
):
    write_keys(tmp_path)
    backend = backends("monolith")
    gw = gateway(auth_rules(backend.url, routes=LIMITED_ROUTE))
    cases = _cases()

    results: dict[str, int] = {}
    for start in range(0, len(cases), 25):
        batch = cases[start : start + 25]
        answers = await defer.gatherResults(
            [
                paced_exchange(gw.port, _pieces(case.payload), gap=0.005)
                if case.split
                else raw_exchange(gw.port, case.payload)
                for case in batch
            ]
        )
        for case, raw in zip(batch, answers, strict=True):
            results[case.rid] = status_of(raw)

    fixed = [case for case in cases if case.status is not None]
    assert {c.rid: results[c.rid] for c in fixed} == {c.rid: c.status for c in fixed}
    rotating = [case.rid for case in cases if case.status is None]
    passed = sorted(rid for rid in rotating if results[rid] == 200)
    assert len(passed) == LIMITED_BURST
    assert {results[rid] for rid in rotating} == {200, 429}

    seen = {r["uri"].rsplit("/", 1)[1]: seen_headers(r) for r in backend.requests}
    expected = {c.rid: c.identity for c in fixed if c.status == 200}
    assert sorted(seen) == sorted([*expected, *passed])
    for rid, identity in expected.items():
        headers = seen[rid]
        assert (headers.get("x-consumer"), headers.get("x-user-id")) == tuple(
            None if value is None else [value] for value in identity
        ), rid


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

    done = run_cli("check", str(path), timeout=60)

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


# -- https:// upstreams ----------------------------------------------------------


def _private_ca(tmp_path: Any, names: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """A private CA (written to ca.pem) and a server certificate it issued for
    `names`, or else 127.0.0.1 and localhost: (server cert PEM, key PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test private CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upstream")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name) for name in names]
                or [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class _HttpsBackend:
    """An echo backend behind TLS (the gateway's own listener code) with a
    certificate issued by a private CA."""

    def __init__(self, tmp_path: Any, names: tuple[str, ...] = ()) -> None:
        cert_pem, key_pem = _private_ca(tmp_path, names)
        (tmp_path / "upstream.pem").write_bytes(cert_pem)
        (tmp_path / "upstream.key").write_bytes(key_pem)
        self.resource = EchoResource("secure")
        factory = tls_factory(
            Tls(cert=tmp_path / "upstream.pem", key=tmp_path / "upstream.key"),
            server.Site(self.resource),
        )
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.url = f"https://127.0.0.1:{self.port.getHost().port}"

    def stop(self) -> defer.Deferred[None]:
        return defer.maybeDeferred(self.port.stopListening)


def _https_rules(url: str, tls: str = "") -> str:
    return f"""
listen: 127.0.0.1:0
access_log: false
upstreams:
  secure:
    targets: [{url}]
    {tls}
default: secure
"""


@ensure
async def test_https_upstream_with_an_unknown_ca_gets_a_clear_502(tmp_path, gateway):
    backend = _HttpsBackend(tmp_path)
    try:
        gw = gateway(_https_rules(backend.url))
        raw = await raw_exchange(gw.port, get("/x"), wait=5.0)
    finally:
        await backend.stop()

    assert status_of(raw) == 502
    assert b'"error":"upstream_tls_error"' in raw
    assert b"certificate verify failed" in raw
    assert backend.resource.requests == []


@ensure
async def test_https_upstream_is_trusted_through_its_tls_ca(tmp_path, gateway):
    backend = _HttpsBackend(tmp_path)
    try:
        gw = gateway(_https_rules(backend.url, "tls: {ca: ca.pem}"))
        raw = await raw_exchange(gw.port, get("/x"), wait=5.0)
    finally:
        await backend.stop()

    assert status_of(raw) == 200
    assert [r["uri"] for r in backend.resource.requests] == ["/x"]


@ensure
async def test_https_upstream_is_trusted_through_ssl_cert_file(tmp_path):
    backend = _HttpsBackend(tmp_path)
    rules = tmp_path / "rules.yaml"
    rules.write_text(_https_rules(backend.url))
    serve = ServeProcess(rules, env={"SSL_CERT_FILE": str(tmp_path / "ca.pem")})
    try:
        raw = await raw_exchange(serve.port, get("/x"), wait=5.0)
    finally:
        serve.stop()
        await backend.stop()

    assert status_of(raw) == 200
    assert [r["uri"] for r in backend.resource.requests] == ["/x"]


@ensure
async def test_https_upstream_whose_certificate_names_another_host_gets_502(
    tmp_path, gateway
):
    backend = _HttpsBackend(tmp_path, names=("other.example.test",))
    try:
        gw = gateway(_https_rules(backend.url, "tls: {ca: ca.pem}"))
        raw = await raw_exchange(gw.port, get("/x"), wait=5.0)
    finally:
        await backend.stop()

    assert status_of(raw) == 502
    assert b'"error":"upstream_tls_error"' in raw
    assert b"the certificate does not name the target's host" in raw
    assert backend.resource.requests == []


def test_upstream_tls_problems_name_file_line_and_key(tmp_path):
    _private_ca(tmp_path)
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    path = tmp_path / "rules.yaml"
    path.write_text(
        "upstreams:\n"
        "  a: {targets: ['https://127.0.0.1:9'], tls: {ca: missing.pem}}\n"
        "  b: {targets: ['https://127.0.0.1:9'], tls: {ca: not-a-cert.pem}}\n"
        "  c: {targets: ['http://127.0.0.1:9'], tls: {ca: ca.pem}}\n"
        "default: a\n"
    )

    done = run_cli("check", str(path), timeout=60)

    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 1
    assert lines[0].startswith(
        f"{path}:2: upstreams.a.tls.ca: cannot read 'missing.pem': "
    ), lines
    assert lines[1] == (
        f"{path}:3: upstreams.b.tls.ca: expected PEM certificates "
        "(-----BEGIN CERTIFICATE-----), got none"
    ), lines
    assert lines[2] == (
        f"{path}:4: upstreams.c.tls: tls applies to https:// targets and this "
        "upstream has none"
    ), lines


async def _until(condition: Any, what: str) -> None:
    for _ in range(200):
        if condition():
            return
        await deferLater(reactor, 0.025, lambda: None)
    raise AssertionError(f"gave up waiting for {what}")


@ensure
async def test_health_checks_and_shadow_copies_trust_the_upstreams_tls_ca(
    tmp_path, backends, gateway
):
    secure = _HttpsBackend(tmp_path)
    plain = backends("monolith")
    try:
        gw = gateway(f"""
listen: 127.0.0.1:0
access_log: false
upstreams:
  monolith: {{targets: [{plain.url}]}}
  secure:
    targets: [{secure.url}]
    tls: {{ca: ca.pem}}
    health: {{path: /health, interval: 100ms, unhealthy_after: 1}}
default: monolith
routes:
  - name: mirrored
    match: {{path: /m}}
    to: monolith
    shadow: {{to: secure, percent: 100}}
""")
        raw = await raw_exchange(gw.port, get("/m/1"), wait=5.0)
        seen = secure.resource.requests
        await _until(lambda: any(r["uri"] == "/m/1" for r in seen), "the shadow copy")
        await _until(lambda: any(r["uri"] == "/health" for r in seen), "a probe")
        target = gw.server.gateway.state.upstreams["secure"].states[0]
    finally:
        await secure.stop()

    assert status_of(raw) == 200
    assert target.healthy

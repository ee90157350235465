"""Rate limits: bucket accuracy on a Clock, and 429s from the real gateway."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_twisted
from security_support import MOBILE_KEY, auth_rules, get, send, write_keys
from support import header_values
from twisted.internet.task import Clock

from strangler.model import RateLimit, Route
from strangler.rules import parse_rules
from strangler.security.gate import Gate
from strangler.security.rate_limit import ClientAddresses, TokenBuckets

ensure = pytest_twisted.ensureDeferred


def test_bucket_grants_burst_plus_rate_over_ten_seconds_at_twice_the_rate():
    clock = Clock()
    buckets = TokenBuckets(RateLimit(rate=100.0, burst=10, per="ip"))

    accepted = 0
    for _ in range(2000):  # 200 a second for 10 seconds
        if buckets.take("client", clock.seconds()) >= 0:
            accepted += 1
        clock.advance(0.005)

    assert accepted <= 10 + 100 * 10
    assert abs(accepted - 1000) <= 0.05 * 1000


def test_bucket_refills_at_rate_and_never_beyond_burst():
    clock = Clock()
    buckets = TokenBuckets(RateLimit(rate=2.0, burst=4, per="ip"))

    first = [buckets.take("k", clock.seconds()) >= 0 for _ in range(6)]
    clock.advance(1.0)
    after_one_second = [buckets.take("k", clock.seconds()) >= 0 for _ in range(3)]
    clock.advance(3600)
    after_an_hour = [buckets.take("k", clock.seconds()) >= 0 for _ in range(6)]

    assert first == [True] * 4 + [False] * 2
    assert after_one_second == [True, True, False]
    assert after_an_hour == [True] * 4 + [False] * 2


def test_bucket_keys_are_independent():
    clock = Clock()
    buckets = TokenBuckets(RateLimit(rate=1.0, burst=1, per="ip"))

    assert buckets.take("a", clock.seconds()) >= 0
    assert buckets.take("a", clock.seconds()) < 0
    assert buckets.take("b", clock.seconds()) >= 0


def test_bucket_memory_is_bounded_and_busy_keys_are_kept():
    clock = Clock()
    buckets = TokenBuckets(RateLimit(rate=1.0, burst=2, per="ip"), max_keys=100)
    buckets.take("busy", clock.seconds())
    buckets.take("busy", clock.seconds())

    for i in range(1000):
        clock.advance(0.001)
        buckets.take(f"idle-{i}", clock.seconds())
        buckets.bucket("busy", clock.seconds())[0] = 0.0

    assert len(buckets) <= 100
    assert buckets.take("busy", clock.seconds()) < 0


def test_client_address_is_peer_unless_peer_is_a_trusted_proxy():
    rules = parse_rules(
        "upstreams: {m: {targets: [http://127.0.0.1:1]}}\ndefault: m\n"
        "trusted_proxies: [10.0.0.0/8]\n",
        "r.yaml",
        {},
    )
    addresses = ClientAddresses(rules.trusted_proxies)

    assert addresses.of("192.0.2.9", False, b"6.6.6.6, 192.0.2.9") == "192.0.2.9"
    chain = b"6.6.6.6, 203.0.113.7, 10.1.1.1, 10.0.0.2"
    assert addresses.of("10.0.0.2", True, chain) == "203.0.113.7"
    assert addresses.of("10.0.0.2", True, b"10.9.9.9, 10.0.0.2") == "10.0.0.2"
    assert addresses.of("2001:db8::1", False, b"") == "2001:db8::/64"
    assert addresses.of("2001:db8::ffff", False, b"") == "2001:db8::/64"


# -- the whole gate on a Clock ------------------------------------------------------


@dataclass
class _Client:
    peer_host: str = "192.0.2.1"
    trusted: bool = False


@dataclass
class _Plan:
    route: Route | None


@dataclass
class _FakeExchange:
    """What the gate reads from an exchange, without a network."""

    plan: _Plan
    headers: dict[bytes, bytes] = field(default_factory=dict)
    client: _Client = field(default_factory=_Client)
    kept: list[Any] = field(default_factory=list)
    query: bytes = b""
    forwarded: tuple[bytes, ...] = (b"192.0.2.1",)

    def header_value(self, lname: bytes) -> bytes | None:
        return self.headers.get(lname)


def _gate_rules(tmp_path: Path, route_limit: str, consumer_limit: str) -> Any:
    write_keys(tmp_path)
    text = auth_rules(
        "http://127.0.0.1:1",
        routes=f"""
  - name: limited
    match: {{path: /limited}}
    to: monolith
    auth: api_key
    rate_limit: {route_limit}
""",
    ).replace(
        "    scopes: [users:read]\n  admin-tool:",
        f"    scopes: [users:read]\n    rate_limit: {consumer_limit}\n  admin-tool:",
    )
    return parse_rules(text, str(tmp_path / "rules.yaml"), {})


def test_gate_accuracy_over_ten_seconds_at_twice_the_rate(tmp_path):
    rules = _gate_rules(
        tmp_path, "{rate: 50/s, burst: 5, per: consumer}", "{rate: 1000/s}"
    )
    clock = Clock()
    gate = Gate(rules, clock)
    route = next(r for r in rules.routes if r.name == "limited")
    exchange = _FakeExchange(_Plan(route), {b"x-api-key": MOBILE_KEY.encode()})

    statuses = []
    for _ in range(1000):  # 100 a second for 10 seconds
        statuses.append(gate.check(exchange).status)  # type: ignore[union-attr]
        clock.advance(0.01)

    accepted = statuses.count(200)
    assert set(statuses) == {200, 429}
    assert accepted <= 5 + 50 * 10
    assert abs(accepted - 500) <= 0.05 * 500


def test_route_and_consumer_limits_both_apply(tmp_path):
    rules = _gate_rules(
        tmp_path, "{rate: 1/m, burst: 100, per: ip}", "{rate: 1/m, burst: 3}"
    )
    clock = Clock()
    gate = Gate(rules, clock)
    route = next(r for r in rules.routes if r.name == "limited")
    mobile = _FakeExchange(_Plan(route), {b"x-api-key": MOBILE_KEY.encode()})
    other_ip = _FakeExchange(
        _Plan(route), {b"x-api-key": MOBILE_KEY.encode()}, _Client("192.0.2.77")
    )

    statuses = [gate.check(mobile).status for _ in range(4)]  # type: ignore[union-attr]
    elsewhere = gate.check(other_ip).status  # type: ignore[union-attr]

    assert statuses == [200, 200, 200, 429]
    assert elsewhere == 429  # the consumer's own budget follows it to any address


def test_refused_request_spends_no_token_of_the_other_limit(tmp_path):
    rules = _gate_rules(
        tmp_path, "{rate: 1/m, burst: 2, per: ip}", "{rate: 1/m, burst: 3}"
    )
    gate = Gate(rules, Clock())
    route = next(r for r in rules.routes if r.name == "limited")
    mobile = _FakeExchange(_Plan(route), {b"x-api-key": MOBILE_KEY.encode()})
    moved = _FakeExchange(
        _Plan(route), {b"x-api-key": MOBILE_KEY.encode()}, _Client("192.0.2.77")
    )

    first = [gate.check(mobile).status for _ in range(4)]  # type: ignore[union-attr]
    from_elsewhere = gate.check(moved).status  # type: ignore[union-attr]

    assert first == [200, 200, 429, 429]
    assert from_elsewhere == 200  # the consumer still had its third token


# -- the real gateway --------------------------------------------------


def _limited_gateway(backends, gateway, tmp_path, limit: str, extra: str = ""):  # type: ignore[no-untyped-def]
    write_keys(tmp_path)
    backend = backends("monolith")
    routes = f"""
  - name: limited
    match: {{path: /limited}}
    to: monolith
    rate_limit: {limit}
"""
    return backend, gateway(auth_rules(backend.url, extra=extra, routes=routes))


@ensure
async def test_limited_response_is_429_with_rate_limit_headers(
    backends, gateway, tmp_path
):
    backend, gw = _limited_gateway(
        backends, gateway, tmp_path, "{rate: 5/m, burst: 3, per: ip}"
    )

    answers = [await send(gw.port, get("/limited/x")) for _ in range(5)]

    assert [status for status, _ in answers] == [200, 200, 200, 429, 429]
    raw = answers[3][1]
    assert header_values(raw, b"retry-after") == [b"12"]
    assert header_values(raw, b"ratelimit-limit") == [b"3"]
    assert header_values(raw, b"ratelimit-remaining") == [b"0"]
    assert header_values(raw, b"ratelimit-reset") == [b"36"]
    assert b'"error":"rate_limited"' in raw
    assert len(backend.requests) == 3


@ensure
async def test_accepted_responses_of_a_limited_route_carry_rate_limit_headers(
    backends, gateway, tmp_path
):
    _backend, gw = _limited_gateway(
        backends, gateway, tmp_path, "{rate: 5/m, burst: 3, per: ip}"
    )

    accepted = [(await send(gw.port, get("/limited/x")))[1] for _ in range(3)]
    unlimited, raw_open = await send(gw.port, get("/open/page"))

    assert [header_values(raw, b"ratelimit-limit") for raw in accepted] == [[b"3"]] * 3
    assert [header_values(raw, b"ratelimit-remaining") for raw in accepted] == [
        [b"2"],
        [b"1"],
        [b"0"],
    ]
    # Seconds until the bucket is full again, at 5 tokens a minute.
    assert [header_values(raw, b"ratelimit-reset") for raw in accepted] == [
        [b"12"],
        [b"24"],
        [b"36"],
    ]
    assert all(header_values(raw, b"retry-after") == [] for raw in accepted)
    assert unlimited == 200
    assert header_values(raw_open, b"ratelimit-limit") == []


def test_accepted_verdict_reports_the_tightest_limit(tmp_path):
    rules = _gate_rules(
        tmp_path, "{rate: 1/m, burst: 10, per: ip}", "{rate: 1/m, burst: 3}"
    )
    gate = Gate(rules, Clock())
    route = next(r for r in rules.routes if r.name == "limited")
    mobile = _FakeExchange(_Plan(route), {b"x-api-key": MOBILE_KEY.encode()})

    verdicts = [gate.check(mobile) for _ in range(2)]

    assert [v.allowed for v in verdicts] == [True, True]  # type: ignore[union-attr]
    assert dict(verdicts[1].response_headers) == {  # type: ignore[union-attr]
        b"RateLimit-Limit": b"3",
        b"RateLimit-Remaining": b"1",
        b"RateLimit-Reset": b"120",
    }
    # The identity headers the consumer's verdict carries are kept.
    assert verdicts[1].consumer == "mobile-app"  # type: ignore[union-attr]
    assert (b"X-Consumer", b"mobile-app") in verdicts[1].upstream_headers  # type: ignore[union-attr]


@ensure
async def test_rotating_forwarded_for_does_not_escape_the_ip_limit(
    backends, gateway, tmp_path
):
    backend, gw = _limited_gateway(
        backends, gateway, tmp_path, "{rate: 1/m, burst: 2, per: ip}"
    )

    statuses = [
        (await send(gw.port, get("/limited", f"X-Forwarded-For: 198.51.100.{i}")))[0]
        for i in range(6)
    ]

    assert statuses == [200, 200, 429, 429, 429, 429]
    assert len(backend.requests) == 2


@ensure
async def test_behind_a_trusted_proxy_the_rightmost_untrusted_address_is_limited(
    backends, gateway, tmp_path
):
    backend, gw = _limited_gateway(
        backends,
        gateway,
        tmp_path,
        "{rate: 1/m, burst: 2, per: ip}",
        extra="trusted_proxies: [127.0.0.1/32, 10.0.0.0/8]",
    )

    rotating = [
        (
            await send(
                gw.port,
                get("/limited", f"X-Forwarded-For: 6.6.6.{i}, 203.0.113.7, 10.0.0.5"),
            )
        )[0]
        for i in range(4)
    ]
    other_client, _ = await send(
        gw.port, get("/limited", "X-Forwarded-For: 198.51.100.1, 10.0.0.5")
    )

    assert rotating == [200, 200, 429, 429]
    assert other_client == 200
    assert len(backend.requests) == 3


@ensure
async def test_per_header_and_per_route_limits(backends, gateway, tmp_path):
    write_keys(tmp_path)
    backend = backends("monolith")
    routes = """
  - name: tenant
    match: {path: /tenant}
    to: monolith
    rate_limit: {rate: 1/m, burst: 1, per: 'header:X-Tenant'}
  - name: whole-route
    match: {path: /whole}
    to: monolith
    rate_limit: {rate: 1/m, burst: 2, per: route}
"""
    gw = gateway(auth_rules(backend.url, routes=routes))

    tenants = [
        (await send(gw.port, get("/tenant", f"X-Tenant: {name}")))[0]
        for name in ("a", "a", "b")
    ]
    whole = [
        (await send(gw.port, get("/whole", f"X-Forwarded-For: 10.0.0.{i}")))[0]
        for i in range(3)
    ]

    assert tenants == [200, 429, 200]
    assert whole == [200, 200, 429]


@ensure
async def test_consumer_limit_applies_on_every_route(backends, gateway, tmp_path):
    write_keys(tmp_path)
    backend = backends("monolith")
    text = auth_rules(backend.url).replace(
        "    scopes: [users:read]\n  admin-tool:",
        "    scopes: [users:read]\n"
        "    rate_limit: {rate: 1/m, burst: 2}\n  admin-tool:",
    )
    gw = gateway(text)

    statuses = [
        (await send(gw.port, get(path, f"X-Api-Key: {MOBILE_KEY}")))[0]
        for path in ("/keys/a", "/api/v1/users", "/keys/b")
    ]
    admin, _ = await send(
        gw.port, get("/keys/c", "X-Api-Key: admin-key-fedcba9876543210")
    )

    assert statuses == [200, 200, 429]
    assert admin == 200


def test_reload_keeps_the_buckets_of_unchanged_limits(tmp_path):
    from strangler.security.gate import build_gate

    rules = _gate_rules(
        tmp_path, "{rate: 1/m, burst: 2, per: ip}", "{rate: 1/m, burst: 9}"
    )
    clock = Clock()
    first = build_gate(rules, clock)
    route = next(r for r in rules.routes if r.name == "limited")
    exchange = _FakeExchange(_Plan(route), {b"x-api-key": MOBILE_KEY.encode()})
    spent = [first.check(exchange).status for _ in range(2)]  # type: ignore[union-attr]

    reloaded = build_gate(rules, clock, first)
    changed = build_gate(
        _gate_rules(
            tmp_path, "{rate: 1/m, burst: 3, per: ip}", "{rate: 1/m, burst: 9}"
        ),
        clock,
        reloaded,
    )

    assert spent == [200, 200]
    assert reloaded.check(exchange).status == 429  # type: ignore[union-attr]
    assert changed.check(exchange).status == 200  # type: ignore[union-attr]
    assert reloaded.counters is first.counters

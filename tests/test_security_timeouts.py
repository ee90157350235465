"""Clients that stall: the request head, the body, and connections that send nothing.

Each stall gets 408 with `Connection: close`, never a silent close, and
never blames an upstream: the upstream failure counter stays at zero, so
outlier ejection and migration rollback are not fed by slow clients.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from security_support import paced_exchange
from support import header_values, raw_exchange, status_of
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from strangler.errors import ConfigError
from strangler.gateway import Gateway
from strangler.proxy.downstream import IDLE_TIMEOUT, GatewayFactory
from strangler.rules import load_rules

ensure = pytest_twisted.ensureDeferred


def rules(backend: str, limits: str, access_log: bool = True) -> str:
    return f"""
listen: 127.0.0.1:0
access_log: {"true" if access_log else "false"}
limits: {limits}
upstreams:
  monolith:
    targets: [{backend}]
    timeout: 2s
default: monolith
routes:
  - name: upload
    match: {{path: /upload}}
    to: monolith
  - name: legacy-xml
    match: {{path: /xml}}
    to: monolith
    transform: {{request: xml_to_json}}
"""


def upstream_failures(gw: Any) -> int:
    return sum(series.errors for series in gw.server.gateway.metrics.series.values())


def post(path: str, length: int, content_type: str = "text/plain") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw.test\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


@ensure
async def test_stalled_body_on_a_plain_route_gets_408_and_no_upstream_failure(
    backends, gateway
):
    backend = backends("monolith")
    gw = gateway(rules(backend.url, "{client_body_timeout: 300ms}"))

    raw = await raw_exchange(gw.port, post("/upload", 100) + b"only ten b", wait=5.0)

    assert status_of(raw) == 408
    assert header_values(raw, b"connection") == [b"close"]
    assert b'"error":"request_timeout"' in raw
    assert b"request body not received in time" in raw
    assert backend.requests == []
    assert upstream_failures(gw) == 0
    [line] = [e for e in gw.log_lines() if e.get("event") == "request"]
    assert (line["route"], line["status"], line["error"]) == (
        "upload",
        408,
        "request_timeout",
    )
    target = gw.server.gateway.state.upstreams["monolith"].states[0]
    assert target.active == 0


@ensure
async def test_stalled_body_on_a_transform_route_gets_408(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url, "{client_body_timeout: 300ms}"))

    raw = await raw_exchange(
        gw.port, post("/xml", 200, "application/xml") + b"<user><id>1", wait=5.0
    )

    assert status_of(raw) == 408
    assert header_values(raw, b"connection") == [b"close"]
    assert backend.requests == []
    assert upstream_failures(gw) == 0


@ensure
async def test_slow_body_within_the_gap_limit_is_accepted(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url, "{client_body_timeout: 400ms}"))
    pieces = [post("/upload", 12)] + [b"abc"] * 4

    # 0.5 s in all, more than the timeout, but never more than 0.1 s between reads.
    raw = await paced_exchange(gw.port, pieces, gap=0.1, wait=3.0)

    assert status_of(raw) == 200
    assert backend.requests[0]["body"] == "abcabcabcabc"


@ensure
async def test_connection_that_sends_nothing_gets_408(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url, "{client_header_timeout: 300ms}"))

    raw = await raw_exchange(gw.port, b"", wait=5.0)

    assert status_of(raw) == 408
    assert header_values(raw, b"connection") == [b"close"]
    assert b"no request received in time" in raw
    assert backend.requests == []


@ensure
async def test_first_head_is_timed_from_the_connection_start(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url, "{client_header_timeout: 500ms}"))

    # The head starts 0.3 s after connecting and is finished 0.3 s later: each
    # gap is shorter than the timeout, the whole wait is not.
    pieces = [b"", b"GET /upload HTTP/1.1\r\n", b"Host: gw.test\r\n\r\n"]
    raw = await paced_exchange(gw.port, pieces, gap=0.3, wait=5.0)

    assert status_of(raw) == 408
    assert backend.requests == []


@ensure
async def test_keep_alive_idle_is_not_cut_by_the_header_timeout(backends, gateway):
    backend = backends("monolith")
    gw = gateway(rules(backend.url, "{client_header_timeout: 300ms}"))
    request = b"GET /upload/%d HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    last = b"GET /upload/3 HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"

    # 0.6 s idle between requests: twice the header timeout, far below the idle one.
    raw = await paced_exchange(
        gw.port, [request % 1, request % 2, last], gap=0.6, wait=5.0
    )

    assert raw.count(b"HTTP/1.1 200 ") == 3
    assert [r["uri"] for r in backend.requests] == [
        "/upload/1",
        "/upload/2",
        "/upload/3",
    ]


# Timing logic on a simulated clock: no upstream ever answers, nothing sleeps.


class _Client(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        """StringTransport has no socket options."""


def _connection(tmp_path: Any, limits: str) -> tuple[Any, MemoryReactorClock, Any]:
    path = tmp_path / "rules.yaml"
    path.write_text(rules("http://127.0.0.1:9", limits, access_log=False))
    clock = MemoryReactorClock()
    gateway = Gateway(load_rules(path), clock)
    conn = GatewayFactory(gateway).buildProtocol(None)
    transport = _Client(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    conn.makeConnection(transport)
    return conn, clock, transport


def test_body_timeout_counts_the_gap_since_the_last_read(tmp_path):
    conn, clock, transport = _connection(tmp_path, "{client_body_timeout: 10s}")

    conn.dataReceived(post("/upload", 30) + b"0123456789")
    clock.advance(9)
    conn.dataReceived(b"0123456789")
    clock.advance(9)
    before = transport.value()
    clock.advance(2)

    assert before == b""
    assert status_of(transport.value()) == 408
    assert transport.disconnecting


def test_body_is_not_timed_while_the_gateway_holds_reading(tmp_path):
    conn, clock, transport = _connection(tmp_path, "{client_body_timeout: 10s}")
    conn.dataReceived(post("/upload", 30) + b"0123456789")

    conn.pause_reading(conn.PAUSE_UPSTREAM)
    clock.advance(60)
    held = transport.value()
    conn.resume_reading(conn.PAUSE_UPSTREAM)
    clock.advance(9)
    still = transport.value()
    clock.advance(2)

    assert (held, still) == (b"", b"")
    assert status_of(transport.value()) == 408


def test_silent_connection_gets_408_at_the_header_timeout(tmp_path):
    _conn, clock, transport = _connection(tmp_path, "{client_header_timeout: 5s}")

    clock.advance(4.9)
    before = transport.value()
    clock.advance(0.2)

    assert before == b""
    assert status_of(transport.value()) == 408
    assert transport.disconnecting


def _answer_from_upstream(clock: MemoryReactorClock, response: bytes) -> None:
    """Play the upstream the gateway connected to: accept, then send `response`."""
    _host, _port, factory, _timeout, _bind = clock.tcpClients[-1]
    upstream = factory.buildProtocol(None)
    upstream.makeConnection(_Client())
    upstream.dataReceived(response)


def test_keep_alive_connection_is_closed_quietly_when_idle(tmp_path):
    conn, clock, transport = _connection(tmp_path, "{client_header_timeout: 5s}")
    conn.dataReceived(b"GET /upload HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    _answer_from_upstream(clock, b"HTTP/1.1 204 No Content\r\n\r\n")
    answered = status_of(transport.value())
    transport.clear()

    clock.advance(IDLE_TIMEOUT - 1)
    open_before = not transport.disconnecting
    clock.advance(2)

    assert answered == 204
    assert open_before
    assert transport.disconnecting
    assert transport.value() == b""


def test_head_pipelined_behind_an_answer_is_timed_from_its_end(tmp_path):
    conn, clock, transport = _connection(tmp_path, "{client_header_timeout: 5s}")
    conn.dataReceived(b"GET /upload HTTP/1.1\r\nHost: gw.test\r\n\r\nGET /up")

    clock.advance(20)  # the upstream is slow; the client is not to blame
    during = transport.value()
    _answer_from_upstream(clock, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    answered = transport.value()
    transport.clear()
    clock.advance(4)
    before = transport.value()
    clock.advance(2)

    assert during == b""
    assert answered.endswith(b"\r\n\r\nok")
    assert before == b""
    assert status_of(transport.value()) == 408


def test_bad_body_timeout_names_file_line_and_key(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        "upstreams: {m: {targets: ['http://127.0.0.1:9']}}\n"
        "default: m\n"
        "limits:\n"
        "  client_body_timeout: soon\n"
    )

    with pytest.raises(ConfigError) as caught:
        load_rules(path)

    assert str(caught.value) == (
        f"{path}:4: limits.client_body_timeout: expected a duration like 250ms, "
        "10s or 5m, got 'soon'"
    )

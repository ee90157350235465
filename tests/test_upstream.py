"""Upstream timers and connection checks, driven by a memory reactor and its clock.

The real gateway code runs end to end here (client connection, exchange,
pool, upstream connection) over in-memory transports, so the timing logic
is checked without sleeping: `MemoryReactorClock` records every connect
attempt and `advance` moves time.
"""

from __future__ import annotations

import socket
import textwrap
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport

from strangler.gateway import Gateway
from strangler.proxy.downstream import ClientConnection
from strangler.proxy.upstream import UpstreamConnection, closed_by_peer
from strangler.rules import parse_rules


class _Transport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        """In-memory transports have no Nagle to turn off."""


class _Harness:
    """A gateway on a memory reactor, one client, and the upstreams it dials."""

    def __init__(self, rules: str) -> None:
        self.reactor = MemoryReactorClock()
        parsed = parse_rules(textwrap.dedent(rules), "rules.yaml", {})
        self.gateway = Gateway(parsed, self.reactor)
        self.client = ClientConnection(self.gateway)
        self.client_transport = _Transport()
        self.client.makeConnection(self.client_transport)
        self.upstreams: list[tuple[UpstreamConnection, _Transport]] = []

    def send(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def connect_next(self) -> tuple[UpstreamConnection, _Transport]:
        """Complete the oldest connect attempt not yet completed."""
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[
            len(self.upstreams)
        ]
        conn = factory.buildProtocol(None)
        transport = _Transport()
        conn.makeConnection(transport)
        self.upstreams.append((conn, transport))
        return conn, transport

    def answered(self) -> bytes:
        return self.client_transport.value()


RULES = """
listen: 127.0.0.1:0
connect_timeout: 2s
upstreams:
  monolith:
    targets: [http://127.0.0.1:9001]
    connect_timeout: 1500ms
    timeout: 1s
default: monolith
routes:
  - name: quick
    match: {path: /quick}
    to: monolith
    connect_timeout: 250ms
"""


def _post_head(length: int) -> bytes:
    return b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % length


def test_connect_timeout_of_the_upstream_and_the_route_reach_the_connect() -> None:
    harness = _Harness(RULES)

    harness.send(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    other = _Harness(RULES)
    other.send(b"GET /quick HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")

    assert [c[3] for c in harness.reactor.tcpClients] == [1.5]
    assert [c[3] for c in other.reactor.tcpClients] == [0.25]


def test_response_timer_waits_for_a_slow_upload_to_finish() -> None:
    harness = _Harness(RULES)
    harness.send(_post_head(6) + b"ab")
    _conn, upstream = harness.connect_next()

    harness.reactor.advance(5)
    harness.send(b"cd")
    harness.reactor.advance(5)

    assert harness.answered() == b""
    harness.send(b"ef")
    assert upstream.value().endswith(b"\r\n\r\nabcdef")
    harness.reactor.advance(0.9)
    assert harness.answered() == b""
    harness.reactor.advance(0.2)
    assert b" 504 " in harness.answered().split(b"\r\n", 1)[0]
    state = harness.gateway.state.upstreams["monolith"].states[0]
    assert state.failures_in_a_row == 1


def test_a_stalled_client_body_is_never_the_upstreams_fault() -> None:
    harness = _Harness(RULES)
    harness.send(_post_head(10) + b"abc")
    harness.connect_next()

    for _ in range(30):
        harness.reactor.advance(1)

    assert harness.answered() == b""
    state = harness.gateway.state.upstreams["monolith"].states[0]
    assert state.failures_in_a_row == 0


def test_an_upstream_that_stops_reading_the_body_times_out() -> None:
    harness = _Harness(RULES)
    harness.send(_post_head(10) + b"abc")
    harness.connect_next()

    # What the upstream's transport does when its send buffer stays full.
    harness.client.pauseProducing()
    harness.reactor.advance(0.9)
    assert harness.answered() == b""
    harness.reactor.advance(0.2)

    assert b" 504 " in harness.answered().split(b"\r\n", 1)[0]
    assert b"stopped reading the request body" in harness.answered()


def test_an_upload_that_moves_while_paused_is_not_cut() -> None:
    harness = _Harness(RULES)
    harness.send(_post_head(10) + b"a")
    harness.connect_next()

    for piece in (b"b", b"c", b"d", b"e"):
        harness.client.pauseProducing()
        harness.reactor.advance(0.9)
        harness.client.resumeProducing()
        harness.send(piece)

    assert harness.answered() == b""


def test_response_timer_starts_with_the_head_when_there_is_no_body() -> None:
    harness = _Harness(RULES)
    harness.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    harness.connect_next()

    harness.reactor.advance(1.1)

    assert b" 504 " in harness.answered().split(b"\r\n", 1)[0]


def test_closed_by_peer_tells_an_open_idle_socket_from_a_closed_one() -> None:
    class _Holder:
        def __init__(self, sock: Any) -> None:
            self.socket = sock

    ours, theirs = socket.socketpair()
    other_ours, other_theirs = socket.socketpair()
    try:
        theirs.close()
        other_theirs.sendall(b"x")

        assert closed_by_peer(_Holder(ours)) is True
        assert closed_by_peer(_Holder(other_ours)) is True
        fresh, peer = socket.socketpair()
        try:
            assert closed_by_peer(_Holder(fresh)) is False
        finally:
            fresh.close()
            peer.close()
    finally:
        ours.close()
        other_ours.close()
        other_theirs.close()


def test_a_post_is_not_written_into_an_idle_connection_the_target_closed() -> None:
    harness = _Harness(RULES)
    harness.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    conn, transport = harness.connect_next()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    pool = harness.gateway.state.upstreams["monolith"].pools
    (target_pool,) = pool.values()
    assert target_pool.idle == [conn]
    ours, theirs = socket.socketpair()
    transport.socket = ours  # type: ignore[attr-defined]
    theirs.close()
    try:
        harness.send(_post_head(2) + b"hi")
    finally:
        ours.close()

    assert transport.value().count(b"POST") == 0
    assert len(harness.reactor.tcpClients) == 2
    _fresh, fresh_transport = harness.connect_next()
    assert fresh_transport.value().startswith(b"POST /up HTTP/1.1\r\n")
    assert fresh_transport.value().endswith(b"\r\n\r\nhi")

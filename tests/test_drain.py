"""The end of a drain, on a memory reactor: answers already written still leave."""

from __future__ import annotations

import textwrap
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from strangler.rules import parse_rules
from strangler.server import FLUSH_LIMIT, GatewayServer


class _Closing:
    """A client connection whose answer is done but still being sent."""

    def __init__(self) -> None:
        self.current = None
        self.incoming = None
        self.transport = self
        self.closes = 0

    def loseConnection(self) -> None:
        self.closes += 1


def _server() -> GatewayServer:
    text = """
    listen: 127.0.0.1:0
    access_log: false
    upstreams: {monolith: {targets: [http://127.0.0.1:9001]}}
    default: monolith
    """
    rules = parse_rules(textwrap.dedent(text), "rules.yaml", {})
    return GatewayServer(rules, MemoryReactorClock(), lambda path: rules)


def test_drain_waits_for_closing_connections_to_flush() -> None:
    server = _server()
    closing = _Closing()
    server.gateway.connections.add(closing)
    stopped: list[Any] = []

    server.stop(drain_timeout=5).addCallback(stopped.append)
    server.reactor.advance(0.5)
    assert closing.closes >= 1 and stopped == []

    server.gateway.connections.discard(closing)
    server.reactor.advance(0.02)
    assert stopped == [None]


def test_a_connection_that_never_flushes_holds_the_exit_for_a_moment_only() -> None:
    server = _server()
    server.gateway.connections.add(_Closing())
    stopped: list[Any] = []

    server.stop(drain_timeout=5).addCallback(stopped.append)
    server.reactor.advance(FLUSH_LIMIT - 0.05)
    assert stopped == []
    server.reactor.advance(0.1)

    assert stopped == [None]

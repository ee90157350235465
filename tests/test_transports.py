"""Send-at-once transports and the gateway's reactor, on real sockets."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from strangler.proxy import transports
from strangler.reactor import GatewayReactor

ensure = pytest_twisted.ensureDeferred
BIG = bytes(range(256)) * (32 * 1024)  # 8 MiB, more than any socket buffer takes


class Collect(protocol.Protocol):
    """Client side: gathers everything until the server closes."""

    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.chunks))


class CountingSocket:
    """Wraps a socket to count `send` calls; everything else passes through."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self.sends: list[int] = []

    def send(self, data: bytes) -> int:
        sent = self._sock.send(data)
        if data:  # Twisted's close path sends b"" once; that is not a write
            self.sends.append(sent)
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


async def serve_once(on_connect: Any) -> bytes:
    """Listen with send-at-once transports, connect once, return what arrived."""

    class Server(protocol.Protocol):
        def connectionMade(self) -> None:
            on_connect(self.transport)

    factory = protocol.Factory.forProtocol(Server)
    port = transports.listen_tcp(reactor, 0, factory, 50, "127.0.0.1")
    done: defer.Deferred[bytes] = defer.Deferred()
    client = protocol.ClientCreator(reactor, Collect, done)
    try:
        await client.connectTCP("127.0.0.1", port.getHost().port)
        return await done
    finally:
        await port.stopListening()


def test_the_test_reactor_is_the_gateways() -> None:
    assert isinstance(reactor, GatewayReactor)


@ensure
async def test_a_write_the_kernel_cannot_take_whole_arrives_whole_and_in_order():
    def send(transport: Any) -> None:
        transport.write(BIG)
        transport.write(b"after")
        transport.writeSequence([b"-", b"end"])
        transport.loseConnection()

    received = await serve_once(send)

    assert len(received) == len(BIG) + len(b"after-end")
    assert (
        hashlib.sha256(received).digest() == hashlib.sha256(BIG + b"after-end").digest()
    )


@ensure
async def test_writes_made_during_a_hold_leave_in_one_send_after_release():
    counted: dict[str, CountingSocket] = {}

    def send(transport: Any) -> None:
        counted["socket"] = transport.socket = CountingSocket(transport.socket)
        transports.hold_writes()
        transport.write(b"head;")
        transport.write(b"body")
        held_sends = list(counted["socket"].sends)
        transports.release_writes()
        counted["held"] = held_sends  # type: ignore[assignment]
        transport.loseConnection()

    received = await serve_once(send)

    assert received == b"head;body"
    assert counted["held"] == []
    assert counted["socket"].sends == [len(b"head;body")]


@ensure
async def test_held_writes_of_an_aborted_connection_are_never_sent():
    def send(transport: Any) -> None:
        transports.hold_writes()
        transport.write(b"must not leave")
        transport.abortConnection()
        transports.release_writes()

    assert await serve_once(send) == b""


@ensure
async def test_the_reactor_goes_on_after_an_event_handler_raises():
    errors: list[Any] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "strangler.reactor":
            errors.append(event)

    class Faulty(protocol.Protocol):
        def connectionLost(self, reason: Any = None) -> None:
            raise RuntimeError("broken handler")

    globalLogPublisher.addObserver(observe)
    faulty = transports.listen_tcp(
        reactor, 0, protocol.Factory.forProtocol(Faulty), 50, "127.0.0.1"
    )
    try:
        done: defer.Deferred[bytes] = defer.Deferred()
        client = await protocol.ClientCreator(reactor, Collect, done).connectTCP(
            "127.0.0.1", faulty.getHost().port
        )
        client.transport.loseConnection()
        await done
        for _ in range(100):
            if errors:
                break
            await deferLater(reactor, 0.01, lambda: None)
        still_serving = await serve_once(
            lambda transport: (transport.write(b"ok"), transport.loseConnection())
        )
    finally:
        globalLogPublisher.removeObserver(observe)
        await faulty.stopListening()

    assert errors and "broken handler" in str(errors[0].get("log_failure"))
    assert still_serving == b"ok"

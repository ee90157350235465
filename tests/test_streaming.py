"""Bodies stream through with back-pressure: 1 GiB each way, gateway memory bounded.

The gateway runs as `strangler serve` in its own process so its peak resident
memory (VmHWM) is its own; the backend and client run in the test's reactor.
"""

from __future__ import annotations

import httptools
import pytest
import pytest_twisted
from cli_support import ServeProcess
from support import write_rules
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

GIB = 1024**3
BLOCK = b"z" * 65536
SLOW_EVERY = 16 * 1024**2
SLOW_PAUSE = 0.02


def _read_slowly(transport, before: int, after: int) -> None:  # type: ignore[no-untyped-def]
    """Stop reading for a moment every `SLOW_EVERY` bytes: a slower peer than the gateway.

    Without this the reader keeps up with the writer and the test would pass
    even if the gateway buffered without limit.
    """
    if before // SLOW_EVERY != after // SLOW_EVERY:
        transport.pauseProducing()
        reactor.callLater(SLOW_PAUSE, transport.resumeProducing)


MEMORY_LIMIT = 100 * 1024**2
TIME_LIMIT = 240.0


def _give_up(*waiting: defer.Deferred) -> None:  # type: ignore[type-arg]
    """Bound the test: a stalled transfer fails instead of hanging the suite."""
    for deferred in waiting:
        if not deferred.called:
            deferred.errback(RuntimeError("transfer stalled"))


class _StreamingBackend(protocol.Protocol):
    """GET streams `GIB` bytes; POST counts the body and answers the count."""

    def connectionMade(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        before = self.received
        self.received += len(body)
        _read_slowly(self.transport, before, self.received)

    def on_message_complete(self) -> None:
        if self.parser.get_method() == b"POST":
            answer = str(self.received).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                % (len(answer), answer)
            )
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % GIB)
        self.transport.registerProducer(_Blocks(self.transport, GIB), False)


@implementer(IPullProducer)
class _Blocks:
    """Writes `total` bytes, one block each time the transport asks for more."""

    def __init__(self, transport, total: int) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        self.left = total

    def resumeProducing(self) -> None:
        piece = BLOCK if self.left >= len(BLOCK) else BLOCK[: self.left]
        self.left -= len(piece)
        self.transport.write(piece)
        if self.left == 0:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.left = 0


class _Uploader(protocol.Protocol):
    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.reply = b""

    def connectionMade(self) -> None:
        self.transport.write(
            b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % GIB
        )
        self.transport.registerProducer(_Blocks(self.transport, GIB), False)

    def dataReceived(self, data: bytes) -> None:
        self.reply += data
        if self.reply.endswith(str(GIB).encode()):
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:  # type: ignore[no-untyped-def]
        self.done.callback(self.reply)


class _Downloader(protocol.Protocol):
    def __init__(self, done: defer.Deferred[int]) -> None:
        self.done = done
        self.seen = 0
        self.head = b""

    def connectionMade(self) -> None:
        self.transport.write(b"GET /download HTTP/1.1\r\nHost: a\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            data = self.head.split(b"\r\n\r\n", 1)[1]
            self.head = None  # type: ignore[assignment]
        before = self.seen
        self.seen += len(data)
        _read_slowly(self.transport, before, self.seen)
        if self.seen >= GIB:
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:  # type: ignore[no-untyped-def]
        self.done.callback(self.seen)


def _connect(port: int, build) -> None:  # type: ignore[no-untyped-def]
    factory = protocol.ClientFactory()
    factory.buildProtocol = lambda addr: build()  # type: ignore[method-assign]
    reactor.connectTCP("127.0.0.1", port, factory)


@pytest.fixture
def streaming_backend():  # type: ignore[no-untyped-def]
    port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(_StreamingBackend), interface="127.0.0.1"
    )
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest_twisted.ensureDeferred
async def test_gigabyte_up_and_down_with_gateway_memory_under_100mib(
    tmp_path, streaming_backend
):
    rules = write_rules(
        tmp_path,
        f"""
        listen: 127.0.0.1:0
        access_log: {{path: {tmp_path / "access.log"}}}
        upstreams:
          backend:
            targets: [http://127.0.0.1:{streaming_backend}]
        default: backend
        """,
    )
    gateway = ServeProcess(rules)
    try:
        uploaded: defer.Deferred[bytes] = defer.Deferred()
        _connect(gateway.port, lambda: _Uploader(uploaded))
        downloaded: defer.Deferred[int] = defer.Deferred()
        _connect(gateway.port, lambda: _Downloader(downloaded))

        watchdog = reactor.callLater(TIME_LIMIT, _give_up, uploaded, downloaded)
        reply = await uploaded
        seen = await downloaded
        if watchdog.active():
            watchdog.cancel()
        peak = gateway.peak_rss_bytes()
    finally:
        exit_code = gateway.stop()

    assert reply.endswith(str(GIB).encode())
    assert seen == GIB
    assert peak < MEMORY_LIMIT, f"gateway peak RSS {peak / 1024**2:.1f} MiB"
    assert exit_code == 0

"""Real servers and clients for integration tests, all on 127.0.0.1 port 0."""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from treq.client import HTTPClient
from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.web import resource, server
from twisted.web.client import HTTPConnectionPool

from strangler.logs import AccessLog
from strangler.rules import load_rules
from strangler.server import GatewayServer


class EchoResource(resource.Resource):
    """Answers every request with JSON describing what it received.

    Special paths exercise the proxy: `/status/N`, `/cookies`, `/redirect`,
    `/chunked`, `/download?bytes=N`, `/slow?ms=N`, `/upload` (counts bytes).
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.fail_with: int | None = None

    def render(self, request: server.Request) -> Any:
        path = request.uri.split(b"?")[0]
        body = request.content.read()
        seen = {
            "served_by": self.name,
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")]
                for k, vs in request.requestHeaders.getAllRawHeaders()
                for v in vs
            ],
            "body_bytes": len(body),
            "body": body[:2048].decode("latin-1"),
        }
        self.requests.append(seen)
        request.setHeader(b"X-Served-By", self.name.encode())
        if self.fail_with is not None:
            request.setResponseCode(self.fail_with)
            return b'{"error": "failing on purpose"}'
        if path.startswith(b"/status/"):
            request.setResponseCode(int(path.rsplit(b"/", 1)[1]))
            if request.code in (204, 304):
                return b""
        elif path == b"/cookies":
            request.responseHeaders.addRawHeader(b"Set-Cookie", b"a=1; Path=/")
            request.responseHeaders.addRawHeader(b"Set-Cookie", b"b=2; Path=/")
        elif path == b"/redirect":
            request.setResponseCode(302)
            request.setHeader(b"Location", b"http://example.test/elsewhere?x=1")
            return b""
        elif path == b"/chunked":
            request.write(b"first,")
            request.write(b"second")
            request.finish()
            return server.NOT_DONE_YET
        elif path == b"/download":
            size = int(request.args[b"bytes"][0])
            return self._stream(request, size)
        elif path == b"/hang":
            return server.NOT_DONE_YET
        elif path == b"/stall":
            request.setHeader(b"Content-Length", b"100")
            request.write(b"partial")
            return server.NOT_DONE_YET
        elif path == b"/slow":
            delay = int(request.args[b"ms"][0]) / 1000
            call = reactor.callLater(delay, self._finish_slow, request, seen)
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return server.NOT_DONE_YET
        request.setHeader(b"Content-Type", b"application/json")
        return orjson.dumps(seen)

    def _finish_slow(self, request: server.Request, seen: dict[str, Any]) -> None:
        request.setHeader(b"Content-Type", b"application/json")
        request.write(orjson.dumps(seen))
        request.finish()

    def _stream(self, request: server.Request, size: int) -> Any:
        request.setHeader(b"Content-Length", str(size).encode())
        block = b"x" * 65536
        producer = _BlockProducer(request, block, size)
        request.registerProducer(producer, True)
        producer.resumeProducing()
        return server.NOT_DONE_YET


class _BlockProducer:
    """Streams `size` bytes, honouring back-pressure from the transport."""

    def __init__(self, request: server.Request, block: bytes, size: int) -> None:
        self.request = request
        self.block = block
        self.left = size
        self.paused = False
        self.done = False

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0 and not self.done:
            piece = self.block[: min(len(self.block), self.left)]
            self.left -= len(piece)
            self.request.write(piece)
        if self.left == 0 and not self.done:
            self.done = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.done = True


class _TrackingSite(server.Site):
    """A Site that remembers its connections so a test can kill them."""

    noisy = False

    def __init__(self, root: resource.Resource) -> None:
        super().__init__(root)
        self.connections: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        conn = super().buildProtocol(addr)
        self.connections.append(conn)
        return conn

    def log(self, request: server.Request) -> None:
        """Backends in tests keep quiet."""


class Backend:
    """A running echo backend."""

    def __init__(self, name: str, port: int = 0) -> None:
        self.resource = EchoResource(name)
        self.site = _TrackingSite(self.resource)
        self.port = reactor.listenTCP(port, self.site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.killed = False

    def kill(self) -> defer.Deferred[None]:
        """Die like a crashed process: stop listening and reset every connection."""
        self.killed = True
        for conn in self.site.connections:
            transport = getattr(conn, "transport", None)
            if transport is not None:
                transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.resource.requests

    @property
    def fail_with(self) -> int | None:
        """When set, every request is answered with this status."""
        return self.resource.fail_with

    @fail_with.setter
    def fail_with(self, status: int | None) -> None:
        self.resource.fail_with = status

    def stop(self) -> defer.Deferred[None]:
        if self.killed:
            return defer.succeed(None)
        return defer.maybeDeferred(self.port.stopListening)


class RunningGateway:
    """A gateway started in-process from rule-file text, with a captured access log."""

    def __init__(self, rules_path: Path) -> None:
        self.rules_path = rules_path
        self.log_sink = io.BytesIO()
        self.access_log = AccessLog(self.log_sink)
        rules = load_rules(rules_path)
        self.server = GatewayServer(
            rules, reactor, load_rules, access_log=self.access_log
        )
        address = self.server.start()
        self.port = address.port
        self.url = f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        self.access_log.flush()
        return [json.loads(line) for line in self.log_sink.getvalue().splitlines()]

    def stop(self) -> defer.Deferred[None]:
        return self.server.stop(drain_timeout=1.0)


def write_rules(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def new_client() -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client with its own pool, so a test can close what it opened."""
    from twisted.web.client import Agent

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.retryAutomatically = False
    return HTTPClient(Agent(reactor, pool=pool)), pool


class _RawClient(protocol.Protocol):
    def __init__(
        self, payload: bytes | list[bytes], done: defer.Deferred[bytes]
    ) -> None:
        self.payload = payload
        self.done = done
        self.received = bytearray()

    def connectionMade(self) -> None:
        pieces = self.payload if isinstance(self.payload, list) else [self.payload]
        for piece in pieces:
            self.transport.write(piece)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.received))


def raw_exchange(
    port: int, payload: bytes | list[bytes], wait: float = 2.0
) -> defer.Deferred[bytes]:
    """Send raw bytes, return everything received until the server closes (or `wait`)."""
    return client_exchange(port, lambda done: _RawClient(payload, done), wait)


def client_exchange(
    port: int,
    build: Callable[[defer.Deferred[bytes]], protocol.Protocol],
    wait: float,
) -> defer.Deferred[bytes]:
    """Connect a client protocol made by `build(done)`; close it after `wait`.

    The protocol fires `done` with what it received when the connection ends.
    """
    done: defer.Deferred[bytes] = defer.Deferred()
    holder: dict[str, protocol.Protocol] = {}

    class Factory(protocol.ClientFactory):
        def buildProtocol(self, addr: Any) -> protocol.Protocol:
            holder["p"] = build(done)
            return holder["p"]

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            done.errback(reason)

    reactor.connectTCP("127.0.0.1", port, Factory())

    def give_up() -> None:
        if not done.called and "p" in holder:
            holder["p"].transport.loseConnection()

    call = reactor.callLater(wait, give_up)
    done.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
    return done


def sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def status_of(raw: bytes) -> int:
    """The status code of the first response in raw bytes."""
    line = raw.split(b"\r\n", 1)[0]
    return int(line.split(b" ")[1])


def header_values(raw: bytes, name: bytes) -> list[bytes]:
    head = raw.split(b"\r\n\r\n", 1)[0]
    wanted = name.lower()
    values = []
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == wanted:
            values.append(value.strip())
    return values


Predicate = Callable[[], bool]

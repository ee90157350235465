"""A small, bounded load generator for integration tests (loopback only).

Each worker keeps one keep-alive connection and sends requests one after
another, parsing responses with httptools. Every run is bounded by a request
count and a wall-clock limit, and only ever connects to 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
from twisted.internet import defer, protocol, reactor

RequestMaker = Callable[[int], bytes]


@dataclass
class Reply:
    """One response as the load generator saw it."""

    index: int
    status: int
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class LoadResult:
    replies: list[Reply] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def count(self, header: bytes, value: bytes) -> int:
        return sum(1 for r in self.replies if r.headers.get(header) == value)


class _Worker(protocol.Protocol):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.parser = httptools.HttpResponseParser(self)
        self.index = -1
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    def connectionMade(self) -> None:
        self._send_next()

    def _send_next(self) -> None:
        index = self.run.take()
        if index is None:
            self.transport.loseConnection()
            return
        self.index = index
        self.transport.write(self.run.make(index))

    def dataReceived(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.run.result.failures.append(f"request {self.index}: bad response {exc}")
            self.transport.abortConnection()

    def on_message_begin(self) -> None:
        self.headers = {}
        self.body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.run.result.replies.append(
            Reply(self.index, status, self.headers, self.body)
        )
        self.index = -1
        if self.parser.should_keep_alive():
            self._send_next()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if self.index >= 0:
            self.run.result.failures.append(f"request {self.index}: connection lost")
        self.run.worker_done(self.index < 0)


class _Run:
    def __init__(
        self,
        port: int,
        make: RequestMaker,
        count: int,
        workers: int,
        until: Callable[[], bool] | None = None,
    ) -> None:
        self.until = until
        self.port = port
        self.make = make
        self.count = count
        self.next = 0
        self.active = 0
        self.stopped = False
        self.result = LoadResult()
        self.done: defer.Deferred[LoadResult] = defer.Deferred()
        for _ in range(workers):
            self._start_worker()

    def take(self) -> int | None:
        if self.until is not None and self.until():
            self.stopped = True
        if self.stopped or self.next >= self.count:
            return None
        index = self.next
        self.next += 1
        return index

    def _start_worker(self) -> None:
        self.active += 1
        factory = protocol.ClientFactory()
        factory.buildProtocol = lambda addr: _Worker(self)  # type: ignore[method-assign]
        factory.clientConnectionFailed = lambda c, reason: self._connect_failed(reason)  # type: ignore[method-assign]
        reactor.connectTCP("127.0.0.1", self.port, factory, timeout=5)

    def _connect_failed(self, reason: Any) -> None:
        self.result.failures.append(f"connect failed: {reason.getErrorMessage()}")
        self.worker_done(True)

    def worker_done(self, clean: bool) -> None:
        self.active -= 1
        if not self.stopped and self.next < self.count:
            self._start_worker()
            return
        if self.active == 0 and not self.done.called:
            self.done.callback(self.result)


def run_load(
    port: int,
    make: RequestMaker,
    count: int,
    workers: int = 4,
    time_limit: float = 60.0,
    until: Callable[[], bool] | None = None,
) -> defer.Deferred[LoadResult]:
    """Send `count` requests (request i is `make(i)`) over `workers` connections.

    `until`, when given, is asked before each request and ends the run early.
    """
    run = _Run(port, make, count, workers, until)

    def stop() -> None:
        run.stopped = True
        run.result.failures.append(f"time limit of {time_limit}s reached")

    timer = reactor.callLater(time_limit, stop)

    def finished(result: LoadResult) -> LoadResult:
        if timer.active():
            timer.cancel()
        return result

    return run.done.addCallback(finished)


def get(path: str, headers: dict[str, str] | None = None) -> bytes:
    """Raw bytes of a keep-alive GET."""
    lines = [f"GET {path} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

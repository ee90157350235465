"""One copied request on a shadow pool: send it, capture the answer, or give up.

A `Fetch` is the shadow's counterpart of an exchange, without a client: it
drives an `UpstreamConnection` through the same `UpstreamUser` calls, keeps
the answer in a bounded `Capture`, and has one deadline for the whole trip
(connect, head and body). Whatever happens, it ends exactly once, by calling
`done(fetch, error)` with `error` None on success or a short reason:
`timeout`, `connect`, `closed` or `protocol` (also kept as `fetch.error`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from strangler.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from strangler.proxy.upstream import TargetPool, UpstreamConnection
from strangler.shadow.compare import Answer, Capture

__all__ = ["Fetch"]

Done = Callable[["Fetch", "str | None"], None]


class Fetch:
    """Sends one request and collects its answer within `timeout` seconds."""

    __slots__ = (
        "capture",
        "conn",
        "data",
        "done",
        "error",
        "finished",
        "head_only",
        "headers",
        "pool",
        "reactor",
        "retried",
        "status",
        "timeout",
        "timer",
    )

    def __init__(
        self,
        pool: TargetPool,
        data: bytes,
        head_only: bool,
        timeout: float,
        done: Done,
        limit: int,
    ) -> None:
        self.pool = pool
        self.reactor: Any = pool.reactor
        self.data = data
        self.head_only = head_only
        self.timeout = timeout
        self.done = done
        self.capture = Capture(limit)
        self.conn: UpstreamConnection | None = None
        self.timer: Any = None
        self.finished = False
        self.error: str | None = None
        self.retried = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []

    def start(self) -> None:
        self.timer = self.reactor.callLater(self.timeout, self._expired)
        self.pool.acquire(self, self.timeout)

    def answer(self) -> Answer:
        return self.capture.answer(self.status, self.headers)

    # -- UpstreamUser ------------------------------------------------------------

    def attach(self, conn: UpstreamConnection) -> None:
        if self.finished:
            self.pool.release(conn)
            return
        self.conn = conn
        conn.send(self, self.data, self.timeout, self.timeout, self.head_only)

    def upstream_failed(self, error: UpstreamError, retryable: bool) -> None:
        if self.finished:
            return
        self.conn = None
        if isinstance(error, UpstreamConnectError):
            self._end("connect")
        elif isinstance(error, UpstreamTimeout):
            self._end("timeout")
        elif retryable and not self.retried:
            # A kept-alive connection the shadow had closed meanwhile: nothing
            # was answered, so one fresh connection may try again.
            self.retried = True
            self.pool.connect(self, self.timeout)
        else:
            self._end("closed" if error.reason == "upstream_closed" else "protocol")

    def informational(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """`100 Continue` and friends say nothing about the answer."""

    def response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        self.status = status
        self.headers = headers

    def response_body(self, data: bytes) -> None:
        if not self.finished:
            self.capture.add(data)

    def response_complete(self) -> None:
        self.conn = None
        if not self.finished:
            self._end(None)

    def upgraded(self, conn: UpstreamConnection, extra: bytes) -> None:
        """A shadow that switches protocols is not answering the copy: drop it."""
        self.conn = None
        conn.abort()
        if not self.finished:
            self._end("protocol")

    # -- internals --------------------------------------------------------------

    def _expired(self) -> None:
        self.timer = None
        if self.finished:
            return
        conn, self.conn = self.conn, None
        self._end("timeout")
        if conn is not None:
            conn.abort()

    def _end(self, error: str | None) -> None:
        self.finished = True
        self.error = error
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if error is not None:
            self.capture.chunks = []
        self.done(self, error)

"""Converting large bodies in worker threads, so one upload cannot stall the gateway.

Converting a 10 MiB XML body takes seconds of CPU. Done on the reactor
thread, that would hold up every other request on every route for as long.
`ConversionPool` runs conversions of bodies above `inline_limit` in a small
thread pool of its own, started on first use and stopped with the gateway;
small bodies, which convert in well under a millisecond, stay inline where a
thread hop would cost more than the work.

The pool's threads still share the interpreter lock with the reactor, so a
large conversion slows other requests down somewhat, but no longer stops
them. Requests that find `max_waiting` large conversions already queued or
running are refused with 503 rather than queued without end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from strangler.transforms import TransformError

__all__ = ["INLINE_LIMIT", "MAX_THREADS", "MAX_WAITING", "ConversionPool"]

INLINE_LIMIT = 64 * 1024
"""Bodies up to this many bytes are converted on the reactor thread."""

MAX_THREADS = 2
"""Conversion threads per gateway process."""

MAX_WAITING = 32
"""Large request conversions allowed at once, running or queued."""


class ConversionPool:
    """Runs body conversions inline when small, in worker threads when large."""

    def __init__(
        self,
        reactor: Any,
        threads: int = MAX_THREADS,
        inline_limit: int = INLINE_LIMIT,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.reactor = reactor
        self.threads = threads
        self.inline_limit = inline_limit
        self.max_waiting = max_waiting
        self.busy = 0
        self._pool: ThreadPool | None = None
        self._closed = False

    def run(
        self, convert: Callable[[bytes], bytes], body: bytes, may_refuse: bool = True
    ) -> bytes | Deferred[bytes]:
        """`convert(body)`: its result at once, or a Deferred when it runs off-thread.

        Raises `TransformError` from an inline conversion, and with status 503
        when `may_refuse` and the pool already has `max_waiting` conversions;
        a Deferred fails with the conversion's exception.
        """
        if len(body) <= self.inline_limit or self._closed:
            return convert(body)
        if may_refuse and self.busy >= self.max_waiting:
            raise TransformError(
                f"the gateway is already converting {self.busy} large bodies; "
                "try again shortly",
                status=503,
                reason="busy",
            )
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(0, self.threads, "strangler-transforms")
            pool.start()
        self.busy += 1
        done: Deferred[bytes] = deferToThreadPool(self.reactor, pool, convert, body)
        done.addBoth(self._finished)
        return done

    def _finished(self, result: Any) -> Any:
        self.busy -= 1
        return result

    def close(self) -> None:
        """Stop the threads; a conversion still running is waited for."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

"""The reactor `strangler serve` runs on: epoll without per-event log context.

Twisted's epoll reactor wraps every socket event in `log.callWithLogger`,
which asks the connection for its log prefix and pushes two context frames
so that anything logged inside carries it. The gateway never logs through
that context (its own records carry the request id), and at tens of
thousands of events a second the wrapping costs more than the routing does.
This reactor dispatches each event straight to `_doReadOrWrite`, which
already turns a failing read or write into a closed connection; anything
else that escapes is logged and the loop goes on with the next event.

On a platform without epoll, the default reactor is used unchanged.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger

_log = Logger(namespace="strangler.reactor")

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # pragma: no cover - not Linux
    EPollReactor = None  # type: ignore[assignment,misc]


if EPollReactor is not None:

    class GatewayReactor(EPollReactor):
        """An epoll reactor whose event loop skips Twisted's logging context."""

        def doPoll(self, timeout: float | None) -> None:
            if timeout is None:
                timeout = -1
            try:
                events = self._poller.poll(timeout, len(self._selectables))
            except OSError as err:
                if err.errno == errno.EINTR:
                    return
                raise
            selectables = self._selectables
            handle = self._doReadOrWrite
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                try:
                    handle(selectable, fd, event)
                except Exception:
                    _log.failure("unhandled error in event handler")

        doIteration = doPoll


def install() -> Any:
    """Install the gateway's reactor as the global one (entry points only)."""
    from twisted.internet import main

    if EPollReactor is None:  # pragma: no cover - not Linux
        from twisted.internet import default

        default.install()
    else:
        main.installReactor(GatewayReactor())
    from twisted.internet import reactor

    return reactor

"""Connections to upstream targets: one HTTP/1.1 exchange at a time, pooled.

An `UpstreamConnection` parses responses with llhttp (httptools) and hands
each piece to the exchange that currently owns it. A `TargetPool` keeps idle
keep-alive connections per target so a request normally costs no connect.
No Deferreds on this path: the pool calls the exchange back directly, which
saves an allocation and a callback chain per request.
"""

from __future__ import annotations

import contextlib
import socket
from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet import protocol
from twisted.python.failure import Failure

from strangler.errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTlsError,
)
from strangler.proxy.transports import connect_tcp, hold_writes, release_writes
from strangler.security.tls import handshake_problem

if TYPE_CHECKING:
    from strangler.balancing import TargetState
    from strangler.twisted_types import ProxyTransport, Timer, UpstreamReactor

MAX_IDLE_PER_TARGET = 256


class UpstreamUser(TypingProtocol):
    """What an exchange must offer to drive an upstream connection."""

    def attach(self, conn: UpstreamConnection) -> None: ...
    def upstream_failed(self, error: UpstreamError, retryable: bool) -> None: ...
    def response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None: ...
    def informational(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_complete(self) -> None: ...
    def upgraded(self, conn: UpstreamConnection, extra: bytes) -> None: ...


class _SkipBody(Exception):
    """Raised inside the parser to stop it after the head of a HEAD response."""


class UpstreamConnection(protocol.Protocol):
    """One keep-alive connection to one target."""

    # Twisted types this `ITransport | None`; a pooled connection is only ever
    # used while connected, through the methods `ProxyTransport` names.
    transport: ProxyTransport  # type: ignore[assignment]

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool
        self.user: UpstreamUser | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reused = False
        self.response_started = False
        self.expect_no_body = False
        self.tunnel = False
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._timer: Timer | None = None
        self._stopped_for_head = False
        self.connecting: _Connecting | None = None
        self.paused = False
        self.aborted = False
        self.head_received = False
        self.timeout = 0.0
        self.idle_timeout = 0.0
        self.last_data = 0.0
        self.uploading = False

    # -- driven by the exchange -------------------------------------------

    def send(
        self,
        user: UpstreamUser,
        data: bytes,
        timeout: float,
        idle_timeout: float,
        head: bool,
        complete: bool = True,
    ) -> None:
        """Start one exchange: write the request head (and any body so far).

        One timer per exchange covers every limit. While the body is still
        streaming up (`complete` False) the upstream is not blamed for the
        client's pace: the timer only checks that it keeps reading. Once the
        request is all sent (`request_sent`), the upstream has `timeout` to
        answer with a head; after the head, `idle_timeout` between body
        chunks, checked lazily against the time of the last bytes received.
        """
        self.user = user
        self.response_started = False
        self.head_received = False
        self.expect_no_body = head
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.uploading = not complete
        self.transport.write(data)
        # One timer lives as long as the connection: moving an armed timer
        # later costs far less than a new one per request, and one left armed
        # after an exchange finds no user when it fires.
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(timeout)
        else:
            self._timer = self.pool.reactor.callLater(timeout, self._timed_out)

    def request_sent(self) -> None:
        """The last byte of the request was written: the wait for the head starts."""
        if not self.uploading:
            return
        self.uploading = False
        timer = self._timer
        if self.head_received or self.user is None or timer is None:
            return
        if timer.active():
            timer.reset(self.timeout)

    def abort(self) -> None:
        """Drop the connection at once; it is never reused after this."""
        self.user = None
        self.aborted = True
        self._cancel_timer()
        self.transport.abortConnection()

    # -- producer for the client side: a slow client slows the upstream ---------

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client went away; the exchange aborts this connection itself."""

    # -- Twisted protocol ---------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.pool.open_connections += 1
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel:
            user = self.user
            if user is not None:
                user.tunnel_data(data)  # type: ignore[attr-defined]
            return
        if self.user is None:
            # Bytes nobody asked for: the connection is out of step; drop it.
            self.transport.abortConnection()
            return
        self.response_started = True
        if self.head_received:
            self.last_data = self.pool.reactor.seconds()
        hold_writes()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            self._start_tunnel(data[offset:])
        except httptools.HttpParserCallbackError:
            if self._stopped_for_head:
                self._stopped_for_head = False
                self.parser = httptools.HttpResponseParser(self)
                return
            raise
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid response from upstream: {exc}"))
        finally:
            release_writes()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._cancel_timer()
        self.pool.forget(self)
        user, self.user = self.user, None
        if user is None:
            return
        if self.tunnel:
            user.tunnel_closed()  # type: ignore[attr-defined]
            return
        if self.pool.tls_options is not None and not self.response_started:
            problem = handshake_problem(reason)
            if problem is not None:
                user.upstream_failed(
                    UpstreamTlsError(f"TLS with the upstream failed: {problem}"), True
                )
                return
        retryable = self.reused and not self.response_started
        user.upstream_failed(
            UpstreamClosed("upstream closed the connection before answering")
            if not self.response_started
            else UpstreamClosed("upstream closed the connection mid-response"),
            retryable,
        )

    # -- httptools callbacks --------------------------------------------------

    def on_message_begin(self) -> None:
        self._reason = b""
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        user = self.user
        if user is None:
            return
        if 100 <= status < 200 and status != 101:
            user.informational(status, self._reason, self._headers)
            return
        self.head_received = True
        self.last_data = self.pool.reactor.seconds()
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(self.idle_timeout)
        user.response_head(status, self._reason, self._headers)
        if self.expect_no_body and status != 101:
            self._stopped_for_head = True
            self._finish(self.parser.should_keep_alive())
            raise _SkipBody()

    def on_body(self, body: bytes) -> None:
        user = self.user
        if user is not None:
            user.response_body(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return
        self._finish(self.parser.should_keep_alive())

    # -- internals ------------------------------------------------------------

    def _finish(self, keep_alive: bool) -> None:
        if self.aborted:
            return
        user, self.user = self.user, None
        # An answer that came before the whole request was sent leaves the
        # connection owing body bytes: reusing it would read the next request
        # as the rest of this body.
        if keep_alive and not self.uploading:
            self.pool.release(self)
        else:
            self._cancel_timer()
            self.transport.loseConnection()
        if user is not None:
            user.response_complete()

    def _start_tunnel(self, extra: bytes) -> None:
        self.tunnel = True
        self._cancel_timer()
        if self.user is not None:
            self.user.upgraded(self, extra)

    def _timed_out(self) -> None:
        self._timer = None
        if self.user is None:
            return
        if not self.head_received:
            if not self.uploading:
                self._fail(UpstreamTimeout("upstream did not answer in time"))
            # Only a proxied exchange streams a body up; a shadow copy never does.
            elif self.user.upload_blocked():  # type: ignore[attr-defined]
                self._fail(UpstreamTimeout("upstream stopped reading the request body"))
            else:
                self._timer = self.pool.reactor.callLater(self.timeout, self._timed_out)
            return
        remaining = self.last_data + self.idle_timeout - self.pool.reactor.seconds()
        if remaining > 0:
            self._timer = self.pool.reactor.callLater(remaining, self._timed_out)
            return
        self._fail(UpstreamTimeout("upstream stopped sending the response body"))

    def _fail(self, error: UpstreamError) -> None:
        user, self.user = self.user, None
        self._cancel_timer()
        self.transport.abortConnection()
        if user is not None:
            user.upstream_failed(error, False)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class _Connecting(protocol.ClientFactory):
    """One connection attempt on behalf of one waiting exchange."""

    noisy = False

    def __init__(self, pool: TargetPool, user: UpstreamUser) -> None:
        self.pool = pool
        self.user: UpstreamUser | None = user

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        conn = UpstreamConnection(self.pool)
        conn.connecting = self
        return conn

    def connected(self, conn: UpstreamConnection) -> None:
        user, self.user = self.user, None
        if user is None:
            self.pool.release(conn)
        else:
            user.attach(conn)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        user, self.user = self.user, None
        if user is not None:
            message = reason.getErrorMessage()
            user.upstream_failed(UpstreamConnectError(message), True)


def closed_by_peer(transport: Any) -> bool:
    """Whether an idle connection's peer has closed it, or sent bytes unasked.

    Peeks at the socket without reading: an end of file, an error, or any
    byte at all (nothing is owed on an idle connection) means it must not
    carry a request. A transport without a socket (tests) is taken as open.
    """
    sock = getattr(transport, "socket", None)
    if sock is None:
        sock = getattr(getattr(transport, "transport", None), "socket", None)
        if sock is None:
            return False
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return True


class TargetPool:
    """Idle keep-alive connections to one target, and new ones when none is idle."""

    def __init__(
        self,
        state: TargetState,
        reactor: UpstreamReactor,
        tls_options: Any = None,
    ) -> None:
        self.state = state
        self.reactor = reactor
        self.tls_options = tls_options
        self.idle: list[UpstreamConnection] = []
        self.open_connections = 0

    def acquire(
        self, user: UpstreamUser, connect_timeout: float, check: bool = False
    ) -> None:
        """Give `user` a connection now if one is idle, or when a connect succeeds.

        With `check`, an idle connection is first asked whether the target
        closed it meanwhile (one non-blocking peek), so that a request that
        must not run twice is not written into a connection already gone.
        """
        idle = self.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and transport.connected:
                if check and closed_by_peer(transport):
                    transport.abortConnection()
                    continue
                conn.reused = True
                user.attach(conn)
                return
        self.connect(user, connect_timeout)

    def connect(self, user: UpstreamUser, connect_timeout: float) -> None:
        """Open a fresh connection for `user` (used for retries of stale reuse)."""
        factory = _Connecting(self, user)
        target = self.state.target
        if self.tls_options is not None:
            self.reactor.connectSSL(
                target.host, target.port, factory, self.tls_options, connect_timeout
            )
        else:
            connect_tcp(
                self.reactor, target.host, target.port, factory, connect_timeout
            )

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection whose exchange ended cleanly."""
        conn.user = None
        if len(self.idle) >= MAX_IDLE_PER_TARGET:
            conn.transport.loseConnection()
            return
        conn.resumeProducing()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: make sure it is never handed out again."""
        if conn.connecting is None:
            self.open_connections -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def close_idle(self) -> None:
        """Close every idle connection (on shutdown or when a target is removed)."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.transport.loseConnection()

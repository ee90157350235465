"""The client side of the gateway: parse requests, queue pipelined ones, enforce limits.

Requests are parsed by llhttp (httptools), which refuses ambiguous framing
(`Content-Length` with `Transfer-Encoding`, bad chunk sizes, bare CR/LF) by
itself; those become 400 and a closed connection before anything reaches an
upstream. Pipelined requests are answered strictly in order: while one
exchange runs, later ones wait in a queue and reading pauses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httptools
from twisted.internet import protocol
from twisted.python.failure import Failure

from strangler.proxy.exchange import Exchange
from strangler.proxy.headers import is_trusted
from strangler.proxy.transports import hold_writes, release_writes

if TYPE_CHECKING:
    from strangler.gateway import Gateway
    from strangler.proxy.upstream import UpstreamConnection
    from strangler.twisted_types import ProxyTransport, Timer

IDLE_TIMEOUT = 60.0
_NO_HEADERS: tuple[tuple[bytes, bytes, bytes], ...] = ()


class _RequestRejected(Exception):
    """Raised inside a parser callback to stop parsing after an error reply."""


class ClientConnection(protocol.Protocol):
    """One client connection, possibly carrying many keep-alive requests."""

    PAUSE_PIPELINE = 1
    PAUSE_UPSTREAM = 2
    PAUSE_BUFFER = 4
    PAUSE_UPGRADE = 8

    # Twisted types this `ITransport | None`; the gateway only reads and writes
    # while connected, through the methods `ProxyTransport` names.
    transport: ProxyTransport  # type: ignore[assignment]

    def __init__(self, gateway: Gateway, scheme: bytes = b"http") -> None:
        self.gateway = gateway
        self.scheme = scheme
        self.parser = httptools.HttpRequestParser(self)
        self.peer_host = ""
        self.trusted = False
        self.current: Exchange | None = None
        self.incoming: Exchange | None = None
        # Pipelined requests waiting their turn; a list, not a deque: it is
        # almost always empty, and an empty deque costs 760 bytes a connection.
        self.queue: list[Exchange] = []
        self.paused = 0
        self.closed = False
        self.tunnel: UpstreamConnection | None = None
        self.upgrade_buffer: list[bytes] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes, bytes]] = []
        self._head_size = 0
        self._max_headers = 0
        self._max_head = 0
        self._head_raw = 0
        self._in_head = False
        self._timer: Timer | None = None
        self._head_started = 0.0
        self._idle_since = 0.0
        self._body_read_at = 0.0
        self._begun = False

    # -- Twisted protocol -------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        transport.setTcpNoDelay(True)
        self.peer_host = transport.getPeer().host
        self.trusted = is_trusted(self.peer_host, self.gateway.rules.trusted_proxies)
        self.gateway.connections.add(self)
        # The first request's head is timed from the connection's start.
        self._idle_since = self._head_started = self.gateway.reactor.seconds()
        self._arm_timer(self._timer_period())

    def dataReceived(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        if self.upgrade_buffer is not None:
            self.upgrade_buffer.append(data)
            self.pause_reading(self.PAUSE_UPGRADE)
            return
        if self.closed:
            return
        hold_writes()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgrade_buffer = [data[upgrade.args[0] :]]
        except httptools.HttpParserCallbackError:
            if not self.closed:
                raise
        except httptools.HttpParserError as exc:
            self._malformed(str(exc))
        finally:
            release_writes()
        if self.incoming is not None:
            # A body is on its way: `client_body_timeout` runs from this read.
            self._body_read_at = self.gateway.reactor.seconds()
        if self._in_head:
            # A backstop for what `on_header` cannot see yet: one header line
            # still growing. It counts raw bytes, so it is deliberately generous.
            self._head_raw += len(data)
            limit = self.gateway.rules.limits.max_header_bytes
            if self._head_raw > limit * 2 + 65536 and not self.closed:
                self._refuse(431, "header_too_large", "request head is too large")

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        self._cancel_timer()
        self.gateway.connections.discard(self)
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.user = None
            tunnel.transport.loseConnection()
        current, self.current = self.current, None
        if current is not None:
            current.client_lost()
        if self.incoming is not None and self.incoming is not current:
            self.incoming.client_lost()
        while self.queue:
            self.queue.pop(0).client_lost()

    # -- flow control (this object is also the producer for the upstream side) ---

    def pause_reading(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pauseProducing()
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.pause_reading(self.PAUSE_UPSTREAM)

    def resumeProducing(self) -> None:
        self.resume_reading(self.PAUSE_UPSTREAM)

    def stopProducing(self) -> None:
        """The upstream side went away; the exchange handles that itself."""

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closed:
            # Answered with a close: requests pipelined behind are never read.
            raise _RequestRejected()
        if self._begun:
            self._head_started = self.gateway.reactor.seconds()
        else:
            self._begun = True
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._head_raw = 0
        self._in_head = True
        # Read once per request, not once per header; a reload applies from
        # the next request on.
        limits = self.gateway.rules.limits
        self._max_headers = limits.max_headers
        self._max_head = limits.max_header_bytes

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.gateway.rules.limits.max_header_bytes:
            self._refuse(414, "uri_too_long", "request target is too long")
            raise _RequestRejected()

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        headers.append((name.lower(), name, value))
        self._head_size += len(name) + len(value) + 4
        if len(headers) > self._max_headers or self._head_size > self._max_head:
            limits = self.gateway.rules.limits
            if len(headers) > limits.max_headers:
                self._refuse(431, "too_many_headers", "request has too many headers")
            else:
                self._refuse(431, "header_too_large", "request headers are too large")
            raise _RequestRejected()

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        version = parser.get_http_version()
        http11 = version == "1.1"
        if not http11 and version != "1.0":
            # llhttp also reads `HTTP/2.0` and HTTP/0.9's bare `GET /`; neither
            # can be relayed faithfully as HTTP/1.1 (docs/proxy.md).
            self._refuse(
                505,
                "http_version_not_supported",
                f"the gateway speaks HTTP/1.0 and HTTP/1.1, not HTTP/{version}",
            )
            raise _RequestRejected()
        exchange = Exchange(
            self,
            parser.get_method(),
            self._url,
            self._headers,
            http11,
            parser.should_keep_alive(),
            parser.should_upgrade(),
        )
        # The exchange owns the head now; an idle connection keeps none of it.
        self._url = b""
        self._headers = _NO_HEADERS  # type: ignore[assignment]
        self.incoming = exchange
        if self.current is None:
            self.current = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            self.pause_reading(self.PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        if self.incoming is not None:
            self.incoming.request_body(body)

    def on_message_complete(self) -> None:
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            incoming.request_complete()

    # -- called by exchanges -------------------------------------------------------

    def exchange_done(self, exchange: Exchange) -> None:
        """An exchange finished its response; close or move on to the next request."""
        if exchange is not self.current or not exchange.request_done:
            if not exchange.keep_alive and exchange is self.current:
                self._close()
            return
        self.current = None
        if not exchange.keep_alive or self.closed:
            self._close()
            return
        if self.queue:
            nxt = self.queue.pop(0)
            self.current = nxt
            if not self.queue:
                self.resume_reading(self.PAUSE_PIPELINE)
            nxt.start()
            if nxt.request_done and nxt.finished:
                return
        else:
            now = self._idle_since = self.gateway.reactor.seconds()
            if self._in_head:
                # The next head began while this answer was being sent: time it
                # from now, since the client was waiting for us until now.
                self._head_started = now

    def start_tunnel(self, conn: UpstreamConnection, extra: bytes) -> None:
        """Become a raw two-way pipe to `conn` (after a 101 Switching Protocols)."""
        self.tunnel = conn
        self.current = None
        conn.user = self  # type: ignore[assignment]
        buffered = self.upgrade_buffer or []
        self.upgrade_buffer = None
        if extra:
            self.transport.write(extra)
        for piece in buffered:
            if piece:
                conn.transport.write(piece)
        self.resume_reading(self.PAUSE_UPGRADE)
        if self.transport.producer is not None:
            self.transport.unregisterProducer()
        self.transport.registerProducer(conn, True)
        if conn.transport.producer is None:
            conn.transport.registerProducer(self, True)

    def tunnel_data(self, data: bytes) -> None:
        self.transport.write(data)

    def tunnel_closed(self) -> None:
        self.tunnel = None
        self.transport.loseConnection()

    # -- internals ----------------------------------------------------------------

    def _malformed(self, detail: str) -> None:
        if self.closed:
            return
        self._refuse(400, "bad_request", f"malformed request: {detail}")

    def _refuse(self, status: int, error: str, message: str) -> None:
        """Answer an unparseable or over-limit request and close the connection."""
        if self.closed:
            return
        self.closed = True
        current = self.current
        if current is not None and not current.response_started:
            current.reject(status, error, message)
        elif current is None:
            record = Exchange(self, b"-", self._url, [], True, False, False)
            record.request_done = True
            record.reject(status, error, message)
        self._close()

    def _close(self) -> None:
        self.closed = True
        self._cancel_timer()
        self.transport.loseConnection()

    def _arm_timer(self, seconds: float) -> None:
        self._timer = self.gateway.reactor.callLater(seconds, self._check_timeouts)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timer_period(self) -> float:
        limits = self.gateway.rules.limits
        return min(limits.client_header_timeout, limits.client_body_timeout)

    def _check_timeouts(self) -> None:
        """One lazy timer per connection, not one per request: see what is overdue.

        A request head must be in within `client_header_timeout` of its first
        byte, or, for the first request, of the connection's start (so a
        client that connects and sends nothing is not held either). A request
        body may pause at most `client_body_timeout` between two reads. Both
        get 408 and a close. A keep-alive connection with nothing in flight is
        closed once idle for `IDLE_TIMEOUT`. While the gateway itself holds
        reading back (a slow upstream, a pipelined request) the client is not
        timed. The timer wakes at least once a period (the shorter of the two
        timeouts), so a deadline that begins between two wake-ups is still
        caught on time.
        """
        self._timer = None
        if self.closed or self.tunnel is not None:
            return
        now = self.gateway.reactor.seconds()
        limits = self.gateway.rules.limits
        period = self._timer_period()
        if self._in_head:
            if self.current is not None:
                # Pipelined behind a request still being answered: the head is
                # timed from the end of that answer (see `exchange_done`).
                remaining = period
            else:
                remaining = self._head_started + limits.client_header_timeout - now
                if remaining <= 0:
                    self._refuse(
                        408, "request_timeout", "request headers not received in time"
                    )
                    return
        elif self.incoming is not None:
            if self.paused:
                self._body_read_at = now
            remaining = self._body_read_at + limits.client_body_timeout - now
            if remaining <= 0:
                self._body_timed_out(self.incoming)
                return
        elif self.current is not None:
            remaining = period
        elif not self._begun:
            remaining = self._head_started + limits.client_header_timeout - now
            if remaining <= 0:
                self._refuse(408, "request_timeout", "no request received in time")
                return
        else:
            remaining = self._idle_since + IDLE_TIMEOUT - now
            if remaining <= 0:
                self._close()
                return
        self._arm_timer(min(remaining, period))

    def _body_timed_out(self, exchange: Exchange) -> None:
        """The client stopped sending its body: 408, close, and drop the upstream.

        The upstream is not blamed: no upstream failure is counted, so outlier
        ejection and migration rollback never see a slow client.
        """
        self.incoming = None
        exchange.cut_request(
            408, "request_timeout", "request body not received in time"
        )
        self._close()


class GatewayFactory(protocol.ServerFactory):
    """Builds a `ClientConnection` per accepted client."""

    noisy = False

    def __init__(self, gateway: Gateway, scheme: bytes = b"http") -> None:
        self.gateway = gateway
        self.scheme = scheme

    def buildProtocol(self, addr: Any) -> ClientConnection:
        conn = ClientConnection(self.gateway, self.scheme)
        conn.factory = self
        return conn

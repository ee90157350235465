"""One request's trip through the gateway: route, pick, relay, record.

An `Exchange` is created when a request's head has been parsed. It decides
the route and branch, builds the upstream request head in one pass over the
client's headers, relays the body both ways as it streams (re-framing
chunked bodies, never buffering beyond what a slow peer forces), and writes
one access-log record at the end. Failures before the response head reached
the client become a short JSON 502/504; after that the client connection is
closed, so a truncated body is never passed off as complete.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import httptools
import structlog
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from strangler.errors import (
    ResponseTransformError,
    UpstreamBadStatus,
    UpstreamConnectError,
    UpstreamError,
)
from strangler.proxy import headers as hdr
from strangler.proxy.header_edits import edit_request, edit_response
from strangler.proxy.hooks import ShadowTap, Verdict
from strangler.proxy.redirects import restore_location
from strangler.proxy.responses import error_response
from strangler.security.identity import claims_identity
from strangler.security.paths import (
    PathError,
    normalise_path,
    rewrite_path,
    routing_path,
)
from strangler.security.request_head import framing_problem, host_problem
from strangler.stickiness import new_cookie_key, set_cookie_header, sticky_key
from strangler.transforms import TransformError, pipeline

if TYPE_CHECKING:
    from strangler.balancing import TargetState
    from strangler.gateway import Branch, GatewayState, RoutePlan, UpstreamRuntime
    from strangler.model import Rewrite, Transform
    from strangler.proxy.downstream import ClientConnection
    from strangler.proxy.upstream import TargetPool, UpstreamConnection

NO_BODY, LENGTH, CHUNKED = 0, 1, 2
REPLAY_LIMIT = 64 * 1024
PENDING_PAUSE = 64 * 1024
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_NO_BODY_STATUS = frozenset({204, 304})
_UNDERSCORE = 0x5F  # an int: `int in bytes` skips the buffer protocol, `b"_"` not
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_DROP_FROM_RESPONSE = frozenset({b"x-request-id"})
_PASS_ON_101 = frozenset({b"upgrade", b"connection"})
# An answer body this small is relayed without registering back-pressure.
_SMALL_BODY = 65536
# `Connection` tokens that name no header: nothing to take out for them.
_PLAIN_CONNECTION_TOKENS = frozenset({b"", b"close", b"keep-alive"})
_REPLACED_BY_TRANSFORM = frozenset(
    {b"content-type", b"content-length", b"transfer-encoding", b"content-encoding"}
)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

log = structlog.get_logger("strangler.proxy")


def _as_converted(transform: Transform, headers: hdr.Headers) -> hdr.Headers:
    """A HEAD answer's headers as the converted GET answer would carry them.

    The converted length is unknown without the body, so `Content-Length`
    goes; the type is what the conversion writes.
    """
    kept = [(n, v) for n, v in headers if n.lower() not in _REPLACED_BY_TRANSFORM]
    kept.append((b"Content-Type", pipeline.response_content_type(transform)))
    return kept


def _find(headers: hdr.Headers, lname: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == lname:
            return value
    return None


class Exchange:
    """A single request/response pair between one client and one upstream."""

    __slots__ = (
        "attempts",
        "body_kind",
        "body_limit",
        "branch",
        "bytes_in",
        "bytes_out",
        "client",
        "conn",
        "consumer",
        "content_length",
        "decision",
        "error",
        "extra_response_headers",
        "failed_targets",
        "fell_back_from",
        "finished",
        "forwarded",
        "head_bytes",
        "headers",
        "holding",
        "host",
        "http11",
        "keep_alive",
        "kept",
        "method",
        "path",
        "pending",
        "pending_size",
        "plan",
        "pool",
        "query",
        "replay",
        "request_buffer",
        "request_done",
        "request_id",
        "response_buffer",
        "response_chunked",
        "response_saved",
        "response_started",
        "retried_stale",
        "retries_used",
        "set_cookie",
        "started_at",
        "state",
        "status",
        "streamed",
        "tap",
        "target",
        "upgrade",
        "upload_mark",
        "upstream_target",
        "url",
        "wire_path",
    )

    def __init__(
        self,
        client: ClientConnection,
        method: bytes,
        url: bytes,
        headers: list[tuple[bytes, bytes, bytes]],
        http11: bool,
        keep_alive: bool,
        upgrade: bool,
    ) -> None:
        self.client = client
        self.method = method
        self.url = url
        self.headers = headers
        self.http11 = http11
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.started_at = time.monotonic()
        self.state: GatewayState = client.gateway.state
        client.gateway.metrics.in_flight += 1
        self.body_kind = NO_BODY
        self.body_limit: int | None = None
        self.content_length = 0
        self.request_id = ""
        self.path = ""
        self.wire_path = b""
        self.query = b""
        self.host: bytes | None = None
        self.plan: RoutePlan | None = None
        self.branch: Branch | None = None
        self.target: TargetState | None = None
        self.pool: TargetPool | None = None
        self.conn: UpstreamConnection | None = None
        self.head_bytes = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.replay: list[bytes] | None = []
        self.streamed = False
        self.upload_mark = 0
        self.request_done = False
        self.response_started = False
        self.response_chunked = False
        self.finished = False
        self.retried_stale = False
        self.failed_targets: tuple[TargetState, ...] = ()
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.decision = ""
        self.error = ""
        self.set_cookie: tuple[bytes, bytes] | None = None
        self.kept: list[tuple[bytes, bytes, bytes]] = []
        self.forwarded: tuple[bytes, bytes, bytes | None, bytes] = (b"", b"", None, b"")
        self.upstream_target = b""
        self.request_buffer: list[bytes] | None = None
        self.response_buffer: list[bytes] | None = None
        self.response_saved: tuple[int, bytes, hdr.Headers] | None = None
        self.consumer: str | None = None
        self.extra_response_headers: list[tuple[bytes, bytes]] | None = None
        self.tap: ShadowTap | None = None
        self.attempts = 0
        self.retries_used = 0
        self.holding: UpstreamRuntime | None = None
        self.fell_back_from: str | None = None

    # -- the request ------------------------------------------------------------

    def start(self) -> None:
        """Route the request and begin sending it upstream."""
        head = self._build_upstream_head()
        if head is None:
            return
        self.head_bytes = head
        if not self._body_within_limit():
            return
        gate = self.state.gate
        if gate is not None:
            verdict = gate.check(self)
            if isinstance(verdict, Deferred):
                verdict.addCallback(self._gate_decided)
                verdict.addErrback(self._gate_broke)
                return
            if not self._apply_verdict(verdict):
                return
        self._proceed()

    def _gate_decided(self, verdict: Verdict) -> None:
        if not self.finished and self._apply_verdict(verdict):
            self._proceed()

    def _gate_broke(self, failure: Failure) -> None:
        log.error(
            "gate_failed", request_id=self.request_id, error=failure.getErrorMessage()
        )
        if not self.finished:
            self.reject(503, "gate_unavailable", "the request could not be checked")

    def _apply_verdict(self, verdict: Verdict) -> bool:
        """Refuse the request, or add the identity headers the gate vouches for."""
        self.consumer = verdict.consumer
        if not verdict.allowed:
            self.reject(
                verdict.status, verdict.error, verdict.message, verdict.response_headers
            )
            return False
        if verdict.strip or verdict.upstream_headers:
            strip = verdict.strip
            kept = [e for e in self.kept if not claims_identity(e[0], strip)]
            for name, value in verdict.upstream_headers:
                kept.append((name.lower(), name, value))
            self.kept = kept
            self.head_bytes = self._render_head()
        if verdict.response_headers:
            self.extra_response_headers = verdict.response_headers
        return True

    def _proceed(self) -> None:
        """Past the gate: start a shadow copy, then transform or send."""
        plan = self.plan
        assert plan is not None and self.branch is not None
        if plan.shadow is not None:
            self.tap = plan.shadow.tap(self)
        self._edit_request_headers()
        transform = self.branch.entry.transform
        if transform is not None and pipeline.converts_responses(transform):
            # The body must arrive uncompressed to be converted.
            self.kept = [e for e in self.kept if e[0] != b"accept-encoding"]
            self.head_bytes = self._render_head()
        if (
            transform is not None
            and self.body_kind != NO_BODY
            and pipeline.converts_request(transform, self.header_value(b"content-type"))
        ):
            self._buffer_request(transform.max_body)
            return
        self._send_to_target()

    def _edit_request_headers(self) -> None:
        branch, plan = self.branch, self.plan
        assert branch is not None and plan is not None
        rules = branch.entry.headers
        if rules is None or rules.request is None:
            return
        self.kept = edit_request(
            self.kept, rules.request, plan.name, branch.entry.to, self.header_value
        )
        self.head_bytes = self._render_head()

    def _buffer_request(self, max_body: int) -> None:
        """Hold the whole body for a request transform, refusing oversize early.

        The gateway answers `Expect: 100-continue` itself: the upstream sees
        the request only once the converted body is ready, so it cannot.
        """
        if self.body_kind == LENGTH and self.content_length > max_body:
            self.reject(413, "body_too_large", f"request body is over {max_body} bytes")
            return
        self.request_buffer = [p for p in self.pending if p is not _LAST_CHUNK]
        self.pending = []
        self.pending_size = 0
        self.client.resume_reading(self.client.PAUSE_BUFFER)
        expect = self.header_value(b"expect")
        if expect is not None and expect.strip().lower() == b"100-continue":
            self.kept = [e for e in self.kept if e[0] != b"expect"]
            if self.http11 and not self.request_done and not self.bytes_in:
                self.client.transport.write(_CONTINUE)
        if self.request_done:
            self._transform_request()

    def _transform_request(self) -> None:
        """Convert the held body, inline or in a worker thread when it is large."""
        assert self.branch is not None and self.request_buffer is not None
        transform = self.branch.entry.transform
        assert transform is not None
        body = b"".join(self.request_buffer)
        self.request_buffer = None
        try:
            converted = self.client.gateway.conversions.run(
                lambda data: pipeline.convert_request(transform, data), body
            )
        except TransformError as exc:
            self._request_conversion_refused(exc)
            return
        if isinstance(converted, Deferred):
            converted.addCallbacks(
                self._request_converted, self._request_conversion_failed
            )
            return
        self._request_converted(converted)

    def _request_conversion_refused(self, exc: TransformError) -> None:
        if exc.status == 503:
            self.reject(503, "transform_busy", exc.message, [(b"Retry-After", b"1")])
            return
        self.reject(exc.status, "request_transform_failed", exc.message)

    def _request_conversion_failed(self, failure: Failure) -> None:
        if self.finished:
            return  # the client left while the body was converting
        if failure.check(TransformError):
            self._request_conversion_refused(failure.value)
            return
        log.error(
            "request_transform_crashed",
            request_id=self.request_id,
            route=self.plan.name if self.plan is not None else None,
            error=failure.getErrorMessage(),
        )
        self.reject(500, "internal_error", "the request body could not be converted")

    def _request_converted(self, converted: bytes) -> None:
        if self.finished:
            return  # the client left while the body was converting
        assert self.branch is not None and self.branch.entry.transform is not None
        content_type = pipeline.request_content_type(self.branch.entry.transform)
        self.kept = [e for e in self.kept if e[0] != b"content-type"]
        self.kept.append((b"content-type", b"Content-Type", content_type))
        self.body_kind = LENGTH
        self.content_length = len(converted)
        self.pending = [converted]
        self.replay = [converted]
        self.head_bytes = self._render_head()
        self._send_to_target()

    def _build_upstream_head(self) -> bytes | None:
        client = self.client
        request_id = None
        forwarded_for = forwarded_proto = forwarded_host = None
        hosts = 0
        connection_tokens: set[bytes] | None = None
        upgrade_value = b""
        kept: list[tuple[bytes, bytes, bytes]] = []

        for entry in self.headers:
            lname = entry[0]
            if lname in hdr.HOP_BY_HOP:
                if lname == b"content-length":
                    self.body_kind = LENGTH
                    self.content_length = int(entry[2])
                elif lname == b"transfer-encoding":
                    self.body_kind = CHUNKED
                elif lname == b"connection":
                    if connection_tokens is None:
                        connection_tokens = set()
                    for token in entry[2].lower().split(b","):
                        connection_tokens.add(token.strip())
                elif lname == b"upgrade":
                    upgrade_value = entry[2]
                continue
            if lname == b"host":
                hosts += 1
                self.host = entry[2]
            elif lname == b"x-forwarded-for":
                forwarded_for = (
                    entry[2]
                    if forwarded_for is None
                    else (forwarded_for + b", " + entry[2])
                )
                continue
            elif lname == b"x-forwarded-proto":
                forwarded_proto = entry[2]
                continue
            elif lname == b"x-forwarded-host":
                forwarded_host = entry[2]
                continue
            elif lname == b"x-request-id":
                request_id = entry[2]
                continue
            elif lname.startswith(b"proxy-") or lname == b"x-strangler-shadow":
                # Only the gateway marks mirrored copies; a client cannot.
                continue
            elif _UNDERSCORE in lname and hdr.gateway_managed(lname):
                # `X_Forwarded_For` reads as HTTP_X_FORWARDED_FOR to CGI, WSGI
                # and PHP, the same as the header the gateway writes.
                continue
            kept.append(entry)

        if request_id is not None and hdr.valid_request_id(request_id):
            self.request_id = request_id.decode("ascii")
        else:
            self.request_id = hdr.new_request_id()

        if hosts != 1 and (self.http11 or hosts > 1):
            problem = (
                "missing Host header" if hosts == 0 else "more than one Host header"
            )
            self.reject(400, "bad_request", problem)
            return None
        if self.method == b"CONNECT":
            self.keep_alive = False
            self.reject(405, "method_not_allowed", "CONNECT is not proxied")
            return None
        if not self._split_target():
            return None

        # Forwarding comes before routing: `ip_hash` and `sticky: {by: ip}`
        # key on the client address, which behind a trusted proxy is in
        # `X-Forwarded-For`.
        peer = client.peer_host.encode("latin-1")
        if not client.trusted:
            forwarded_for = peer
            forwarded_proto = forwarded_host = None
        elif forwarded_for is not None:
            forwarded_for = forwarded_for + b", " + peer
        else:
            forwarded_for = peer
        if forwarded_proto is None:
            forwarded_proto = client.scheme
        if forwarded_host is None and self.host is not None:
            forwarded_host = self.host
        self.forwarded = (forwarded_for, forwarded_proto, forwarded_host, upgrade_value)

        plan = self.state.router.match(
            self.method.decode("latin-1"),
            self.path,
            self.host.decode("latin-1") if self.host is not None else None,
            self._header_text,
        )
        self.plan = self.state.plan_for(plan)
        self.branch = self._choose_branch(self.plan)

        target = self.upstream_path(self.branch.entry.rewrite)
        if self.query:
            target += b"?" + self.query
        if connection_tokens is not None:
            # `Connection` names the client's own hop-by-hop headers; it can never
            # take away the Host the upstream routes on.
            connection_tokens.discard(b"host")
            kept = [entry for entry in kept if entry[0] not in connection_tokens]
        self.kept = kept
        self.upstream_target = target
        return self._render_head()

    def _render_head(self) -> bytes:
        """The upstream request head from the decisions `_build_upstream_head` made."""
        forwarded_for, forwarded_proto, forwarded_host, upgrade_value = self.forwarded
        parts = [self.method, b" ", self.upstream_target, b" HTTP/1.1\r\n"]
        for _lname, name, value in self.kept:
            parts += (name, b": ", value, _CRLF)
        parts += (b"X-Forwarded-For: ", forwarded_for, _CRLF)
        parts += (b"X-Forwarded-Proto: ", forwarded_proto, _CRLF)
        if forwarded_host is not None:
            parts += (b"X-Forwarded-Host: ", forwarded_host, _CRLF)
        parts += (b"X-Request-Id: ", self.request_id.encode("ascii"), _CRLF)
        if self.host is None and self.target is not None:
            # An HTTP/1.0 client sent no Host; HTTP/1.1 upstreams need one.
            parts += (b"Host: ", self.target.target.authority.encode("ascii"), _CRLF)
        if self.body_kind == LENGTH:
            parts.append(b"Content-Length: %d\r\n" % self.content_length)
        elif self.body_kind == CHUNKED:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if self.upgrade and upgrade_value:
            parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade_value, _CRLF)
        parts.append(_CRLF)
        return b"".join(parts)

    def _split_target(self) -> bool:
        """Separate path and query; an absolute-form target keeps only its path.

        The Host and chunked framing are checked first, and the path is
        normalised (strangler.security.paths) before anything routes on it.
        """
        problem = host_problem(self.host)
        if problem is None and self.body_kind == CHUNKED:
            problem = framing_problem(
                self.header_value(b"transfer-encoding"), self.http11
            )
        if problem is not None:
            self.reject(400, "bad_request", problem)
            return False
        url = self.url
        if url[:1] != b"/":
            if url == b"*" and self.method == b"OPTIONS":
                self.path = "*"
                self.wire_path = url
                return True
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                parsed = None
            if parsed is None or not parsed.path or parsed.path[:1] != b"/":
                self.reject(400, "bad_request", "request target must be a path")
                return False
            url = parsed.path + (b"?" + parsed.query if parsed.query else b"")
        path, _, query = url.partition(b"?")
        path = path.partition(b"#")[0]
        try:
            wire = normalise_path(path)
        except PathError as exc:
            self.reject(400, "bad_request", str(exc))
            return False
        self.wire_path = wire
        # A path returned as it came has no escapes or parameters to read.
        routed = wire if wire is path else routing_path(wire)
        self.path = routed.decode("latin-1")
        self.query = query.partition(b"#")[0]
        return True

    def upstream_path(self, rewrite: Rewrite | None) -> bytes:
        """The path the upstream receives, after `rewrite` if there is one.

        Without a rewrite that is the client's path as sent (dot segments
        resolved, see strangler.security.paths).
        """
        if rewrite is None:
            return self.wire_path
        return rewrite_path(rewrite, self.wire_path, self.path)

    def _body_within_limit(self) -> bool:
        """Refuse a declared body over `max_body` at once; a chunked one is counted."""
        route = self.plan.route if self.plan is not None else None
        limit = route.max_body if route is not None else None
        if limit is None:
            limit = self.state.rules.limits.max_body
        if limit is None or self.body_kind == NO_BODY:
            return True
        if self.body_kind == LENGTH and self.content_length > limit:
            self.reject(413, "body_too_large", f"request body is over {limit} bytes")
            return False
        if self.body_kind == CHUNKED:
            self.body_limit = limit
        return True

    def _body_too_large(self) -> None:
        """A chunked body passed `max_body`: drop the upstream, answer 413, close."""
        limit = self.body_limit
        self.cut_request(413, "body_too_large", f"request body is over {limit} bytes")

    def cut_request(self, status: int, error: str, message: str) -> None:
        """Stop reading a request whose body went wrong on the client's side.

        The upstream connection is aborted (the request it got is incomplete)
        and the client gets `status`, or, when a response has already begun,
        a closed connection. Nothing is counted against the upstream.
        """
        if self.finished:
            return
        self.body_limit = None
        conn = self.conn
        self._release_upstream()
        if conn is not None:
            conn.abort()
        self.keep_alive = False
        self.request_buffer = None
        if self.response_started:
            self.error = error
            self._finish()
            return
        self.reject(status, error, message)

    def _header_text(self, name: str) -> str | None:
        found = self.header_value(name.encode("latin-1"))
        return found.decode("latin-1") if found is not None else None

    def header_value(self, lname: bytes) -> bytes | None:
        """The first value of a request header, by lower-case name."""
        for entry in self.headers:
            if entry[0] == lname:
                return entry[2]
        return None

    def _choose_branch(self, plan: RoutePlan) -> Branch:
        branches = plan.branches
        if len(branches) == 1:
            return branches[0]
        if plan.override_header is not None:
            forced = self.header_value(plan.override_header)
            if forced is not None:
                index = plan.by_upstream.get(forced.decode("latin-1").strip())
                if index is not None:
                    self.decision = "override"
                    return branches[index]
        splitter = plan.splitter
        assert splitter is not None
        sticky = plan.sticky
        if sticky is not None:
            key = sticky_key(
                sticky,
                self.header_value,
                self.client_address() if sticky.by == "ip" else "",
            )
            if key is None and sticky.by == "cookie":
                key = new_cookie_key()
                self.set_cookie = set_cookie_header(sticky, key)
            if key is not None:
                self.decision = "sticky"
                return branches[splitter.pick_sticky(key)]
        self.decision = "random"
        return branches[splitter.pick_random()]

    def client_address(self) -> str:
        """Who the client is for `ip_hash` and `sticky: {by: ip}`.

        The same address `rate_limit: {per: ip}` uses: the TCP peer, or
        behind a trusted proxy the right-most untrusted `X-Forwarded-For`
        entry; IPv6 clients count by their /64.
        """
        client = self.client
        return self.state.client_addresses.of(
            client.peer_host, client.trusted, self.forwarded[0]
        )

    def _send_to_target(self) -> None:
        """Take a slot on the branch's upstream (circuit breaking), then a target.

        A branch with a `fallback` whose targets are all out of rotation goes
        to the fallback at once instead of panic routing to them.
        """
        branch = self.branch
        assert branch is not None and self.plan is not None
        if (
            self.plan.fallbacks
            and self.fell_back_from is None
            and not branch.upstream.any_available(self.failed_targets)
            and self._fall_back("unavailable", sent=False)
        ):
            return
        if branch.upstream.admit(self):
            self.admitted()

    def admitted(self) -> None:
        """A slot on the upstream is ours: pick a target and get a connection."""
        branch = self.branch
        assert branch is not None
        upstream = self.holding = branch.upstream
        try:
            self.target, self.pool = upstream.pick(
                self.client_address() if upstream.balancer.by_client else None,
                self.failed_targets,
            )
        except UpstreamError as exc:
            self.upstream_failed(exc, False)
            return
        if self.host is None:
            self.head_bytes = self._render_head()
        self.target.active += 1
        if not self.attempts:
            branch.upstream.retry_budget.deposit()
        self.attempts += 1
        # Only a request that must not run twice pays for checking that an
        # idle connection is still open (and the one retry after a stale one).
        self.pool.acquire(
            self,
            branch.connect_timeout,
            self.retried_stale or self.method not in IDEMPOTENT,
        )

    def overloaded(self, upstream: str) -> None:
        """The upstream is at `max_connections` with a full queue: 503 now."""
        self.reject(
            503,
            "upstream_overloaded",
            f"upstream {upstream} is at its connection limit",
            [(b"Retry-After", b"1")],
        )

    def request_body(self, data: bytes) -> None:
        """A piece of the client's body (already de-chunked by the parser)."""
        self.bytes_in += len(data)
        if self.finished:
            return
        if self.body_limit is not None and self.bytes_in > self.body_limit:
            self._body_too_large()
            return
        if self.tap is not None:
            self.tap.request_body(data)
        buffer = self.request_buffer
        if buffer is not None:
            buffer.append(data)
            assert self.branch is not None and self.branch.entry.transform is not None
            limit = self.branch.entry.transform.max_body
            if self.bytes_in > limit:
                self.request_buffer = None
                self.reject(
                    413, "body_too_large", f"request body is over {limit} bytes"
                )
            return
        replay = self.replay
        if replay is not None:
            if self.bytes_in <= REPLAY_LIMIT:
                replay.append(data)
            elif self.conn is None and self.streamed:
                # A retry is connecting and will resend from `replay`; `pending`
                # pauses the client, so this grows by at most PENDING_PAUSE.
                replay.append(data)
            else:
                self.replay = None
        conn = self.conn
        if conn is None:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > PENDING_PAUSE:
                self.client.pause_reading(self.client.PAUSE_BUFFER)
            return
        if self.body_kind == CHUNKED:
            conn.transport.writeSequence((b"%x\r\n" % len(data), data, _CRLF))
        else:
            conn.transport.write(data)

    def request_complete(self) -> None:
        """The client's request, body included, has been read entirely."""
        self.request_done = True
        if self.finished:
            self.client.exchange_done(self)
            return
        if self.tap is not None:
            self.tap.request_complete()
        if self.request_buffer is not None:
            self._transform_request()
            return
        conn = self.conn
        if self.body_kind == CHUNKED:
            if conn is None:
                self.pending.append(_LAST_CHUNK)
            else:
                conn.transport.write(_LAST_CHUNK)
        if conn is not None and self.body_kind != NO_BODY:
            conn.request_sent()

    # -- driven by the upstream connection ---------------------------------------

    def attach(self, conn: UpstreamConnection) -> None:
        """A connection is ready: send the head and whatever body has arrived."""
        if self.finished:
            assert self.pool is not None
            self.pool.release(conn)
            return
        self.conn = conn
        data = self.head_bytes
        if self.body_kind != NO_BODY:
            data = self._with_body(data)
        assert self.branch is not None
        conn.send(
            self,
            data,
            self.branch.timeout,
            self.branch.idle_timeout,
            self.method == b"HEAD",
            self.request_done or self.body_kind == NO_BODY,
        )
        if not self.request_done and self.body_kind != NO_BODY:
            self.upload_mark = self.bytes_in
            conn.transport.registerProducer(self.client, True)

    def _with_body(self, head: bytes) -> bytes:
        """The head and the body so far, for a connection that has just attached.

        The first connection gets what waited in `pending`; a retry or a
        fallback gets the whole body again from `replay` (the retry paths
        check that it is still held), re-framed when it is chunked.
        """
        client = self.client
        if self.streamed:
            assert self.replay is not None
            pieces = list(self.replay)
            if self.request_done and self.body_kind == CHUNKED:
                pieces.append(_LAST_CHUNK)
            # The connection that failed may have paused the client for good.
            client.resume_reading(client.PAUSE_UPSTREAM)
        else:
            pieces = self.pending
        self.streamed = True
        self.pending = []
        self.pending_size = 0
        client.resume_reading(client.PAUSE_BUFFER)
        if not pieces:
            return head
        if self.body_kind == CHUNKED:
            framed = []
            for piece in pieces:
                if piece is _LAST_CHUNK:
                    framed.append(piece)
                else:
                    framed += (b"%x\r\n" % len(piece), piece, _CRLF)
            pieces = framed
        return b"".join([head, *pieces])

    def upload_blocked(self) -> bool:
        """Whether the upstream held the body back for a whole period.

        Asked by the connection's timer while the body is still streaming
        up: True when no byte arrived since the last time and the client is
        paused only because the upstream is not reading. A client that is
        merely slow, or stalls, is never the upstream's fault.
        """
        mark, self.upload_mark = self.upload_mark, self.bytes_in
        client = self.client
        return mark == self.bytes_in and bool(client.paused & client.PAUSE_UPSTREAM)

    def informational(self, status: int, reason: bytes, headers: hdr.Headers) -> None:
        """Relay `100 Continue` and friends to an HTTP/1.1 client."""
        if self.http11 and not self.finished:
            head = [b"HTTP/1.1 %d " % status, reason, _CRLF]
            head += hdr.serialize(hdr.end_to_end(headers))
            head.append(_CRLF)
            self.client.transport.write(b"".join(head))

    def response_head(self, status: int, reason: bytes, headers: hdr.Headers) -> None:
        """Write the client's status line and headers, choosing the framing."""
        if self.finished:
            return
        branch = self.branch
        if branch is not None and self.target is not None:
            if status >= 500:
                branch.upstream.outlier.failure(self.target)
                retry = self._may_retry("5xx")
                if retry or self._can_fall_back():
                    self._discard_and_retry(status, retry)
                    return
            else:
                branch.upstream.outlier.success(self.target)
        self.status = status
        no_body = self.method == b"HEAD" or status in _NO_BODY_STATUS or status == 101
        transform = self.branch.entry.transform if self.branch is not None else None
        if transform is not None and pipeline.converts_response(
            transform, _find(headers, b"content-type")
        ):
            if not no_body:
                self.response_saved = (status, reason, headers)
                self.response_buffer = []
                return
            if self.method == b"HEAD" and status not in _NO_BODY_STATUS:
                headers = _as_converted(transform, headers)
        self._write_response_head(status, reason, headers, no_body)

    def _can_fall_back(self) -> bool:
        plan, branch = self.plan, self.branch
        return (
            plan is not None
            and branch is not None
            and branch.entry.to in plan.fallbacks
            and self.fell_back_from is None
            and self.method in IDEMPOTENT
            and self._can_replay()
            and (self.body_kind == NO_BODY or branch.entry.transform is None)
        )

    def _discard_and_retry(self, status: int, retry: bool) -> None:
        """Drop a 5xx answer unseen and try again (policy retry or fallback)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            if conn.transport.producer is self.client:
                conn.transport.unregisterProducer()
            conn.abort()
        failed = self.target
        self._release_target()
        if retry:
            self._retry_elsewhere(failed)
            return
        if not self._fall_back("5xx"):
            self._answer_error(UpstreamBadStatus(f"upstream answered {status}"))

    def _write_response_head(
        self, status: int, reason: bytes, headers: hdr.Headers, no_body: bool
    ) -> None:
        self.response_started = True
        branch = self.branch
        if branch is not None and branch.entry.rewrite is not None:
            rewrite = branch.entry.rewrite
            if (
                rewrite.prefix is not None
                and rewrite.location
                and self.pool is not None
            ):
                headers = restore_location(
                    headers, rewrite, self.host, self.pool.state.target
                )
        if branch is not None and branch.entry.headers is not None:
            edits = branch.entry.headers.response
            if edits is not None and self.plan is not None:
                headers = edit_response(
                    headers, edits, self.plan.name, branch.entry.to, self.header_value
                )
        if self.tap is not None:
            self.tap.primary_head(status, headers)
        upstream_length = None
        upstream_chunked = False
        parts = [b"HTTP/1.1 %d " % status, reason, _CRLF]
        pass_through = _PASS_ON_101 if status == 101 else ()
        # One pass over the headers. Headers a `Connection` header names are
        # rare in answers: only then are they taken out, in a second pass.
        named: set[bytes] | None = None
        for name, value in headers:
            lname = name.lower()
            if lname in hdr.HOP_BY_HOP and lname not in pass_through:
                if lname == b"content-length":
                    upstream_length = value
                elif lname == b"transfer-encoding":
                    upstream_chunked = True
                elif lname == b"connection" and status != 101:
                    tokens = {token.strip() for token in value.lower().split(b",")}
                    tokens -= _PLAIN_CONNECTION_TOKENS
                    if tokens:
                        named = tokens if named is None else named | tokens
                continue
            if lname in _DROP_FROM_RESPONSE or lname.startswith(b"proxy-"):
                continue
            parts += (name, b": ", value, _CRLF)
        if named:
            parts = parts[:3]
            for name, value in headers:
                lname = name.lower()
                if not (
                    lname in hdr.HOP_BY_HOP
                    or lname in named
                    or lname in _DROP_FROM_RESPONSE
                    or lname.startswith(b"proxy-")
                ):
                    parts += (name, b": ", value, _CRLF)
        if no_body:
            if upstream_length is not None and status != 101:
                parts += (b"Content-Length: ", upstream_length, _CRLF)
        elif upstream_length is not None and not upstream_chunked:
            parts += (b"Content-Length: ", upstream_length, _CRLF)
        elif self.http11:
            self.response_chunked = True
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            self.keep_alive = False
        if (
            (self.upgrade and status != 101)
            or self.client.gateway.draining
            or not self.request_done
        ):
            # An answer before the client finished its body: the rest of the
            # body is never read, so the connection cannot carry another.
            self.keep_alive = False
        if status != 101:
            if not self.keep_alive:
                parts.append(b"Connection: close\r\n")
            elif not self.http11:
                parts.append(b"Connection: keep-alive\r\n")
        parts += (b"X-Request-Id: ", self.request_id.encode("ascii"), _CRLF)
        if self.state.rules.expose_decision:
            assert self.plan is not None and self.branch is not None
            parts += (b"X-Strangler-Route: ", self.plan.name.encode(), _CRLF)
            parts += (b"X-Strangler-Upstream: ", self.branch.entry.to.encode(), _CRLF)
        if self.set_cookie is not None:
            parts += (self.set_cookie[0], b": ", self.set_cookie[1], _CRLF)
        if self.extra_response_headers is not None:
            for name, value in self.extra_response_headers:
                parts += (name, b": ", value, _CRLF)
        parts.append(_CRLF)
        transport = self.client.transport
        transport.write(b"".join(parts))
        # A slow client pauses the upstream only for bodies that could fill
        # memory: one no larger than the transport's own buffer needs no
        # back-pressure, and skipping it saves two calls per small answer.
        if (
            not no_body
            and self.conn is not None
            and (
                upstream_length is None
                or upstream_chunked
                or len(upstream_length) > 5
                or int(upstream_length) > _SMALL_BODY
            )
        ):
            transport.registerProducer(self.conn, True)

    def response_body(self, data: bytes) -> None:
        if self.finished:
            return
        buffer = self.response_buffer
        if buffer is not None:
            buffer.append(data)
            assert self.branch is not None and self.branch.entry.transform is not None
            limit = self.branch.entry.transform.max_body
            if sum(map(len, buffer)) > limit:
                self.response_buffer = None
                conn, self.conn = self.conn, None
                if conn is not None:
                    conn.abort()
                self._response_unconvertible(f"response body is over {limit} bytes")
            return
        self.bytes_out += len(data)
        if self.tap is not None:
            self.tap.primary_body(data)
        if self.response_chunked:
            self.client.transport.writeSequence((b"%x\r\n" % len(data), data, _CRLF))
        else:
            self.client.transport.write(data)

    def response_complete(self) -> None:
        if self.finished:
            return
        if self.response_buffer is not None:
            self._release_upstream()
            self._transform_response()
            return
        if self.response_chunked:
            self.client.transport.write(_LAST_CHUNK)
        self._release_upstream()
        self._finish()

    def _transform_response(self) -> None:
        """Convert the held answer, inline or in a worker thread when it is large."""
        assert self.branch is not None and self.response_saved is not None
        transform = self.branch.entry.transform
        assert transform is not None
        assert self.response_buffer is not None
        body = b"".join(self.response_buffer)
        self.response_buffer = None
        try:
            # The upstream has answered, so the answer is never refused as busy.
            converted = self.client.gateway.conversions.run(
                lambda data: pipeline.convert_response(transform, data),
                body,
                may_refuse=False,
            )
        except TransformError as exc:
            self._response_unconvertible(exc.message)
            return
        if isinstance(converted, Deferred):
            converted.addCallbacks(
                self._response_converted, self._response_conversion_failed
            )
            return
        self._response_converted(converted)

    def _response_unconvertible(self, reason: str) -> None:
        """The upstream's answer cannot reach the client converted: log it, 502."""
        assert self.branch is not None
        log.error(
            "response_transform_failed",
            request_id=self.request_id,
            route=self.plan.name if self.plan is not None else None,
            upstream=self.branch.entry.to,
            reason=reason,
        )
        self.upstream_failed(
            ResponseTransformError(
                f"the upstream's answer could not be converted: {reason}"
            ),
            False,
        )

    def _response_conversion_failed(self, failure: Failure) -> None:
        if self.finished:
            return  # the client left while the answer was converting
        if failure.check(TransformError):
            self._response_unconvertible(failure.value.message)
            return
        self._response_unconvertible(f"internal error: {failure.getErrorMessage()}")

    def _response_converted(self, converted: bytes) -> None:
        if self.finished:
            return  # the client left while the answer was converting
        assert self.branch is not None and self.response_saved is not None
        transform = self.branch.entry.transform
        assert transform is not None
        status, reason, headers = self.response_saved
        headers = [
            (name, value)
            for name, value in headers
            if name.lower() not in _REPLACED_BY_TRANSFORM
        ]
        headers.append((b"Content-Type", pipeline.response_content_type(transform)))
        headers.append((b"Content-Length", b"%d" % len(converted)))
        self._write_response_head(status, reason, headers, False)
        self.bytes_out += len(converted)
        self.client.transport.write(converted)
        if self.tap is not None:
            self.tap.primary_body(converted)
        self._finish()

    def upstream_failed(self, error: UpstreamError, retryable: bool) -> None:
        """The upstream could not finish: retry, fall back, answer 502/504, or cut.

        `retryable` comes with a refused connection (nothing was sent) or
        with a reused connection that closed before any byte of the answer
        (the target may have closed it while it sat idle, but the request
        was written, so only an idempotent one is sent again).
        """
        if self.finished:
            return
        conn, self.conn = self.conn, None
        if conn is not None and conn.transport.producer is self.client:
            conn.transport.unregisterProducer()
        failed_target = self.target
        branch = self.branch
        if failed_target is not None and branch is not None and error.counts_as_failure:
            branch.upstream.outlier.failure(failed_target)
        self._release_target()
        if not self.response_started and branch is not None:
            unsent = retryable and isinstance(error, UpstreamConnectError)
            stale = retryable and not unsent
            if self._retry_after(error, unsent, stale, failed_target):
                return
            if self._fall_back(error.retry_kind, sent=not unsent):
                return
        self._answer_error(error)

    def _retry_after(
        self,
        error: UpstreamError,
        unsent: bool,
        stale: bool,
        failed: TargetState | None,
    ) -> bool:
        """Try again when it is safe: unsent requests always, others by policy."""
        assert self.branch is not None
        upstream = self.branch.upstream
        if unsent and self._can_resend():
            if failed is not None:
                # Nothing was sent, so another target costs the failed one nothing:
                # these retries are bounded by the target count, not the budget.
                self.failed_targets = (*self.failed_targets, failed)
                if len(self.failed_targets) < len(upstream.states):
                    upstream.retries += 1
                    self._send_to_target()
                    return True
            return False
        if (
            stale
            and not self.retried_stale
            and self.method in IDEMPOTENT
            and self._can_resend()
        ):
            self.retried_stale = True
            upstream.retries += 1
            self._send_to_target()
            return True
        if self._may_retry(error.retry_kind):
            self._retry_elsewhere(failed)
            return True
        return False

    def _retry_elsewhere(self, failed: TargetState | None) -> None:
        """A policy retry, on another target while there is one left to try."""
        assert self.branch is not None
        upstream = self.branch.upstream
        if failed is not None and len(self.failed_targets) + 1 < len(upstream.states):
            self.failed_targets = (*self.failed_targets, failed)
        self.retries_used += 1
        upstream.retries += 1
        self._send_to_target()

    def _may_retry(self, kind: str) -> bool:
        """Policy retries: configured, idempotent, replayable, and within budget."""
        plan = self.plan
        assert plan is not None and self.branch is not None
        policy = plan.route.retries if plan.route is not None else None
        return (
            policy is not None
            and kind in policy.retry_on
            and self.retries_used < policy.attempts
            and self.method in IDEMPOTENT
            and self._can_replay()
            and self.branch.upstream.retry_budget.spend()
        )

    def _fall_back(self, kind: str, sent: bool = True) -> bool:
        """Serve the request from the branch's `fallback` upstream instead.

        After a request was sent, only an idempotent one falls back; one
        that was never sent (its branch had no target in rotation, or none
        could be reached) falls back whatever its method.
        """
        plan = self.plan
        branch = self.branch
        assert plan is not None and branch is not None
        fallback = plan.fallbacks.get(branch.entry.to)
        if (
            fallback is None
            or self.fell_back_from is not None
            or kind not in ("connect", "timeout", "5xx", "unavailable")
            or (sent and self.method not in IDEMPOTENT)
            or not (self._can_replay() if sent else self._can_resend())
            or (self.body_kind != NO_BODY and branch.entry.transform is not None)
        ):
            return False
        branch.upstream.fallbacks += 1
        self.fell_back_from = branch.entry.to
        log.warning(
            "fallback_served",
            request_id=self.request_id,
            route=plan.name,
            failed=branch.entry.to,
            fallback=fallback.entry.to,
            reason=kind,
        )
        self.branch = fallback
        self.failed_targets = ()
        self.decision = "fallback"
        target = self.upstream_path(fallback.entry.rewrite)
        self.upstream_target = target + b"?" + self.query if self.query else target
        self.head_bytes = self._render_head()
        self._send_to_target()
        return True

    def _answer_error(self, error: UpstreamError) -> None:
        self.error = error.reason
        if self.response_started:
            self.keep_alive = False
            self._finish()
            return
        self.status = error.status
        message = str(error) or error.reason
        if not self.request_done:
            self.keep_alive = False
        self.client.transport.write(
            error_response(
                error.status,
                error.reason,
                message,
                self.request_id,
                close=not self.keep_alive,
                extra_headers=self._decision_headers(None),
            )
        )
        self._finish()

    def _decision_headers(
        self, extra: list[tuple[bytes, bytes]] | None
    ) -> list[tuple[bytes, bytes]]:
        """`extra`, plus the decision and new sticky cookie a proxied head carries."""
        headers = list(extra or ())
        plan, branch = self.plan, self.branch
        if plan is not None and branch is not None and self.state.rules.expose_decision:
            headers.append((b"X-Strangler-Route", plan.name.encode()))
            headers.append((b"X-Strangler-Upstream", branch.entry.to.encode()))
        if self.set_cookie is not None:
            headers.append(self.set_cookie)
        return headers

    def upgraded(self, conn: UpstreamConnection, extra: bytes) -> None:
        """The upstream switched protocols: from now on bytes flow both ways as is."""
        self._release_target()
        self.finished = True
        self.client.start_tunnel(conn, extra)
        self._record()

    # -- the end --------------------------------------------------------------

    def reject(
        self,
        status: int,
        error: str,
        message: str,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer the client directly, without contacting any upstream.

        The connection stays open when the request was read whole, so a
        refused request does not cost a well-behaved client its connection.
        """
        self.status = status
        self.error = error
        if not self.request_done or status in (400, 408, 413, 414, 431):
            self.keep_alive = False
        if not self.request_id:
            self.request_id = hdr.new_request_id()
        tap, self.tap = self.tap, None
        if tap is not None:
            tap.primary_failed()
        self.client.transport.write(
            error_response(
                status,
                error,
                message,
                self.request_id,
                close=not self.keep_alive,
                extra_headers=self._decision_headers(extra_headers),
            )
        )
        self._finish()

    def client_lost(self) -> None:
        """The client went away: abandon the upstream side of an unfinished exchange."""
        if self.finished:
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        self._release_target()
        tap, self.tap = self.tap, None
        if tap is not None:
            tap.primary_failed()
        if not self.status or not self.response_started:
            self.status = 499
        self.error = self.error or "client_closed"
        self.finished = True
        self._record()

    def _can_resend(self) -> bool:
        """Whether the body so far can go to another connection.

        Until a connection took it, it all waits in `pending`; after that
        only `replay` holds it, and only while it is within REPLAY_LIMIT.
        """
        return self.body_kind == NO_BODY or not self.streamed or self.replay is not None

    def _can_replay(self) -> bool:
        """Whether the whole request is known and can be sent again."""
        return self.body_kind == NO_BODY or (self.request_done and self._can_resend())

    def _release_upstream(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            transport = self.client.transport
            if transport.producer is conn:
                transport.unregisterProducer()
            if conn.transport.producer is self.client:
                conn.transport.unregisterProducer()
        self._release_target()

    def _release_target(self) -> None:
        target = self.target
        if target is not None:
            target.active -= 1
            self.target = None
        holding = self.holding
        if holding is not None:
            self.holding = None
            holding.leave()

    def _finish(self) -> None:
        self.finished = True
        tap, self.tap = self.tap, None
        if tap is not None:
            if self.response_started and not self.error:
                tap.primary_complete()
            else:
                tap.primary_failed()
        self._record()
        if not self.request_done:
            self.keep_alive = False
        self.client.exchange_done(self)

    def _record(self) -> None:
        gateway = self.client.gateway
        plan = self.plan
        branch = self.branch
        elapsed = time.monotonic() - self.started_at
        gateway.metrics.in_flight -= 1
        if plan is not None and branch is not None:
            gateway.metrics.observe(
                plan.name,
                branch.entry.to,
                self.status,
                elapsed,
                self.bytes_in,
                self.bytes_out,
                self.status in (502, 504) and bool(self.error),
            )
        log = gateway.access_log
        if log is None:
            return
        pool = self.pool
        log(
            {
                "event": "request",
                "request_id": self.request_id,
                "method": self.method.decode("latin-1"),
                "path": self.path,
                "route": plan.name if plan is not None else None,
                "upstream": branch.entry.to if branch is not None else None,
                "target": pool.state.target.authority if pool is not None else None,
                "split": self.decision or None,
                "status": self.status,
                "duration_ms": round(elapsed * 1000, 3),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "client": self.client.peer_host,
                "consumer": self.consumer,
                "fallback_from": self.fell_back_from,
                "error": self.error or None,
            }
        )

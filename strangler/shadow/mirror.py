"""Mirroring: copy a route's requests to its shadow and compare the answers.

`Mirror` is a route's `ShadowSource`. The exchange asks it once per request,
after routing and the gate; it answers with `None` unless the request is
sampled, its method is allowed, its primary is not already the shadow's
upstream, its body fits `max_body` and fewer than `max_in_flight` copies are
outstanding for the route. That decision is a handful of comparisons, made
before anything is allocated.

A `ShadowCall` is the tap for one copied request. It only ever receives: the
exchange hands it the client's body pieces and the primary's answer and
never waits for it or reads anything back. Once the client's request is
whole it sends the copy through the shadow's own pool (`Fetch`) and, with
`compare.noise: auto` and while the route is still learning, a second copy
to the primary. When every side has ended the answers are compared and
counted; the comparison runs on a later reactor turn if the primary was the
last to finish, so not inside the client's exchange. Whatever the shadow
does (hang, reset, 500, trickle) ends as a count in the route's stats.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from strangler.model import Route, Rules, Shadow
from strangler.proxy.exchange import _LAST_CHUNK, LENGTH, NO_BODY
from strangler.proxy.upstream import TargetPool
from strangler.shadow.compare import (
    CAPTURE_LIMIT,
    Answer,
    Capture,
    CompareSpec,
    compare,
)
from strangler.shadow.convert import convert_answer, convert_request
from strangler.shadow.fetch import Fetch
from strangler.shadow.jsonpath import JsonPathError, PathSet, parse_path
from strangler.shadow.noise import SAFE_TO_REPEAT
from strangler.shadow.stats import Redactor, SampleRequest
from strangler.transforms import TransformError

if TYPE_CHECKING:
    from strangler.gateway import GatewayState, UpstreamRuntime
    from strangler.proxy.exchange import Exchange
    from strangler.shadow.registry import ShadowRegistry

__all__ = [
    "SHADOW_HEADER",
    "Mirror",
    "ShadowCall",
    "build_mirror",
    "compile_spec",
    "secret_names",
]

log = structlog.get_logger("strangler.shadow")

SHADOW_HEADER = b"X-Strangler-Shadow: 1\r\n"
_CRLF = b"\r\n"
# Never copied: the gateway writes its own marker, the copy must come back
# uncompressed to be compared, and the body is sent whole, so no 100-continue.
_NOT_COPIED = frozenset({b"x-strangler-shadow", b"accept-encoding", b"expect"})
_NOT_COPIED_TYPED = _NOT_COPIED | {b"content-type"}


def compile_spec(shadow: Shadow, route: str = "") -> CompareSpec:
    """The route's compare settings, with its ignore paths parsed.

    `strangler check` already refuses an ignore path this parser cannot
    read, so rules loaded from a file never fail here. A `Shadow` built in
    code can still carry one: it is logged and left out, so the rest of the
    route's shadow keeps working.
    """
    patterns = []
    for text in shadow.compare.ignore:
        try:
            patterns.append((parse_path(text), "ignore"))
        except JsonPathError as exc:
            log.error("shadow_ignore_invalid", route=route, error=str(exc))
    headers = tuple(name.lower().encode("latin-1") for name in shadow.compare.headers)
    return CompareSpec(headers=headers, ignore=PathSet(patterns))


def build_mirror(
    route: Route, state: GatewayState, registry: ShadowRegistry
) -> Mirror | None:
    """The route's mirror, or None when the route has no `shadow`."""
    shadow = route.shadow
    if shadow is None:
        return None
    return Mirror(
        route.name,
        shadow,
        compile_spec(shadow, route.name),
        state.upstreams[shadow.to],
        registry,
        state.rng,
        registry.reactor,
        registry.redactor.extended(secret_names(shadow, state.rules)),
    )


def secret_names(shadow: Shadow, rules: Rules) -> frozenset[str]:
    """Names a route's samples redact besides the built-in ones.

    The shadow's own `redact` list, and wherever the rule file says API keys
    are read (`auth.api_key.header` and `.query`): a key there is a
    credential whatever its name looks like.
    """
    names = set(shadow.redact)
    api_key = rules.auth.api_key if rules.auth is not None else None
    if api_key is not None:
        names.add(api_key.header)
        if api_key.query is not None:
            names.add(api_key.query)
    return frozenset(names)


class Mirror:
    """Decides, per request and cheaply, whether to copy it to the shadow."""

    __slots__ = (
        "_turn",
        "max_body",
        "max_in_flight",
        "methods",
        "noise_auto",
        "percent",
        "reactor",
        "redactor",
        "registry",
        "rng",
        "shadow",
        "spec",
        "stats",
        "to",
        "upstream",
    )

    def __init__(
        self,
        route: str,
        shadow: Shadow,
        spec: CompareSpec,
        upstream: UpstreamRuntime,
        registry: ShadowRegistry,
        rng: Any,
        reactor: Any,
        redactor: Redactor | None = None,
    ) -> None:
        self.shadow = shadow
        self.spec = spec
        self.to = shadow.to
        self.percent = shadow.percent
        self.methods = frozenset(m.upper().encode("ascii") for m in shadow.methods)
        self.max_body = shadow.max_body
        self.max_in_flight = shadow.max_in_flight
        self.noise_auto = shadow.compare.noise == "auto"
        self.upstream = upstream
        self.registry = registry
        self.rng = rng
        self.reactor = reactor
        self.redactor = redactor if redactor is not None else registry.redactor
        self.stats = registry.stats_for(route)
        self.stats.config = shadow
        self._turn = 0

    def tap(self, exchange: Exchange) -> ShadowCall | None:
        percent = self.percent
        if percent < 100.0 and self.rng.random() * 100.0 >= percent:
            return None
        stats = self.stats
        if exchange.method not in self.methods:
            stats.skip("method")
            return None
        branch = exchange.branch
        if branch is not None and branch.entry.to == self.to:
            stats.skip("same_upstream")
            return None
        if exchange.upgrade:
            stats.skip("upgrade")
            return None
        if exchange.body_kind == LENGTH and exchange.content_length > self.max_body:
            stats.skip("too_large")
            return None
        if stats.in_flight >= self.max_in_flight:
            stats.dropped += 1
            return None
        return ShadowCall(self, exchange)

    def pool(self, upstream: UpstreamRuntime) -> TargetPool:
        """A shadow-side pool for one of `upstream`'s targets, in turn.

        Targets that health checks or ejection took out are passed over
        while any other is available.
        """
        states = upstream.states
        count = len(states)
        turn = self._turn
        self._turn = turn + 1
        chosen = states[turn % count]
        for step in range(count):
            candidate = states[(turn + step) % count]
            if candidate.available:
                chosen = candidate
                break
        return self.registry.pool_for(chosen.target, upstream.model.tls)


class ShadowCall:
    """The tap for one copied request: collects, sends, pairs and compares."""

    __slots__ = (
        "body",
        "body_size",
        "capture",
        "closed",
        "exchange",
        "fetches",
        "kept",
        "lost",
        "mirror",
        "primary",
        "primary_branch",
        "primary_headers",
        "primary_status",
        "probe",
        "request",
        "shadow",
        "waiting",
    )

    def __init__(self, mirror: Mirror, exchange: Exchange) -> None:
        self.mirror = mirror
        mirror.stats.in_flight += 1
        self.exchange: Exchange | None = exchange
        self.body: list[bytes] | None = []
        self.body_size = 0
        self.capture: Capture | None = Capture()
        self.primary_status = 0
        self.primary_headers: list[tuple[bytes, bytes]] = []
        self.primary: Answer | None = None
        self.shadow: Fetch | None = None
        self.probe: Fetch | None = None
        self.primary_branch: Any = exchange.branch
        self.request: tuple[bytes, str, bytes, str] | None = None
        self.kept: list[tuple[bytes, bytes, bytes]] = []
        self.waiting = True  # for the primary's answer
        self.fetches = 0  # copies sent and not yet ended
        self.lost = False
        self.closed = False

        # Body pieces that arrived while the gate was deciding are already
        # queued on the exchange; an asynchronous gate can even have seen the
        # whole request, in which case no request_complete will follow.
        for piece in exchange.pending:
            if piece is not _LAST_CHUNK:
                self.request_body(piece)
        if exchange.request_done:
            mirror.reactor.callLater(0, self.request_complete)

    # -- the client's request (ShadowTap) -----------------------------------------

    def request_body(self, data: bytes) -> None:
        body = self.body
        if body is None:
            return
        self.body_size += len(data)
        if self.body_size > self.mirror.max_body:
            self.body = None
            return
        body.append(data)

    def request_complete(self) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is None or self.lost:
            return
        try:
            self._start(exchange)
        except Exception:  # the boundary: a shadow bug must not reach the client
            log.exception("shadow_failed", route=self.mirror.stats.name)
            self.mirror.stats.error("internal")
            self._lose()

    def _start(self, exchange: Exchange) -> None:
        mirror = self.mirror
        if self.body is None:
            mirror.stats.skip("too_large")
            self._lose()
            return
        body = b"".join(self.body)
        self.body = None
        try:
            data = self._shadow_request(exchange, body)
        except TransformError:
            mirror.stats.error("request_transform")
            self._lose()
            return
        mirror.stats.mirrored += 1
        self.shadow = self._send(mirror.pool(mirror.upstream), data, exchange)
        if (
            mirror.noise_auto
            and exchange.method in SAFE_TO_REPEAT
            and exchange.body_kind == NO_BODY
            and mirror.stats.noise.wants_probe()
            and self.primary_branch is not None
        ):
            mirror.stats.noise.probe_started()
            probe = self._probe_request(exchange)
            self.probe = self._send(
                mirror.pool(self.primary_branch.upstream), probe, exchange
            )

    # -- the primary's answer (ShadowTap) ------------------------------------------

    def primary_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.primary_status = status
        self.primary_headers = headers

    def primary_body(self, data: bytes) -> None:
        capture = self.capture
        if capture is not None:
            capture.add(data)

    def primary_complete(self) -> None:
        capture, self.capture = self.capture, None
        if self.exchange is not None:
            # The primary answered before the client finished sending: the
            # copy was never sent and there is nothing to pair it with.
            self.exchange = None
            self.mirror.stats.skip("answered_early")
            self._lose()
            return
        if capture is not None and not self.lost:
            self.primary = capture.answer(self.primary_status, self.primary_headers)
        self.waiting = False
        self._settle(from_primary=True)

    def primary_failed(self) -> None:
        self.capture = None
        self.exchange = None
        self.waiting = False
        if not self.lost:
            self.mirror.stats.skip("primary_failed")
        self._lose()

    # -- the copies ---------------------------------------------------------------

    def _send(self, pool: TargetPool, data: bytes, exchange: Exchange) -> Fetch:
        self.fetches += 1
        fetch = Fetch(
            pool,
            data,
            exchange.method == b"HEAD",
            self.mirror.shadow.timeout,
            self._fetched,
            CAPTURE_LIMIT,
        )
        fetch.start()
        return fetch

    def _fetched(self, fetch: Fetch, error: str | None) -> None:
        if error is not None:
            if fetch is self.probe:
                self.mirror.stats.noise.probe_failed()
            else:
                self.mirror.stats.error(error)
        self.fetches -= 1
        self._settle(from_primary=False)

    def _shadow_request(self, exchange: Exchange, body: bytes) -> bytes:
        shadow = self.mirror.shadow
        path = exchange.path
        if shadow.rewrite is not None and path != "*":
            path = shadow.rewrite.apply(path)
        target = path.encode("latin-1")
        if exchange.query:
            target += b"?" + exchange.query

        has_body = exchange.body_kind != NO_BODY
        body, content_type = convert_request(
            shadow.transform, body, exchange.header_value(b"content-type")
        )

        # Kept for a sample in case the pair disagrees; the exchange may still
        # add to its own list.
        self.kept = list(exchange.kept)
        self.request = (
            exchange.method,
            exchange.path,
            exchange.query,
            exchange.request_id,
        )
        return self._render(
            exchange,
            target,
            _NOT_COPIED_TYPED if content_type is not None else _NOT_COPIED,
            content_type,
            body if has_body else None,
        )

    def _probe_request(self, exchange: Exchange) -> bytes:
        return self._render(exchange, exchange.upstream_target, _NOT_COPIED, None, None)

    @staticmethod
    def _render(
        exchange: Exchange,
        target: bytes,
        dropped: frozenset[bytes],
        content_type: bytes | None,
        body: bytes | None,
    ) -> bytes:
        forwarded_for, forwarded_proto, forwarded_host, _ = exchange.forwarded
        parts = [exchange.method, b" ", target, b" HTTP/1.1\r\n"]
        for lname, name, value in exchange.kept:
            if lname not in dropped:
                parts += (name, b": ", value, _CRLF)
        parts += (b"X-Forwarded-For: ", forwarded_for, _CRLF)
        parts += (b"X-Forwarded-Proto: ", forwarded_proto, _CRLF)
        if forwarded_host is not None:
            parts += (b"X-Forwarded-Host: ", forwarded_host, _CRLF)
        parts += (b"X-Request-Id: ", exchange.request_id.encode("ascii"), _CRLF)
        parts.append(SHADOW_HEADER)
        if content_type is not None:
            parts += (b"Content-Type: ", content_type, _CRLF)
        if body is not None:
            parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
            parts.append(body)
        else:
            parts.append(_CRLF)
        return b"".join(parts)

    # -- pairing ----------------------------------------------------------------

    def _lose(self) -> None:
        """Nothing will be compared; free the slot once no copy is outstanding."""
        self.lost = True
        self.body = None
        self.capture = None
        self._settle(from_primary=False)

    def _settle(self, from_primary: bool) -> None:
        """Free the route's slot once every side has ended, then compare.

        The slot is held while a copy is outstanding even when the pair is
        lost, so a hanging shadow counts against `max_in_flight` until its
        timeout, whatever happened to the client.
        """
        if self.closed or self.fetches or (self.waiting and not self.lost):
            return
        self.closed = True
        self.mirror.stats.in_flight -= 1
        if self.lost or self.primary is None:
            return
        if from_primary:
            # The primary finished last, inside the client's exchange: compare
            # on a later turn so that exchange finishes first.
            self.mirror.reactor.callLater(0, self._compare)
        else:
            self._compare()

    def _compare(self) -> None:
        try:
            self._compare_answers()
        except Exception:  # the boundary: count it, keep the shadow's connection
            log.exception("shadow_compare_failed", route=self.mirror.stats.name)
            self.mirror.stats.error("internal")

    def _compare_answers(self) -> None:
        mirror = self.mirror
        stats = mirror.stats
        primary = self.primary
        assert primary is not None
        noise = stats.noise
        probe, self.probe = self.probe, None
        if probe is not None and probe.error is None:
            try:
                repeat = convert_answer(
                    probe.answer(), self.primary_branch.entry.transform
                )
            except TransformError:
                noise.probe_failed()
            else:
                noise.learn(primary, repeat, mirror.spec)

        shadow_fetch = self.shadow
        if shadow_fetch is None or shadow_fetch.error is not None:
            return
        try:
            shadow = convert_answer(shadow_fetch.answer(), mirror.shadow.transform)
        except TransformError:
            stats.error("response_transform")
            return

        if mirror.noise_auto:
            outcome = compare(
                primary, shadow, mirror.spec, noise.paths, noise.header_names
            )
        else:
            outcome = compare(primary, shadow, mirror.spec)
        stats.record(outcome, self._sample_request, primary, shadow, mirror.redactor)

    def _sample_request(self) -> SampleRequest:
        redactor = self.mirror.redactor
        assert self.request is not None
        method, path, query, request_id = self.request
        return SampleRequest(
            request_id=request_id,
            method=method.decode("latin-1"),
            target=redactor.target(path, query),
            headers=redactor.headers([(name, value) for _, name, value in self.kept]),
        )

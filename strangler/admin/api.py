"""The admin API: a small JSON web service on its own listener.

It reads the running `GatewayServer` at request time, never a copy, so what
it shows is what the proxy is doing now, and the bearer token is looked up
in the current rules on every request, so a reload that changes the token
takes effect at once. Every answer, errors included, is JSON (Prometheus
text and the HTML dashboard aside); a failure inside a handler becomes a 500
with a one-line message, never a traceback.

The endpoints live in one table, `ENDPOINTS`, which the OpenAPI document in
`strangler.admin.openapi` describes; the tests check that the two agree.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import http, resource, server

from strangler.admin.dashboard import DASHBOARD_HEADERS, DASHBOARD_HTML
from strangler.admin.openapi import openapi_document
from strangler.gateway import DEFAULT_ROUTE_NAME, RoutePlan, UpstreamRuntime
from strangler.metrics import STATUS_CLASSES
from strangler.migration.admin import (
    act_on_migration,
    migration_detail,
    migrations_view,
    start_migration,
)
from strangler.migration.runner import MigrationError
from strangler.model import Match
from strangler.runtime_weights import WeightError
from strangler.shadow.admin import ShadowCollector, shadow_route, shadow_summary

if TYPE_CHECKING:
    from strangler.server import GatewayServer, ReloadResult

__all__ = ["ENDPOINTS", "AdminResource", "Endpoint", "build_admin_site"]

log = structlog.get_logger("strangler.admin")

MAX_BODY = 64 * 1024
"""Largest request body the admin API reads; a split is a few dozen bytes."""

JSON_TYPE = b"application/json"
_LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass(frozen=True, slots=True)
class Reply:
    """One response: status, body and the headers that go with it."""

    status: int
    body: bytes
    content_type: bytes = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_reply(data: object, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def error_reply(
    status: int,
    code: str,
    message: str,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> Reply:
    body = orjson.dumps({"error": code, "message": message}) + b"\n"
    return Reply(status, body, headers=headers)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A path template (`{name}` matches one segment) and its handlers by method.

    `handlers` maps an HTTP method to the name of an `AdminResource` method;
    `public` endpoints answer without the bearer token.
    """

    path: str
    handlers: dict[str, str]
    public: bool = False

    def match(self, segments: list[str]) -> dict[str, str] | None:
        """The path parameters if `segments` fit this template, else None."""
        template = self.path.strip("/").split("/") if self.path != "/" else [""]
        if len(template) != len(segments):
            return None
        params = {}
        for want, got in zip(template, segments, strict=True):
            if want.startswith("{") and want.endswith("}"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("/health", {"GET": "get_health"}, public=True),
    Endpoint("/", {"GET": "get_dashboard"}, public=True),
    Endpoint("/dashboard", {"GET": "get_dashboard"}, public=True),
    Endpoint("/routes", {"GET": "get_routes"}),
    Endpoint("/routes/{name}", {"GET": "get_route"}),
    Endpoint("/routes/{name}/split", {"POST": "post_split"}),
    Endpoint("/upstreams", {"GET": "get_upstreams"}),
    Endpoint("/reload", {"GET": "get_reload", "POST": "post_reload"}),
    Endpoint("/metrics", {"GET": "get_metrics"}),
    Endpoint("/openapi.json", {"GET": "get_openapi"}),
    Endpoint("/shadow", {"GET": "get_shadow"}),
    Endpoint("/shadow/{route}", {"GET": "get_shadow_route"}),
    Endpoint("/migrations", {"GET": "get_migrations", "POST": "post_migrations"}),
    Endpoint("/migrations/{name}", {"GET": "get_migration"}),
    Endpoint("/migrations/{name}/{action}", {"POST": "post_migration_action"}),
)


class _AdminRequest(server.Request):
    """A request that stops storing its body past `MAX_BODY` bytes.

    twisted.web reads the whole body before rendering; counting here keeps a
    client that sends more than any admin call needs from filling memory or
    a temporary file, and the handler answers 413.
    """

    body_bytes = 0

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()  # type: ignore[assignment]

    def handleContentChunk(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.body_bytes <= MAX_BODY and self.content is not None:
            self.content.write(data)


class _AdminSite(server.Site):
    """The admin site; state changes are logged by the handlers, not per request."""

    requestFactory = _AdminRequest

    def log(self, request: http.Request) -> None:
        return None


class AdminResource(resource.Resource):
    """Routes every admin request through `ENDPOINTS`, after the token check."""

    isLeaf = True

    def __init__(self, gateway_server: GatewayServer) -> None:
        super().__init__()
        self.gateway_server = gateway_server
        admin = gateway_server.rules.admin
        # If a reload removes the admin section, the listener keeps running
        # (it only stops on restart) and keeps the token it started with.
        self.startup_token = admin.token if admin is not None else None

    def render(self, request: server.Request) -> bytes:
        try:
            reply = self._handle(request)
        except Exception:  # the boundary: no traceback reaches a client
            log.exception("admin_handler_failed", path=_path_text(request))
            reply = error_reply(
                500, "internal_error", "the admin API failed; see the gateway log"
            )
        request.setResponseCode(reply.status)
        request.setHeader(b"Content-Type", reply.content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        for name, value in reply.headers:
            request.setHeader(name, value)
        return reply.body

    def _handle(self, request: server.Request) -> Reply:
        postpath = request.postpath or []
        segments = [segment.decode("utf-8", "replace") for segment in postpath]
        method = request.method.decode("latin-1")
        found = [(e, p) for e in ENDPOINTS if (p := e.match(segments)) is not None]

        if not (found and found[0][0].public):
            refused = self._authorize(request)
            if refused is not None:
                return refused
        if not found:
            return error_reply(
                404, "not_found", f"no admin endpoint at {_path_text(request)!r}"
            )

        endpoint, params = found[0]
        handler_name = endpoint.handlers.get("GET" if method == "HEAD" else method)
        if handler_name is None:
            allowed = ", ".join(sorted(endpoint.handlers))
            return error_reply(
                405,
                "method_not_allowed",
                f"{method} is not allowed on {endpoint.path}; use {allowed}",
                headers=((b"Allow", allowed.encode()),),
            )
        received = getattr(request, "body_bytes", 0)
        if received > MAX_BODY:
            return error_reply(
                413,
                "body_too_large",
                f"request body of {received} bytes is over the {MAX_BODY}-byte limit",
            )
        handler: Callable[..., Reply] = getattr(self, handler_name)
        return handler(request, **params)

    # The token.

    def _authorize(self, request: server.Request) -> Reply | None:
        """None if the request may go on, else the refusal to send."""
        admin = self.gateway_server.rules.admin
        token = admin.token if admin is not None else self.startup_token
        if token is None:
            return _loopback_only(request)

        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(
            given.strip(), token.encode("utf-8")
        ):
            return None
        reason = "missing" if not header else "wrong"
        log.info(
            "admin_unauthorized",
            reason=reason,
            client=_client_host(request),
            path=_path_text(request),
        )
        return error_reply(
            401,
            "unauthorized",
            f"{reason} bearer token: send 'Authorization: Bearer <admin.token>'",
            headers=((b"WWW-Authenticate", b'Bearer realm="strangler-admin"'),),
        )

    # Public endpoints.

    def get_health(self, request: server.Request) -> Reply:
        if self.gateway_server.gateway.draining:
            return json_reply({"status": "draining"}, status=503)
        return json_reply({"status": "ok"})

    def get_dashboard(self, request: server.Request) -> Reply:
        return Reply(
            200, DASHBOARD_HTML, b"text/html; charset=utf-8", DASHBOARD_HEADERS
        )

    # Routes and splits.

    def get_routes(self, request: server.Request) -> Reply:
        state = self.gateway_server.gateway.state
        summary = self.gateway_server.gateway.metrics.summary()
        plans = [*state.plans.values(), state.default_plan]
        return json_reply({"routes": [self._route_view(p, summary) for p in plans]})

    def get_route(self, request: server.Request, name: str) -> Reply:
        plan = self._plan(name)
        if plan is None:
            return _unknown_route(name)
        return json_reply(
            self._route_view(plan, self.gateway_server.gateway.metrics.summary())
        )

    def post_split(self, request: server.Request, name: str) -> Reply:
        if self._plan(name) is None:
            return _unknown_route(name)
        body = _json_body(request)
        if isinstance(body, Reply):
            return body
        if not isinstance(body, dict):
            return error_reply(
                400,
                "invalid_body",
                "expected a JSON object of upstream names to weights, "
                f'like {{"monolith": 50, "users": 50}}, got {_json_kind(body)}',
            )
        if (
            name == DEFAULT_ROUTE_NAME
            and name not in self.gateway_server.gateway.state.plans
        ):
            return error_reply(
                400,
                "invalid_weights",
                f"route {name!r} sends everything to the default upstream; "
                "it has no split to change",
            )

        gateway = self.gateway_server.gateway
        try:
            weights = gateway.set_weights(name, body, by="admin")
        except WeightError as exc:
            return error_reply(400, "invalid_weights", str(exc))
        plan = gateway.state.plans[name]
        log.info(
            "admin_weights_changed",
            route=name,
            weights=weights,
            source=plan.weight_source,
            client=_client_host(request),
        )
        return json_reply({"route": name, "weights": weights, **self._origin(plan)})

    def _plan(self, name: str) -> RoutePlan | None:
        state = self.gateway_server.gateway.state
        if name in state.plans:
            return state.plans[name]
        if name == DEFAULT_ROUTE_NAME:
            return state.default_plan
        return None

    def _origin(self, plan: RoutePlan) -> dict[str, Any]:
        """Where a route's weights come from: the rule file, or who set them when."""
        override = None
        if plan.weight_source == "runtime":
            override = self.gateway_server.gateway.runtime.get(plan.name)
        return {
            "source": plan.weight_source,
            "set_at": _iso(override.set_at) if override is not None else None,
            "by": override.by if override is not None else None,
        }

    def _route_view(
        self, plan: RoutePlan, summary: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        route = plan.route
        weights = plan.effective_weights()
        rule_weights = plan.rule_weights()
        traffic = summary.get(plan.name, {})
        split = [
            {
                "upstream": branch.entry.to,
                "weight": weights[branch.entry.to],
                "rule_weight": rule_weights[branch.entry.to],
                "traffic": traffic.get(branch.entry.to) or _no_traffic(),
            }
            for branch in plan.branches
        ]
        sticky = None
        if plan.sticky is not None:
            sticky = {"by": plan.sticky.by, "name": plan.sticky.name}
        shadow = None
        if route is not None and route.shadow is not None:
            shadow = {"to": route.shadow.to, "percent": route.shadow.percent}
        return {
            "name": plan.name,
            "line": route.line if route is not None else None,
            "match": _match_view(route.match) if route is not None else None,
            "split": split,
            **self._origin(plan),
            "sticky": sticky,
            "shadow": shadow,
        }

    # Upstreams, reloads, metrics, the document.

    def get_upstreams(self, request: server.Request) -> Reply:
        upstreams = self.gateway_server.gateway.state.upstreams.values()
        return json_reply({"upstreams": [_upstream_view(u) for u in upstreams]})

    def get_reload(self, request: server.Request) -> Reply:
        return json_reply(_reload_view(self.gateway_server.last_reload))

    def post_reload(self, request: server.Request) -> Reply:
        result = self.gateway_server.reload()
        log.info(
            "admin_reload",
            ok=result.ok,
            errors=len(result.errors),
            client=_client_host(request),
        )
        return json_reply(_reload_view(result))

    def get_metrics(self, request: server.Request) -> Reply:
        gateway = self.gateway_server.gateway
        registry = gateway.metrics.registry()
        registry.register(ShadowCollector(gateway.shadows))
        text = generate_latest(registry)
        return Reply(200, text, CONTENT_TYPE_LATEST.encode("ascii"))

    def get_shadow(self, request: server.Request) -> Reply:
        return json_reply(shadow_summary(self.gateway_server))

    def get_shadow_route(self, request: server.Request, route: str) -> Reply:
        data = shadow_route(self.gateway_server, route)
        if data is None:
            return error_reply(404, "not_found", f"route {route!r} has no shadow")
        return json_reply(data)

    def get_openapi(self, request: server.Request) -> Reply:
        return json_reply(openapi_document())

    # Migration plans (strangler.migration.admin makes the answers).

    def get_migrations(self, request: server.Request) -> Reply:
        return _migration_reply(lambda: migrations_view(self.gateway_server))

    def post_migrations(self, request: server.Request) -> Reply:
        body = _json_body(request)
        if isinstance(body, Reply):
            return body
        return _migration_reply(
            lambda: start_migration(self.gateway_server, body), status=201
        )

    def get_migration(self, request: server.Request, name: str) -> Reply:
        return _migration_reply(lambda: migration_detail(self.gateway_server, name))

    def post_migration_action(
        self, request: server.Request, name: str, action: str
    ) -> Reply:
        return _migration_reply(
            lambda: act_on_migration(self.gateway_server, name, action)
        )


def _migration_reply(produce: Callable[[], Any], status: int = 200) -> Reply:
    try:
        return json_reply(produce(), status)
    except MigrationError as exc:
        return error_reply(exc.status, exc.code, exc.message)


def build_admin_site(gateway_server: GatewayServer) -> server.Site:
    """The admin API for one running gateway, ready to listen on `admin.listen`."""
    site = _AdminSite(AdminResource(gateway_server))
    site.noisy = False
    return site


# Views: the runtime objects as plain JSON-ready data.


def _no_traffic() -> dict[str, Any]:
    return {
        "requests": 0,
        "status": dict.fromkeys(STATUS_CLASSES, 0),
        "errors": 0,
        "mean_ms": 0,
    }


def _match_view(match: Match) -> dict[str, Any]:
    methods = sorted(match.methods) if match.methods is not None else None
    regex = match.path_regex.pattern if match.path_regex is not None else None
    headers = [
        {
            "name": header.name,
            "pattern": header.pattern.pattern if header.pattern is not None else None,
        }
        for header in match.headers
    ]
    return {
        "summary": _match_summary(match, methods, regex),
        "path": match.path,
        "path_regex": regex,
        "methods": methods,
        "host": match.host,
        "headers": headers,
    }


def _match_summary(match: Match, methods: list[str] | None, regex: str | None) -> str:
    """One line a person can read: `GET,POST /api/v1/users host=shop.test`."""
    parts = [",".join(methods) if methods else "*"]
    if match.path is not None:
        parts.append(match.path)
    elif regex is not None:
        parts.append(f"~{regex}")
    else:
        parts.append("(any path)")
    if match.host is not None:
        parts.append(f"host={match.host}")
    for header in match.headers:
        pattern = f"~{header.pattern.pattern}" if header.pattern is not None else ""
        parts.append(f"{header.name}{pattern}")
    return " ".join(parts)


def _upstream_view(upstream: UpstreamRuntime) -> dict[str, Any]:
    model = upstream.model
    health = None
    if model.health is not None:
        health = {
            "path": model.health.path,
            "interval": model.health.interval,
            "timeout": model.health.timeout,
        }
    targets = [
        {
            "url": state.target.url,
            "weight": state.target.weight,
            "active": state.active,
            "available": state.available,
            "healthy": state.healthy,
            "ejected": state.ejected,
            "ejections": state.ejections,
        }
        for state in upstream.states
    ]
    return {
        "name": upstream.name,
        "balance": model.balance,
        "health": health,
        "targets": targets,
        "fallbacks": upstream.fallbacks,
        "overloaded": upstream.overflows,
        "retries": upstream.retries,
        "ejections": sum(state.ejections for state in upstream.states),
    }


def _reload_view(result: ReloadResult) -> dict[str, Any]:
    return {
        "ok": result.ok,
        "at": _iso(result.at),
        "errors": list(result.errors),
        "source": result.source,
    }


def _iso(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Request helpers.


def _json_body(request: server.Request) -> object:
    """The parsed JSON body, or the 415/400 reply that refuses it."""
    content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
    media = content_type.partition(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        shown = repr(media) if media else "none"
        return error_reply(
            415,
            "unsupported_media_type",
            f"expected Content-Type: application/json, got {shown}",
        )
    raw = request.content.read() if request.content is not None else b""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return error_reply(
            400, "invalid_json", f"request body is not valid JSON: {exc}"
        )


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"[:80]


def _unknown_route(name: str) -> Reply:
    return error_reply(404, "unknown_route", f"no route named {name!r}")


def _client_host(request: server.Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "?"))


def _path_text(request: server.Request) -> str:
    return request.path.decode("utf-8", "replace")


def _loopback_only(request: server.Request) -> Reply | None:
    """Without a token, answer only loopback connections addressed to a loopback name.

    The Host check stops a web page from reaching a token-less admin API
    through DNS rebinding: the browser would send the attacker's host name.
    """
    local = str(getattr(request.getHost(), "host", ""))
    if not _is_loopback(local):
        return error_reply(
            403,
            "forbidden",
            f"the admin API answers on non-loopback {local} only with admin.token set",
        )
    host_header = (request.getHeader(b"host") or b"").decode("latin-1")
    if host_header and not _is_loopback(_strip_port(host_header)):
        return error_reply(
            403,
            "forbidden",
            "without admin.token the admin API answers only requests addressed to "
            f"127.0.0.1, [::1] or localhost, got Host {host_header!r}",
        )
    return None


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""`strangler explain`: what the gateway would do with one request, without sending it.

It runs the same router, splitter and rewrite code as the proxy, so its
answer is the proxy's answer for the same rules, request and sticky key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strangler.gateway import DEFAULT_ROUTE_NAME, make_splitter
from strangler.model import Route, Rules, SplitEntry, Transform
from strangler.routing import Router
from strangler.security.paths import normalise_path, rewrite_path, routing_path
from strangler.stickiness import sticky_key
from strangler.units import format_duration


@dataclass
class Explanation:
    """The decision for one request, in a shape both text and JSON output use."""

    route: str
    route_line: int | None
    upstream: str
    path: str
    routed_path: str
    rewritten_path: str
    decision: str
    shares: dict[str, float] = field(default_factory=dict)
    sticky: str | None = None
    sticky_key: str | None = None
    targets: list[str] = field(default_factory=list)
    balance: str = ""
    transform_request: str | None = None
    transform_response: str | None = None
    timeout: float = 0.0
    connect_timeout: float = 0.0
    shadow: str | None = None
    body_map: str | None = None
    header_edits: str | None = None

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)

    def as_text(self) -> str:
        where = f" (line {self.route_line})" if self.route_line else ""
        lines = [f"route:      {self.route}{where}"]
        if self.shares:
            split = " | ".join(f"{name} {pct:g}%" for name, pct in self.shares.items())
            lines.append(f"split:      {split}")
        if self.sticky:
            key = self.sticky_key if self.sticky_key is not None else "(absent)"
            lines.append(f"sticky:     {self.sticky} = {key}")
        if self.routed_path != self.path.partition("?")[0]:
            lines.append(f"routed as:  {self.routed_path}")
        lines.append(f"decision:   {self.decision}")
        lines.append(
            f"upstream:   {self.upstream} ({self.balance}: {', '.join(self.targets)})"
        )
        if self.rewritten_path != self.path:
            lines.append(f"path:       {self.path} -> {self.rewritten_path}")
        else:
            lines.append(f"path:       {self.path} (unchanged)")
        if self.transform_request or self.transform_response:
            lines.append(
                "transform:  request "
                f"{self.transform_request or 'none'}, response "
                f"{self.transform_response or 'none'}"
            )
        lines.append(
            f"timeout:    {format_duration(self.timeout)} "
            f"(connect {format_duration(self.connect_timeout)})"
        )
        if self.body_map:
            lines.append(f"body map:   {self.body_map}")
        if self.header_edits:
            lines.append(f"headers:    {self.header_edits}")
        if self.shadow:
            lines.append(f"shadow:     {self.shadow}")
        return "\n".join(lines)


def explain(
    rules: Rules,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    client_ip: str = "127.0.0.1",
) -> Explanation:
    """Decide route, branch and rewrite for one request as the proxy would."""
    lowered = {name.lower(): value for name, value in (headers or {}).items()}
    raw_path, _, query = target.partition("?")
    # The proxy's own normalisation: PathError for a path it answers with 400.
    wire = normalise_path(raw_path.encode("latin-1"))
    path = routing_path(wire).decode("latin-1")
    host = lowered.get("host")
    route = Router(rules.routes).match(method.upper(), path, host, lowered.get)
    entry, decision, key = _choose(route, rules, lowered, client_ip)
    upstream = rules.upstreams[entry.to]
    sent = wire if entry.rewrite is None else rewrite_path(entry.rewrite, wire, path)
    rewritten = sent.decode("latin-1")
    if query:
        rewritten += "?" + query
    shadow = None
    if route is not None and route.shadow is not None:
        methods = ", ".join(sorted(route.shadow.methods))
        shadow = f"{route.shadow.to} ({route.shadow.percent:g}% of {methods})"
        if route.shadow.transform is not None:
            shadow += f"; transform {describe_transform(route.shadow.transform)}"
    return Explanation(
        route=route.name
        if route is not None
        else f"{DEFAULT_ROUTE_NAME} (no route matched)",
        route_line=route.line if route is not None else None,
        upstream=entry.to,
        path=target,
        routed_path=path,
        rewritten_path=rewritten,
        decision=decision,
        shares={e.to: e.weight for e in route.split}
        if route and len(route.split) > 1
        else {},
        sticky=f"{route.sticky.by} {route.sticky.name}".strip()
        if route and route.sticky
        else None,
        sticky_key=key,
        targets=[f"{t.url} (weight {t.weight})" for t in upstream.targets],
        balance=upstream.balance,
        transform_request=entry.transform.request if entry.transform else None,
        transform_response=entry.transform.response if entry.transform else None,
        timeout=_first(entry.timeout, upstream.timeout, rules.timeout),
        connect_timeout=_first(
            entry.connect_timeout, upstream.connect_timeout, rules.connect_timeout
        ),
        shadow=shadow,
        body_map=entry.transform.body.describe()
        if entry.transform and entry.transform.body
        else None,
        header_edits=_describe_headers(entry),
    )


def describe_transform(transform: Transform) -> str:
    """One line naming each step of a transform, as the proxy runs them."""
    parts = [
        f"request {transform.request or 'none'}",
        f"response {transform.response or 'none'}",
    ]
    if transform.body is not None:
        parts.append(f"body map ({transform.body.describe()})")
    return ", ".join(parts)


def _describe_headers(entry: SplitEntry) -> str | None:
    rules = entry.headers
    if rules is None:
        return None
    parts = []
    for direction, edits in (("request", rules.request), ("response", rules.response)):
        if edits is None:
            continue
        changes = [f"remove {name}" for name in edits.remove]
        changes += [f"set {name}: {value}" for name, value in edits.set]
        changes += [f"add {name}: {value}" for name, value in edits.add]
        parts.append(f"{direction} " + ", ".join(changes))
    return "; ".join(parts) or None


def _choose(
    route: Route | None, rules: Rules, headers: dict[str, str], client_ip: str
) -> tuple[SplitEntry, str, str | None]:
    if route is None:
        return SplitEntry(to=rules.default), "default upstream", None
    if len(route.split) == 1:
        return route.split[0], "single upstream", None
    if route.override is not None:
        forced = headers.get(route.override.header.lower())
        for entry in route.split:
            if forced is not None and forced.strip() == entry.to:
                return entry, f"forced by {route.override.header}", None
    import random

    splitter = make_splitter(route.split, random.Random())
    key = None
    if route.sticky is not None:

        def lookup(name: bytes) -> bytes | None:
            value = headers.get(name.decode("latin-1"))
            return value.encode("latin-1") if value is not None else None

        key = sticky_key(route.sticky, lookup, client_ip)
    if key is not None:
        entry = route.split[splitter.pick_sticky(key)]
        return entry, f"sticky pick for key {key!r}", key
    shares = ", ".join(f"{e.to} {e.weight:g}%" for e in route.split)
    entry = route.split[splitter.pick_random()]
    return entry, f"random draw by weight ({shares}); this run drew {entry.to}", None


def _first(*values: float | None) -> float:
    for value in values:
        if value is not None:
            return value
    return 0.0

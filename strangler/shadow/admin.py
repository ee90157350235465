"""Shadow results for the admin API: JSON views and Prometheus metrics.

The admin API mounts `shadow_summary` at `GET /shadow` and `shadow_route` at
`GET /shadow/{route}`, and adds a `ShadowCollector` to its `/metrics`
registry. All three read the gateway's `ShadowRegistry` when asked, so they
show the counts as they are at that moment, across reloads; a route whose
shadow was removed from the rules keeps its history and shows
`"active": false`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from strangler.gateway import Gateway
    from strangler.server import GatewayServer
    from strangler.shadow.registry import ShadowRegistry

__all__ = ["ShadowCollector", "shadow_route", "shadow_summary"]


def _active(gateway: Gateway, route: str) -> bool:
    plan = gateway.state.plans.get(route)
    return plan is not None and plan.shadow is not None


def shadow_summary(server: GatewayServer) -> dict[str, Any]:
    """`GET /shadow`: one line per shadowed route, with its agreement rate."""
    gateway = server.gateway
    routes = gateway.shadows.routes
    return {
        "routes": [
            routes[name].summary(_active(gateway, name)) for name in sorted(routes)
        ]
    }


def shadow_route(server: GatewayServer, route: str) -> dict[str, Any] | None:
    """`GET /shadow/{route}`: field-level counts, noise and samples; None if unknown.

    A route the rules have but that has no shadow (and never had one since
    the gateway started) is unknown here too; answer it with 404.
    """
    gateway = server.gateway
    stats = gateway.shadows.routes.get(route)
    if stats is None:
        return None
    return stats.detail(_active(gateway, route))


class ShadowCollector(Collector):
    """Prometheus families for every route's shadow, built when scraped."""

    def __init__(self, registry: ShadowRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        route = ["route"]
        mirrored = CounterMetricFamily(
            "strangler_shadow_mirrored", "Requests copied to the shadow.", labels=route
        )
        compared = CounterMetricFamily(
            "strangler_shadow_compared",
            "Mirrored pairs whose two answers were compared.",
            labels=route,
        )
        agreed = CounterMetricFamily(
            "strangler_shadow_agreed",
            "Compared pairs whose answers agreed.",
            labels=route,
        )
        kinds = CounterMetricFamily(
            "strangler_shadow_differences",
            "Disagreeing pairs by kind of difference (status, header, body).",
            labels=["route", "kind"],
        )
        fields = CounterMetricFamily(
            "strangler_shadow_field_differences",
            "Disagreeing pairs by field: a header name or a JSONPath.",
            labels=["route", "kind", "field"],
        )
        ignored = CounterMetricFamily(
            "strangler_shadow_ignored",
            "Differences left out by compare.ignore.",
            labels=route,
        )
        errors = CounterMetricFamily(
            "strangler_shadow_errors",
            "Copies that got no usable answer, by reason (timeout, connect, ...).",
            labels=["route", "reason"],
        )
        skipped = CounterMetricFamily(
            "strangler_shadow_skipped",
            "Sampled requests not copied, by reason (method, too_large, ...).",
            labels=["route", "reason"],
        )
        dropped = CounterMetricFamily(
            "strangler_shadow_dropped",
            "Requests not copied because max_in_flight copies were outstanding.",
            labels=route,
        )
        in_flight = GaugeMetricFamily(
            "strangler_shadow_in_flight", "Copies outstanding now.", labels=route
        )
        agreement = GaugeMetricFamily(
            "strangler_shadow_agreement_ratio",
            "Share of compared pairs that agreed.",
            labels=route,
        )
        noise = GaugeMetricFamily(
            "strangler_shadow_noise_fields",
            "Fields learned as noise (compare.noise: auto).",
            labels=route,
        )

        for name, stats in sorted(self.registry.routes.items()):
            mirrored.add_metric([name], stats.mirrored)
            compared.add_metric([name], stats.compared)
            agreed.add_metric([name], stats.agreed)
            for kind, count in stats.kinds.items():
                kinds.add_metric([name, kind], count)
            for (kind, field), stat in sorted(stats.fields.items()):
                fields.add_metric([name, kind, field], stat.count)
            ignored.add_metric([name], stats.ignored)
            errors.add_metric([name, "timeout"], stats.timeouts)
            for reason, count in sorted(stats.errors.items()):
                errors.add_metric([name, reason], count)
            for reason, count in sorted(stats.skipped.items()):
                skipped.add_metric([name, reason], count)
            dropped.add_metric([name], stats.dropped)
            in_flight.add_metric([name], stats.in_flight)
            rate = stats.agreement()
            if rate is not None:
                agreement.add_metric([name], rate)
            noise.add_metric([name], len(stats.noise.fields) + len(stats.noise.headers))

        yield from (mirrored, compared, agreed, kinds, fields, ignored, errors)
        yield from (skipped, dropped, in_flight, agreement, noise)

"""Request metrics: counted cheaply on the hot path, rendered by prometheus_client.

Updating a prometheus_client counter and histogram per request costs a few
microseconds of locking and label lookup. Here the proxy only bumps plain
integers in dicts keyed by (route, upstream); a custom collector turns them
into Prometheus families when `/metrics` is scraped. The exposition format
and client library stay the standard ones.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class _Series:
    """Everything counted for one (route, upstream) pair."""

    __slots__ = (
        "buckets",
        "by_class",
        "bytes_in",
        "bytes_out",
        "count",
        "errors",
        "total",
    )

    def __init__(self) -> None:
        self.by_class = [0, 0, 0, 0, 0]
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.count = 0
        self.total = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors = 0


class Metrics:
    """Counters the proxy updates per request and the admin API reads."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, str], _Series] = {}
        self.in_flight = 0
        self.reloads = {"ok": 0, "error": 0}
        self.sources: list[Callable[[], Any]] = []

    def observe(
        self,
        route: str,
        upstream: str,
        status: int,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        failed: bool,
    ) -> None:
        key = (route, upstream)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series()
        index = status // 100 - 1
        if 0 <= index < 5:
            series.by_class[index] += 1
        series.buckets[bisect_left(BUCKETS, seconds)] += 1
        series.count += 1
        series.total += seconds
        series.bytes_in += bytes_in
        series.bytes_out += bytes_out
        if failed:
            series.errors += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per route and upstream: requests by class, errors, mean latency."""
        out: dict[str, dict[str, Any]] = {}
        for (route, upstream), series in self.series.items():
            out.setdefault(route, {})[upstream] = {
                "requests": series.count,
                "status": dict(zip(STATUS_CLASSES, series.by_class, strict=True)),
                "errors": series.errors,
                "mean_ms": round(series.total / series.count * 1000, 3)
                if series.count
                else 0,
            }
        return out

    def registry(self) -> CollectorRegistry:
        """A registry for one scrape: request metrics plus every extra source.

        `sources` are callables returning an object with `collect()` (or
        None), so parts that are rebuilt on reload (the security gate) are
        looked up at scrape time rather than captured once.
        """
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        for source in self.sources:
            collector = source()
            if collector is not None:
                registry.register(collector)
        return registry


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        metrics = self.metrics
        requests = CounterMetricFamily(
            "strangler_requests",
            "Requests answered, by route, upstream and status class.",
            labels=["route", "upstream", "status_class"],
        )
        failures = CounterMetricFamily(
            "strangler_upstream_failures",
            "Requests where no upstream answered (502/504 from the gateway).",
            labels=["route", "upstream"],
        )
        received = CounterMetricFamily(
            "strangler_request_bytes",
            "Request body bytes received.",
            labels=["route", "upstream"],
        )
        sent = CounterMetricFamily(
            "strangler_response_bytes",
            "Response body bytes sent.",
            labels=["route", "upstream"],
        )
        latency = HistogramMetricFamily(
            "strangler_request_duration_seconds",
            "Time from request head to the end of the response.",
            labels=["route", "upstream"],
        )
        for (route, upstream), series in sorted(metrics.series.items()):
            for name, value in zip(STATUS_CLASSES, series.by_class, strict=True):
                if value:
                    requests.add_metric([route, upstream, name], value)
            failures.add_metric([route, upstream], series.errors)
            received.add_metric([route, upstream], series.bytes_in)
            sent.add_metric([route, upstream], series.bytes_out)
            cumulative = 0
            buckets = []
            for bound, value in zip(
                (*BUCKETS, float("inf")), series.buckets, strict=True
            ):
                cumulative += value
                buckets.append((_bound(bound), cumulative))
            latency.add_metric([route, upstream], buckets, series.total)
        yield requests
        yield failures
        yield received
        yield sent
        yield latency
        yield GaugeMetricFamily(
            "strangler_in_flight_requests",
            "Requests being served now.",
            value=metrics.in_flight,
        )
        reloads = CounterMetricFamily(
            "strangler_reloads", "Rule-file reloads by outcome.", labels=["outcome"]
        )
        for outcome, value in metrics.reloads.items():
            reloads.add_metric([outcome], value)
        yield reloads


class UpstreamCollector(Collector):
    """Resilience counters and target states of the upstreams in force.

    `upstreams` is called at scrape time, since a reload replaces the
    upstreams whose definition changed (and their counters start again, which
    Prometheus reads as a counter reset).
    """

    def __init__(self, upstreams: Callable[[], Iterable[Any]]) -> None:
        self.upstreams = upstreams

    def collect(self) -> Iterator[Any]:
        per_upstream = {
            "fallbacks": CounterMetricFamily(
                "strangler_upstream_fallbacks",
                "Requests an upstream failed or could not take that its "
                "fallback served.",
                labels=["upstream"],
            ),
            "overflows": CounterMetricFamily(
                "strangler_upstream_overloaded",
                "Requests refused with 503 by max_connections and max_pending.",
                labels=["upstream"],
            ),
            "retries": CounterMetricFamily(
                "strangler_upstream_retries",
                "Requests sent again after an attempt failed.",
                labels=["upstream"],
            ),
        }
        ejections = CounterMetricFamily(
            "strangler_upstream_ejections",
            "Outlier ejections, by target.",
            labels=["upstream", "target"],
        )
        flags: dict[str, GaugeMetricFamily] = {
            "available": GaugeMetricFamily(
                "strangler_target_available",
                "1 when the target is in rotation (healthy and not ejected).",
                labels=["upstream", "target"],
            ),
            "healthy": GaugeMetricFamily(
                "strangler_target_healthy",
                "1 when active health checks find the target healthy.",
                labels=["upstream", "target"],
            ),
            "ejected": GaugeMetricFamily(
                "strangler_target_ejected",
                "1 while outlier ejection keeps the target out.",
                labels=["upstream", "target"],
            ),
        }
        for upstream in sorted(self.upstreams(), key=lambda u: u.name):
            for attribute, family in per_upstream.items():
                family.add_metric([upstream.name], getattr(upstream, attribute))
            for state in upstream.states:
                labels = [upstream.name, state.target.url]
                ejections.add_metric(labels, state.ejections)
                for attribute, gauge in flags.items():
                    gauge.add_metric(labels, 1 if getattr(state, attribute) else 0)
        yield from per_upstream.values()
        yield ejections
        yield from flags.values()


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)

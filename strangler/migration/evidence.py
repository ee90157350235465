"""The evidence a plan step is judged on, from counters the proxy keeps anyway.

The proxy already counts every request per (route, upstream): status
classes, gateway errors and a latency histogram (`strangler.metrics`). A
plan takes a `Snapshot` of those cumulative counters when a step starts and
diffs a later one against it, so judging a step adds nothing to the cost of
a request. The step's p99 per side is read from the histogram difference
the way Prometheus reads one: linear within the bucket that holds it.

Requests the new side failed and the monolith then answered (`fallback:`)
are recorded by the proxy under the monolith; the upstream's fallback count
adds them back to the new side's requests and failures, so a fallback that
hides failures from clients does not hide them from the plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from strangler.metrics import BUCKETS
from strangler.migration.plan import Gates

if TYPE_CHECKING:
    from strangler.gateway import Gateway

__all__ = [
    "LATENCY_FLOOR",
    "P99_MIN_SAMPLES",
    "AgreementSource",
    "Evidence",
    "GateResult",
    "Side",
    "Snapshot",
    "gateway_agreement",
    "judge",
    "quantile",
    "take_snapshot",
]

AgreementSource = Callable[[str], "tuple[int, int] | None"]
"""(compared, agreed) so far for a route's shadow, or None if it has no shadow."""

P99_MIN_SAMPLES = 20
"""Requests each side needs in a step before its p99 is compared."""

LATENCY_FLOOR = 0.010
"""p99 values below this (seconds) count as this, so 1 ms against 2 ms of
loopback jitter is not read as "twice as slow"."""

_SLOTS = len(BUCKETS) + 1
_FIVE_XX = 4  # index of 5xx in Metrics' by_class

GateStatus = Literal["pass", "fail", "wait", "skip"]


@dataclass(frozen=True, slots=True)
class Side:
    """Cumulative counts for one side of the split (one or more upstreams)."""

    requests: int = 0
    server_errors: int = 0
    gateway_errors: int = 0
    buckets: tuple[int, ...] = (0,) * _SLOTS

    def plus(self, series: Any) -> Side:
        return Side(
            self.requests + series.count,
            self.server_errors + series.by_class[_FIVE_XX],
            self.gateway_errors + series.errors,
            tuple(a + b for a, b in zip(self.buckets, series.buckets, strict=True)),
        )

    def since(self, earlier: Side) -> Side:
        """What was counted after `earlier`; all of it if the counters restarted."""
        if self.requests < earlier.requests:
            return self
        return Side(
            self.requests - earlier.requests,
            self.server_errors - earlier.server_errors,
            self.gateway_errors - earlier.gateway_errors,
            tuple(a - b for a, b in zip(self.buckets, earlier.buckets, strict=True)),
        )


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The counters of one route at one moment, split into new and old side."""

    route_requests: int
    new: Side
    old: Side
    fallbacks: int
    shadow: tuple[int, int] | None


def take_snapshot(
    gateway: Gateway, route: str, move_to: str, agreement: AgreementSource
) -> Snapshot:
    """Read the gateway's counters for `route` now; cheap enough to do each second."""
    new, old = Side(), Side()
    for (series_route, upstream), series in list(gateway.metrics.series.items()):
        if series_route != route:
            continue
        if upstream == move_to:
            new = new.plus(series)
        else:
            old = old.plus(series)
    runtime = gateway.state.upstreams.get(move_to)
    # Fallbacks are counted per upstream, not per route: see docs/limitations.md.
    fallbacks = runtime.fallbacks if runtime is not None else 0
    return Snapshot(new.requests + old.requests, new, old, fallbacks, agreement(route))


@dataclass(frozen=True, slots=True)
class Evidence:
    """What happened on a route between two snapshots."""

    route_requests: int
    new_requests: int
    new_failed: int
    gateway_errors: int
    fallbacks: int
    new_answered: int
    old_requests: int
    new_p99: float | None
    old_p99: float | None
    compared: int | None
    agreed: int | None
    shadow_added: bool = False

    @classmethod
    def between(cls, earlier: Snapshot, later: Snapshot) -> Evidence:
        new = later.new.since(earlier.new)
        old = later.old.since(earlier.old)
        fallbacks = _since(later.fallbacks, earlier.fallbacks)
        compared = agreed = None
        # A shadow added during the step is judged from the next step on.
        added = later.shadow is not None and earlier.shadow is None
        if later.shadow is not None and earlier.shadow is not None:
            compared = _since(later.shadow[0], earlier.shadow[0])
            agreed = min(compared, _since(later.shadow[1], earlier.shadow[1]))
        return cls(
            route_requests=new.requests + old.requests,
            new_requests=new.requests + fallbacks,
            new_failed=new.server_errors + fallbacks,
            gateway_errors=new.gateway_errors,
            fallbacks=fallbacks,
            new_answered=new.requests,
            old_requests=old.requests,
            new_p99=quantile(new.buckets, 0.99),
            old_p99=quantile(old.buckets, 0.99),
            compared=compared,
            agreed=agreed,
            shadow_added=added,
        )

    @classmethod
    def so_far(cls, snapshot: Snapshot) -> Evidence:
        """Everything counted on the route up to `snapshot`, since counting began."""
        shadow = None if snapshot.shadow is None else (0, 0)
        return cls.between(Snapshot(0, Side(), Side(), 0, shadow), snapshot)

    def as_dict(self) -> dict[str, Any]:
        return {
            "route_requests": self.route_requests,
            "new_requests": self.new_requests,
            "new_failed": self.new_failed,
            "gateway_errors": self.gateway_errors,
            "fallbacks": self.fallbacks,
            "old_requests": self.old_requests,
            "new_p99_ms": _ms(self.new_p99),
            "old_p99_ms": _ms(self.old_p99),
            "shadow_compared": self.compared,
            "shadow_agreed": self.agreed,
        }


def _since(now: int, then: int) -> int:
    return now - then if now >= then else now


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def quantile(buckets: Sequence[int], q: float) -> float | None:
    """The `q` quantile in seconds of a histogram over `BUCKETS`; None if empty.

    Linear within the bucket that holds the rank; a rank in the overflow
    bucket reads as the last finite bound, as Prometheus does.
    """
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index >= len(BUCKETS):
                return BUCKETS[-1]
            lower = BUCKETS[index - 1] if index else 0.0
            upper = BUCKETS[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return BUCKETS[-1]


@dataclass(frozen=True, slots=True)
class GateResult:
    """One gate judged on one step's evidence.

    `pass` and `skip` let the plan advance, `wait` holds it at the step
    until there is evidence, `fail` triggers `on_fail` at once.
    """

    gate: str
    bound: float
    value: float | None
    status: GateStatus
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "bound": self.bound,
            "value": self.value,
            "status": self.status,
            "detail": self.detail,
        }


def judge(
    gates: Gates, evidence: Evidence, *, move_to: str, weight: float
) -> tuple[GateResult, ...]:
    """Every gate of a plan against the evidence of its current step.

    No gate is judged before `min_requests` holds, so none fails on the
    first handful of requests of a step.
    """
    enough = evidence.route_requests >= gates.min_requests
    results = [_min_requests(gates.min_requests, evidence)]
    waiting = f"judged once the route has {gates.min_requests} requests"
    if gates.max_error_rate is not None:
        bound = gates.max_error_rate
        if not enough:
            results.append(GateResult("max_error_rate", bound, None, "wait", waiting))
        else:
            results.append(_error_rate(bound, evidence, move_to))
    if gates.max_p99_ratio is not None:
        bound = gates.max_p99_ratio
        if not enough:
            results.append(GateResult("max_p99_ratio", bound, None, "wait", waiting))
        else:
            results.append(_p99_ratio(bound, evidence, move_to))
    if gates.min_shadow_agreement is not None:
        bound = gates.min_shadow_agreement
        if evidence.shadow_added:
            detail = "the shadow was added during this step; judged from the next"
            results.append(
                GateResult("min_shadow_agreement", bound, None, "skip", detail)
            )
        elif evidence.compared is None:
            # The plan asked for agreement; advancing without it would be a
            # guess, so the plan holds at this step until the shadow is back.
            detail = "the route has no shadow now; the plan holds until it has one"
            results.append(
                GateResult("min_shadow_agreement", bound, None, "wait", detail)
            )
        elif not enough:
            results.append(
                GateResult("min_shadow_agreement", bound, None, "wait", waiting)
            )
        else:
            results.append(_agreement(bound, evidence, weight))
    return tuple(results)


def _min_requests(bound: int, evidence: Evidence) -> GateResult:
    seen = evidence.route_requests
    if seen >= bound:
        return GateResult(
            "min_requests", bound, seen, "pass", f"{seen} requests on the route"
        )
    return GateResult(
        "min_requests", bound, seen, "wait", f"{seen} of {bound} requests so far"
    )


def _error_rate(bound: float, evidence: Evidence, move_to: str) -> GateResult:
    sent, failed = evidence.new_requests, evidence.new_failed
    if sent == 0:
        detail = f"no request reached {move_to} yet"
        return GateResult("max_error_rate", bound, None, "wait", detail)
    rate = round(100 * failed / sent, 3)
    detail = f"{failed} of {sent} requests to {move_to} failed"
    if evidence.fallbacks:
        detail += f", {evidence.fallbacks} of them answered by a fallback"
    return GateResult(
        "max_error_rate", bound, rate, "pass" if rate <= bound else "fail", detail
    )


def _p99_ratio(bound: float, evidence: Evidence, move_to: str) -> GateResult:
    new_count, old_count = evidence.new_answered, evidence.old_requests
    if new_count < P99_MIN_SAMPLES or old_count < P99_MIN_SAMPLES:
        detail = (
            f"not judged: each side needs {P99_MIN_SAMPLES} requests "
            f"({move_to} {new_count}, the others {old_count})"
        )
        return GateResult("max_p99_ratio", bound, None, "skip", detail)
    assert evidence.new_p99 is not None and evidence.old_p99 is not None
    new = max(evidence.new_p99, LATENCY_FLOOR)
    old = max(evidence.old_p99, LATENCY_FLOOR)
    ratio = round(new / old, 3)
    detail = (
        f"p99 {move_to} {evidence.new_p99 * 1000:.1f} ms, the others "
        f"{evidence.old_p99 * 1000:.1f} ms (under {LATENCY_FLOOR * 1000:g} ms "
        f"counts as {LATENCY_FLOOR * 1000:g} ms)"
    )
    return GateResult(
        "max_p99_ratio", bound, ratio, "pass" if ratio <= bound else "fail", detail
    )


def _agreement(bound: float, evidence: Evidence, weight: float) -> GateResult:
    compared, agreed = evidence.compared or 0, evidence.agreed or 0
    if compared == 0:
        if weight >= 100:
            detail = "nothing is mirrored once the new side takes every request"
            return GateResult("min_shadow_agreement", bound, None, "skip", detail)
        detail = "no shadow comparison finished yet"
        return GateResult("min_shadow_agreement", bound, None, "wait", detail)
    rate = round(100 * agreed / compared, 3)
    detail = f"{agreed} of {compared} shadow comparisons agreed"
    status: GateStatus = "pass" if rate >= bound else "fail"
    return GateResult("min_shadow_agreement", bound, rate, status, detail)


def gateway_agreement(gateway: Gateway) -> AgreementSource:
    """Shadow agreement read from the gateway's shadow registry.

    A route has a shadow when its rules give it one now; its counts survive
    reloads in the registry, so a step's difference stays meaningful.
    """

    def read(route: str) -> tuple[int, int] | None:
        plan = gateway.state.plans.get(route)
        if plan is None or plan.route is None or plan.route.shadow is None:
            return None
        stats = gateway.shadows.routes.get(route)
        if stats is None:
            return (0, 0)
        return (stats.compared, stats.agreed)

    return read

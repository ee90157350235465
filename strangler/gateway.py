"""The gateway's live state: compiled routes, upstream pools and balancers.

A `GatewayState` is built from one `Rules` and never changed afterwards; a
reload builds a new one and swaps it in, so a request keeps the state it
started with. Upstreams whose definition did not change are carried over
whole into the new state, with their connection pools, health and counters.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from strangler.balancing import TargetState, make_balancer
from strangler.health import HealthChecker
from strangler.metrics import Metrics, UpstreamCollector
from strangler.model import Route, Rules, SplitEntry, Sticky, Upstream, UpstreamTls
from strangler.outlier import OutlierDetector
from strangler.proxy.hooks import ShadowSource
from strangler.proxy.upstream import TargetPool
from strangler.retry_budget import RetryBudget
from strangler.routing import Router
from strangler.runtime_weights import (
    RuntimeWeights,
    WeightError,
    WeightOverride,
    resolve_weights,
)
from strangler.security.rate_limit import ClientAddresses
from strangler.shadow.mirror import build_mirror
from strangler.shadow.registry import ShadowRegistry
from strangler.splitting import Splitter
from strangler.transforms.offload import ConversionPool

if TYPE_CHECKING:
    from strangler.security.gate import Gate

DEFAULT_ROUTE_NAME = "default"


class UpstreamRuntime:
    """One upstream's targets, their pools and the balancer that picks among them."""

    def __init__(self, model: Upstream, reactor: Any, rng: random.Random) -> None:
        self.model = model
        self.name = model.name
        self.states = [TargetState(target) for target in model.targets]
        self.pools = {
            id(state): _make_pool(state, reactor, model.tls) for state in self.states
        }
        self.balancer = make_balancer(
            model.balance, self.states, rng=rng, upstream=model.name
        )
        self.health: HealthChecker | None = None
        if model.health is not None:
            self.health = HealthChecker(
                model.name, model.health, self.states, reactor, model.tls
            )
            self.health.start()
        self.outlier = OutlierDetector(model.name, model.outlier, self.states, reactor)
        self.retry_budget = RetryBudget(reactor)
        self.in_flight = 0
        self.waiting: deque[Any] = deque()
        # Counted for the admin API and /metrics: requests served by a
        # fallback instead, 503s from circuit breaking, and retries.
        self.fallbacks = 0
        self.overflows = 0
        self.retries = 0

    def admit(self, exchange: Any) -> bool:
        """Circuit breaking: True to go ahead now, False when queued or refused.

        Past `max_connections` requests in flight a request waits in a queue
        of at most `max_pending`; past that `exchange.overloaded()` answers
        503 at once rather than queuing without bound.
        """
        limit = self.model.max_connections
        if limit is None or self.in_flight < limit:
            self.in_flight += 1
            return True
        pending = self.model.max_pending
        if pending is not None and len(self.waiting) < pending:
            self.waiting.append(exchange)
            return False
        self.overflows += 1
        exchange.overloaded(self.name)
        return False

    def leave(self) -> None:
        """A request finished with this upstream; let a waiting one in."""
        self.in_flight -= 1
        while self.waiting:
            exchange = self.waiting.popleft()
            if not exchange.finished:
                self.in_flight += 1
                exchange.admitted()
                return

    def any_available(self, exclude: tuple[TargetState, ...] = ()) -> bool:
        """Whether a target not in `exclude` is in rotation (healthy, not ejected)."""
        return any(s.available and s not in exclude for s in self.states)

    def pick(
        self, client_ip: str | None, exclude: tuple[TargetState, ...] = ()
    ) -> tuple[TargetState, TargetPool]:
        """A target for one attempt, and the pool that reaches it."""
        state = self.balancer.pick(client_ip, exclude)
        return state, self.pools[id(state)]

    def close(self) -> None:
        if self.health is not None:
            self.health.stop()
        self.outlier.stop()
        for pool in self.pools.values():
            pool.close_idle()


def _make_pool(
    state: TargetState, reactor: Any, trust: UpstreamTls | None = None
) -> TargetPool:
    tls = None
    if state.target.scheme == "https":
        from strangler.security.tls import client_tls_options

        tls = client_tls_options(state.target.host, trust)
    return TargetPool(state, reactor, tls_options=tls)


@dataclass(frozen=True, slots=True)
class Branch:
    """One split entry resolved against the live upstreams."""

    entry: SplitEntry
    upstream: UpstreamRuntime
    timeout: float
    connect_timeout: float
    idle_timeout: float


@dataclass(slots=True)
class RoutePlan:
    """Everything the proxy needs to send a request that matched one route."""

    name: str
    route: Route | None
    branches: tuple[Branch, ...]
    splitter: Splitter | None
    sticky: Sticky | None
    override_header: bytes | None
    by_upstream: dict[str, int] = field(default_factory=dict)
    weight_source: str = "rules"
    shadow: ShadowSource | None = None
    fallbacks: dict[str, Branch] = field(default_factory=dict)

    def rule_weights(self) -> dict[str, float]:
        """The weights the rule file gives this route's split."""
        return {b.entry.to: b.entry.weight for b in self.branches}

    def effective_weights(self) -> dict[str, float]:
        """The weights in force now (rule file or runtime)."""
        if self.splitter is None:
            return {b.entry.to: 100.0 for b in self.branches}
        return dict(zip(self.splitter.labels, self.splitter.weights, strict=True))


class GatewayState:
    """One rule file, compiled and bound to live upstreams."""

    def __init__(
        self,
        rules: Rules,
        reactor: Any,
        previous: GatewayState | None = None,
        rng: random.Random | None = None,
        runtime: RuntimeWeights | None = None,
        shadows: ShadowRegistry | None = None,
    ) -> None:
        self.rules = rules
        self.rng = rng or random.Random()
        self.runtime = runtime if runtime is not None else RuntimeWeights()
        self.shadows = shadows if shadows is not None else ShadowRegistry(reactor)
        # Runtime overrides the rule file has since changed; dropped by
        # `Gateway` once this state is in use, not while it is being built.
        self.stale_overrides: list[str] = []
        self.router = Router(rules.routes)
        self.client_addresses = ClientAddresses(rules.trusted_proxies)
        self.upstreams: dict[str, UpstreamRuntime] = {}
        try:
            self._bind_upstreams(rules, reactor, previous)
            self._build(rules, reactor, previous)
        except BaseException:
            # Health checks of the upstreams built so far would poll forever.
            self._discard_new_parts(previous)
            raise

    def _build(self, rules: Rules, reactor: Any, previous: GatewayState | None) -> None:
        from strangler.security.gate import build_gate

        self.gate: Gate | None = build_gate(
            rules, reactor, previous.gate if previous is not None else None
        )
        self.plans = {route.name: self._plan(route) for route in rules.routes}
        default_entry = SplitEntry(to=rules.default)
        self.default_plan = RoutePlan(
            name=DEFAULT_ROUTE_NAME,
            route=None,
            branches=(self._branch(default_entry),),
            splitter=None,
            sticky=None,
            override_header=None,
        )

    def _discard_new_parts(self, previous: GatewayState | None) -> None:
        """Close what a build that failed opened, leaving `previous` whole."""
        kept = previous.upstreams if previous is not None else {}
        for name, runtime in self.upstreams.items():
            if kept.get(name) is not runtime:
                runtime.close()
        gate = getattr(self, "gate", None)
        if gate is not None:
            gate.close(keep=previous.gate if previous is not None else None)

    def plan_for(self, route: Route | None) -> RoutePlan:
        return self.default_plan if route is None else self.plans[route.name]

    def retired_upstreams(self, newer: GatewayState) -> list[UpstreamRuntime]:
        """Upstreams of this state that `newer` no longer uses."""
        return [
            runtime
            for name, runtime in self.upstreams.items()
            if newer.upstreams.get(name) is not runtime
        ]

    def _bind_upstreams(
        self, rules: Rules, reactor: Any, previous: GatewayState | None
    ) -> None:
        bound = self.upstreams
        for name, model in rules.upstreams.items():
            old = previous.upstreams.get(name) if previous is not None else None
            if old is not None and old.model == model:
                bound[name] = old
            else:
                bound[name] = UpstreamRuntime(model, reactor, self.rng)

    def _branch(self, entry: SplitEntry) -> Branch:
        upstream = self.upstreams[entry.to]
        rules = self.rules
        timeout = _first(entry.timeout, upstream.model.timeout, rules.timeout)
        return Branch(
            entry=entry,
            upstream=upstream,
            timeout=timeout,
            connect_timeout=_first(
                entry.connect_timeout,
                upstream.model.connect_timeout,
                rules.connect_timeout,
            ),
            # Without its own setting, the gap allowed inside a body is the
            # wait allowed for the head in force here, not the top-level one.
            idle_timeout=_first(
                entry.idle_timeout, upstream.model.idle_timeout, timeout
            ),
        )

    def _plan(self, route: Route) -> RoutePlan:
        branches = tuple(self._branch(entry) for entry in route.split)
        splitter = None
        source = "rules"
        if len(branches) > 1:
            splitter = make_splitter(route.split, self.rng)
            override = self.runtime.get(route.name)
            rule_weights = {entry.to: entry.weight for entry in route.split}
            if override is not None and override.base == rule_weights:
                splitter = Splitter(
                    [override.weights[entry.to] for entry in route.split],
                    labels=[entry.to for entry in route.split],
                    rng=self.rng,
                )
                source = "runtime"
            elif override is not None:
                # The rule file changed this split since the runtime change: it wins.
                self.stale_overrides.append(route.name)
        return RoutePlan(
            name=route.name,
            route=route,
            branches=branches,
            splitter=splitter,
            sticky=route.sticky,
            override_header=(
                route.override.header.lower().encode("latin-1")
                if route.override is not None
                else None
            ),
            by_upstream={b.entry.to: i for i, b in enumerate(branches)},
            weight_source=source,
            fallbacks=self._fallbacks(route, branches),
            shadow=build_mirror(route, self, self.shadows),
        )

    def _fallbacks(
        self, route: Route, branches: tuple[Branch, ...]
    ) -> dict[str, Branch]:
        """For each branch with a `fallback`, the branch that serves instead.

        The fallback upstream's own branch in the same split is used when there
        is one, so it gets its own rewrite and transform; otherwise the request
        goes to it as the client sent it, with the route's own timeouts.
        """
        found = {}
        own = {b.entry.to: b for b in branches}
        for branch in branches:
            name = branch.entry.fallback
            if name is None:
                continue
            found[branch.entry.to] = own.get(name) or self._branch(
                SplitEntry(
                    to=name,
                    timeout=route.timeout,
                    connect_timeout=route.connect_timeout,
                    idle_timeout=route.idle_timeout,
                )
            )
        return found

    def set_weights(
        self, route_name: str, requested: dict[str, object], at: float, by: str
    ) -> dict[str, float]:
        """Change a route's split at runtime; returns the weights now in force."""
        plan = self.plans.get(route_name)
        if plan is None:
            raise WeightError(f"no route named {route_name!r}")
        if plan.splitter is None:
            raise WeightError(
                f"route {route_name!r} has a single upstream, not a split"
            )
        base = plan.rule_weights()
        weights = resolve_weights(route_name, base, requested)
        plan.splitter = Splitter(
            [weights[b.entry.to] for b in plan.branches],
            labels=[b.entry.to for b in plan.branches],
            rng=self.rng,
        )
        if weights == base:
            self.runtime.clear(route_name)
            plan.weight_source = "rules"
        else:
            self.runtime.set(route_name, WeightOverride(weights, base, at, by))
            plan.weight_source = "runtime"
        return weights


def make_splitter(entries: tuple[SplitEntry, ...], rng: random.Random) -> Splitter:
    """A splitter whose branch labels are the upstream names, so keys stay put."""
    return Splitter(
        [entry.weight for entry in entries],
        labels=[entry.to for entry in entries],
        rng=rng,
    )


def _first(*values: float | None) -> float:
    for value in values:
        if value is not None:
            return value
    raise ValueError("no value given")


class Gateway:
    """Holds the current state and swaps it on reload; the proxy reads `state`."""

    def __init__(
        self,
        rules: Rules,
        reactor: Any,
        access_log: Callable[[dict[str, Any]], None] | None = None,
        rng: random.Random | None = None,
        runtime: RuntimeWeights | None = None,
    ) -> None:
        self.reactor = reactor
        self.rng = rng or random.Random()
        self.runtime = runtime if runtime is not None else RuntimeWeights()
        # Shadow counts, learned noise and shadow pools outlive reloads.
        self.shadows = ShadowRegistry(reactor)
        self.state = GatewayState(
            rules, reactor, rng=self.rng, runtime=self.runtime, shadows=self.shadows
        )
        self._drop_stale_overrides(self.state)
        self.access_log = access_log
        self.metrics = Metrics()
        self.metrics.sources.append(
            lambda: self.state.gate.counters if self.state.gate is not None else None
        )
        upstreams = UpstreamCollector(lambda: self.state.upstreams.values())
        self.metrics.sources.append(lambda: upstreams)
        self.connections: set[Any] = set()
        self.draining = False
        # Large bodies are converted in these threads, off the reactor.
        self.conversions = ConversionPool(reactor)

    @property
    def rules(self) -> Rules:
        return self.state.rules

    def apply(self, rules: Rules) -> GatewayState:
        """Switch to new rules; requests already running finish on the old state."""
        old = self.state
        new = GatewayState(
            rules,
            self.reactor,
            previous=old,
            rng=self.rng,
            runtime=self.runtime,
            shadows=self.shadows,
        )
        self.state = new
        self._drop_stale_overrides(new)
        for runtime in old.retired_upstreams(new):
            runtime.close()
        if old.gate is not None:
            old.gate.close(keep=new.gate)
        return new

    def _drop_stale_overrides(self, state: GatewayState) -> None:
        for name in state.stale_overrides:
            self.runtime.clear(name)

    def set_weights(
        self, route_name: str, requested: dict[str, object], by: str = "admin"
    ) -> dict[str, float]:
        """Shift a split now; kept in the state file until the rule file changes it."""
        return self.state.set_weights(route_name, requested, self.reactor.seconds(), by)

    def close(self) -> None:
        for runtime in self.state.upstreams.values():
            runtime.close()
        if self.state.gate is not None:
            self.state.gate.close()
        self.shadows.close()
        self.conversions.close()

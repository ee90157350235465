"""The gateway-wide home of shadow state that must outlive a reload.

A reload builds a new `GatewayState` and its mirrors, but a route's counts,
its learned noise, its in-flight bound and the shadow's keep-alive
connections belong to the route, not to one version of the rule file. The
`Gateway` keeps one `ShadowRegistry` for its whole life and every state it
builds takes per-route `RouteStats` and per-target pools from it.

Shadow pools are separate from the pools that carry client traffic, so a
shadow target that hangs ties up only its own connections, never one a
client request is waiting for.
"""

from __future__ import annotations

from typing import Any

from strangler.balancing import TargetState
from strangler.model import Target, UpstreamTls
from strangler.proxy.upstream import TargetPool
from strangler.shadow.stats import Redactor, RouteStats

__all__ = ["ShadowRegistry"]


class ShadowRegistry:
    """Per-route shadow statistics and the shadow's own connection pools."""

    def __init__(
        self, reactor: Any, secret_headers: frozenset[str] = frozenset()
    ) -> None:
        self.reactor = reactor
        self.routes: dict[str, RouteStats] = {}
        self.pools: dict[tuple[str, str, int, UpstreamTls | None], TargetPool] = {}
        self.redactor = Redactor(secret_headers)

    def stats_for(self, route: str) -> RouteStats:
        stats = self.routes.get(route)
        if stats is None:
            stats = self.routes[route] = RouteStats(route)
        return stats

    def pool_for(self, target: Target, trust: UpstreamTls | None = None) -> TargetPool:
        """The shadow side's pool for one target, made on first use."""
        key = (target.scheme, target.host, target.port, trust)
        pool = self.pools.get(key)
        if pool is None:
            tls = None
            if target.scheme == "https":
                from strangler.security.tls import client_tls_options

                tls = client_tls_options(target.host, trust)
            pool = TargetPool(TargetState(target), self.reactor, tls_options=tls)
            self.pools[key] = pool
        return pool

    def close(self) -> None:
        """Close idle shadow connections (the gateway is stopping)."""
        for pool in self.pools.values():
            pool.close_idle()

"""Active health checks: take failing targets out of rotation, bring them back.

Each upstream with a `health` block gets one checker that probes every
target on its own timer, off the request path. A target leaves rotation
after `unhealthy_after` failed probes in a row and returns after
`healthy_after` good ones; targets start in rotation, so a gateway that
restarts does not refuse traffic while it waits for its first probes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from treq.client import HTTPClient
from twisted.internet.task import LoopingCall
from twisted.web.client import Agent, HTTPConnectionPool

from strangler.balancing import TargetState
from strangler.model import HealthCheck, UpstreamTls
from strangler.security.tls import UpstreamTrust

log = structlog.get_logger("strangler.health")


class TargetHealth:
    """Probe streaks for one target, and the decision they lead to."""

    __slots__ = ("failures", "last_error", "state", "successes")

    def __init__(self, state: TargetState) -> None:
        self.state = state
        self.successes = 0
        self.failures = 0
        self.last_error = ""

    def record(self, ok: bool, check: HealthCheck, error: str = "") -> bool | None:
        """Count one probe; returns the new availability when it changes."""
        state = self.state
        if ok:
            self.successes += 1
            self.failures = 0
            if not state.healthy and self.successes >= check.healthy_after:
                state.healthy = True
                state.refresh()
                return True
            return None
        self.failures += 1
        self.successes = 0
        self.last_error = error
        if state.healthy and self.failures >= check.unhealthy_after:
            state.healthy = False
            state.refresh()
            return False
        return None


class HealthChecker:
    """Probes every target of one upstream every `interval`."""

    def __init__(
        self,
        upstream: str,
        check: HealthCheck,
        states: Sequence[TargetState],
        reactor: Any,
        tls: UpstreamTls | None = None,
    ) -> None:
        self.upstream = upstream
        self.check = check
        self.reactor = reactor
        self.targets = [TargetHealth(state) for state in states]
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        # Probes of https:// targets trust what the proxied requests trust.
        agent = Agent(reactor, contextFactory=UpstreamTrust(tls), pool=self._pool)
        self._client = HTTPClient(agent)
        self._loop = LoopingCall(self.probe_all)
        self._loop.clock = reactor
        self._in_flight = 0

    def start(self) -> None:
        self._loop.start(self.check.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def probe_all(self) -> None:
        if self._in_flight:
            return
        for target in self.targets:
            self._probe(target)

    def _probe(self, target: TargetHealth) -> None:
        url = target.state.target.url.rstrip("/") + self.check.path
        self._in_flight += 1
        request = self._client.get(
            url, timeout=self.check.timeout, allow_redirects=False
        )
        request.addCallback(self._answered, target)
        request.addErrback(
            lambda failure: self._record(target, False, failure.getErrorMessage())
        )
        request.addBoth(self._done)

    def _answered(self, response: Any, target: TargetHealth) -> Any:
        low, high = self.check.expect_status
        ok = low <= response.code <= high
        done = response.content()
        done.addBoth(lambda _: self._record(target, ok, f"status {response.code}"))
        return done

    def _done(self, _result: Any) -> None:
        self._in_flight -= 1

    def _record(self, target: TargetHealth, ok: bool, error: str) -> None:
        changed = target.record(ok, self.check, error)
        if changed is None:
            return
        log.warning(
            "target_healthy" if changed else "target_unhealthy",
            upstream=self.upstream,
            target=target.state.target.url,
            reason=None if changed else error,
        )

"""Passive outlier ejection: learn from real traffic which target is failing.

A target that fails `consecutive_failures` requests in a row (connection
refused or reset, or a 5xx answer) leaves rotation for `base_ejection` times
its ejection level, which rises by one with each ejection (up to
MAX_EJECTION_FACTOR), so a target that keeps failing stays out longer. The
level falls by one for every `base_ejection` the target then spends back in
rotation without being ejected, so a target that recovered for good is
judged afresh. Ejection never takes more than `max_ejection_percent` of an
upstream's targets out at once; when every target is unavailable anyway the
balancer's panic mode still sends traffic rather than refusing it all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from strangler.balancing import TargetState
from strangler.model import Outlier

log = structlog.get_logger("strangler.outlier")

MAX_EJECTION_FACTOR = 10


class OutlierDetector:
    """Counts failures per target of one upstream and ejects repeat offenders."""

    def __init__(
        self,
        upstream: str,
        policy: Outlier,
        states: Sequence[TargetState],
        reactor: Any,
    ) -> None:
        self.upstream = upstream
        self.policy = policy
        self.states = states
        self.reactor = reactor
        self._timers: dict[int, Any] = {}

    def success(self, state: TargetState) -> None:
        state.failures_in_a_row = 0

    def failure(self, state: TargetState) -> None:
        state.failures_in_a_row += 1
        if (
            state.failures_in_a_row >= self.policy.consecutive_failures
            and not state.ejected
        ):
            self._eject(state)

    def _eject(self, state: TargetState) -> None:
        ejected_now = sum(1 for s in self.states if s.ejected)
        allowed = int(len(self.states) * self.policy.max_ejection_percent / 100)
        if ejected_now + 1 > allowed:
            return
        base = self.policy.base_ejection
        level = state.ejection_level
        if level and base > 0:
            # Time served well since the last return lowers the level again.
            quiet = self.reactor.seconds() - state.returned_at
            level = max(0, level - int(quiet // base))
        state.ejection_level = min(level + 1, MAX_EJECTION_FACTOR)
        state.ejections += 1
        state.ejected = True
        state.failures_in_a_row = 0
        state.refresh()
        duration = base * state.ejection_level
        self._timers[id(state)] = self.reactor.callLater(duration, self._return, state)
        log.warning(
            "target_ejected",
            upstream=self.upstream,
            target=state.target.url,
            seconds=duration,
            times=state.ejections,
        )

    def _return(self, state: TargetState) -> None:
        self._timers.pop(id(state), None)
        state.ejected = False
        state.returned_at = self.reactor.seconds()
        state.refresh()
        log.info("target_returned", upstream=self.upstream, target=state.target.url)

    def stop(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()

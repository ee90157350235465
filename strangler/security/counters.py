"""What the security layer refused and what went wrong with shared state, counted.

Counting is a dictionary increment on the refusal path only; accepted
requests are already counted by the proxy's metrics. `collect` yields
Prometheus families so the admin API's registry can include them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily

__all__ = ["SecurityCounters"]


class SecurityCounters:
    """Refusals by (kind, reason), shared-state errors and key-set fetch failures."""

    def __init__(self) -> None:
        self.refused: dict[tuple[str, str], int] = {}
        self.state_errors = 0
        self.jwks_failures = 0

    def refuse(self, kind: str, reason: str) -> None:
        key = (kind, reason)
        self.refused[key] = self.refused.get(key, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """Plain data for the admin API and tests."""
        return {
            "refused": {
                f"{kind}:{reason}": n for (kind, reason), n in self.refused.items()
            },
            "state_errors": self.state_errors,
            "jwks_failures": self.jwks_failures,
        }

    def collect(self) -> Iterator[Any]:
        refused = CounterMetricFamily(
            "strangler_security_refused",
            "Requests refused at the edge, by kind and reason.",
            labels=["kind", "reason"],
        )
        for (kind, reason), value in sorted(self.refused.items()):
            refused.add_metric([kind, reason], value)
        yield refused
        yield CounterMetricFamily(
            "strangler_shared_state_errors",
            "Rate-limit decisions made without Redis because it could not be reached.",
            value=self.state_errors,
        )
        yield CounterMetricFamily(
            "strangler_jwks_fetch_failures",
            "JWKS downloads that failed or returned an unusable key set.",
            value=self.jwks_failures,
        )

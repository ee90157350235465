"""A retry budget: retries add at most a share of an upstream's traffic.

Every first attempt deposits `ratio` of a token and time adds `min_per_second`
tokens, up to `capacity`; every retry spends one. A fresh budget holds a few
tokens so that a short incident is absorbed while outlier ejection catches
up. When an upstream fails wholesale, retries stop once the budget is spent
instead of doubling the load
on whatever is left.
"""

from __future__ import annotations

from typing import Any

RATIO = 0.2
MIN_PER_SECOND = 3.0
INITIAL = 10.0
CAPACITY = 100.0


class RetryBudget:
    """Token bucket fed by traffic and time, spent by retries."""

    __slots__ = ("_last", "capacity", "clock", "min_per_second", "ratio", "tokens")

    def __init__(
        self,
        clock: Any,
        ratio: float = RATIO,
        min_per_second: float = MIN_PER_SECOND,
        capacity: float = CAPACITY,
    ) -> None:
        self.clock = clock
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.capacity = capacity
        self.tokens = INITIAL
        self._last = clock.seconds()

    def deposit(self) -> None:
        """A first attempt was sent: it earns a fraction of a retry."""
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.capacity else self.capacity

    def spend(self) -> bool:
        """Take one retry from the budget; False when it is empty."""
        now = self.clock.seconds()
        elapsed = now - self._last
        self._last = now
        self.tokens = min(self.capacity, self.tokens + elapsed * self.min_per_second)
        if self.tokens > 1.0 - 1e-9:  # deposits of 0.2 add up to 0.999...
            self.tokens -= 1.0
            return True
        return False

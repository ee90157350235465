"""Choosing one target of an upstream for each request.

Every balancer reads the same mutable `TargetState` objects that the proxy,
health checks and outlier ejection write to, and `pick` runs once per
request, so each policy does its arithmetic at construction (interleaving
cycles, scan orders, hash rings, cumulative weights) and a pick is a short
loop over a handful of targets or one binary search.

Candidates are the targets that are `available` and not in `exclude` (the
targets a retry already tried). When no target is available the balancer
panics: it follows its policy over every target not excluded, because sending
traffic to a target that health checks doubt beats refusing all of it. Only
when every target is excluded does `pick` raise `NoTargetAvailable`.
"""

from __future__ import annotations

import math
import random
import struct
from array import array
from bisect import bisect_right
from collections.abc import Collection, Sequence
from hashlib import blake2b
from itertools import accumulate

from strangler.errors import UpstreamConnectError
from strangler.model import Target

__all__ = [
    "BALANCERS",
    "Balancer",
    "IpHash",
    "LeastConn",
    "NoTargetAvailable",
    "RandomTwoChoices",
    "RoundRobin",
    "TargetState",
    "make_balancer",
]

# Longest interleaving cycle kept in memory; heavier weight sums run the same
# algorithm live, which costs one pass over the targets per pick.
CYCLE_LIMIT = 4096

# Points on the hash ring per unit of weight. More points spread clients more
# evenly (a target's share strays by about 1/sqrt(points), 4.5% at 500) but
# cost some 50 bytes each, hence the ceiling on the sum of weights.
RING_POINTS_PER_WEIGHT = 500
RING_MAX_WEIGHT = 1000

# Weighted draws that `random` retries before listing the candidates.
DRAW_TRIES = 4

_RING_END = 1 << 64


class NoTargetAvailable(UpstreamConnectError):
    """Every target of an upstream was excluded, so there is nothing left to try."""


class TargetState:
    """What the gateway knows about one target right now.

    `active` counts requests in flight (the proxy raises and lowers it) and
    `available` is cleared by health checks and outlier ejection. Balancers
    only read these fields; states compare by identity, so `exclude` may be
    any collection of them.
    """

    __slots__ = (
        "active",
        "available",
        "ejected",
        "ejection_level",
        "ejections",
        "failures_in_a_row",
        "healthy",
        "returned_at",
        "target",
    )

    def __init__(self, target: Target, active: int = 0, available: bool = True) -> None:
        self.target = target
        self.active = active
        self.available = available
        self.healthy = available
        self.ejected = False
        self.ejections = 0
        self.ejection_level = 0
        self.returned_at = 0.0
        self.failures_in_a_row = 0

    def refresh(self) -> None:
        """Recompute `available` from the health check and the ejection state."""
        self.available = self.healthy and not self.ejected

    def __repr__(self) -> str:
        return (
            f"TargetState({self.target.url!r}, active={self.active}, "
            f"available={self.available})"
        )


class Balancer:
    """A balancing policy over a fixed list of target states.

    Subclasses implement `_choose`, which returns None when no target meets
    the bar; `pick` lowers the bar from available targets to any target not
    excluded before it gives up.
    """

    name = ""
    by_client = False
    """Whether `pick` uses the client address (the proxy computes it only then)."""

    def __init__(
        self,
        states: Sequence[TargetState],
        rng: random.Random | None = None,
        *,
        upstream: str = "",
    ) -> None:
        if not states:
            raise ValueError(
                f"upstream {upstream!r} has no targets; expected at least one"
            )
        for state in states:
            weight = state.target.weight
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                raise ValueError(
                    f"target {state.target.url} has weight {weight!r}; "
                    "expected an integer of at least 1"
                )
        self.states: tuple[TargetState, ...] = tuple(states)
        self.upstream = upstream
        self._rng = rng if rng is not None else random.Random()
        self._weights: tuple[int, ...] = tuple(s.target.weight for s in self.states)

    def pick(
        self, client_ip: str | None = None, exclude: Collection[TargetState] = ()
    ) -> TargetState:
        """The target for the next request; `NoTargetAvailable` if all are excluded."""
        state = self._choose(client_ip, exclude, True)
        if state is None:
            state = self._choose(client_ip, exclude, False)
            if state is None:
                raise self._nothing_left()
        return state

    def _choose(
        self,
        client_ip: str | None,
        exclude: Collection[TargetState],
        need_available: bool,
    ) -> TargetState | None:
        raise NotImplementedError

    def _nothing_left(self) -> NoTargetAvailable:
        name = f"upstream {self.upstream!r}" if self.upstream else "the upstream"
        return NoTargetAvailable(
            f"no target left to try for {name}: all {len(self.states)} targets "
            f"were excluded ({', '.join(s.target.url for s in self.states)})"
        )


def _smooth_step(
    states: Sequence[TargetState],
    weights: Sequence[int],
    current: list[int],
    exclude: Collection[TargetState],
    need_available: bool,
) -> int:
    """One step of smooth weighted round robin over the candidates; -1 if none.

    Each candidate earns its weight, the richest is chosen and pays back what
    all candidates earned together, so heavy targets are spread through the
    cycle instead of served in a burst.
    """
    best = -1
    best_current = 0
    total = 0
    for index, state in enumerate(states):
        if (need_available and not state.available) or state in exclude:
            continue
        weight = weights[index]
        total += weight
        now = current[index] + weight
        current[index] = now
        if best < 0 or now > best_current:
            best = index
            best_current = now
    if best >= 0:
        current[best] = best_current - total
    return best


def _smooth_cycle(weights: Sequence[int], limit: int | None = None) -> list[int] | None:
    """The target indexes of one full smooth round robin cycle, or None if too long.

    This is `_smooth_step` with every target a candidate. Dividing the weights
    by their common divisor leaves the order unchanged, since every running
    total scales by the same factor.
    """
    divisor = math.gcd(*weights)
    reduced = [weight // divisor for weight in weights]
    length = sum(reduced)
    if length > (CYCLE_LIMIT if limit is None else limit):
        return None

    current = [0] * len(reduced)
    cycle = []
    for _ in range(length):
        for index, weight in enumerate(reduced):
            current[index] += weight
        best = current.index(max(current))
        current[best] -= length
        cycle.append(best)
    return cycle


class RoundRobin(Balancer):
    """Smooth weighted round robin: weights 5,1,1 give a a b a c a a, then again.

    While every target is a candidate a pick is one step along a precomputed
    cycle. A cycle slot whose target is down or excluded is filled by the
    live algorithm over the remaining candidates, so their shares keep
    following their weights.
    """

    name = "round_robin"

    def __init__(
        self,
        states: Sequence[TargetState],
        rng: random.Random | None = None,
        *,
        upstream: str = "",
    ) -> None:
        super().__init__(states, rng, upstream=upstream)
        cycle = _smooth_cycle(self._weights)
        self._cycle = None if cycle is None else tuple(self.states[i] for i in cycle)
        self._position = 0
        self._current = [0] * len(self.states)

    def pick(
        self, client_ip: str | None = None, exclude: Collection[TargetState] = ()
    ) -> TargetState:
        cycle = self._cycle
        if cycle is not None:
            position = self._position
            state = cycle[position]
            position += 1
            self._position = position if position < len(cycle) else 0
            if state.available and state not in exclude:
                return state
        return Balancer.pick(self, client_ip, exclude)

    def _choose(
        self,
        client_ip: str | None,
        exclude: Collection[TargetState],
        need_available: bool,
    ) -> TargetState | None:
        index = _smooth_step(
            self.states, self._weights, self._current, exclude, need_available
        )
        return self.states[index] if index >= 0 else None


class LeastConn(Balancer):
    """Fewest requests in flight per unit of weight.

    Ties go to the first tied target in a scan whose starting point moves
    along a weighted round robin cycle, so idle targets share requests by
    weight rather than all of them going to the first one listed.
    """

    name = "least_conn"

    def __init__(
        self,
        states: Sequence[TargetState],
        rng: random.Random | None = None,
        *,
        upstream: str = "",
    ) -> None:
        super().__init__(states, rng, upstream=upstream)
        pairs = [(s, 1.0 / s.target.weight) for s in self.states]
        count = len(pairs)
        orders = [tuple(pairs[i:] + pairs[:i]) for i in range(count)]
        starts = _smooth_cycle(self._weights)
        if starts is None:
            # Tie-breaking only needs the proportions, so squeeze the weights.
            total = sum(self._weights)
            squeezed = [max(1, CYCLE_LIMIT * w // total) for w in self._weights]
            starts = _smooth_cycle(squeezed, limit=CYCLE_LIMIT + count)
            assert starts is not None
        self._orders = tuple(orders[start] for start in starts)
        self._turn = 0

    def _choose(
        self,
        client_ip: str | None,
        exclude: Collection[TargetState],
        need_available: bool,
    ) -> TargetState | None:
        turn = self._turn
        order = self._orders[turn]
        turn += 1
        self._turn = turn if turn < len(self._orders) else 0

        best = None
        best_load = 0.0
        for state, inverse in order:
            if (need_available and not state.available) or state in exclude:
                continue
            load = state.active * inverse
            if best is None or load < best_load:
                best = state
                best_load = load
        return best


def _stable_hash(prefix: blake2b, data: bytes) -> int:
    """64 bits of blake2b: the same in every process, unlike the builtin `hash`."""
    hasher = prefix.copy()
    hasher.update(data)
    return int.from_bytes(hasher.digest(), "big")


_IP_PREFIX = blake2b(b"strangler ip_hash client\x00", digest_size=8)
_POINT_PREFIX = blake2b(b"strangler ip_hash point\x00", digest_size=64)
_EIGHT_POINTS = struct.Struct(">8Q")


def _ring_points(label: bytes, count: int) -> list[int]:
    """`count` stable ring positions for one target, eight per 64-byte digest.

    The first n positions do not depend on `count`, so a heavier target keeps
    the points it had and only adds more.
    """
    points: list[int] = []
    block = 0
    while len(points) < count:
        hasher = _POINT_PREFIX.copy()
        hasher.update(label + str(block).encode())
        points.extend(_EIGHT_POINTS.unpack(hasher.digest()))
        block += 1
    del points[count:]
    return points


class IpHash(Balancer):
    """Consistent hashing of the client address onto a ring of virtual nodes.

    Each target owns `weight * RING_POINTS_PER_WEIGHT` points placed by a
    stable hash of its URL, so every worker and every restart builds the same
    ring, and a target's points do not depend on the other targets. A client
    goes to the owner of the first point at or after its own hash, skipping
    targets that are not candidates: removing or disabling one target moves
    only its own clients. Without a client address it falls back to round
    robin.
    """

    name = "ip_hash"
    by_client = True

    def __init__(
        self,
        states: Sequence[TargetState],
        rng: random.Random | None = None,
        *,
        upstream: str = "",
    ) -> None:
        super().__init__(states, rng, upstream=upstream)
        if sum(self._weights) > RING_MAX_WEIGHT:
            raise ValueError(
                f"ip_hash weights of upstream {upstream!r} sum to "
                f"{sum(self._weights)}; expected at most {RING_MAX_WEIGHT}, "
                "since every unit of weight costs ring points"
            )
        self._fallback = RoundRobin(self.states, self._rng, upstream=upstream)

        ring: list[tuple[int, int]] = []
        seen: dict[str, int] = {}
        for index, state in enumerate(self.states):
            url = state.target.url
            copy = seen.get(url, 0)
            seen[url] = copy + 1
            label = f"{url}\x00{copy}\x00".encode()
            count = state.target.weight * RING_POINTS_PER_WEIGHT
            ring.extend((point, index) for point in _ring_points(label, count))
        ring.sort()

        # A sentinel past every hash wraps the ring without a branch per pick.
        self._points = [point for point, _ in ring] + [_RING_END]
        owners = [self.states[index] for _, index in ring]
        self._owners = (*owners, owners[0])
        self._size = size = len(ring)

        # Where the next run of points owned by another target starts, so a
        # walk past a target that is down skips all of its points at once.
        skip = array("I", bytes(4 * size))
        for back in range(2 * size - 1, -1, -1):
            here = back % size
            after = (here + 1) % size
            skip[here] = after if owners[after] is not owners[here] else skip[after]
        self._skip = skip

    def pick(
        self, client_ip: str | None = None, exclude: Collection[TargetState] = ()
    ) -> TargetState:
        if client_ip is None:
            return self._fallback.pick(None, exclude)
        position = bisect_right(
            self._points, _stable_hash(_IP_PREFIX, client_ip.encode())
        )
        state = self._owners[position]
        if state.available and state not in exclude:
            return state
        return Balancer.pick(self, client_ip, exclude)

    def _choose(
        self,
        client_ip: str | None,
        exclude: Collection[TargetState],
        need_available: bool,
    ) -> TargetState | None:
        assert client_ip is not None
        for state in self.states:
            if (state.available or not need_available) and state not in exclude:
                break
        else:
            return None

        owners = self._owners
        skip = self._skip
        position = bisect_right(
            self._points, _stable_hash(_IP_PREFIX, client_ip.encode())
        )
        position %= self._size
        for _ in range(self._size):
            state = owners[position]
            if (state.available or not need_available) and state not in exclude:
                return state
            position = skip[position]
        return None  # not reached: some candidate owns a point on the ring


class RandomTwoChoices(Balancer):
    """Power of two choices: draw two targets by weight, keep the less loaded.

    Load is requests in flight per unit of weight, the same measure as
    `least_conn`; on a tie the first draw wins, so idle targets get exactly
    their weighted share.
    """

    name = "random"

    def __init__(
        self,
        states: Sequence[TargetState],
        rng: random.Random | None = None,
        *,
        upstream: str = "",
    ) -> None:
        super().__init__(states, rng, upstream=upstream)
        self._cumulative = list(accumulate(self._weights))
        self._total = self._cumulative[-1]
        self._inverse = tuple(1.0 / weight for weight in self._weights)

    def _draw(self, exclude: Collection[TargetState], need_available: bool) -> int:
        """A weighted draw among all targets, retried while it hits a non-candidate."""
        states = self.states
        cumulative = self._cumulative
        total = self._total
        random_ = self._rng.random
        for _ in range(DRAW_TRIES):
            index = bisect_right(cumulative, random_() * total)
            state = states[index]
            if (state.available or not need_available) and state not in exclude:
                return index
        return -1

    def _choose(
        self,
        client_ip: str | None,
        exclude: Collection[TargetState],
        need_available: bool,
    ) -> TargetState | None:
        first = self._draw(exclude, need_available)
        second = self._draw(exclude, need_available) if first >= 0 else -1
        if second < 0:
            # Candidates hold little of the weight: draw among them directly.
            indexes = [
                index
                for index, state in enumerate(self.states)
                if (state.available or not need_available) and state not in exclude
            ]
            if not indexes:
                return None
            weights = [self._weights[index] for index in indexes]
            first, second = self._rng.choices(indexes, weights, k=2)

        states = self.states
        inverse = self._inverse
        if (
            states[second].active * inverse[second]
            < states[first].active * inverse[first]
        ):
            return states[second]
        return states[first]


BALANCERS: dict[str, type[Balancer]] = {
    cls.name: cls for cls in (RoundRobin, LeastConn, IpHash, RandomTwoChoices)
}


def make_balancer(
    name: str,
    states: Sequence[TargetState],
    rng: random.Random | None = None,
    *,
    upstream: str = "",
) -> Balancer:
    """The balancer for a policy named in the rule file (`balance:`)."""
    cls = BALANCERS.get(name)
    if cls is None:
        raise ValueError(
            f"unknown balancing policy {name!r}; expected one of "
            f"{', '.join(sorted(BALANCERS))}"
        )
    return cls(states, rng, upstream=upstream)

"""Token buckets kept in memory, and the key that says whose bucket a request uses.

A bucket holds at most `burst` tokens and gains `rate` tokens a second; a
request takes one, or is refused with 429 when less than one is left. Over
any stretch of T seconds a key is therefore granted at most
`burst + rate * T` requests, which is what the accuracy test measures.

Buckets are refilled lazily when touched, so an idle key costs nothing but
its dictionary entry; a full bucket is the same as no bucket, which is what
lets the sweep drop idle keys without changing any answer.
"""

from __future__ import annotations

import ipaddress
import math

from strangler.model import Network, RateLimit
from strangler.proxy.headers import is_trusted
from strangler.proxy.hooks import Verdict

__all__ = [
    "ClientAddresses",
    "TokenBuckets",
    "accepted_verdict",
    "limited_verdict",
    "quota_headers",
]

DEFAULT_MAX_KEYS = 100_000


class TokenBuckets:
    """The buckets of one limit, one per key: `[tokens, last refill time]`."""

    __slots__ = ("_buckets", "burst", "limit", "max_keys", "rate")

    def __init__(self, limit: RateLimit, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.limit = limit
        self.rate = limit.rate
        self.burst = float(limit.burst)
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, key: str, now: float) -> list[float]:
        """The bucket for `key`, refilled up to `now`; the caller may take a token."""
        found = self._buckets.get(key)
        if found is None:
            if len(self._buckets) >= self.max_keys:
                self._sweep(now)
            found = self._buckets[key] = [self.burst, now]
            return found
        elapsed = now - found[1]
        if elapsed > 0:
            level = found[0] + elapsed * self.rate
            found[0] = level if level < self.burst else self.burst
            found[1] = now
        return found

    def take(self, key: str, now: float) -> float:
        """Take one token for `key`: the tokens left, or -1 when none could be taken."""
        found = self.bucket(key, now)
        if found[0] < 1.0:
            return -1.0
        found[0] -= 1.0
        return found[0]

    def _sweep(self, now: float) -> None:
        """Drop buckets that have refilled (they equal a new one); then the oldest."""
        rate, burst = self.rate, self.burst
        full = [
            key
            for key, (level, last) in self._buckets.items()
            if level + (now - last) * rate >= burst
        ]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            # Still full of busy keys: forget the oldest half. Those clients get
            # a fresh bucket, which can let a burst through; see docs/security.md.
            for key in list(self._buckets)[: self.max_keys // 2]:
                del self._buckets[key]


def quota_headers(limit: RateLimit, level: float) -> list[tuple[bytes, bytes]]:
    """`RateLimit-Limit` (the burst), `-Remaining` (whole tokens left) and `-Reset`.

    `RateLimit-Reset` is the number of seconds until the bucket is full
    again (0 when it is); the same three headers go on 429s and on accepted
    responses of a limited route.
    """
    level = max(level, 0.0)
    reset = max(0, math.ceil((limit.burst - level) / limit.rate))
    return [
        (b"RateLimit-Limit", b"%d" % limit.burst),
        (b"RateLimit-Remaining", b"%d" % math.floor(level)),
        (b"RateLimit-Reset", b"%d" % reset),
    ]


def limited_verdict(limit: RateLimit, level: float, consumer: str | None) -> Verdict:
    """429 with `Retry-After` and the `RateLimit-*` headers for a bucket at `level`."""
    level = max(level, 0.0)
    retry = max(1, math.ceil((1.0 - level) / limit.rate))
    return Verdict(
        allowed=False,
        status=429,
        error="rate_limited",
        message=f"too many requests; retry in {retry} s",
        consumer=consumer,
        response_headers=[
            (b"Retry-After", b"%d" % retry),
            *quota_headers(limit, level),
        ],
    )


def _tokens_left(pair: tuple[RateLimit, float]) -> float:
    return pair[1]


def accepted_verdict(base: Verdict, limits: list[tuple[RateLimit, float]]) -> Verdict:
    """`base` plus the `RateLimit-*` headers of the tightest of `limits`.

    `limits` pairs each limit the request drew from with the tokens left
    after the draw; the one with the fewest whole tokens left is reported,
    as the client will meet that one first.
    """
    if not limits:
        return base
    limit, level = limits[0] if len(limits) == 1 else min(limits, key=_tokens_left)
    return Verdict(
        True,
        consumer=base.consumer,
        strip=base.strip,
        upstream_headers=base.upstream_headers,
        response_headers=quota_headers(limit, level),
    )


class ClientAddresses:
    """The address a request is limited by, as `per: ip` sees it.

    The TCP peer, unless the peer is a trusted proxy: then the right-most
    address in `X-Forwarded-For` that is not itself a trusted proxy, since
    everything left of it was written by the client and may be invented.
    IPv6 clients are keyed by their /64, which one subscriber usually holds.
    """

    __slots__ = ("_cache", "_trusted")

    def __init__(self, trusted: tuple[Network, ...]) -> None:
        self._trusted = trusted
        self._cache: dict[str, str] = {}

    def of(self, peer: str, peer_trusted: bool, forwarded_for: bytes) -> str:
        """The key for a client at `peer`; `forwarded_for` ends with the peer itself."""
        if not peer_trusted:
            return self._key(peer)
        for raw in reversed(forwarded_for.split(b",")):
            address = raw.strip().decode("latin-1")
            if address and not is_trusted(address, self._trusted):
                return self._key(address)
        return self._key(peer)

    def _key(self, address: str) -> str:
        if ":" not in address:
            return address
        cached = self._cache.get(address)
        if cached is None:
            try:
                cached = str(ipaddress.ip_network(f"{address}/64", strict=False))
            except ValueError:
                cached = address
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[address] = cached
        return cached

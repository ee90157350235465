"""Token buckets in Redis, so every gateway that shares a Redis shares each limit.

One Lua script takes a token from every bucket a request draws from (the
route's and the consumer's) or from none of them, atomically, with Redis's
own clock so gateways on different machines agree on time. The buckets are
the same as the in-memory ones (`rate_limit.TokenBuckets`): a level and
the time it was last refilled, stored in a hash that expires once it would
have refilled completely.

The gateway never waits for Redis to come back: while no connection is up,
`take` returns None at once and the caller decides locally (or refuses,
with `on_state_error: deny`). txredisapi reconnects in the background.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint

from strangler.model import SharedState

__all__ = ["SharedBuckets"]

TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local levels = {}
local deny = 0
for i = 1, n do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', KEYS[i], 't', 'v')
  local level = burst
  if state[1] and state[2] then
    local elapsed = now - tonumber(state[1])
    if elapsed < 0 then elapsed = 0 end
    level = math.min(burst, tonumber(state[2]) + elapsed * rate / 1000000)
  end
  levels[i] = level
  if level < 1 and deny == 0 then deny = i end
end
local out = {deny}
for i = 1, n do
  local level = levels[i]
  if deny == 0 then
    level = level - 1
    local rate = tonumber(ARGV[2 * i - 1])
    local burst = tonumber(ARGV[2 * i])
    redis.call('HSET', KEYS[i], 't', string.format('%.0f', now),
               'v', string.format('%.6f', level))
    redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
  end
  out[i + 1] = string.format('%.6f', level)
end
return out
"""


class SharedBuckets:
    """A connection to Redis and the one script the rate limiter runs there."""

    def __init__(self, config: SharedState, reactor: Any) -> None:
        self.config = config
        factory = txredisapi.RedisFactory(
            f"{config.host}:{config.port}",
            config.db or None,
            1,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            password=config.password,
            replyTimeout=config.timeout,
            convertNumbers=False,
        )
        factory.initialDelay = 0.5
        factory.maxDelay = 2.0
        factory.startConnecting(
            HostnameEndpoint(reactor, config.host, config.port, timeout=2.0)
        )
        self._factory = factory

    @property
    def connected(self) -> bool:
        return any(conn.connected for conn in self._factory.pool)

    def key(self, *parts: str) -> str:
        return ":".join((self.config.prefix, "rl", *parts))

    def take(
        self, buckets: tuple[tuple[str, float, int], ...]
    ) -> Deferred[tuple[int, list[float]]] | None:
        """Take a token from every `(key, rate, burst)` or none; None when offline.

        Fires with `(deny, levels)`: `deny` is 0 when the tokens were taken,
        else the 1-based position of the first empty bucket; `levels` are
        the tokens left (or found, when refused) in each bucket.
        """
        conn = None
        for candidate in self._factory.pool:
            if candidate.connected:
                conn = candidate
                break
        if conn is None:
            return None
        keys = [key for key, _rate, _burst in buckets]
        args: list[str] = []
        for _key, rate, burst in buckets:
            args += (repr(float(rate)), str(burst))
        running: Deferred[Any] = conn.eval(TAKE_SCRIPT, keys, args)
        return running.addCallback(_parse_reply)

    def close(self) -> Deferred[Any]:
        return self._factory.disconnect()


def _parse_reply(reply: Any) -> tuple[int, list[float]]:
    if isinstance(reply, Exception):
        raise reply
    if not isinstance(reply, list) or not reply:
        raise txredisapi.InvalidResponse(
            f"unexpected reply from the rate script: {reply!r}"
        )
    return int(reply[0]), [float(level) for level in reply[1:]]

"""Checks shared by the ramp tests: 0 -> 1 -> 10 -> 50 -> 100 under load.

A ramp step sends every key of a fixed set at least twice and checks that
each key landed on exactly the upstream the split's hash gives it, that the
share is close to the weight, and that no key has left `users` since it
first got there.
"""

from __future__ import annotations

from collections.abc import Callable

from load import Reply, get

from strangler.splitting import Splitter

UPSTREAM = b"x-strangler-upstream"

RAMP = (0, 1, 10, 50, 100)
# Enough keys that 1% is about ten of them, so the first step really moves some.
RAMP_KEYS = [f"k{n}" for n in range(1000)]


def keys_on_users(keys: list[str], weight: float) -> set[str]:
    """Which sticky keys belong on `users` at this weight (the split's own hash).

    An independent statement of the promise "a key moves only onto the branch
    that grows" is the history check in `check_ramp_step`; this set pins the
    gateway to exactly the keys its documented hash assigns.
    """
    splitter = Splitter([100 - weight, weight], ["monolith", "users"])
    return {key for key in keys if splitter.pick_sticky(key) == 1}


def check_ramp_step(
    replies: list[Reply],
    keys: list[str],
    weight: float,
    history: dict[str, set[str]],
    header: bytes = UPSTREAM,
) -> None:
    """Every key on its one expected upstream; none left `users` since it got there."""
    assert {r.status for r in replies} == {200}
    landed: dict[str, set[bytes]] = {}
    for reply in replies:
        landed.setdefault(keys[reply.index % len(keys)], set()).add(
            reply.headers[header]
        )
    assert set(landed) == set(keys)
    assert all(len(upstreams) == 1 for upstreams in landed.values())
    on_users = {key for key, upstreams in landed.items() if upstreams == {b"users"}}

    assert on_users == keys_on_users(keys, weight)
    assert abs(len(on_users) / len(keys) * 100 - weight) <= 3
    if 0 < weight < 100:
        assert 0 < len(on_users) < len(keys)
    left = history.get("users", set()) - on_users
    assert not left, f"keys that left users at {weight}%: {sorted(left)[:5]}"
    moved = on_users - history.get("users", set())
    history["users"] = on_users
    history.setdefault("moved", set()).update(moved)


def sticky_request(keys: list[str]) -> Callable[[int], bytes]:
    return lambda i: get("/api/v1/users", {"X-User-Id": keys[i % len(keys)]})

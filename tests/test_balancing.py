"""Each balancing policy keeps the distribution promise it makes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from strangler import balancing
from strangler.balancing import (
    Balancer,
    IpHash,
    LeastConn,
    NoTargetAvailable,
    RandomTwoChoices,
    RoundRobin,
    TargetState,
    make_balancer,
)
from strangler.errors import UpstreamConnectError
from strangler.model import Target

POLICIES = ["round_robin", "least_conn", "ip_hash", "random"]
ROOT = Path(__file__).resolve().parent.parent


def make_states(*weights: int, base: int = 9001) -> list[TargetState]:
    return [
        TargetState(
            Target(
                url=f"http://127.0.0.1:{base + i}",
                scheme="http",
                host="127.0.0.1",
                port=base + i,
                weight=weight,
            )
        )
        for i, weight in enumerate(weights)
    ]


def client_ips(count: int) -> Iterator[str]:
    for n in range(count):
        yield f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def names(states: list[TargetState], picks: list[TargetState]) -> str:
    """Picks written as letters, `a` for the first state: easy to compare."""
    letters = {id(state): chr(ord("a") + i) for i, state in enumerate(states)}
    return "".join(letters[id(state)] for state in picks)


def shares(picks: list[TargetState]) -> Counter[str]:
    return Counter(state.target.url for state in picks)


class ScriptedRandom(random.Random):
    """A random source that returns the given numbers in order, for exact draws."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self._values = iter(values)

    def random(self) -> float:
        return next(self._values)


# round_robin


def test_round_robin_interleaves_heavy_target() -> None:
    states = make_states(5, 1, 1)
    balancer = make_balancer("round_robin", states)

    picks = [balancer.pick(None) for _ in range(14)]

    assert names(states, picks) == "aabacaa" * 2


@pytest.mark.parametrize("weights", [(5, 1, 1), (3, 2, 1), (4, 2), (2, 7, 1, 3)])
def test_round_robin_shares_are_exact_over_a_cycle(weights: tuple[int, ...]) -> None:
    states = make_states(*weights)
    balancer = make_balancer("round_robin", states)

    picks = [balancer.pick(None) for _ in range(sum(weights) * 3)]

    counts = shares(picks)
    assert [counts[s.target.url] for s in states] == [3 * w for w in weights]


def test_round_robin_live_path_gives_the_same_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Weights too heavy for a stored cycle run the same algorithm live."""
    monkeypatch.setattr(balancing, "CYCLE_LIMIT", 3)
    states = make_states(5, 1, 1)
    balancer = make_balancer("round_robin", states)

    picks = [balancer.pick(None) for _ in range(14)]

    assert names(states, picks) == "aabacaa" * 2


def test_round_robin_gives_a_down_targets_share_by_weight() -> None:
    states = make_states(5, 1, 1)
    states[2].available = False
    balancer = make_balancer("round_robin", states)

    picks = [balancer.pick(None) for _ in range(42)]

    counts = shares(picks)
    assert [counts[s.target.url] for s in states] == [35, 7, 0]


def test_round_robin_takes_a_recovered_target_back() -> None:
    states = make_states(1, 1)
    balancer = make_balancer("round_robin", states)
    states[1].available = False
    assert {balancer.pick(None).target.port for _ in range(4)} == {9001}

    states[1].available = True

    assert names(states, [balancer.pick(None) for _ in range(4)]) in ("abab", "baba")


# least_conn


def test_least_conn_prefers_the_least_loaded() -> None:
    states = make_states(1, 1, 1)
    states[0].active, states[1].active, states[2].active = 3, 1, 2
    balancer = make_balancer("least_conn", states)

    assert all(balancer.pick(None) is states[1] for _ in range(6))


def test_least_conn_divides_load_by_weight() -> None:
    states = make_states(3, 1)
    states[0].active, states[1].active = 2, 1
    balancer = make_balancer("least_conn", states)

    assert balancer.pick(None) is states[0]

    states[0].active = 4

    assert balancer.pick(None) is states[1]


def test_least_conn_fills_targets_in_proportion_to_weight() -> None:
    """Requests that never finish pile up 3:1 on weights 3 and 1."""
    states = make_states(3, 1)
    balancer = make_balancer("least_conn", states)

    for _ in range(40):
        balancer.pick(None).active += 1

    assert [s.active for s in states] == [30, 10]


def test_least_conn_rotates_among_equal_targets() -> None:
    states = make_states(1, 1, 1)
    balancer = make_balancer("least_conn", states)

    first = [balancer.pick(None) for _ in range(3)]
    rest = [balancer.pick(None) for _ in range(27)]

    assert len(set(map(id, first))) == 3
    assert sorted(shares(first + rest).values()) == [10, 10, 10]


def test_least_conn_idle_targets_share_by_weight() -> None:
    """Requests that finish before the next one arrives still follow weights."""
    states = make_states(3, 1)
    balancer = make_balancer("least_conn", states)

    picks = [balancer.pick(None) for _ in range(40)]

    counts = shares(picks)
    assert [counts[s.target.url] for s in states] == [30, 10]


def test_least_conn_heavy_weights_still_break_ties_by_weight() -> None:
    """Weights too heavy for an exact cycle are scaled down for tie-breaking."""
    states = make_states(6001, 2000)
    assert balancing.CYCLE_LIMIT < 6001 + 2000
    balancer = make_balancer("least_conn", states)

    picks = [balancer.pick(None) for _ in range(8000)]

    counts = shares(picks)
    assert abs(counts[states[0].target.url] / 8000 - 6001 / 8001) <= 0.01


# ip_hash


def test_ip_hash_sends_an_address_to_the_same_target() -> None:
    states = make_states(1, 1, 1, 1)
    balancer = make_balancer("ip_hash", states)
    another_worker = make_balancer("ip_hash", make_states(1, 1, 1, 1))

    for ip in client_ips(500):
        first = balancer.pick(ip)
        assert balancer.pick(ip) is first
        assert another_worker.pick(ip).target == first.target


def test_ip_hash_agrees_across_processes() -> None:
    """Different PYTHONHASHSEEDs must not change the mapping."""
    script = (
        "import json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tests.test_balancing import client_ips, make_states\n"
        "from strangler.balancing import make_balancer\n"
        "b = make_balancer('ip_hash', make_states(1, 2, 1))\n"
        "print(json.dumps([b.pick(ip).target.port for ip in client_ips(300)]))\n"
    )
    balancer = make_balancer("ip_hash", make_states(1, 2, 1))
    here = [balancer.pick(ip).target.port for ip in client_ips(300)]

    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script, str(ROOT)],
            env=env,
            capture_output=True,
            check=True,
            text=True,
        )
        assert json.loads(out.stdout) == here


def test_ip_hash_spreads_addresses_evenly() -> None:
    states = make_states(1, 1, 1, 1)
    balancer = make_balancer("ip_hash", states)

    counts = shares([balancer.pick(ip) for ip in client_ips(20000)])

    assert len(counts) == 4
    for count in counts.values():
        assert 0.20 <= count / 20000 <= 0.30


def test_ip_hash_spreads_addresses_by_weight() -> None:
    states = make_states(3, 1)
    balancer = make_balancer("ip_hash", states)

    counts = shares([balancer.pick(ip) for ip in client_ips(20000)])

    assert 0.70 <= counts[states[0].target.url] / 20000 <= 0.80


def test_ip_hash_removing_a_target_moves_only_its_clients() -> None:
    states = make_states(1, 1, 1, 1)
    before = make_balancer("ip_hash", states)
    removed = states[2]
    after = make_balancer("ip_hash", [s for s in states if s is not removed])

    moved = 0
    for ip in client_ips(5000):
        old = before.pick(ip)
        new = after.pick(ip)
        if old is removed:
            moved += 1
        else:
            assert new is old, ip
    assert moved > 0


def test_ip_hash_unavailable_target_moves_only_its_clients() -> None:
    states = make_states(2, 1, 1, 1)
    balancer = make_balancer("ip_hash", states)
    before = {ip: balancer.pick(ip) for ip in client_ips(5000)}

    states[0].available = False
    during = {ip: balancer.pick(ip) for ip in before}
    states[0].available = True
    after = {ip: balancer.pick(ip) for ip in before}

    for ip, old in before.items():
        if old is states[0]:
            assert during[ip] is not states[0]
        else:
            assert during[ip] is old
    assert after == before


def test_ip_hash_ignores_target_order() -> None:
    states = make_states(1, 2, 1)
    forward = make_balancer("ip_hash", states)
    backward = make_balancer("ip_hash", states[::-1])

    for ip in client_ips(1000):
        assert forward.pick(ip) is backward.pick(ip)


def test_ip_hash_without_address_falls_back_to_round_robin() -> None:
    states = make_states(5, 1, 1)
    balancer = make_balancer("ip_hash", states)

    picks = [balancer.pick(None) for _ in range(7)]

    assert names(states, picks) == "aabacaa"


def test_ip_hash_refuses_weights_too_heavy_for_the_ring() -> None:
    with pytest.raises(ValueError, match=r"sum to 1001; expected at most 1000"):
        make_balancer("ip_hash", make_states(1000, 1))


# random


def test_random_shares_follow_weights() -> None:
    states = make_states(3, 1, 1)
    balancer = make_balancer("random", states, random.Random(7))

    counts = shares([balancer.pick(None) for _ in range(20000)])

    assert abs(counts[states[0].target.url] / 20000 - 0.6) <= 0.02
    assert abs(counts[states[1].target.url] / 20000 - 0.2) <= 0.02


def test_random_takes_the_less_loaded_of_two_draws() -> None:
    states = make_states(1, 1)
    states[0].active = 5
    # 0.25 draws the first target, 0.75 the second; order must not matter.
    balancer = make_balancer("random", states, ScriptedRandom([0.25, 0.75, 0.75, 0.25]))

    assert balancer.pick(None) is states[1]
    assert balancer.pick(None) is states[1]

    states[0].active, states[1].active = 0, 5
    balancer = make_balancer("random", states, ScriptedRandom([0.25, 0.75, 0.75, 0.25]))

    assert balancer.pick(None) is states[0]
    assert balancer.pick(None) is states[0]


def test_random_keeps_the_first_draw_on_a_tie() -> None:
    states = make_states(1, 1)
    balancer = make_balancer("random", states, ScriptedRandom([0.75, 0.25]))

    assert balancer.pick(None) is states[1]


def test_random_drains_a_loaded_target() -> None:
    states = make_states(1, 1, 1, 1)
    states[0].active = 10
    balancer = make_balancer("random", states, random.Random(3))

    counts = shares([balancer.pick(None) for _ in range(20000)])

    # Only a draw of the loaded target twice sends it a request: 1 in 16.
    assert abs(counts[states[0].target.url] / 20000 - 1 / 16) <= 0.01


def test_random_shares_follow_weights_with_a_target_down() -> None:
    states = make_states(3, 1, 4)
    states[2].available = False
    balancer = make_balancer("random", states, random.Random(11))

    counts = shares([balancer.pick(None) for _ in range(20000)])

    assert counts[states[2].target.url] == 0
    assert abs(counts[states[0].target.url] / 20000 - 0.75) <= 0.02


# exclude, panic mode and errors, for every policy


@pytest.mark.parametrize("policy", POLICIES)
def test_excluded_targets_are_never_picked(policy: str) -> None:
    states = make_states(3, 1, 1)
    balancer = make_balancer(policy, states, random.Random(1))
    exclude = {states[0], states[2]}

    for ip in [None, *client_ips(300)]:
        assert balancer.pick(ip, exclude) is states[1]


@pytest.mark.parametrize("policy", POLICIES)
def test_unavailable_targets_are_never_picked(policy: str) -> None:
    states = make_states(1, 1, 1)
    states[1].available = False
    balancer = make_balancer(policy, states, random.Random(1))

    picks = [balancer.pick(ip) for ip in [None, *client_ips(300)]]

    assert states[1] not in picks
    assert {id(s) for s in picks} == {id(states[0]), id(states[2])}


@pytest.mark.parametrize("policy", POLICIES)
def test_panic_mode_uses_every_target_not_excluded(policy: str) -> None:
    states = make_states(1, 1, 1)
    for state in states:
        state.available = False
    balancer = make_balancer(policy, states, random.Random(1))

    picks = [balancer.pick(ip, [states[0]]) for ip in [None, *client_ips(300)]]

    assert {id(s) for s in picks} == {id(states[1]), id(states[2])}


def test_panic_mode_round_robin_keeps_weights() -> None:
    states = make_states(5, 1, 1)
    for state in states:
        state.available = False
    balancer = make_balancer("round_robin", states)

    counts = shares([balancer.pick(None) for _ in range(70)])

    assert [counts[s.target.url] for s in states] == [50, 10, 10]


def test_panic_mode_least_conn_still_prefers_least_loaded() -> None:
    states = make_states(1, 1, 1)
    for state, active in zip(states, (4, 2, 0), strict=True):
        state.available = False
        state.active = active
    balancer = make_balancer("least_conn", states)

    assert balancer.pick(None) is states[2]


def test_panic_mode_ip_hash_keeps_the_mapping() -> None:
    states = make_states(1, 1, 1)
    balancer = make_balancer("ip_hash", states)
    before = {ip: balancer.pick(ip) for ip in client_ips(1000)}

    for state in states:
        state.available = False

    assert {ip: balancer.pick(ip) for ip in before} == before


def test_panic_mode_random_still_prefers_less_loaded() -> None:
    states = make_states(1, 1)
    states[0].active = 5
    for state in states:
        state.available = False
    # The first four draws look for an available target and find none.
    draws = [0.1] * balancing.DRAW_TRIES + [0.25, 0.75]
    balancer = make_balancer("random", states, ScriptedRandom(draws))

    assert balancer.pick(None) is states[1]


@pytest.mark.parametrize("policy", POLICIES)
def test_everything_excluded_raises(policy: str) -> None:
    states = make_states(1, 2)
    states[0].available = False
    balancer = make_balancer(policy, states, upstream="users")

    with pytest.raises(NoTargetAvailable) as caught:
        balancer.pick("10.0.0.1", states)

    assert isinstance(caught.value, UpstreamConnectError)
    message = str(caught.value)
    assert "'users'" in message
    assert "http://127.0.0.1:9001" in message
    assert "http://127.0.0.1:9002" in message


@pytest.mark.parametrize(
    ("policy", "cls"),
    [
        ("round_robin", RoundRobin),
        ("least_conn", LeastConn),
        ("ip_hash", IpHash),
        ("random", RandomTwoChoices),
    ],
)
def test_make_balancer_builds_the_named_policy(
    policy: str, cls: type[Balancer]
) -> None:
    states = make_states(1, 1)

    balancer = make_balancer(policy, states)

    assert type(balancer) is cls
    assert balancer.states == tuple(states)


def test_make_balancer_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match=r"'fastest'; expected one of ip_hash, least"):
        make_balancer("fastest", make_states(1))


def test_make_balancer_rejects_no_targets() -> None:
    with pytest.raises(ValueError, match=r"upstream 'users' has no targets"):
        make_balancer("round_robin", [], upstream="users")


@pytest.mark.parametrize("weight", [0, -1])
def test_make_balancer_rejects_weight_below_one(weight: int) -> None:
    with pytest.raises(ValueError, match=rf"9001 has weight {weight}; expected"):
        make_balancer("round_robin", make_states(weight))


def test_target_state_defaults() -> None:
    state = make_states(1)[0]

    assert (state.active, state.available) == (0, True)
    assert "http://127.0.0.1:9001" in repr(state)
    with pytest.raises(AttributeError):
        state.extra = 1  # type: ignore[attr-defined]


def test_ip_hash_new_or_heavier_target_only_takes_clients() -> None:
    states = make_states(1, 1, 1, 1)
    before = make_balancer("ip_hash", states[:3])
    added = make_balancer("ip_hash", states)
    heavier = make_states(1, 1, 3)
    lighter = make_balancer("ip_hash", make_states(1, 1, 1))
    heavy = make_balancer("ip_hash", heavier)

    for ip in client_ips(5000):
        now = added.pick(ip)
        assert now is states[3] or now is before.pick(ip)
        old_port = lighter.pick(ip).target.port
        new_port = heavy.pick(ip).target.port
        assert new_port in (9003, old_port)

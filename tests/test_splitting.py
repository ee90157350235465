"""Split branches: random draws by weight, sticky keys that only move one way."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strangler.model import SplitEntry
from strangler.splitting import Splitter

ROOT = Path(__file__).resolve().parent.parent
KEYS = [f"user-{n}" for n in range(10000)]

keys_strategy = st.lists(
    st.one_of(st.text(max_size=24), st.binary(max_size=24)),
    min_size=1,
    max_size=60,
    unique=True,
)


def percent(points: int) -> float:
    """Basis points (whole hundredths of a percent) as a rule-file weight."""
    return points / 100


class ScriptedRandom(random.Random):
    """A random source that returns the given numbers in order."""

    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self._values = iter(values)

    def random(self) -> float:
        return next(self._values)


# sticky: monotonic ramps


@settings(deadline=None)
@given(
    keys=keys_strategy,
    ramp=st.lists(st.integers(0, 10000), min_size=2, max_size=8).map(sorted),
)
def test_two_way_ramp_never_takes_a_key_off_the_rising_branch(
    keys: list[str | bytes], ramp: list[int]
) -> None:
    on_users = []
    for points in ramp:
        splitter = Splitter(
            [percent(10000 - points), percent(points)], ["monolith", "users"]
        )
        on_users.append({key for key in keys if splitter.pick_sticky(key) == 1})

    for lower, higher in pairwise(on_users):
        assert lower <= higher
    for points, chosen in zip(ramp, on_users, strict=True):
        if points == 0:
            assert chosen == set()
        if points == 10000:
            assert chosen == set(keys)


@settings(deadline=None)
@given(
    keys=keys_strategy,
    ramp=st.lists(st.integers(0, 10000), min_size=2, max_size=8).map(sorted),
)
def test_ramping_down_sends_keys_back_in_reverse_order(
    keys: list[str | bytes], ramp: list[int]
) -> None:
    """The keys on a branch depend only on its weight, not on the way there."""

    def on_users(points: int) -> set[str | bytes]:
        splitter = Splitter(
            [percent(10000 - points), percent(points)], ["monolith", "users"]
        )
        return {key for key in keys if splitter.pick_sticky(key) == 1}

    going_up = [on_users(points) for points in ramp]
    going_down = [on_users(points) for points in reversed(ramp)][::-1]
    arrival: dict[str | bytes, int] = {}
    for step, chosen in enumerate(going_up):
        for key in chosen:
            arrival.setdefault(key, step)

    assert going_down == going_up
    for step, chosen in enumerate(going_down):
        for key in keys:
            assert (key in chosen) == (key in arrival and step >= arrival[key])


@settings(deadline=None)
@given(
    keys=keys_strategy,
    rising=st.integers(0, 2),
    ratio=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    data=st.data(),
)
def test_three_way_ramp_only_moves_keys_onto_the_rising_branch(
    keys: list[str | bytes],
    rising: int,
    ratio: tuple[int, int],
    data: st.DataObject,
) -> None:
    """One branch rises while the other two shrink in a fixed proportion."""
    part, other = ratio
    # The other two hold (part + other) * units basis points between them.
    most_units = 10000 // (part + other)
    units = data.draw(
        st.lists(st.integers(0, most_units), min_size=2, max_size=8).map(
            lambda found: sorted(found, reverse=True)
        )
    )
    labels = ["monolith", "users", "billing"]
    rest = [index for index in range(3) if index != rising]

    steps = []
    for unit in units:
        points = [0, 0, 0]
        points[rest[0]] = part * unit
        points[rest[1]] = other * unit
        points[rising] = 10000 - (part + other) * unit
        splitter = Splitter([percent(p) for p in points], labels)
        steps.append({key: splitter.pick_sticky(key) for key in keys})

    for before, after in pairwise(steps):
        for key in keys:
            if before[key] == rising:
                assert after[key] == rising
            if after[key] != before[key]:
                assert after[key] == rising


def test_raising_one_of_three_unevenly_keeps_its_keys() -> None:
    """Even when the shrinking branches do not keep their proportion."""
    ramp = [(70, 20, 10), (60, 25, 15), (40, 30, 30), (5, 45, 50), (0, 40, 60)]
    splitters = [Splitter(list(w), ["monolith", "users", "billing"]) for w in ramp]

    for key in KEYS[:3000]:
        on_billing = [s.pick_sticky(key) == 2 for s in splitters]
        assert on_billing == sorted(on_billing)


# sticky: shares, labels and keys


@pytest.mark.parametrize(
    "weights",
    [
        [50, 50],
        [99, 1],
        [1, 99],
        [75, 25],
        [33.33, 33.33, 33.34],
        [10, 20, 30, 40],
        [0, 60, 40],
        [12.5, 0, 0.5, 87],
    ],
)
def test_sticky_shares_match_weights(weights: list[float]) -> None:
    splitter = Splitter(weights, [f"upstream-{i}" for i in range(len(weights))])

    counts = Counter(splitter.pick_sticky(key) for key in KEYS)

    for index, weight in enumerate(weights):
        share = 100 * counts[index] / len(KEYS)
        assert abs(share - weight) <= 2, (index, share, weight)
        if weight == 0:
            assert counts[index] == 0


def test_sticky_same_key_same_branch() -> None:
    splitter = Splitter([40, 60], ["monolith", "users"])
    another_worker = Splitter([40, 60], ["monolith", "users"])

    for key in KEYS[:2000]:
        first = splitter.pick_sticky(key)
        assert splitter.pick_sticky(key) == first
        assert another_worker.pick_sticky(key) == first


def test_sticky_agrees_across_processes() -> None:
    """Different PYTHONHASHSEEDs must not change which branch a key gets."""
    script = (
        "import json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from strangler.splitting import Splitter\n"
        "s = Splitter([30, 30, 40], ['monolith', 'users', 'billing'])\n"
        "print(json.dumps([s.pick_sticky(f'user-{n}') for n in range(500)]))\n"
    )
    splitter = Splitter([30, 30, 40], ["monolith", "users", "billing"])
    here = [splitter.pick_sticky(key) for key in KEYS[:500]]

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


def test_sticky_text_key_equals_its_utf8_bytes() -> None:
    splitter = Splitter([50, 50], ["monolith", "users"])

    for key in ["user-1", "ünïcødé", "", "a" * 300]:
        assert splitter.pick_sticky(key) == splitter.pick_sticky(key.encode())


def test_reordering_entries_keeps_every_key_on_its_upstream() -> None:
    labels = ["monolith", "users", "billing"]
    weights = [50, 30, 20]
    forward = Splitter(weights, labels)
    backward = Splitter(weights[::-1], labels[::-1])

    for key in KEYS[:3000]:
        assert (
            labels[forward.pick_sticky(key)] == labels[::-1][backward.pick_sticky(key)]
        )


def test_adding_a_branch_only_moves_keys_onto_it() -> None:
    before = Splitter([50, 50], ["monolith", "users"])
    after = Splitter([40, 40, 20], ["monolith", "users", "billing"])

    moved = 0
    for key in KEYS:
        new = after.pick_sticky(key)
        if new == 2:
            moved += 1
        else:
            assert new == before.pick_sticky(key)
    assert abs(100 * moved / len(KEYS) - 20) <= 2


def test_repeated_upstream_branches_share_keys_by_weight() -> None:
    splitter = Splitter([50, 25, 25], ["users", "monolith", "users"])

    counts = Counter(splitter.pick_sticky(key) for key in KEYS)

    assert abs(100 * counts[2] / len(KEYS) - 25) <= 2


def test_single_live_branch_takes_every_key() -> None:
    splitter = Splitter([0, 100, 0], ["monolith", "users", "billing"])

    assert {splitter.pick_sticky(key) for key in KEYS[:100]} == {1}
    assert {splitter.pick_random() for _ in range(100)} == {1}


# random draws


@pytest.mark.parametrize(
    "weights", [[50, 50], [95, 5], [33.33, 33.33, 33.34], [0, 70, 0, 30], [10, 90]]
)
def test_random_shares_match_weights(weights: list[float]) -> None:
    splitter = Splitter(
        weights, [f"upstream-{i}" for i in range(len(weights))], random.Random(42)
    )

    counts = Counter(splitter.pick_random() for _ in range(10000))

    for index, weight in enumerate(weights):
        assert abs(100 * counts[index] / 10000 - weight) <= 2
        if weight == 0:
            assert counts[index] == 0


def test_random_uses_one_draw_against_cumulative_weights() -> None:
    draws = [0.0, 0.2499, 0.25, 0.6, 0.9999999]
    splitter = Splitter(
        [25, 0, 75], ["monolith", "users", "billing"], ScriptedRandom(draws)
    )

    assert [splitter.pick_random() for _ in draws] == [0, 0, 2, 2, 2]


def test_random_top_draw_lands_on_the_last_live_branch() -> None:
    """Float rounding of the cumulative weights cannot pick a 0-weight tail."""
    splitter = Splitter(
        [33.33, 33.33, 33.34, 0],
        ["a", "b", "c", "d"],
        ScriptedRandom([1.0 - 2.0**-53]),
    )

    assert splitter.pick_random() == 2


# construction


def test_from_entries_uses_upstream_names_as_labels() -> None:
    entries = [SplitEntry(to="monolith", weight=75), SplitEntry(to="users", weight=25)]

    splitter = Splitter.from_entries(entries)

    assert splitter.labels == ("monolith", "users")
    assert splitter.weights == (75.0, 25.0)
    direct = Splitter([75, 25], ["monolith", "users"])
    assert all(splitter.pick_sticky(k) == direct.pick_sticky(k) for k in KEYS[:500])


@pytest.mark.parametrize(
    ("weights", "labels", "message"),
    [
        ([60, 30], ["a", "b"], r"must sum to 100, got 90"),
        ([50, 50.001], ["a", "b"], r"weight 50\.001 for 'b' is finer than 0\.01"),
        ([110, -10], ["a", "b"], r"weight -10 for 'b' is not a percentage"),
        ([float("nan"), 100], ["a", "b"], r"weight nan for 'a' is not a percentage"),
        (["50", 50], ["a", "b"], r"weight '50' for 'a' is not a percentage"),
        ([50, 50], ["a"], r"2 weights but 1 labels"),
        ([], [], r"no branches"),
    ],
)
def test_bad_weights_are_refused(
    weights: list[float], labels: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Splitter(weights, labels)


def test_hundredths_that_floats_cannot_hold_exactly_are_accepted() -> None:
    splitter = Splitter([0.1, 0.2, 99.7], ["a", "b", "c"])

    assert splitter.weights == (0.1, 0.2, 99.7)

"""Ejection back-off and the retry budget, driven by a fake clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from strangler.balancing import TargetState
from strangler.model import Outlier, Target
from strangler.outlier import OutlierDetector
from strangler.retry_budget import INITIAL, RetryBudget


def _states(count: int) -> list[TargetState]:
    return [
        TargetState(
            Target(f"http://127.0.0.1:{9000 + i}", "http", "127.0.0.1", 9000 + i)
        )
        for i in range(count)
    ]


def test_ejection_grows_with_each_repeat_and_ends_on_its_own() -> None:
    clock = Clock()
    states = _states(2)
    detector = OutlierDetector("u", Outlier(3, 10.0, 50.0), states, clock)

    for _ in range(3):
        detector.failure(states[0])
    assert states[0].ejected and not states[0].available
    clock.advance(9.9)
    assert states[0].ejected
    clock.advance(0.2)
    assert states[0].available

    for _ in range(3):
        detector.failure(states[0])
    clock.advance(19.9)
    assert states[0].ejected
    clock.advance(0.2)
    assert states[0].available


def test_success_resets_the_streak() -> None:
    clock = Clock()
    states = _states(2)
    detector = OutlierDetector("u", Outlier(3, 10.0, 50.0), states, clock)

    for ok in (False, False, True, False, False):
        (detector.success if ok else detector.failure)(states[0])

    assert not states[0].ejected


def test_max_ejection_percent_keeps_part_of_the_pool() -> None:
    clock = Clock()
    states = _states(4)
    detector = OutlierDetector("u", Outlier(1, 10.0, 50.0), states, clock)

    for state in states:
        detector.failure(state)

    assert sum(state.ejected for state in states) == 2


def test_health_and_ejection_both_decide_availability() -> None:
    clock = Clock()
    (state,) = _states(1)
    detector = OutlierDetector("u", Outlier(1, 5.0, 100.0), [state], clock)
    state.healthy = False
    state.refresh()

    detector.failure(state)
    clock.advance(6)

    assert not state.ejected
    assert not state.available


def test_retry_budget_allows_a_share_of_traffic_plus_a_trickle() -> None:
    clock = Clock()
    budget = RetryBudget(clock, ratio=0.2, min_per_second=1.0, capacity=100.0)
    for _ in range(int(INITIAL)):
        assert budget.spend()
    assert not budget.spend()

    for _ in range(50):
        budget.deposit()
    granted = sum(budget.spend() for _ in range(20))
    assert granted == 10

    clock.advance(3)
    assert sum(budget.spend() for _ in range(10)) == 3


def test_time_back_in_rotation_lowers_the_next_ejection_again() -> None:
    clock = Clock()
    states = _states(2)
    detector = OutlierDetector("u", Outlier(1, 10.0, 50.0), states, clock)

    def eject_and_wait() -> float:
        detector.failure(states[0])
        began = clock.seconds()
        while states[0].ejected:
            clock.advance(1)
        return clock.seconds() - began

    first, second, third = eject_and_wait(), eject_and_wait(), eject_and_wait()
    clock.advance(25)  # two whole base ejections served well: the level drops by 2
    fourth = eject_and_wait()
    clock.advance(1000)
    fifth = eject_and_wait()

    assert (first, second, third) == (10, 20, 30)
    assert fourth == 20
    assert fifth == 10
    assert states[0].ejections == 5

"""Step evidence from the proxy's counters: differences, p99 and gate verdicts."""

from __future__ import annotations

import pytest

from strangler.metrics import BUCKETS, Metrics
from strangler.migration.evidence import (
    LATENCY_FLOOR,
    P99_MIN_SAMPLES,
    Evidence,
    Side,
    Snapshot,
    judge,
    quantile,
)
from strangler.migration.plan import Gates


def histogram(*values: float) -> tuple[int, ...]:
    """The latency buckets `Metrics` fills for requests that took `values`."""
    metrics = Metrics()
    for value in values:
        metrics.observe("r", "u", 200, value, 0, 0, False)
    series = metrics.series.get(("r", "u"))
    return tuple(series.buckets) if series else (0,) * (len(BUCKETS) + 1)


def test_quantile_interpolates_within_the_bucket_that_holds_the_rank():
    # 100 requests between 50 and 100 ms: the p99 is 99% of the way up.
    buckets = histogram(*[0.075] * 100)

    assert quantile(buckets, 0.99) == pytest.approx(0.05 + 0.05 * 0.99)
    assert quantile(buckets, 0.5) == pytest.approx(0.075)


def test_quantile_of_a_mixed_histogram_lands_in_the_slow_tail():
    buckets = histogram(*[0.002] * 95, *[0.4] * 5)

    assert 0.25 < quantile(buckets, 0.99) <= 0.5
    assert quantile(buckets, 0.9) <= 0.0025


def test_quantile_of_nothing_is_none_and_overflow_reads_the_last_bound():
    assert quantile(histogram(), 0.99) is None
    assert quantile(histogram(30.0, 30.0), 0.99) == BUCKETS[-1]


def snapshot(
    new: int = 0,
    new_5xx: int = 0,
    old: int = 0,
    fallbacks: int = 0,
    shadow: tuple[int, int] | None = None,
    new_seconds: float = 0.002,
    old_seconds: float = 0.002,
) -> Snapshot:
    new_side = Side(new, new_5xx, 0, histogram(*[new_seconds] * new))
    old_side = Side(old, 0, 0, histogram(*[old_seconds] * old))
    return Snapshot(new + old, new_side, old_side, fallbacks, shadow)


def test_evidence_is_the_difference_between_two_snapshots():
    earlier = snapshot(new=10, new_5xx=1, old=90, fallbacks=2, shadow=(5, 5))
    later = snapshot(new=30, new_5xx=4, old=170, fallbacks=3, shadow=(25, 20))

    evidence = Evidence.between(earlier, later)

    assert evidence.route_requests == 100
    assert (evidence.new_requests, evidence.new_failed) == (21, 4)
    assert evidence.fallbacks == 1
    assert (evidence.compared, evidence.agreed) == (20, 15)


def test_counters_that_restarted_count_from_zero():
    earlier = snapshot(new=50, old=50, fallbacks=10)
    later = snapshot(new=5, old=80, fallbacks=1)

    evidence = Evidence.between(earlier, later)

    assert (evidence.new_requests, evidence.old_requests) == (5 + 1, 30)


def test_a_shadow_added_during_the_step_is_not_judged_yet():
    evidence = Evidence.between(snapshot(), snapshot(shadow=(100, 0)))

    gates = judge(Gates(min_shadow_agreement=99), evidence, move_to="u", weight=10)

    assert gates[1].status == "skip"
    assert gates[1].detail.startswith("the shadow was added during this step")


def verdicts(gates: Gates, later: Snapshot, weight: float = 10) -> dict[str, str]:
    earlier = snapshot(shadow=None if later.shadow is None else (0, 0))
    evidence = Evidence.between(earlier, later)
    return {
        g.gate: g.status for g in judge(gates, evidence, move_to="u", weight=weight)
    }


def test_error_rate_waits_for_min_requests_and_for_a_request_on_the_new_side():
    gates = Gates(min_requests=100, max_error_rate=1)

    assert verdicts(gates, snapshot(new=10, new_5xx=10))["max_error_rate"] == "wait"
    assert verdicts(gates, snapshot(old=100))["max_error_rate"] == "wait"
    assert verdicts(gates, snapshot(new=100, new_5xx=1))["max_error_rate"] == "pass"
    assert verdicts(gates, snapshot(new=100, new_5xx=2))["max_error_rate"] == "fail"


def test_p99_ratio_needs_enough_requests_on_both_sides():
    gates = Gates(max_p99_ratio=1.5)
    few = P99_MIN_SAMPLES - 1

    slow = snapshot(new=few, old=100, new_seconds=1.0)
    assert verdicts(gates, slow)["max_p99_ratio"] == "skip"
    at_full = snapshot(new=100, old=few, new_seconds=1.0)
    assert verdicts(gates, at_full, weight=100)["max_p99_ratio"] == "skip"
    judged = snapshot(new=P99_MIN_SAMPLES, old=P99_MIN_SAMPLES, new_seconds=1.0)
    assert verdicts(gates, judged)["max_p99_ratio"] == "fail"


def test_p99_below_the_floor_counts_as_the_floor():
    gates = Gates(max_p99_ratio=1.5)
    fast = snapshot(new=100, old=100, new_seconds=0.004, old_seconds=0.0009)
    evidence = Evidence.between(snapshot(), fast)

    (ratio,) = judge(gates, evidence, move_to="u", weight=10)[1:]

    assert evidence.new_p99 is not None and evidence.new_p99 < LATENCY_FLOOR
    assert (ratio.value, ratio.status) == (1.0, "pass")


def test_shadow_agreement_at_full_weight_with_nothing_mirrored_does_not_block():
    gates = Gates(min_shadow_agreement=99)

    assert (
        verdicts(gates, snapshot(new=10, shadow=(0, 0)), weight=50)[
            "min_shadow_agreement"
        ]
        == "wait"
    )
    assert (
        verdicts(gates, snapshot(new=10, shadow=(0, 0)), weight=100)[
            "min_shadow_agreement"
        ]
        == "skip"
    )
    assert (
        verdicts(gates, snapshot(new=10, shadow=(100, 99)))["min_shadow_agreement"]
        == "pass"
    )

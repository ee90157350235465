"""Durations and sizes as people write them in rule files and on the command line."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strangler.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 2 s ", 2.0),
        ("0s", 0.0),
        (3, 3.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration_reads_each_unit(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10", "10 sec", "s", "-1s", "1d", "", "1.s"])
def test_parse_duration_refuses_text_without_a_known_unit(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration like 250ms") as caught:
        parse_duration(text)
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize("value", [True, False])
def test_parse_duration_refuses_booleans(value: bool) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


def test_parse_duration_refuses_negative_numbers() -> None:
    with pytest.raises(ValueError, match="cannot be negative, got -2"):
        parse_duration(-2)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64KiB", 64 * 1024),
        ("10MiB", 10 * 1024**2),
        ("1GiB", 1024**3),
        ("2KB", 2000),
        ("3MB", 3_000_000),
        ("1GB", 10**9),
        ("512B", 512),
        ("512", 512),
        (" 8 KiB ", 8192),
        (4096, 4096),
    ],
)
def test_parse_size_reads_each_unit(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1.5MiB", "10 mib", "KiB", "-1", "1TiB", ""])
def test_parse_size_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size like 64KiB") as caught:
        parse_size(text)
    assert repr(text) in str(caught.value)


def test_parse_size_refuses_booleans_and_negative_numbers() -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(True)
    with pytest.raises(ValueError, match="cannot be negative, got -1"):
        parse_size(-1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (0.0, "0ms"), (1.5, "1.5s"), (90.0, "90s"), (300.0, "5m")],
)
def test_format_duration_picks_the_shortest_spelling(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(0, 10**9), st.sampled_from(["ms", "s", "m", "h"]))
def test_whole_durations_parse_to_their_unit_times_the_number(
    number: int, unit: str
) -> None:
    seconds = {"ms": number / 1000, "s": number, "m": number * 60, "h": number * 3600}
    assert parse_duration(f"{number}{unit}") == pytest.approx(seconds[unit], rel=1e-12)


@given(
    st.integers(0, 10**6),
    st.sampled_from([("", 1), ("B", 1), ("KiB", 1024), ("MiB", 1024**2), ("KB", 1000)]),
)
def test_sizes_parse_to_the_number_times_the_unit(
    number: int, unit: tuple[str, int]
) -> None:
    suffix, factor = unit
    assert parse_size(f"{number}{suffix}") == number * factor


@given(st.integers(0, 999))
def test_milliseconds_round_trip_through_format(millis: int) -> None:
    # `ms` is multiplied by 0.001, so 43ms reads as 0.043000000000000003.
    assert parse_duration(format_duration(millis / 1000)) == pytest.approx(
        millis / 1000, rel=1e-12
    )


@given(st.integers(1, 999_999))
def test_whole_seconds_round_trip_through_format(seconds: int) -> None:
    assert parse_duration(format_duration(float(seconds))) == seconds

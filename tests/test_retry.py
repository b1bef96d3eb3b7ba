"""Exim retry schedules: parsing and the arithmetic of the next attempt."""

from __future__ import annotations

import pytest

from relayd.config.retry import DEFAULT_RETRY, RetrySyntaxError, parse_duration, parse_retry_schedule


@pytest.mark.parametrize("text, seconds", [("3s", 3), ("15m", 900), ("2h", 7200), ("4d", 345600), ("1w", 604800), ("1h30m", 5400), ("42", 42)])
def test_durations_accept_exim_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "h", "1h 30m", "-3s"])
def test_bad_durations_are_refused_with_a_sentence(text: str) -> None:
    with pytest.raises(RetrySyntaxError):
        parse_duration(text)


def test_default_schedule_walks_fixed_then_geometric_then_fixed_and_gives_up_after_four_days() -> None:
    schedule = parse_retry_schedule(DEFAULT_RETRY)
    assert str(schedule) == "F,2h,15m; G,16h,1h,1.5; F,4d,6h"
    now, interval, intervals = 0.0, None, []
    while (planned := schedule.next_attempt(0.0, now, interval)) is not None:
        now, interval = planned
        intervals.append(interval)
    assert intervals[:8] == [900.0] * 8  # every 15 minutes for the first 2 hours
    assert intervals[8:11] == [3600.0, 5400.0, 8100.0]  # then 1h growing by 1.5
    assert intervals[-1] == 6 * 3600.0  # then every 6 hours
    assert 4 * 86400 <= now < 4 * 86400 + 6 * 3600  # the last attempt is just past 4 days
    assert schedule.next_attempt(0.0, 4 * 86400 + 1, interval) is None


def test_short_test_schedule_gives_up_after_its_cutoff() -> None:
    schedule = parse_retry_schedule("F,3s,1s")
    assert schedule.next_attempt(100.0, 100.0, None) == (101.0, 1.0)
    assert schedule.next_attempt(100.0, 102.5, 1.0) == (103.5, 1.0)
    assert schedule.next_attempt(100.0, 103.0, 1.0) is None
    assert schedule.max_age == 3


@pytest.mark.parametrize("text", ["X,1h,1m", "F,1h", "G,1h,1m", "G,1h,1m,0.5", "F,2h,15m; F,1h,5m", "F,1h,0s", ""])
def test_bad_schedules_are_refused(text: str) -> None:
    with pytest.raises(RetrySyntaxError):
        parse_retry_schedule(text)

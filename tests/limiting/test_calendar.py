"""Calendar months in a time zone: labels, bounds across the year's end and daylight
saving, and the clock that follows them."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import ConfigError
from tokenguard.limiting.calendar import MONTH_COUNTER, MonthClock, month_of

PARIS = ZoneInfo("Europe/Paris")


def at(*fields: int, tz: ZoneInfo = PARIS) -> float:
    return datetime(*fields, tzinfo=tz).timestamp()


def test_december_ends_on_the_first_of_january_of_the_next_year() -> None:
    month = month_of(at(2026, 12, 31, 23, 59, 59), PARIS)
    assert month.label == "2026-12"
    assert (month.start, month.end) == (at(2026, 12, 1), at(2027, 1, 1))


def test_a_month_with_a_daylight_saving_change_is_not_a_whole_number_of_days() -> None:
    march = month_of(at(2026, 3, 15), PARIS)  # clocks go forward on March 29
    assert march.end - march.start == 31 * 86_400 - 3_600


def test_a_month_row_counts_longer_than_any_month() -> None:
    window_ms, bucket_ms = MONTH_COUNTER
    assert window_ms >= 31 * 86_400_000 + bucket_ms


def test_the_month_clock_moves_to_the_next_month_at_midnight_local_time() -> None:
    now = [at(2026, 11, 30, 23, 0)]
    clock = MonthClock(PARIS, lambda: now[0])
    month, left = clock.current()
    assert (month.label, left) == ("2026-11", 3600.0)
    now[0] = at(2026, 12, 1)
    assert clock.current()[0].label == "2026-12"
    # 23:30 UTC on Nov 30 is already December in Paris.
    now[0] = datetime(2026, 11, 30, 23, 30, tzinfo=UTC).timestamp()
    assert clock.current()[0].label == "2026-12"


def test_the_time_zone_is_validated_and_defaults_to_utc() -> None:
    assert parse_settings({}, "c").timezone == "UTC"
    assert parse_settings({"limits": {"timezone": "Asia/Tokyo"}}, "c").timezone == "Asia/Tokyo"
    for bad in ("Mars/Olympus", "../etc", ""):
        with pytest.raises(ConfigError, match="limits.timezone"):
            parse_settings({"limits": {"timezone": bad}}, "c")

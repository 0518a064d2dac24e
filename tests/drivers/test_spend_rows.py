"""The window-store contract, spend rows in micro-units and calendar months
(``spend_per_month``), as the limiter names them: on every driver (``harness``, from
tests/drivers/conftest.py: memory on a fake clock, a real Redis, a real Redis Cluster).
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
import trio

from tests.support.window_harness import TEST_TIMEOUT, Harness, used
from tokenguard.config.prices import Price
from tokenguard.limiting.limiter import Cost, Limiter
from tokenguard.model import ApiKey, Limits, digest_of
from tokenguard.store.rows import Row

# --- spend rows -------------------------------------------------------------------------

# A budget of a million currency units, in micro-units: sums stay exact (integers far
# below 2**53, where Lua's doubles are exact).
BUDGET = 10**12


async def test_spend_rows_sum_micro_units_exactly_and_settle_to_the_real_cost(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        third = BUDGET // 3  # 333_333_333_333

        def spend(amount: int) -> Row:
            return harness.row(
                limit=BUDGET,
                amount=amount,
                dimension="spend",
                window_ms=3_600_000,
                bucket_ms=60_000,
            )

        reservations = []
        for _ in range(3):
            admission = (await harness.admit([spend(third)])).value
            assert admission.admitted
            reservations.append(admission.reservation)
        assert not (await harness.admit([spend(2)])).value.admitted  # 1 micro-unit left
        assert (await harness.admit([spend(1)])).value.admitted
        assert used(await harness.usage([spend(0)])) == BUDGET
        # Settled to a real cost 123_456 micro-units below the reservation: exactly that
        # much fits again, not a micro-unit more.
        await harness.store.settle(reservations[0], [-123_456])
        assert not (await harness.admit([spend(123_457)])).value.admitted
        assert (await harness.admit([spend(123_456)])).value.admitted
        assert used(await harness.usage([spend(0)])) == BUDGET


# --- calendar months (spend_per_month), as the limiter names and reports them ------------

PARIS = ZoneInfo("Europe/Paris")
# 2026-11-30 23:59:00 in Paris (UTC+1): a minute before December begins there.
NOV_END_PARIS = datetime(2026, 11, 30, 23, 59, tzinfo=PARIS).timestamp()


class WallClock:
    """POSIX seconds for the limiter's months, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def monthly(harness: Harness, wall: WallClock, timezone: ZoneInfo) -> tuple[Limiter, ApiKey]:
    key = ApiKey("k", digest_of(f"sk-{harness.driver.name}"), Limits(spend_per_month=100))
    limiter = Limiter(
        harness.store, window_seconds=60, bucket_seconds=5, timezone=timezone, wall_clock=wall
    )
    return limiter, key


async def test_a_monthly_budget_resets_when_the_calendar_month_ends_in_its_time_zone(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        wall = WallClock(NOV_END_PARIS)
        limiter, key = monthly(harness, wall, PARIS)
        price = Price(input=1_000_000, cached_input=1_000_000, output=1_000_000)
        cost = Cost(input_tokens=60, output_tokens=0, price=price)  # 60 micro-units
        assert (await limiter.admit(key, cost)).admitted
        refused = await limiter.admit(key, cost)
        assert not refused.admitted and refused.refusal is not None
        assert refused.refusal.row.scope.endswith(":month:2026-11")
        assert refused.admission.retry_after == pytest.approx(60.0)  # to Dec 1, 00:00 Paris
        (november,) = await limiter.usage(key)
        assert november.used == 60 and november.reset_after == pytest.approx(60.0)
        wall.now += 60  # 2026-12-01 00:00 in Paris (still 23:00 on Nov 30 in UTC)
        december = await limiter.admit(key, cost)
        assert december.admitted and december.state("spend").used == 60
        assert december.state("spend").row.scope.endswith(":month:2026-12")
        # A node still in November (a lagging clock) counts in November's counter only.
        wall.now -= 1
        assert not (await limiter.admit(key, cost)).admitted


async def test_the_same_instant_is_in_different_months_in_different_time_zones(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        instant = datetime(2026, 12, 31, 23, 30, tzinfo=UTC).timestamp()
        labels = {}
        for zone in ("UTC", "Pacific/Auckland", "America/Los_Angeles"):
            limiter, key = monthly(harness, WallClock(instant), ZoneInfo(zone))
            (state,) = await limiter.usage(key)
            labels[zone] = state.row.scope.rpartition(":month:")[2]
            left = state.reset_after if state.used else None
            assert left is None  # nothing spent yet
        assert labels == {
            "UTC": "2026-12",
            "Pacific/Auckland": "2027-01",
            "America/Los_Angeles": "2026-12",
        }

"""The limiter's logic on the memory store, with an injected clock (no sleeping)."""

from __future__ import annotations

import pytest
import trio

from drivers.memory import MemoryStore
from tokenguard.api.dialect import OPENAI
from tokenguard.api.ratelimit import openai_duration, retry_headers
from tokenguard.config.prices import Price
from tokenguard.limiting.limiter import Cost, Limiter
from tokenguard.model import ApiKey, Limits, digest_of


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_key(name: str = "k", **limits: int) -> ApiKey:
    return ApiKey(name=name, digest=digest_of(f"sk-{name}"), limits=Limits(**limits))


@pytest.fixture
def clock() -> FakeClock:
    # Start exactly on a 5 s bucket boundary, so the arithmetic below is readable.
    return FakeClock(1_000_000.0)


@pytest.fixture
def limiter(clock: FakeClock) -> Limiter:
    return Limiter(MemoryStore(clock=clock), window_seconds=60, bucket_seconds=5)


async def test_requests_limit_is_exact(limiter: Limiter) -> None:
    key = make_key(rpm=3)
    results = [await limiter.admit(key, Cost()) for _ in range(5)]
    assert [d.admitted for d in results] == [True, True, True, False, False]
    refused = results[3]
    assert refused.refusal is not None
    assert refused.refusal.row.dimension == "requests"
    assert refused.refusal.used == 3


async def test_admission_is_all_or_nothing(limiter: Limiter) -> None:
    key = make_key(rpm=10, input_tpm=100, output_tpm=100)
    ok = await limiter.admit(key, Cost(input_tokens=60, output_tokens=10))
    assert ok.admitted
    # Input tokens refuse: requests and output tokens must not be consumed either.
    refused = await limiter.admit(key, Cost(input_tokens=50, output_tokens=10))
    assert not refused.admitted
    assert refused.refusal is not None and refused.refusal.row.dimension == "input_tokens"
    states = {s.row.dimension: s for s in await limiter.usage(key)}
    assert states["requests"].used == 1
    assert states["input_tokens"].used == 60
    assert states["output_tokens"].used == 10


async def test_window_slides_bucket_by_bucket(limiter: Limiter, clock: FakeClock) -> None:
    key = make_key(rpm=2)
    assert (await limiter.admit(key, Cost())).admitted  # t = 0, bucket 0
    clock.advance(10)
    assert (await limiter.admit(key, Cost())).admitted  # t = 10, bucket 2
    assert not (await limiter.admit(key, Cost())).admitted
    # The first admission is remembered for at least 60 s: still refused at t = 64.999.
    clock.advance(54.999)
    refused = await limiter.admit(key, Cost())
    assert not refused.admitted
    assert refused.admission.retry_after == pytest.approx(0.001)
    # Bucket 0 leaves the window when the clock enters bucket 13 (t = 65).
    clock.advance(0.001)
    assert (await limiter.admit(key, Cost())).admitted
    assert not (await limiter.admit(key, Cost())).admitted
    # The t = 10 admission leaves at t = 75.
    clock.advance(10)
    assert (await limiter.admit(key, Cost())).admitted


async def test_never_more_than_limit_in_any_60s_interval(
    limiter: Limiter, clock: FakeClock
) -> None:
    """Hammer one key every 0.25 s for 5 minutes; check every 60 s interval exactly."""
    key = make_key(rpm=7)
    admitted: list[float] = []
    for _ in range(1200):
        if (await limiter.admit(key, Cost())).admitted:
            admitted.append(clock.now)
        clock.advance(0.25)
    assert len(admitted) >= 7 * 4  # it does keep admitting as the window slides
    for i, start in enumerate(admitted):
        within = [t for t in admitted[i:] if t < start + 60]
        assert len(within) <= 7, f"{len(within)} admitted in the 60 s from {start}"


async def test_settlement_refunds_into_reserved_bucket(limiter: Limiter, clock: FakeClock) -> None:
    key = make_key(output_tpm=100)
    first = await limiter.admit(key, Cost(output_tokens=80))
    assert first.admitted
    assert not (await limiter.admit(key, Cost(output_tokens=30))).admitted
    clock.advance(20)
    # The reply used 10 of its 80: 70 come back, into the t = 0 bucket.
    await limiter.settle(first, output_tokens=10)
    second = await limiter.admit(key, Cost(output_tokens=30))
    assert second.admitted
    assert second.state("output_tokens").used == 40
    # The refunded bucket leaves at t = 65, taking the 10 settled tokens with it.
    clock.advance(45)
    states = {s.row.dimension: s for s in await limiter.usage(key)}
    assert states["output_tokens"].used == 30


async def test_settle_after_bucket_left_window_is_a_noop(
    limiter: Limiter, clock: FakeClock
) -> None:
    key = make_key(output_tpm=100)
    decision = await limiter.admit(key, Cost(output_tokens=50))
    clock.advance(66)
    await limiter.admit(key, Cost(output_tokens=40))
    await limiter.settle(decision, output_tokens=0)  # would be -50 on an old bucket
    states = {s.row.dimension: s for s in await limiter.usage(key)}
    assert states["output_tokens"].used == 40


async def test_settlement_never_goes_below_zero(limiter: Limiter) -> None:
    key = make_key(output_tpm=100)
    decision = await limiter.admit(key, Cost(output_tokens=5))
    await limiter.store.settle(decision.reservation, [-50])
    states = {s.row.dimension: s for s in await limiter.usage(key)}
    assert states["output_tokens"].used == 0


async def test_retry_after_is_exact(limiter: Limiter, clock: FakeClock) -> None:
    key = make_key(input_tpm=100)
    assert (await limiter.admit(key, Cost(input_tokens=40))).admitted  # t = 0
    clock.advance(12)
    assert (await limiter.admit(key, Cost(input_tokens=50))).admitted  # t = 12 (bucket 2)
    clock.advance(3)  # t = 15
    refused = await limiter.admit(key, Cost(input_tokens=30))
    assert not refused.admitted
    # 30 fits once the 40 (bucket 0) leaves, at t = 65: 50 s from now.
    assert refused.admission.retry_after == pytest.approx(50.0)
    refused = await limiter.admit(key, Cost(input_tokens=60))
    # 60 needs both buckets gone: the t = 12 bucket leaves at t = 75.
    assert refused.admission.retry_after == pytest.approx(60.0)
    clock.advance(49.999)
    assert not (await limiter.admit(key, Cost(input_tokens=30))).admitted
    clock.advance(0.001)
    assert (await limiter.admit(key, Cost(input_tokens=30))).admitted


async def test_request_larger_than_limit_never_fits(limiter: Limiter) -> None:
    key = make_key(input_tpm=100)
    refused = await limiter.admit(key, Cost(input_tokens=101))
    assert not refused.admitted
    assert refused.refusal is not None and refused.refusal.never_fits
    assert refused.admission.retry_after is None
    states = {s.row.dimension: s for s in await limiter.usage(key)}
    assert states["input_tokens"].used == 0


async def test_absent_limits_are_unlimited(limiter: Limiter) -> None:
    key = make_key(rpm=1000)  # no token limits
    decision = await limiter.admit(key, Cost(input_tokens=10**9, output_tokens=10**9))
    assert decision.admitted
    assert [s.row.dimension for s in decision.admission.states] == ["requests"]
    unlimited = make_key("free-for-all")
    for _ in range(1000):
        assert (await limiter.admit(unlimited, Cost(input_tokens=10**6))).admitted


async def test_keys_are_independent(limiter: Limiter) -> None:
    a, b = make_key("a", rpm=1), make_key("b", rpm=1)
    assert (await limiter.admit(a, Cost())).admitted
    assert (await limiter.admit(b, Cost())).admitted
    assert not (await limiter.admit(a, Cost())).admitted


async def test_hundred_concurrent_tasks_admit_exactly_five(limiter: Limiter) -> None:
    key = make_key(rpm=5)
    results: list[bool] = []

    async def one() -> None:
        await trio.lowlevel.checkpoint()  # let all 100 start before any admits
        results.append((await limiter.admit(key, Cost())).admitted)

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(one)
    assert results.count(True) == 5
    assert len(results) == 100


async def test_sweep_drops_idle_counters(clock: FakeClock) -> None:
    store = MemoryStore(clock=clock)
    limiter = Limiter(store, window_seconds=60, bucket_seconds=5)
    for i in range(50):
        key = make_key(f"k{i}", rpm=10, input_tpm=10, output_tpm=10)
        await limiter.admit(key, Cost(input_tokens=1, output_tokens=1))
    assert store.sweep() == 150  # 3 counters per key
    clock.advance(65)
    assert store.sweep() == 0


def test_openai_duration_format() -> None:
    assert openai_duration(0) == "0s"
    assert openai_duration(0.25) == "250ms"
    assert openai_duration(0.0001) == "1ms"  # rounded up: never early
    assert openai_duration(1) == "1s"
    assert openai_duration(6.5) == "6.5s"
    assert openai_duration(360) == "6m0s"
    assert openai_duration(61.25) == "1m1.25s"
    assert openai_duration(3725) == "1h2m5s"


def test_retry_headers_round_up() -> None:
    assert retry_headers(0.2) == {"retry-after": "1", "retry-after-ms": "200"}
    assert retry_headers(6.0001) == {"retry-after": "7", "retry-after-ms": "6001"}
    assert retry_headers(6.0) == {"retry-after": "6", "retry-after-ms": "6000"}


async def test_headers_report_tighter_token_dimension(limiter: Limiter) -> None:
    key = make_key(rpm=10, input_tpm=1000, output_tpm=100)
    decision = await limiter.admit(key, Cost(input_tokens=100, output_tokens=50))
    headers = OPENAI.ratelimit_headers(decision.admission.states)
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-remaining-input-tokens"] == "900"
    assert headers["x-ratelimit-remaining-output-tokens"] == "50"
    # Output has 50% left, input 90%: output is the tighter one.
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "50"
    assert headers["x-ratelimit-reset-requests"] == "1m5s"


# --- spend rows ---------------------------------------------------------------------------

PRICE = Price(input=2_000_000, cached_input=500_000, output=8_000_000)  # per 1M tokens


async def test_spend_reserves_the_worst_case_and_settles_to_the_real_cost(
    limiter: Limiter,
) -> None:
    key = make_key(spend_per_day=100)  # 100 micro-units
    cost = Cost(input_tokens=10, output_tokens=10, price=PRICE)  # 20 + 80 = 100 reserved
    first = await limiter.admit(key, cost)
    assert first.admitted and first.state("spend").used == 100
    assert not (await limiter.admit(key, cost)).admitted  # the reservation does not fit
    # It used 2 output tokens, 6 of its 10 input tokens were cache hits: 8 + 3 + 16 = 27.
    await limiter.settle(first, output_tokens=2, cached_input_tokens=6)
    (spend,) = [s for s in await limiter.usage(key) if s.row.dimension == "spend"]
    assert spend.used == 27
    # What the real price left room for (73) is admitted again: 20 + 48.
    assert (await limiter.admit(key, Cost(input_tokens=10, output_tokens=6, price=PRICE))).admitted


# --- the prompt-cache tally ----------------------------------------------------------------


async def test_cache_hits_settled_are_tallied_over_the_window_and_never_refuse(
    limiter: Limiter, clock: FakeClock
) -> None:
    key = make_key(rpm=10, input_tpm=100)
    first = await limiter.admit(key, Cost(input_tokens=50, output_tokens=5))
    await limiter.settle(first, output_tokens=5, cached_input_tokens=30, cache_reads=400)
    second = await limiter.admit(key, Cost(input_tokens=50, output_tokens=5))
    await limiter.settle(second, output_tokens=5)  # no hits: the tally is not written
    states, cached = await limiter.usage_and_cached_input(key)
    assert cached == 430
    assert {s.row.dimension for s in states} == {"requests", "input_tokens"}  # not a limit
    assert [s.used for s in states if s.row.dimension == "input_tokens"] == [100]
    # A tally far past any limit refuses nothing.
    third = await limiter.admit(key, Cost(input_tokens=0, output_tokens=1))
    await limiter.settle(third, output_tokens=1, cache_reads=10**9)
    assert (await limiter.admit(key, Cost(input_tokens=0, output_tokens=1))).admitted
    clock.advance(65)  # a window and a bucket: every bucket of it is forgotten
    assert (await limiter.usage_and_cached_input(key))[1] == 0


async def test_a_refused_request_tallies_no_cache_hits(limiter: Limiter) -> None:
    key = make_key(rpm=1)
    assert (await limiter.admit(key, Cost())).admitted
    refused = await limiter.admit(key, Cost())
    await limiter.settle(refused, output_tokens=0, cached_input_tokens=7)
    assert (await limiter.usage_and_cached_input(key))[1] == 0


async def test_a_request_whose_reservation_exceeds_the_budget_never_fits(limiter: Limiter) -> None:
    key = make_key(spend_per_hour=50)
    refused = await limiter.admit(key, Cost(input_tokens=10, output_tokens=10, price=PRICE))
    assert not refused.admitted and refused.refusal is not None
    assert refused.refusal.row.dimension == "spend" and refused.refusal.never_fits


async def test_an_unpriced_request_costs_no_money(limiter: Limiter) -> None:
    key = make_key(spend_per_day=1)
    for _ in range(3):
        assert (await limiter.admit(key, Cost(input_tokens=1000, output_tokens=1000))).admitted

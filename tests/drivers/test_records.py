"""The window-store contract, records: put, read back, replaced, expired, refused out of
bounds: on every driver (``harness``, from tests/drivers/conftest.py: memory on a fake
clock, a real Redis, a real Redis Cluster).
"""

from __future__ import annotations

import pytest
import trio

from drivers import memory as memory_driver
from drivers.memory import MemoryStore
from tests.support.window_harness import START_MS, TEST_TIMEOUT, FakeClock, Harness
from tokenguard.store.window_store import MAX_RECORD_NAME, MAX_RECORD_VALUE, open_store

# --- records -----------------------------------------------------------------------------


async def test_a_record_put_is_read_back_by_another_store_on_the_same_server(
    harness: Harness,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.store.record_put("responses/k1/resp_1", '{"input": 12}', 60)
        assert await harness.store.record_get("responses/k1/resp_1") == '{"input": 12}'
        assert await harness.store.record_get("responses/k1/resp_2") is None
        if harness.driver.clock is None:  # a second node on the same Redis sees it
            async with open_store(harness.driver.make_store()) as other:
                assert await other.record_get("responses/k1/resp_1") == '{"input": 12}'


async def test_a_record_put_again_is_replaced(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        await harness.store.record_put("r", "first", 60)
        await harness.store.record_put("r", "second", 60)
        assert await harness.store.record_get("r") == "second"


async def test_a_record_is_gone_once_its_ttl_passed(harness: Harness) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        start = await harness.now_ms()
        await harness.store.record_put("short", "v", 0.2)
        await harness.store.record_put("long", "v", 60)
        await harness.sleep_until(start + 400)
        assert await harness.store.record_get("short") is None
        assert await harness.store.record_get("long") == "v"


@pytest.mark.parametrize(
    ("name", "value", "ttl"),
    [
        ("", "v", 60),
        ("n" * (MAX_RECORD_NAME + 1), "v", 60),
        ("n", "v" * (MAX_RECORD_VALUE + 1), 60),
        ("n", "v", 0),
        ("n", "v", -1),
        ("n", "v", float("inf")),
        ("n", "v", float("nan")),
    ],
)
async def test_a_record_out_of_bounds_is_refused_and_nothing_is_kept(
    harness: Harness, name: str, value: str, ttl: float
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with pytest.raises(ValueError):
            await harness.store.record_put(name, value, ttl)
        if name:
            assert await harness.store.record_get(name) is None


async def test_the_memory_store_keeps_a_bounded_number_of_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory_driver, "MAX_RECORDS", 3)
    store = MemoryStore(clock=FakeClock(START_MS))
    for i in range(5):
        await store.record_put(f"r{i}", str(i), 60)
    assert [await store.record_get(f"r{i}") for i in range(5)] == [None, None, "2", "3", "4"]

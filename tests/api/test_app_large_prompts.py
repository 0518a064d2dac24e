"""The HTTP surface through the app: large prompts cost the event loop nothing they need not.

A key at its ``rpm`` or at its ``max_concurrent`` is refused before its large prompt is
counted (one ``usage()`` of the store first); a large prompt is counted in a worker
thread, off the event loop, to the same count.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import trio

from drivers.memory import MemoryStore
from tests.support.chat_app import FakeClock, auth, chat
from tokenguard.api.app import create_app
from tokenguard.api.pipeline import COUNT_OFF_LOOP_BYTES
from tokenguard.config.loading import parse_settings
from tokenguard.counting import COUNT_CACHE, count_chat_prompt, count_text
from tokenguard.limiting.limiter import Cost
from tokenguard.model import digest_of


class CountingStore(MemoryStore):
    """The memory store, counting the calls the app makes to it."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.calls: list[str] = []

    async def admit(self, partition, rows):  # type: ignore[no-untyped-def]
        self.calls.append("admit")
        return await super().admit(partition, rows)

    async def usage(self, partition, rows):  # type: ignore[no-untyped-def]
        self.calls.append("usage")
        return await super().usage(partition, rows)


PRECHECK_CONFIG = {
    "server": {"max_body_bytes": 2 * 1024 * 1024},
    "keys": [
        {"key": "sk-rpm", "name": "rpm", "rpm": 1, "input_tpm": 10**9},
        {"key": "sk-conc", "name": "conc", "max_concurrent": 1, "input_tpm": 10**9},
    ],
}


def large_text() -> str:
    """~900 KiB of text never seen before (so counting it would be a cache miss)."""
    seed = time.perf_counter_ns()
    return " ".join(f"w{seed}x{i}" for i in range(900 * 1024 // 24))[: 900 * 1024]


async def test_a_key_at_its_rpm_is_refused_before_its_large_prompt_is_counted() -> None:
    store = CountingStore(FakeClock())
    client = create_app(parse_settings(PRECHECK_CONFIG, "<test>"), store).test_client()
    # An ordinary body: one store call (the admission), no pre-check.
    assert (await chat(client, "sk-rpm", max_tokens=1)).status_code == 200
    assert store.calls == ["admit"]
    misses = COUNT_CACHE.misses
    text = large_text()
    big = {"messages": [{"role": "user", "content": text}], "max_tokens": 1}
    refused = await chat(client, "sk-rpm", **big)
    assert refused.status_code == 429
    error = (await refused.get_json())["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "Limit 1, Used 1, Requested 1" in error["message"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert COUNT_CACHE.misses == misses  # the prompt was never counted
    assert store.calls == ["admit", "usage"]  # and nothing was admitted
    # The very 429 an admission gives: same message, same retry-after to the ms.
    small = await chat(client, "sk-rpm", max_tokens=1)
    assert small.status_code == 429
    assert (await small.get_json())["error"] == error
    for header in ("retry-after", "retry-after-ms", "x-ratelimit-reset-requests"):
        assert refused.headers[header] == small.headers[header], header


async def test_a_key_at_its_max_concurrent_is_refused_before_its_large_prompt_is_counted() -> None:
    store = CountingStore(FakeClock())
    app = create_app(parse_settings(PRECHECK_CONFIG, "<test>"), store)
    gateway = app.extensions["tokenguard"]
    in_flight = await gateway.limiter.admit(
        gateway.keyring.by_digest(digest_of("sk-conc")), Cost(1, 1, 1)
    )
    assert in_flight.admitted
    misses = COUNT_CACHE.misses
    big = {"messages": [{"role": "user", "content": large_text()}], "max_tokens": 1}
    refused = await chat(app.test_client(), "sk-conc", **big)
    assert refused.status_code == 429
    assert (await refused.get_json())["error"]["type"] == "concurrency"
    assert refused.headers["retry-after"] == "1"
    assert COUNT_CACHE.misses == misses
    # Once the request in flight ends, the same prompt is counted and admitted.
    await gateway.limiter.settle(in_flight, output_tokens=1)
    admitted = await chat(app.test_client(), "sk-conc", **big)
    assert admitted.status_code == 200
    assert COUNT_CACHE.misses == misses + 1


# --- large prompts ---------------------------------------------------------------------


LARGE_PROMPT_CONFIG = {
    "server": {"max_body_bytes": 2 * 1024 * 1024},
    "keys": [{"key": "sk-large", "name": "large", "input_tpm": 10**9}],
}


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
async def test_a_large_prompt_is_counted_off_the_event_loop(
    route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt of a large body is counted in a worker thread (tiktoken releases the
    GIL), so the node's event loop keeps serving meanwhile. Shown without a clock: the
    count of the large text waits until a task on the event loop has run; counted on
    the loop, it would wait for nothing (the hang guard ends it). The count is the
    same as in place. (Remembered counts are off: the prompt is counted.)"""
    text = " ".join(f"w{i * 7919 % 100_003}" for i in range(130_000))  # ~1 MB, ~400k tokens
    assert len(text) > COUNT_OFF_LOOP_BYTES
    body: dict[str, Any]
    if route == "/v1/chat/completions":
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}
        expected = count_chat_prompt("gpt-4o", body["messages"])
    elif route == "/v1/completions":
        body = {"model": "gpt-4o", "prompt": text, "max_tokens": 1}
        expected = count_text("gpt-4o", text)
    else:
        body = {"model": "text-embedding-3-small", "input": text}
        expected = count_text("text-embedding-3-small", text)
    loop_thread = threading.get_ident()
    counting = threading.Event()
    loop_ran = threading.Event()
    counted_on: list[tuple[int, bool]] = []  # (thread, the loop ran meanwhile)
    count = COUNT_CACHE.count

    def count_waiting_for_the_loop(encoding: Any, value: str) -> int:
        if len(value) >= COUNT_OFF_LOOP_BYTES:
            counting.set()
            counted_on.append((threading.get_ident(), loop_ran.wait(timeout=10)))
        return count(encoding, value)

    monkeypatch.setattr(COUNT_CACHE, "enabled", False)
    monkeypatch.setattr(COUNT_CACHE, "count", count_waiting_for_the_loop)
    client = create_app(
        parse_settings(LARGE_PROMPT_CONFIG, "<test>"), MemoryStore(clock=FakeClock())
    ).test_client()

    async def run_on_the_loop_while_counting() -> None:
        while not counting.is_set():  # noqa: ASYNC110 (set by a worker thread)
            await trio.sleep(0.001)
        loop_ran.set()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_on_the_loop_while_counting)
            response = await client.post(route, json=body, headers=auth("sk-large"))
    assert response.status_code == 200, await response.get_data()
    assert (await response.get_json())["usage"]["prompt_tokens"] == expected
    assert counted_on and all(thread != loop_thread for thread, _ in counted_on), counted_on
    assert all(ran for _, ran in counted_on), "the event loop was held while counting"

"""Tests for ``python -m bench feed`` (bench/feed.py): its machinery runs for real, in
a tiny form (half-second rounds, two subscribers) against real node processes and a
real redis-server, and its report names every kind, mode and figure. No timing is
asserted: only that each kind was measured, in the mode it names.
"""

from __future__ import annotations

import pytest
import trio

from bench.feed import KINDS, FeedBenchOptions, format_report, run

TINY = FeedBenchOptions(
    subscribers=2,
    keys=2,
    seconds=0.5,
    rounds=1,
    concurrency=8,
    latency_seconds=0.5,
    latency_rate=20.0,
)


@pytest.mark.slow
async def test_every_kind_is_measured_in_its_mode_and_reported() -> None:
    with trio.fail_after(120):
        result = await run(TINY)
    assert [r.kind for r in result.rounds] == list(KINDS)  # one round: in this order
    for r in result.rounds:
        assert r.throughput > 0 and r.node_cpu_ms > 0
        assert r.lagged == 0
        if r.kind == "none":
            assert r.received == r.messages == ()
            continue
        assert len(r.received) == len(r.messages) == TINY.subscribers
        assert all(n > 0 for n in r.received)
        if r.kind.endswith("-batch"):
            # Hundreds of events a second, published every 20 ms: batched.
            assert sum(r.messages) < sum(r.received), r
        else:
            assert r.messages == r.received  # one event per message
    assert result.latency_events > 0 and result.batch_latency_events > 0
    assert result.latency_ms["p50"] > 0 and result.batch_latency_ms["p50"] > 0
    report = format_report(result)
    for text in (
        "no subscriber",
        "2 key subscribers ",
        "2 key subscribers, batched",
        "2 admin subscribers ",
        "2 admin subscribers, batched",
        "events per message",
        "delivery latency",
        "the same, batched",
    ):
        assert text in report, text
    figures = result.to_dict()
    assert set(figures["ratios"]) == set(figures["cpu_ratios"]) == set(KINDS[1:])
    assert "CPU ratio" in report

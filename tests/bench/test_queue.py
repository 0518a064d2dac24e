"""``python -m bench queue``'s arithmetic (bench/queue.py): what it reports from the
answers a bursty client got. (The run itself starts 3 nodes for minutes: a benchmark,
not a test.)"""

from __future__ import annotations

import pytest

from bench.queue import Answer, percentile, summarize


def test_refusals_give_the_429_rate_and_goodput_over_the_bursts() -> None:
    # Two bursts of 3 x 2 against rpm 2: the first gets 2 in, the second none.
    answers = [Answer(0.0, 0.1, 200, None)] * 2 + [Answer(0.0, 0.1, 429, None)] * 4
    answers += [Answer(10.0, 10.1, 429, None)] * 6
    summary = summarize(answers, 0.0, limit=2, window=10, bucket=1, count=2)
    assert summary["statuses"] == {"200": 2, "429": 10}
    assert summary["refused_share"] == pytest.approx(10 / 12)
    assert summary["goodput_over_bursts"] == pytest.approx(0.5)
    assert summary["goodput_while_waiting"] is None
    assert summary["waiting"] == 0
    assert summary["sliding_ceiling"] == pytest.approx(10 / 11)


def test_waits_give_goodput_while_requests_wait_and_the_wait_percentiles() -> None:
    # rpm 2, window 10: two at once, then two a window (11 s apart: the bucket's slack).
    answers = [Answer(0.0, 0.0, 200, 0)] * 2
    answers += [Answer(0.0, 11.0, 200, 11_000)] * 2 + [Answer(0.0, 22.0, 200, 22_000)] * 2
    summary = summarize(answers, 0.0, limit=2, window=10, bucket=1, count=1)
    assert summary["refused_share"] == 0
    assert summary["waiting"] == 4
    # 4 admissions after the first window's, over 22 s: 4 / (2 x 2.2) of the limit.
    assert summary["goodput_while_waiting"] == pytest.approx(4 / (2 * 2.2))
    assert (summary["wait_p50_s"], summary["wait_p99_s"], summary["wait_max_s"]) == (11, 22, 22)


def test_percentiles_are_of_the_values_sorted() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.99) == 4.0
    assert percentile([], 0.5) != percentile([], 0.5)  # nan

"""bench/tokens.py: the count-cache benchmark measures what it says."""

from __future__ import annotations

from bench import tokens as bench_tokens
from tokenguard import counting


def test_the_workloads_are_what_they_claim() -> None:
    options = bench_tokens.TokensBenchOptions(turns=4, prompts=3)
    chat = bench_tokens.conversation(options, seed=1)
    assert [len(messages) for messages in chat] == [2, 4, 6, 8]  # history + a question
    for earlier, later in zip(chat, chat[1:], strict=False):
        assert later[: len(earlier)] == earlier
    fresh = bench_tokens.unique(options, seed=1)
    contents = [m["content"] for messages in fresh for m in messages]
    assert len(set(contents)) == len(contents) == 3


def test_a_tiny_run_reports_both_workloads_and_leaves_the_cache_on() -> None:
    options = bench_tokens.TokensBenchOptions(rounds=2, turns=6, prompts=5)
    result = bench_tokens.run(options)
    for workload in bench_tokens.WORKLOADS:
        for cache in ("on", "off"):
            assert len(result.seconds[workload][cache]) == 2
            assert all(s > 0 for s in result.seconds[workload][cache])
    # The chat's later prompts are mostly history the cache knows: far cheaper with it.
    assert result.ratio("conversation") < 0.8
    assert result.ratio("claude-conversation") < 0.8  # the estimate uses the same cache
    # The estimate scales the text by 1.30: larger than the chat's exact count.
    assert (
        result.tokens_per_prompt["claude-conversation"] > result.tokens_per_prompt["conversation"]
    )
    assert result.tokens_per_prompt["conversation"] > result.tokens_per_prompt["unique"] > 0
    assert counting.COUNT_CACHE.enabled
    report = bench_tokens.format_report(result)
    assert "| conversation |" in report and "| unique |" in report

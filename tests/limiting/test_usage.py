"""What a client is told about its usage (tokenguard/limiting/usage.py): the one shape
of `GET /v1/usage`'s dimensions and of the usage feed's `usage` field."""

from __future__ import annotations

from tokenguard.limiting.usage import usage_by_dimension, usage_entry
from tokenguard.store.rows import Row, RowState


def state(scope: str, dimension: str, limit: int, used: int, *, enforce: bool = True) -> RowState:
    return RowState(Row(scope, dimension, 60_000, 5_000, limit, 0, enforce), used, 12.5)


def test_a_row_is_reported_as_used_limit_remaining_and_reset() -> None:
    entry = usage_entry(state("key:k", "requests", 10, 13))
    assert list(entry.items()) == [
        ("used", 13),
        ("limit", 10),
        ("remaining", 0),
        ("reset_seconds", 12.5),
    ]


def test_each_dimension_reports_its_tightest_enforced_row() -> None:
    states = [
        state("key:k", "requests", 10, 2),  # 80% left
        state("team:t", "requests", 100, 90),  # 10% left: the tightest
        state("key:k", "input_tokens", 1000, 999, enforce=False),  # shadow: not reported
        state("key:k", "input_tokens", 1000, 100),
    ]
    usage = usage_by_dimension(states)
    assert list(usage) == ["requests", "input_tokens", "output_tokens"]
    assert usage["requests"] == usage_entry(states[1])
    assert usage["input_tokens"] == usage_entry(states[3])
    assert usage["output_tokens"] is None  # unlimited


def test_total_tokens_is_reported_only_when_a_rule_limits_it() -> None:
    assert "total_tokens" not in usage_by_dimension([state("key:k", "requests", 1, 0)])
    total = state("key:k", "total_tokens", 500, 20)
    assert usage_by_dimension([total])["total_tokens"] == usage_entry(total)

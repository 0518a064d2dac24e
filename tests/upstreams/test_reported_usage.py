"""What each API's usage block says was spent, and which prompt-cache hits it names:
inside the input (OpenAI's ``cached_tokens``) or beside it (Anthropic's cache reads)."""

from __future__ import annotations

from typing import Any

import pytest

from tokenguard.upstreams.usage import ReportedUsage

CASES = [
    (
        "chat, cached tokens among the prompt's",
        ReportedUsage.of_openai,
        {
            "prompt_tokens": 1000,
            "completion_tokens": 100,
            "prompt_tokens_details": {"cached_tokens": 800},
        },
        ReportedUsage(1000, 100, cache_read_tokens=0, cached_input_tokens=800),
    ),
    (
        "chat, no details",
        ReportedUsage.of_openai,
        {"prompt_tokens": 10, "completion_tokens": 5},
        ReportedUsage(10, 5),
    ),
    (
        "responses, cached tokens among the input",
        ReportedUsage.of_responses,
        {"input_tokens": 300, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 256}},
        ReportedUsage(300, 7, cached_input_tokens=256),
    ),
    (
        "anthropic, cache reads beside the input, cache writes in it",
        ReportedUsage.of_anthropic,
        {
            "input_tokens": 50,
            "cache_creation_input_tokens": 20,
            "cache_read_input_tokens": 900,
            "output_tokens": 9,
        },
        ReportedUsage(70, 9, cache_read_tokens=900),
    ),
    (
        "a cached count that is not a count",
        ReportedUsage.of_openai,
        {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": -3},
        },
        ReportedUsage(10, 5),
    ),
]


@pytest.mark.parametrize(
    ("reader", "block", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_usage_block_is_read_with_its_cache_hits_where_they_are(
    reader: Any, block: dict[str, Any], expected: ReportedUsage
) -> None:
    assert reader(block) == expected


def test_the_whole_prompt_adds_only_the_reads_beside_the_input() -> None:
    openai = ReportedUsage(1000, 1, cached_input_tokens=800)
    anthropic = ReportedUsage(70, 1, cache_read_tokens=900)
    assert (openai.prompt_tokens, anthropic.prompt_tokens) == (1000, 970)
    assert (anthropic.limited_input(False), anthropic.limited_input(True)) == (70, 970)

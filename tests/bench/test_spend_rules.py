"""Tests for ``python -m bench decisions --spend-and-users [--at-node]``
(bench/spend_rules.py): both variants run for real, in a tiny form, and measure the
rules they claim. No timing is asserted: only that each configuration was measured and
that the spend node counted money and end users.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import trio

from bench.spend_rules import compare, compare_at_nodes, node_config
from bench.wrk import find_wrk
from tokenguard.config.loading import parse_settings
from tokenguard.model import Limits


def test_the_spend_nodes_keys_add_a_spend_and_a_per_user_rule_to_the_base_three() -> None:
    base = parse_settings(tomllib.loads(node_config(False)), "<bench>")
    spend = parse_settings(tomllib.loads(node_config(True)), "<bench>")
    assert len(base.keys) == len(spend.keys) == 8
    for plain, priced in zip(base.keys, spend.keys, strict=True):
        limits = plain.limits
        assert (limits.rpm, limits.input_tpm, limits.output_tpm) != (None, None, None)
        assert limits.spend_per_day is None and limits.per_user is None
        assert priced.limits == Limits(
            rpm=limits.rpm,
            input_tpm=limits.input_tpm,
            output_tpm=limits.output_tpm,
            spend_per_day=10**12,  # micro-units: out of reach, exact in a Lua double
            per_user=Limits(rpm=limits.rpm),
            default_max_tokens=limits.default_max_tokens,
        )
    assert (base.user_header, spend.user_header) == (None, "x-end-user")


async def test_the_limiter_variant_measures_both_configurations() -> None:
    with trio.fail_after(60):
        figures = await compare("memory://", seconds=0.2, concurrency=4, rounds=1, keys=4, users=8)
    assert len(figures["base"]) == len(figures["spend+user"]) == 1
    assert figures["base"][0] > 0 and figures["spend+user"][0] > 0


@pytest.mark.slow
@pytest.mark.skipif(find_wrk() is None, reason="wrk is not installed (apt-get install wrk)")
async def test_the_node_variant_loads_both_nodes_and_the_spend_node_counts_users(
    tmp_path: Path,
) -> None:
    with trio.fail_after(120):
        found = await compare_at_nodes(None, seconds=1, connections=4, rounds=1, workdir=tmp_path)
    assert len(found.base) == len(found.spend_and_users) == 1
    assert found.base[0] > 0 and found.spend_and_users[0] > 0
    assert found.failed == 0
    # The header reached the spend node: user-0 has a bucket of its own, and money was
    # counted at the shipped table's price of gpt-4o.
    assert found.user_requests > 0 and found.spend_used > 0

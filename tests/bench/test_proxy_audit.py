"""The proxy accuracy audit (bench/proxy_audit.py): its hostile requests, how it reads the
upstream's ledger, and one short run against real processes (a fake upstream, 3 nodes)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio

from bench.proxy_audit import (
    BEHAVIOURS,
    ProxyAuditOptions,
    Sent,
    billings,
    format_report,
    hostile_body,
    parse_behaviours,
    run_proxy_audit,
)


@pytest.mark.parametrize(
    ("behaviour", "check"),
    [
        ("plain", lambda b: 16 <= b["max_tokens"] <= 256 and "tools" not in b),
        (
            "length_fields",
            lambda b: (
                b["max_tokens"] == 4
                and any(f in b for f in ("n_predict", "max_new_tokens", "best_of"))
            ),
        ),
        ("tools", lambda b: "$defs" in b["tools"][0]["function"]["parameters"]),
        ("abandon", lambda b: b["stream"] and 256 <= b["max_tokens"] <= 1024),
        ("stall", lambda b: b["stream"] and 20_000 <= b["max_tokens"] <= 25_000),
    ],
)
def test_each_behaviour_sends_what_it_says_and_names_key_and_request(
    behaviour: str, check: Any
) -> None:
    rng = random.Random(7)
    for request in range(20):
        body = hostile_body(rng, behaviour, "alice", request)
        assert check(body), body
        marks = body["messages"][0]["content"]
        assert marks == f"tokenguard-key: alice tokenguard-request: {request}"


def test_ledger_entries_are_matched_to_the_requests_sent() -> None:
    sent = [Sent(id=0, key="alice", behaviour="plain", start=10.0)]
    ledger = [
        {"request": "0", "key": "alice", "started": 10.5, "input_tokens": 7, "output_tokens": 9},
        {"request": "99", "key": "alice", "started": 11.0, "input_tokens": 1, "output_tokens": 1},
        {"request": None, "key": None, "started": 11.0, "input_tokens": 1, "output_tokens": 1},
    ]
    bills, unmatched = billings(ledger, sent)
    assert unmatched == 2
    ((bill),) = bills
    assert (bill.key, bill.start, bill.end, bill.input_tokens, bill.output_tokens) == (
        "alice",
        10.0,
        10.5,
        7,
        9,
    )


@pytest.mark.parametrize("text", ["", "plain,teleport", " , "])
def test_unknown_behaviours_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--behaviours"):
        parse_behaviours(text)


def test_behaviours_are_read_from_a_comma_list() -> None:
    assert parse_behaviours("stall, abandon") == ("stall", "abandon")
    assert parse_behaviours(",".join(BEHAVIOURS)) == BEHAVIOURS


async def test_a_short_run_of_stalls_and_abandoned_streams_spends_nothing_past_the_limits(
    workdir: Path,
) -> None:
    options = ProxyAuditOptions(
        flavour="llama", duration=8, concurrency=6, seed=3, behaviours=("plain", "abandon", "stall")
    )
    with trio.fail_after(180):
        result = await run_proxy_audit(options, workdir)
    stalls = [s for s in result.sent if s.behaviour == "stall" and s.status == 200]
    assert result.billed_requests > 0 and result.unmatched == 0
    # Every billed request went through one of the three nodes (their request logs).
    assert len(result.per_node) == 3 and sum(result.per_node) >= result.billed_requests
    assert stalls and all(s.cut for s in stalls)  # the nodes cut every stalled reader
    assert result.definite_overspend == 0, format_report(result)
    assert "definite over-spend: none (ok)" in format_report(result)

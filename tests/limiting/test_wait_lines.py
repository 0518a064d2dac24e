"""The admission queue's rules without I/O (tokenguard/limiting/wait_lines.py): a
request's wait policy, the order of a line, the batch share, the bounds."""

from __future__ import annotations

import math

import pytest

from tokenguard.limiting.wait_lines import (
    BATCH,
    DEFAULT_MAX_WAITING,
    INTERACTIVE,
    WaitLines,
    WaitPolicy,
    interactive_run,
    wait_policy,
)
from tokenguard.model import ApiKey, Limits, ModelRule, Team


def key(limits: Limits | None = None, team: Limits | None = None) -> ApiKey:
    return ApiKey(
        name="k",
        digest="d" * 64,
        limits=limits or Limits(),
        team=Team("t", team) if team is not None else None,
    )


POLICIES = [
    # (what, key, model, asked wait, asked priority, bound, priority, max_waiting)
    ("nothing set: refused at once, as before", key(), "m", None, None, 0.0, INTERACTIVE, 100),
    ("the key's bound", key(Limits(max_wait_seconds=15)), "m", None, None, 15.0, INTERACTIVE, 100),
    ("a header lowers it", key(Limits(max_wait_seconds=15)), "m", 2.0, None, 2.0, INTERACTIVE, 100),
    (
        "a header never raises it",
        key(Limits(max_wait_seconds=15)),
        "m",
        60.0,
        None,
        15.0,
        INTERACTIVE,
        100,
    ),
    ("a header alone allows no wait", key(), "m", 30.0, None, 0.0, INTERACTIVE, 100),
    (
        "the smallest of key and team",
        key(Limits(max_wait_seconds=15), Limits(max_wait_seconds=5)),
        "m",
        None,
        None,
        5.0,
        INTERACTIVE,
        100,
    ),
    (
        "a matching model rule's bound",
        key(
            Limits(
                max_wait_seconds=15,
                models=(ModelRule("gpt-4o*", Limits(rpm=1, max_wait_seconds=0)),),
            )
        ),
        "gpt-4o",
        None,
        None,
        0.0,
        INTERACTIVE,
        100,
    ),
    (
        "a model rule that does not match",
        key(
            Limits(
                max_wait_seconds=15,
                models=(ModelRule("gpt-4o*", Limits(rpm=1, max_wait_seconds=0)),),
            )
        ),
        "o1",
        None,
        None,
        15.0,
        INTERACTIVE,
        100,
    ),
    (
        "batch anywhere is batch",
        key(Limits(max_wait_seconds=9), Limits(priority="batch")),
        "m",
        None,
        None,
        9.0,
        BATCH,
        100,
    ),
    (
        "a header lowers the priority",
        key(Limits(max_wait_seconds=9)),
        "m",
        None,
        "batch",
        9.0,
        BATCH,
        100,
    ),
    (
        "a header never raises it",
        key(Limits(max_wait_seconds=9, priority="batch")),
        "m",
        None,
        "interactive",
        9.0,
        BATCH,
        100,
    ),
    (
        "the smallest max_waiting",
        key(Limits(max_waiting=7), Limits(max_waiting=3)),
        "m",
        None,
        None,
        0.0,
        INTERACTIVE,
        3,
    ),
]


@pytest.mark.parametrize(
    ("what", "api_key", "model", "asked", "asked_priority", "bound", "priority", "max_waiting"),
    POLICIES,
    ids=[p[0] for p in POLICIES],
)
def test_a_requests_wait_policy_comes_from_its_rules_and_headers_only_lower_it(
    what: str,
    api_key: ApiKey,
    model: str,
    asked: float | None,
    asked_priority: str | None,
    bound: float,
    priority: int,
    max_waiting: int,
) -> None:
    policy = wait_policy(api_key, model, asked_wait=asked, asked_priority=asked_priority)
    assert (policy.bound, policy.priority, policy.max_waiting) == (bound, priority, max_waiting)


@pytest.mark.parametrize(
    ("what", "api_key", "waited_on"),
    [
        ("no scope lets requests wait", key(), False),
        ("its own bound", key(Limits(max_wait_seconds=5)), True),
        (
            "its team's, though its own is 0",
            key(Limits(max_wait_seconds=0), Limits(max_wait_seconds=9)),
            True,
        ),
        (
            "a bound of 0 everywhere",
            key(Limits(max_wait_seconds=0), Limits(max_wait_seconds=0)),
            False,
        ),
    ],
)
def test_a_request_is_waited_on_when_any_of_its_scopes_lets_requests_wait(
    what: str, api_key: ApiKey, waited_on: bool
) -> None:
    """Its settlements are then announced to other nodes: a team's waiters wait on the
    team's lines whatever this key's own bound."""
    assert wait_policy(api_key, "m").waited_on is waited_on, what


@pytest.mark.parametrize(
    ("share", "run"), [(0.1, 9), (0.5, 1), (0.25, 3), (1.0, 0), (0.3, 3), (0.0, math.inf)]
)
def test_the_batch_share_is_one_batch_turn_after_a_run_of_interactive_ones(
    share: float, run: float
) -> None:
    assert interactive_run(share) == run


def test_a_line_goes_by_priority_then_arrival() -> None:
    lines = WaitLines(batch_share=0.0)
    batch = WaitPolicy(10, BATCH)
    inter = WaitPolicy(10, INTERACTIVE)
    b1 = lines.join("L", "k1", batch, 0.0, 5.0)
    i1 = lines.join("L", "k2", inter, 1.0, 5.0)
    i2 = lines.join("L", "k2", inter, 2.0, 5.0)
    assert lines.head("L") is i1
    assert i1 is not None and i2 is not None and b1 is not None
    lines.leave(i1, admitted=True)
    assert lines.head("L") is i2
    lines.leave(i2, admitted=True)
    assert lines.head("L") is b1
    lines.leave(b1, admitted=True)
    assert lines.head("L") is None
    assert lines.waiting() == {}


def test_batch_gets_its_share_of_turns_while_interactive_requests_wait() -> None:
    lines = WaitLines(batch_share=0.25)  # one batch turn after three interactive ones
    batch = lines.join("L", "b", WaitPolicy(10, BATCH), 0.0, 0.0)
    inter = [lines.join("L", "i", WaitPolicy(10, INTERACTIVE), 0.0, 0.0) for _ in range(6)]
    served = []
    for _ in range(7):
        head = lines.head("L")
        assert head is not None
        served.append("b" if head is batch else "i")
        lines.leave(head, admitted=True)
    assert served == ["i", "i", "i", "b", "i", "i", "i"]
    assert all(w is not None for w in inter)


def test_past_max_waiting_a_key_may_not_join_and_other_keys_still_may() -> None:
    lines = WaitLines(batch_share=0.1)
    policy = WaitPolicy(10, INTERACTIVE, max_waiting=2)
    assert lines.join("L", "k", policy, 0.0, 1.0) is not None
    assert lines.join("M", "k", policy, 0.0, 1.0) is not None
    assert lines.join("L", "k", policy, 0.0, 1.0) is None
    assert lines.join("L", "other", policy, 0.0, 1.0) is not None
    assert lines.waiting() == {"k": 2, "other": 1}


def test_a_new_request_joins_behind_a_waiter_of_its_priority_or_a_higher_one() -> None:
    lines = WaitLines(batch_share=0.1)
    lines.join("L", "k", WaitPolicy(10, BATCH), 0.0, 1.0)
    assert lines.line_ahead(("X", "L"), BATCH) == "L"
    assert lines.line_ahead(("X", "L"), INTERACTIVE) is None  # interactive goes first
    assert lines.line_ahead(("X",), BATCH) is None  # another counter: not delayed


def test_a_line_is_due_at_its_refusals_moment_and_at_once_when_room_is_freed() -> None:
    lines = WaitLines(batch_share=0.1)
    waiter = lines.join("L", "k", WaitPolicy(10), 0.0, 7.5)
    assert waiter is not None
    assert lines.due("L") == 7.5
    assert not lines.freed(("M",))
    assert lines.freed(("M", "L"))
    assert lines.due("L") == -math.inf
    lines.retry_at("L", 9.0)
    assert lines.due("L") == 9.0
    assert DEFAULT_MAX_WAITING == 100

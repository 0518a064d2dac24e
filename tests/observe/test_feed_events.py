"""What the live usage feed's events carry: admissions, refusals and settlements with their
numbers, the API surface, snapshots every second, batched mode, shadow mode and team
limits, money reserved and spent, the end user. In one process, on the memory driver: a
real node, real websocket clients, real HTTP requests (tests/support/usage_feed.py).
Every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection

from tests.support.usage_feed import (
    ADMIN,
    MESSAGES,
    TEST_TIMEOUT,
    Node,
    chat,
    collect,
    next_event,
    next_events,
    of_type,
    refused_code,
    running_node,
    settings_for,
    subscriber,
)
from tokenguard.config.loading import parse_settings
from tokenguard.observe import feed_session

# --- the events ---------------------------------------------------------------------------


async def test_admitted_rejected_and_settled_events_carry_the_numbers(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-tiny") as ws, httpx.AsyncClient() as client:
            await next_event(ws)
            began = trio.current_time()
            first = await chat(client, node.url, "sk-tiny", max_tokens=60)
            assert first.status_code == 200
            refused = await chat(client, node.url, "sk-tiny", max_tokens=5)
            assert refused.status_code == 429
            never = await chat(client, node.url, "sk-tiny", max_tokens=101)
            assert never.status_code == 429
            since = trio.current_time() - began  # the admission's age, at most
            events = await collect(ws, lambda ev: len(of_type(ev, "rejected")) == 2)
        admitted, settled = of_type(events, "admitted", "settled")
        usage = first.json()["usage"]
        assert (admitted["model"], admitted["surface"]) == ("gpt-4o", "chat")
        assert admitted["reserved"] == {"input_tokens": usage["prompt_tokens"], "output_tokens": 60}
        assert admitted["usage"]["requests"] == {
            "used": 1,
            "limit": 1,
            "remaining": 0,
            "reset_seconds": admitted["usage"]["requests"]["reset_seconds"],
        }
        assert admitted["usage"]["input_tokens"] is None  # unlimited
        assert admitted["usage"]["output_tokens"]["used"] == 60  # the reservation
        assert settled["output_tokens"] == usage["completion_tokens"]
        assert settled["reserved_output_tokens"] == 60
        assert settled["refund"] == 60 - usage["completion_tokens"] > 0
        rejected, never_fits = of_type(events, "rejected")
        assert (rejected["dimension"], rejected["limit"], rejected["used"]) == ("requests", 1, 1)
        assert rejected["surface"] == "chat"
        assert rejected["requested"] == 1
        # The admission leaves with its bucket: 60-65 s after it, less its age.
        assert 60 - since <= rejected["retry_after"] <= 65
        assert int(refused.headers["retry-after"]) == pytest.approx(rejected["retry_after"], abs=1)
        # Larger than the output limit itself: it can never fit, so no wait is given.
        assert never_fits["dimension"] == "output_tokens"
        assert (never_fits["requested"], never_fits["retry_after"]) == (101, None)


async def test_events_name_the_api_surface_of_the_request(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-beta") as ws, httpx.AsyncClient() as client:
            await next_event(ws)
            answer = await client.post(
                f"{node.url}/v1/responses",
                json={"model": "gpt-4o", "input": "hi", "max_output_tokens": 5},
                headers={"Authorization": "Bearer sk-beta"},
            )
            assert answer.status_code == 200
            await chat(client, node.url, "sk-beta")
            events = await collect(ws, lambda ev: len(of_type(ev, "admitted")) == 2)
    assert [e["surface"] for e in of_type(events, "admitted")] == ["responses", "chat"]


async def test_snapshots_every_second_while_a_key_is_active(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-beta") as ws, httpx.AsyncClient() as client:
            await next_event(ws)
            # The first snapshot comes at once, even before any traffic.
            first = await next_event(ws)
            assert first["type"] == "snapshot"
            assert first["usage"]["requests"]["used"] == 0
            await chat(client, node.url, "sk-beta")
            start = trio.current_time()
            events = await collect(
                ws,
                lambda ev: (
                    sum(e["type"] == "snapshot" and e["usage"]["requests"]["used"] == 1 for e in ev)
                    == 3
                ),
            )
            elapsed = trio.current_time() - start
            usage = (
                await client.get(
                    f"{node.url}/v1/usage", headers={"Authorization": "Bearer sk-beta"}
                )
            ).json()["dimensions"]
        snapshots = [e for e in of_type(events, "snapshot") if e["usage"]["requests"]["used"] == 1]
        assert elapsed > 1.5  # three snapshots, a second apart (or more, if slow)
        last = snapshots[-1]
        assert last["window_seconds"] == 60
        for dimension in ("requests", "input_tokens", "output_tokens"):
            assert last["usage"][dimension]["used"] == usage[dimension]["used"]
            assert last["usage"][dimension]["limit"] == usage[dimension]["limit"]


# --- batched mode ------------------------------------------------------------------------


async def test_batched_mode_sends_every_pending_event_in_one_message_in_order(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``?batch=1``: each message is the pending events, one JSON object per line, each
    with its own ``id``; a message never carries more than ``BATCH_MOST``. Publishing
    every 0.5 s (not 20 ms) makes the batching certain here."""
    node.feed.publish_seconds = 0.5
    monkeypatch.setattr(feed_session, "BATCH_MOST", 4)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            subscriber(node.ws_url, ADMIN, query="?batch=1") as admin,
            subscriber(node.ws_url, "sk-alpha", query="?batch=1") as alpha,
            httpx.AsyncClient() as client,
        ):
            for ws in (admin, alpha):
                (ready,) = await next_events(ws)  # `ready` comes alone
                assert (ready["type"], ready["id"], ready["batch"]) == ("ready", 1, True)
            sent = []
            for i in range(6):
                key = ("sk-alpha", "sk-beta")[i % 2]
                assert (await chat(client, node.url, key, max_tokens=10 + i)).status_code == 200
                sent.append((key.removeprefix("sk-"), 10 + i))
            messages: dict[WebSocketConnection, list[list[dict[str, Any]]]] = {admin: [], alpha: []}
            for ws, count in ((admin, 12), (alpha, 6)):
                while sum(len(of_type(m, "admitted", "settled")) for m in messages[ws]) < count:
                    messages[ws].append(await next_events(ws))
    for ws, keys in ((admin, {"alpha", "beta"}), (alpha, {"alpha"})):
        events = [e for message in messages[ws] for e in message]
        assert [e["id"] for e in events] == list(range(2, 2 + len(events)))
        assert all(len(message) <= 4 for message in messages[ws])
        assert any(len(message) > 1 for message in messages[ws])  # batched indeed
        traffic = of_type(events, "admitted", "settled")
        assert [e["type"] for e in traffic] == ["admitted", "settled"] * (len(traffic) // 2)
        assert [e["seq"] for e in traffic] == sorted(e["seq"] for e in traffic)
        admitted = [
            (e["key"], e["reserved"]["output_tokens"]) for e in of_type(traffic, "admitted")
        ]
        assert admitted == [s for s in sent if s[0] in keys]


async def test_batch_is_0_or_1(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-alpha", query="?batch=0") as ws:
            ready = await next_event(ws)
            assert (ready["type"], ready["batch"]) == ("ready", False)
        async with subscriber(node.ws_url, "sk-alpha", query="?batch=yes") as ws:
            assert await refused_code(ws) == 1008


async def test_shadow_mode_and_team_limits_show_in_the_events() -> None:
    """A request only shadow mode let through is followed by ``would_reject``; a team's
    limit that refuses is named as the team's."""
    config = {
        "teams": {"crew": {"rpm": 2}},
        "keys": [
            {"key": "sk-shadow", "name": "shadow", "rpm": 1, "mode": "shadow"},
            {"key": "sk-member", "name": "member", "team": "crew", "rpm": 100},
        ],
    }
    settings = parse_settings(config, "<test>", environ={})
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings) as node:
            async with (
                subscriber(node.ws_url, "sk-shadow") as shadow,
                subscriber(node.ws_url, "sk-member") as member,
                httpx.AsyncClient() as client,
            ):
                await next_event(shadow)
                await next_event(member)
                shadowed = [(await chat(client, node.url, "sk-shadow")).status_code for _ in "ab"]
                assert shadowed == [200, 200]
                statuses = [(await chat(client, node.url, "sk-member")).status_code for _ in "abc"]
                assert statuses == [200, 200, 429]
                shadow_events = await collect(shadow, lambda ev: bool(of_type(ev, "would_reject")))
                member_events = await collect(member, lambda ev: bool(of_type(ev, "rejected")))
    (would,) = of_type(shadow_events, "would_reject")
    assert [e["type"] for e in of_type(shadow_events, "admitted", "would_reject")] == [
        "admitted",
        "admitted",
        "would_reject",
    ]
    assert (would["dimension"], would["scope"], would["limit"], would["used"]) == (
        "requests",
        "key",
        1,
        1,
    )
    assert would["requested"] == 1 and would["window_seconds"] == 60
    (rejected,) = of_type(member_events, "rejected")
    assert (rejected["dimension"], rejected["scope"], rejected["limit"]) == ("requests", "team", 2)
    # The gauges show the tightest limit: the team's 2, not the key's own 100.
    admitted = of_type(member_events, "admitted")[-1]
    assert admitted["usage"]["requests"]["limit"] == 2


async def test_settled_events_carry_the_money_reserved_and_spent() -> None:
    config = {
        "prices": {"gpt-4o": {"input": 1.0, "output": 1.0}},  # micro-units = tokens
        "keys": [{"key": "sk-spender", "name": "spender", "spend_per_day": 1.0}],
    }
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings_for(config)) as node:
            async with subscriber(node.ws_url, "sk-spender") as ws, httpx.AsyncClient() as client:
                await next_event(ws)
                answer = await chat(client, node.url, "sk-spender", max_tokens=60)
                assert answer.status_code == 200
                events = await collect(ws, lambda ev: len(of_type(ev, "settled")) == 1)
    (settled,) = of_type(events, "settled")
    usage = answer.json()["usage"]
    assert settled["reserved_spend"] == usage["prompt_tokens"] + 60
    assert settled["spend"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_events_name_the_end_user_and_a_per_user_refusals_scope() -> None:
    """The key's subscriber sees which of its end users each event is about (from the
    body or the configured header), and a refusal by a per-user limit says so."""
    config = {
        "limits": {"user_header": "X-End-User"},
        "keys": [{"key": "sk-app", "name": "app", "per_user": {"rpm": 1}}],
    }
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings_for(config)) as node:
            async with subscriber(node.ws_url, "sk-app") as ws, httpx.AsyncClient() as client:
                await next_event(ws)
                assert (await chat(client, node.url, "sk-app", user="alice")).status_code == 200
                assert (await chat(client, node.url, "sk-app", user="alice")).status_code == 429
                by_header = await client.post(
                    f"{node.url}/v1/chat/completions",
                    headers={"Authorization": "Bearer sk-app", "X-End-User": "bob"},
                    json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20},
                )
                assert by_header.status_code == 200
                events = await collect(ws, lambda ev: len(of_type(ev, "settled")) == 2)
    traffic = of_type(events, "admitted", "rejected", "settled")
    assert [(e["type"], e.get("user")) for e in traffic] == [
        ("admitted", "alice"),
        ("settled", "alice"),
        ("rejected", "alice"),
        ("admitted", "bob"),
        ("settled", "bob"),
    ]
    (rejected,) = of_type(events, "rejected")
    assert (rejected["scope"], rejected["dimension"], rejected["limit"]) == ("user", "requests", 1)


async def test_events_of_a_request_naming_nobody_carry_no_user(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-alpha") as ws, httpx.AsyncClient() as client:
            await next_event(ws)
            assert (await chat(client, node.url, "sk-alpha")).status_code == 200
            events = await collect(ws, lambda ev: len(of_type(ev, "settled")) == 1)
    assert all("user" not in e for e in of_type(events, "admitted", "settled"))

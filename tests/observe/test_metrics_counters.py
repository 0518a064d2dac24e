"""Prometheus metrics in one process (the app and the memory store): the counters move exactly.

N admitted requests are N in ``tokenguard_requests_total``, a 429 is one refusal of its
dimension, the tokens reserved and settled add up to the replies' usage blocks;
remembered prompt counts, shadow-mode would-refusals, near-limit crossings,
concurrency refusals and ``on_store_error = "open"`` admissions are counted; store
calls, and node stalls apart from failures; the metrics token guards the route. Every
scrape is parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import trio
import trio.testing

from drivers.memory import MemoryStore
from tests.support.guarded_memory import guarded, pipelined, stall
from tests.support.metrics_samples import (
    CHAT,
    CONFIG,
    MESSAGES,
    Samples,
    auth,
    names,
    parse,
    value,
)
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import METRICS_TOKEN_ENV, ConfigError
from tokenguard.limiting.limiter import Cost
from tokenguard.store.stalls import PROBE_PERIOD


async def scrape(client: Any, headers: dict[str, str] | None = None) -> Samples:
    answer = await client.get("/metrics", headers=headers or {})
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    return parse((await answer.get_data()).decode())


async def chat(client: Any, key: str, **body: Any) -> Any:
    payload = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20, **body}
    return await client.post(CHAT, json=payload, headers=auth(key))


def usage_of_stream(text: str) -> dict[str, int]:
    """The usage chunk of a streamed reply (``include_usage``)."""
    for line in text.splitlines():
        if line.startswith("data: {") and '"usage":{' in line:
            usage = json.loads(line.removeprefix("data: "))["usage"]
            if usage:
                return usage
    raise AssertionError(f"no usage chunk in {text!r}")


# --- in one process: the app and the memory store -----------------------------------------


async def test_the_counters_move_with_traffic_exactly() -> None:
    app = create_app(parse_settings(CONFIG, "<test>", environ={}), MemoryStore())
    client = app.test_client()
    before = await scrape(client)
    assert value(before, "tokenguard_requests_total", path=CHAT, status="200", key="alice") == 0
    assert value(before, "tokenguard_node_info", node="0") == 1

    prompt = completion = 0
    for stream in (False, True, False):
        # (quart's test client buffers only a few chunks of a stream: a short one.)
        extra = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 5}
        answer = await chat(client, "sk-alice", **(extra if stream else {}))
        assert answer.status_code == 200
        if stream:
            usage = usage_of_stream((await answer.get_data()).decode())
        else:
            usage = (await answer.get_json())["usage"]
        prompt += usage["prompt_tokens"]
        completion += usage["completion_tokens"]
    refused = await chat(client, "sk-alice")
    assert refused.status_code == 429
    assert (await client.post(CHAT, json={}, headers=auth("sk-wrong"))).status_code == 401
    assert (await client.get("/no/such/path")).status_code == 404

    after = await scrape(client)
    requests = "tokenguard_requests_total"
    assert value(after, requests, path=CHAT, status="200", key="alice") == 3
    assert value(after, requests, path=CHAT, status="429", key="alice") == 1
    assert value(after, requests, path=CHAT, status="401", key="") == 1
    assert value(after, requests, path="other", status="404", key="") == 1
    assert value(after, requests, path="/metrics", status="200", key="") == 1  # the first
    assert value(after, "tokenguard_request_duration_seconds_count", path=CHAT) == 5
    surface = "tokenguard_surface_requests_total"
    assert value(after, surface, surface="chat", status="200") == 3
    assert value(after, surface, surface="chat", status="429") == 1
    assert value(after, surface, surface="chat", status="401") == 1
    responded = await client.post(
        "/v1/responses", json={"model": "gpt-4o", "input": "hi"}, headers=auth("sk-bob")
    )
    assert responded.status_code == 200
    last = await scrape(client)
    assert value(last, surface, surface="responses", status="200") == 1
    assert (
        value(last, "tokenguard_requests_total", path="/v1/responses", status="200", key="bob") == 1
    )
    assert value(after, "tokenguard_admitted_total", key="alice") == 3
    assert value(after, "tokenguard_rejected_total", key="alice", dimension="requests") == 1
    reserved = "tokenguard_tokens_reserved_total"
    assert value(after, reserved, key="alice", direction="input") == prompt
    assert value(after, reserved, key="alice", direction="output") == 20 + 5 + 20
    settled = "tokenguard_tokens_settled_total"
    assert value(after, settled, key="alice", direction="output") == completion
    assert completion > 0
    # Label values are key names, never keys.
    text = (await (await client.get("/metrics")).get_data()).decode()
    assert "sk-alice" not in text and "sk-wrong" not in text


async def test_remembered_prompt_counts_are_counted() -> None:
    """A long message sent twice is counted once: the second time is a hit."""
    app = create_app(parse_settings(CONFIG, "<test>", environ={}), MemoryStore())
    client = app.test_client()
    before = await scrape(client)
    long = "Remember this system prompt, every turn of the chat sends it again. " * 8
    messages = [{"role": "system", "content": long}, {"role": "user", "content": "Hi"}]
    for _ in range(2):
        answer = await chat(client, "sk-alice", messages=messages)
        assert answer.status_code == 200
    after = await scrape(client)
    hits, misses = (
        value(after, f"tokenguard_token_count_cache_{n}_total")
        - value(before, f"tokenguard_token_count_cache_{n}_total")
        for n in ("hits", "misses")
    )
    assert (hits, misses) in ((1, 1), (2, 0))  # ((2, 0): a rerun in this process)
    assert value(after, "tokenguard_token_count_cache_entries") >= 1


async def test_shadow_mode_would_refusals_are_counted_by_dimension() -> None:
    client = create_app(parse_settings(CONFIG, "<test>", environ={}), MemoryStore()).test_client()
    for _ in range(3):
        assert (await chat(client, "sk-shadow")).status_code == 200
    samples = await scrape(client)
    shadow = "tokenguard_shadow_refusals_total"
    assert value(samples, shadow, key="shade", dimension="requests") == 2
    assert value(samples, "tokenguard_admitted_total", key="shade") == 3
    assert value(samples, "tokenguard_rejected_total", key="shade", dimension="requests") == 0


async def test_near_limit_crossings_and_concurrency_refusals_are_counted() -> None:
    config = {
        "limits": {"near_limit_ratio": 0.5},
        "keys": [{"key": "sk-near", "name": "near", "rpm": 6, "max_concurrent": 1}],
    }
    app = create_app(parse_settings(config, "<test>", environ={}), MemoryStore())
    client = app.test_client()
    crossings = "tokenguard_near_limit_crossings_total"
    for _ in range(2):  # one at a time: each lease is given back when its reply ends
        assert (await chat(client, "sk-near")).status_code == 200
    assert value(await scrape(client), crossings, dimension="requests") == 0  # 2 of 6
    assert (await chat(client, "sk-near")).status_code == 200  # 3 of 6: crossed
    gateway = app.extensions["tokenguard"]
    held = await gateway.limiter.admit(gateway.settings.keys[0], Cost(requests=1), "gpt-4o")
    assert held.admitted  # the 4th request, in flight: it holds the only lease
    refused = await chat(client, "sk-near")
    assert refused.status_code == 429
    samples = await scrape(client)
    assert value(samples, crossings, dimension="requests") >= 1
    assert value(samples, "tokenguard_rejected_total", key="near", dimension="concurrent") == 1


async def test_the_metrics_token_guards_the_route() -> None:
    token = "a-metrics-token-of-some-length"
    settings = parse_settings({**CONFIG, "metrics": {"token": token}}, "<test>", environ={})
    client = create_app(settings, MemoryStore()).test_client()
    for headers in ({}, auth("wrong-token"), auth("sk-bob"), {"Authorization": token}):
        answer = await client.get("/metrics", headers=headers)
        assert answer.status_code == 401, headers
        error = (await answer.get_json())["error"]
        assert error["code"] == "invalid_metrics_token" and "metrics token" in error["message"]
    samples = await scrape(client, auth(token))
    assert value(samples, "tokenguard_node_info", node="0") == 1


def test_the_metrics_token_setting() -> None:
    env_token = "from-the-environment-0123"
    settings = parse_settings({"metrics": {"token": "x" * 16}}, "<t>", environ={})
    assert settings.metrics.token_digest is not None and "x" * 16 not in repr(settings)
    overridden = parse_settings({}, "<t>", environ={METRICS_TOKEN_ENV: env_token})
    assert overridden.metrics.token_digest not in (None, settings.metrics.token_digest)
    assert parse_settings({}, "<t>", environ={}).metrics.token_digest is None
    with pytest.raises(ConfigError, match=r"<t>: metrics\.token: .* at least 16"):
        parse_settings({"metrics": {"token": "short"}}, "<t>", environ={})
    with pytest.raises(ConfigError, match=r"<t>: metrics\.tokens: unknown key"):
        parse_settings({"metrics": {"tokens": "x" * 16}}, "<t>", environ={})


async def test_store_calls_and_open_policy_admissions_are_counted(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = {"store": {"url": "redis://127.0.0.1:1/0"}, "keys": CONFIG["keys"][1:2]}
    async with guarded("open") as (store, primary):
        client = create_app(parse_settings(config, "<test>", environ={}), store).test_client()
        assert (await chat(client, "sk-bob")).status_code == 200
        samples = await scrape(client)
        assert value(samples, "tokenguard_store_call_seconds_count", operation="admit") == 1
        assert value(samples, "tokenguard_store_breaker_open") == 0
        assert value(samples, "tokenguard_store_policy_info", policy="open") == 1
        primary.mode = "fail"
        for _ in range(5):
            assert (await chat(client, "sk-bob")).status_code == 200
        samples = await scrape(client)
        assert value(samples, "tokenguard_store_fail_open_admissions_total") == 5
        assert value(samples, "tokenguard_store_breaker_open") == 1
        assert value(samples, "tokenguard_store_breaker_openings_total") == 1
        assert value(samples, "tokenguard_store_failures_total") == 3  # then the breaker
        assert value(samples, "tokenguard_admitted_total", key="bob") == 6
        # Failed calls are failures, not latencies.
        assert value(samples, "tokenguard_store_call_seconds_count", operation="admit") == 1


async def test_node_stalls_and_the_calls_they_cut_are_counted_apart_from_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A request waits on a store that never answers while the node stalls for 2 s: it
    gets the policy's answer (closed: 503), counted as stalled out, not as a failure;
    the stall is counted in seconds."""
    config = {"store": {"url": "redis://127.0.0.1:1/0"}, "keys": CONFIG["keys"][1:2]}
    async with pipelined() as (store, primary):
        client = create_app(parse_settings(config, "<test>", environ={}), store).test_client()
        primary.latency = math.inf

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stall(autojump_clock, 0.01, 2.0))
            assert (await chat(client, "sk-bob")).status_code == 503
        samples = await scrape(client)
        assert value(samples, "tokenguard_store_stalled_out_total") == 1
        assert value(samples, "tokenguard_store_failures_total") == 0
        stalled = value(samples, "tokenguard_store_node_stalled_seconds_total")
        assert 2.0 - PROBE_PERIOD - 1e-9 <= stalled <= 2.0 + 1e-9  # (float sums)


async def test_a_memory_store_node_has_no_store_metrics() -> None:
    client = create_app(parse_settings(CONFIG, "<test>", environ={}), MemoryStore()).test_client()
    assert not any(name.startswith("tokenguard_store_") for name in names(await scrape(client)))

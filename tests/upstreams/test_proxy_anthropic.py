"""Proxy mode with an Anthropic route: a real tokenguard node in front of a fake Anthropic
Messages API that bills honestly (tests/support/anthropic_upstream.py), the official
``anthropic`` SDK as the client.

What is shown: the upstream hears the route's key in ``x-api-key`` with the client's
``anthropic-version`` and ``anthropic-beta`` (never the client's key); answers, streams
and ``count_tokens`` pass through and parse with the SDK's types; a key is settled to
the upstream's usage (a stream's LAST cumulative usage, once); cached input is not
counted unless the route says so; a 529 passes through, its output refunded; a model
routed to one API family is refused on another's surface.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from tests.support.anthropic_types import known_only
from tests.support.anthropic_upstream import Bills, anthropic_upstream, billed
from tests.support.metrics_samples import parse
from tests.support.processes import free_ports, running_tokenguard, wait_healthy, write_config
from tests.support.proxy_nodes import settings_of
from tests.support.proxy_upstreams import ScriptedUpstream, dropping, scripted_upstream
from tokenguard.api.dialects.anthropic import AnthropicMeter
from tokenguard.config.settings import ConfigError
from tokenguard.counting.claude import estimate_claude_prompt
from tokenguard.upstreams.usage import ReportedUsage

pytestmark = pytest.mark.slow

UPSTREAM_SECRET = "sk-ant-upstream-credential-4242"
SECRET_ENV = "TG_TEST_ANTHROPIC_KEY"
CLIENT_KEY = "sk-ant-client"
MODEL = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "Tell me about rate limits, through a proxy"}]
SYSTEM = [
    {
        "type": "text",
        "text": "You are a careful assistant who knows rate limiting well. " * 8,
        "cache_control": {"type": "ephemeral"},
    }
]


def proxy_config(upstream: ScriptedUpstream, route_extra: str = "") -> str:
    return f"""
[upstream.models."claude-*"]
base_url = "{upstream.base_url}"
api_key_env = "{SECRET_ENV}"
dialect = "anthropic"
connect_timeout = 2
read_timeout = 10
{route_extra}

[upstream.models."gpt-*"]
base_url = "{upstream.base_url}"
api_key_env = "{SECRET_ENV}"

[[keys]]
key = "{CLIENT_KEY}"
name = "client"
rpm = 100
input_tpm = 100000
output_tpm = 100000
"""


@contextlib.asynccontextmanager
async def proxy_node(workdir: Path, config: str) -> AsyncIterator[str]:
    path = write_config(workdir / "proxy.toml", config)
    port = free_ports()
    args = ["serve", "--config", str(path), "--port", str(port)]
    env = {SECRET_ENV: UPSTREAM_SECRET}
    async with running_tokenguard(args, output_path=workdir / "proxy.out", env=env):
        url = f"http://127.0.0.1:{port}"
        with trio.fail_after(120):
            await wait_healthy(url)
        yield url


def sdk(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=CLIENT_KEY, max_retries=0, timeout=30)


async def in_thread(call: Callable[[], Any]) -> Any:
    with trio.fail_after(120):
        return await trio.to_thread.run_sync(call)


async def usage_body(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            f"{url}/v1/usage", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        )
    assert response.status_code == 200
    return response.json()


async def used(url: str) -> dict[str, int]:
    body = await usage_body(url)
    return {name: d["used"] for name, d in body["dimensions"].items() if d}


async def test_the_sdk_reaches_the_anthropic_upstream_with_the_routes_key(workdir: Path) -> None:
    bills = Bills()
    async with (
        scripted_upstream(anthropic_upstream(UPSTREAM_SECRET, bills)) as upstream,
        proxy_node(workdir, proxy_config(upstream)) as url,
    ):
        client = sdk(url)
        beta = {"anthropic-beta": "prompt-caching-2024-07-31", "anthropic-version": "2023-06-01"}
        message = await in_thread(
            lambda: client.messages.create(
                model=MODEL, max_tokens=9, messages=MESSAGES, extra_headers=beta
            )
        )
        known_only(message)
        assert message.usage.output_tokens == 9 and message.stop_reason == "max_tokens"
        received = upstream.received[0]
        assert received.path == "/v1/messages"
        assert received.headers["x-api-key"] == UPSTREAM_SECRET
        assert received.headers["anthropic-version"] == "2023-06-01"
        assert received.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
        assert "authorization" not in received.headers
        assert received.body["max_tokens"] == 9 and "stream_options" not in received.body
        bill = bills.entries[0]
        assert message.usage.input_tokens == bill.input_tokens
        # Settled to the upstream's usage, not to tokenguard's estimate.
        assert bill.input_tokens != estimate_claude_prompt(None, MESSAGES, None)
        assert await used(url) == {
            "requests": 1,
            "input_tokens": bill.input_tokens,
            "output_tokens": 9,
        }

        def helper() -> tuple[str, Any]:
            with client.messages.stream(model=MODEL, max_tokens=7, messages=MESSAGES) as stream:
                return "".join(stream.text_stream), stream.get_final_message()

        text, final = await in_thread(helper)
        known_only(final)
        assert text == final.content[0].text and final.usage.output_tokens == 7
        assert upstream.received[1].body["stream"] is True

        counted = await in_thread(
            lambda: client.messages.count_tokens(model=MODEL, messages=MESSAGES)
        )
        assert known_only(counted).input_tokens == estimate_claude_prompt(None, MESSAGES, None)
        assert len(upstream.received) == 2  # the estimate: the upstream was not asked
        async with httpx.AsyncClient(timeout=10) as http:
            samples = parse((await http.get(f"{url}/metrics")).text)
        prompt = (
            "tokenguard_upstream_prompt_tokens_total",
            frozenset({("model", MODEL), ("source", "upstream")}),
        )
        assert samples[prompt] == 2 * bill.input_tokens  # the counting error, per model


async def test_count_tokens_can_ask_the_upstream_for_an_exact_figure(workdir: Path) -> None:
    bills = Bills()
    async with (
        scripted_upstream(anthropic_upstream(UPSTREAM_SECRET, bills)) as upstream,
        proxy_node(workdir, proxy_config(upstream, 'count_tokens = "upstream"')) as url,
    ):
        client = sdk(url)
        counted = await in_thread(
            lambda: client.messages.count_tokens(model=MODEL, messages=MESSAGES)
        )
        assert upstream.received[0].path == "/v1/messages/count_tokens"
        assert upstream.received[0].headers["x-api-key"] == UPSTREAM_SECRET
        exact = sum(billed({"model": MODEL, "messages": MESSAGES}))
        assert known_only(counted).input_tokens == exact
        assert exact != estimate_claude_prompt(None, MESSAGES, None)
        assert bills.entries == []  # counting generates nothing, and bills nothing
        assert await used(url) == {"requests": 1, "input_tokens": 0, "output_tokens": 0}


async def test_a_stream_with_several_cumulative_usages_is_settled_once(workdir: Path) -> None:
    bills = Bills()
    async with (
        scripted_upstream(anthropic_upstream(UPSTREAM_SECRET, bills, deltas=3)) as upstream,
        proxy_node(workdir, proxy_config(upstream)) as url,
    ):
        client = sdk(url)

        def stream() -> list[Any]:
            return list(
                client.messages.create(model=MODEL, max_tokens=12, messages=MESSAGES, stream=True)
            )

        events = await in_thread(stream)
        for event in events:
            known_only(event)
        usages = [e.usage.output_tokens for e in events if e.type == "message_delta"]
        assert usages == [4, 8, 12]  # cumulative: the last one is the answer's
        bill = bills.entries[0]
        assert await used(url) == {
            "requests": 1,
            "input_tokens": bill.input_tokens,
            "output_tokens": 12,
        }


@pytest.mark.parametrize(
    ("route_extra", "cached_counts"), [("", False), ("cached_input_counts = true", True)]
)
async def test_cached_input_counts_only_where_the_route_says_and_the_feed_shows_it(
    workdir: Path, route_extra: str, cached_counts: bool
) -> None:
    bills = Bills()
    async with (
        scripted_upstream(anthropic_upstream(UPSTREAM_SECRET, bills)) as upstream,
        proxy_node(workdir, proxy_config(upstream, route_extra)) as url,
    ):
        feed_url = url.replace("http://", "ws://") + "/v1/usage/stream"
        auth = [(b"Authorization", f"Bearer {CLIENT_KEY}".encode())]
        async with open_websocket_url(feed_url, extra_headers=auth) as feed:
            assert json.loads(await feed.get_message())["type"] == "ready"
            client = sdk(url)
            message = await in_thread(
                lambda: client.messages.create(
                    model=MODEL, max_tokens=5, system=SYSTEM, messages=MESSAGES
                )
            )
            with trio.fail_after(30):
                event = json.loads(await feed.get_message())
                while event["type"] != "settled":
                    event = json.loads(await feed.get_message())
        bill = bills.entries[0]
        assert bill.cache_read > 0 and message.usage.cache_read_input_tokens == bill.cache_read
        assert event["cached_input_tokens"] == bill.cache_read
        expected = bill.input_tokens + (bill.cache_read if cached_counts else 0)
        assert (await used(url))["input_tokens"] == expected
        assert (await usage_body(url))["cached_input_tokens"] == bill.cache_read


async def test_an_overloaded_upstream_529_passes_through_and_refunds_the_output(
    workdir: Path,
) -> None:
    bills = Bills()
    async with (
        scripted_upstream(anthropic_upstream(UPSTREAM_SECRET, bills, overloaded=True)) as upstream,
        proxy_node(workdir, proxy_config(upstream)) as url,
    ):
        client = sdk(url)
        with pytest.raises(anthropic.OverloadedError) as refused:
            await in_thread(
                lambda: client.messages.create(model=MODEL, max_tokens=50, messages=MESSAGES)
            )
        assert refused.value.status_code == 529
        assert refused.value.body["error"]["type"] == "overloaded_error"
        assert refused.value.response.headers["anthropic-ratelimit-requests-limit"] == "100"
        spent = await used(url)
        assert spent["requests"] == 1 and spent["output_tokens"] == 0


async def test_a_model_is_served_only_through_its_routes_api(workdir: Path) -> None:
    bills = Bills()
    async with (
        scripted_upstream(anthropic_upstream(UPSTREAM_SECRET, bills)) as upstream,
        proxy_node(workdir, proxy_config(upstream)) as url,
    ):
        async with httpx.AsyncClient(timeout=10) as http:
            chat = await http.post(
                f"{url}/v1/chat/completions",
                json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            )
            messages = await http.post(
                f"{url}/v1/messages",
                json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5},
                headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"},
            )
        assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"
        assert messages.status_code == 404
        assert messages.json()["error"]["type"] == "not_found_error"
        assert upstream.received == []
        assert await used(url) == {"requests": 0, "input_tokens": 0, "output_tokens": 0}


# --- the route's settings, and the stream meter -------------------------------------------


def test_an_anthropic_routes_settings_are_read_and_inherited() -> None:
    settings = settings_of(
        """
[upstream]
base_url = "https://api.anthropic.com/v1"
dialect = "anthropic"
input_factor = 1.2

[upstream.models."claude-opus-*"]
cached_input_counts = true
count_tokens = "upstream"
input_factor = 1.4
"""
    )
    default, opus = (
        settings.upstream.route("claude-haiku-4-5"),
        settings.upstream.route("claude-opus-4"),
    )
    assert (default.dialect, default.input_factor, default.cached_input_counts) == (
        "anthropic",
        1.2,
        False,
    )
    assert default.count_tokens == "estimate"
    assert (opus.dialect, opus.input_factor, opus.cached_input_counts) == ("anthropic", 1.4, True)
    assert opus.count_tokens == "upstream"
    assert (
        settings_of('[upstream]\nbase_url = "https://x/v1"').upstream.route("m").dialect == "openai"
    )


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ('dialect = "gemini"', "upstream.dialect: must be one of openai, anthropic"),
        ("input_factor = 0", "upstream.input_factor: must be more than 0 and at most 10"),
        ('cached_input_counts = "no"', "upstream.cached_input_counts: must be true or false"),
        ('count_tokens = "guess"', "upstream.count_tokens: must be one of estimate, upstream"),
    ],
)
def test_bad_anthropic_route_settings_are_refused(field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_of(f'[upstream]\nbase_url = "https://x/v1"\n{field}')


def meter_events(*events: dict[str, Any]) -> AnthropicMeter:
    meter = AnthropicMeter(1.0)
    for event in events:
        assert meter.read(json.dumps(event).encode())  # every event reaches the client
    return meter


START = {"type": "message_start", "message": {"usage": {"input_tokens": 20, "output_tokens": 1}}}


def test_the_meter_takes_the_last_cumulative_usage_once_the_message_stopped() -> None:
    meter = meter_events(
        START,
        {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 5}},
        {
            "type": "message_delta",
            "delta": {},
            "usage": {"output_tokens": 9, "cache_read_input_tokens": 7},
        },
        {"type": "message_stop"},
    )
    assert meter.usage == ReportedUsage(input_tokens=20, output_tokens=9, cache_read_tokens=7)


def test_a_stream_cut_before_message_stop_reports_no_output_usage() -> None:
    # The settlement then keeps the reservation: the upstream may have generated more.
    meter = meter_events(
        START,
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 5}},
    )
    assert meter.usage == ReportedUsage(input_tokens=20, output_tokens=None)
    assert meter.output_tokens(MODEL) == 1


async def test_an_upstream_that_drops_a_stream_ends_it_with_anthropics_error_event(
    workdir: Path,
) -> None:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        },
    }
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "OK"},
    }
    events = [
        f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in (start, block, delta)
    ]
    async with (
        scripted_upstream(dropping(events)) as upstream,
        proxy_node(workdir, proxy_config(upstream)) as url,
    ):
        client = sdk(url)
        seen: list[str] = []

        def stream() -> None:
            for event in client.messages.create(
                model=MODEL, max_tokens=30, messages=MESSAGES, stream=True
            ):
                seen.append(event.type)

        with pytest.raises(anthropic.APIStatusError) as broken:
            await in_thread(stream)
        assert seen == ["message_start", "content_block_start", "content_block_delta"]
        assert broken.value.body["type"] == "error"
        assert broken.value.body["error"]["type"] == "api_error"
        assert "in the middle of the stream" in broken.value.body["error"]["message"]
        # The upstream may have generated (and billed) it all: the reservation is kept.
        spent = await used(url)
        assert spent["output_tokens"] == 30 and spent["input_tokens"] == 10

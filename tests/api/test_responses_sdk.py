"""The Responses API of a real node process, driven by the official openai SDK and by raw
HTTP (every streamed event checked against OpenAI's spec)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from tests.support.openai_spec import check, stream_event_schema
from tests.support.processes import running_node_process, write_config

KEYS = """
[mock]
token_delay_ms = 20

[[keys]]
key = "sk-e2e-small"
name = "small"
rpm = 3
input_tpm = 50000
output_tpm = 5000

[[keys]]
key = "sk-e2e-big"
name = "big"
rpm = 1000
input_tpm = 100000
output_tpm = 20000
"""
# one request per 2-second window: a 429 whose retry-after the SDK waits out
RETRY_KEYS = """
[[keys]]
key = "sk-e2e-once"
name = "once"
rpm = 1
"""


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, body: str, window: int = 60, bucket: int = 5
) -> AsyncIterator[str]:
    """A node serving the keys of ``body``; yields its URL."""
    config = write_config(tmp_path / "tokenguard.toml", body, window, bucket)
    async with running_node_process(config, tmp_path / "node.out") as (url, _):
        yield url


@pytest.fixture
async def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with serving(tmp_path, KEYS) as url:
        yield url


def sdk(url: str, key: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=retries, timeout=10)


async def usage(url: str, key: str) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"})
    return {name: dim["used"] for name, dim in answer.json()["dimensions"].items() if dim}


async def test_the_sdk_creates_streams_and_retrieves_responses(node) -> None:  # type: ignore[no-untyped-def]
    client = sdk(node, "sk-e2e-big")

    def run() -> tuple[Any, list[Any], Any, Any, Any]:
        made = client.responses.create(model="gpt-4o", input="Hello", max_output_tokens=30)
        events = list(
            client.responses.create(model="gpt-4o", input="Hi", max_output_tokens=6, stream=True)
        )
        with client.responses.stream(model="gpt-4o", input="Hey", max_output_tokens=100) as stream:
            helped = stream.get_final_response()
        got = client.responses.retrieve(made.id)
        model = client.models.retrieve("gpt-4o")
        return made, events, helped, got, model

    with trio.fail_after(30):
        made, events, helped, got, model = await trio.to_thread.run_sync(run)
    assert made.status == "completed" and made.output_text
    assert made._request_id is not None and made._request_id.startswith("req_")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.incomplete"  # 6 tokens cut it
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text and final.usage.output_tokens == 6
    assert helped.status == "completed" and helped.output_text
    assert got.id == made.id and got.output_text == made.output_text
    assert model.id == "gpt-4o"
    spent = [made.usage, final.usage, helped.usage]
    assert await usage(node, "sk-e2e-big") == {
        "requests": 3,
        "input_tokens": sum(u.input_tokens for u in spent),
        "output_tokens": sum(u.output_tokens for u in spent),
    }


async def test_a_previous_response_id_chain_is_charged_as_openai_bills_it(node) -> None:  # type: ignore[no-untyped-def]
    client = sdk(node, "sk-e2e-big")
    turns = ["Tell me about rate limits.", "And tokens?", "Thanks."]

    def run() -> list[tuple[Any, int]]:
        chain, previous = [], None
        for turn in turns:
            alone = client.responses.input_tokens.count(model="gpt-4o", input=turn)
            made = client.responses.create(
                model="gpt-4o", input=turn, max_output_tokens=40, previous_response_id=previous
            )
            chain.append((made, alone.input_tokens))
            previous = made.id
        return chain

    with trio.fail_after(30):
        chain = await trio.to_thread.run_sync(run)
    # Each turn's input is its own plus the whole conversation before it (the previous
    # response's input and output), as OpenAI bills it.
    first, first_alone = chain[0]
    assert first.usage.input_tokens == first_alone
    for (before, _), (made, alone) in zip(chain, chain[1:], strict=False):
        carried = before.usage.input_tokens + before.usage.output_tokens
        assert made.usage.input_tokens == alone + carried
    assert await usage(node, "sk-e2e-big") == {
        "requests": 6,  # three counts (a request each, no tokens), three turns
        "input_tokens": sum(made.usage.input_tokens for made, _ in chain),
        "output_tokens": sum(made.usage.output_tokens for made, _ in chain),
    }


async def test_the_sdk_gets_a_rate_limit_error_with_retry_after(node) -> None:  # type: ignore[no-untyped-def]
    client = sdk(node, "sk-e2e-small")

    def run() -> None:
        for _ in range(3):
            client.responses.create(model="gpt-4o", input="hi", max_output_tokens=5)
        client.responses.create(model="gpt-4o", input="hi", max_output_tokens=5)

    with trio.fail_after(30), pytest.raises(openai.RateLimitError) as caught:
        await trio.to_thread.run_sync(run)
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.request_id is not None


async def test_an_sdk_with_one_retry_gets_through_on_it(tmp_path: Path) -> None:
    async with serving(tmp_path, RETRY_KEYS, window=2, bucket=1) as url:
        client = sdk(url, "sk-e2e-once", retries=1)

        def run() -> Any:
            client.responses.create(model="gpt-4o", input="first", max_output_tokens=5)
            # refused (the window's one request is spent), waits retry-after, retried
            raw = client.responses.with_raw_response.create(
                model="gpt-4o", input="second", max_output_tokens=5
            )
            return raw

        with trio.fail_after(30):
            raw = await trio.to_thread.run_sync(run)
        assert raw.retries_taken == 1
        assert raw.parse().status in ("completed", "incomplete")
        assert (await usage(url, "sk-e2e-once"))["requests"] == 1  # the window moved on


async def stream_events(url: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    headers = {"Authorization": "Bearer sk-e2e-big"}
    events = []
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream("POST", f"{url}/v1/responses", json=body, headers=headers) as sse:
            assert sse.status_code == 200
            assert sse.headers["content-type"].startswith("text/event-stream")
            assert "x-ratelimit-remaining-requests" in sse.headers
            name = ""
            async for line in sse.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))
    return events


@pytest.mark.parametrize("max_output_tokens", [200, 4])
async def test_every_event_a_node_streams_matches_the_spec(node, max_output_tokens) -> None:  # type: ignore[no-untyped-def]
    body = {
        "model": "gpt-4o",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Stream it"}]}],
        "instructions": "Be brief.",
        "max_output_tokens": max_output_tokens,
        "stream": True,
    }
    with trio.fail_after(30):
        events = await stream_events(node, body)
    for number, (name, event) in enumerate(events):
        assert name == event["type"] and event["sequence_number"] == number
        check(stream_event_schema(event["type"]), event)
    terminal = events[-1][1]
    assert terminal["type"] == (
        "response.completed" if max_output_tokens == 200 else "response.incomplete"
    )
    spent = terminal["response"]["usage"]
    used = await usage(node, "sk-e2e-big")
    assert (used["input_tokens"], used["output_tokens"]) == (
        spent["input_tokens"],
        spent["output_tokens"],
    )


async def test_a_client_that_leaves_mid_stream_pays_what_it_was_sent(node) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": "Bearer sk-e2e-big"}
    body = {"model": "gpt-4o", "input": "a long story", "max_output_tokens": 1000, "stream": True}
    deltas = 0
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream(
                "POST", f"{node}/v1/responses", json=body, headers=headers
            ) as sse:
                assert sse.headers["x-ratelimit-remaining-output-tokens"] == str(20000 - 1000)
                async for line in sse.aiter_lines():
                    if line.startswith("data: ") and '"response.output_text.delta"' in line:
                        deltas += 1
                        if deltas == 3:
                            break  # hang up (a token every 20 ms)
            while (await usage(node, "sk-e2e-big"))["output_tokens"] == 1000:  # noqa: ASYNC110
                await trio.sleep(0.05)
    spent = (await usage(node, "sk-e2e-big"))["output_tokens"]
    assert deltas <= spent <= deltas + 3


async def test_a_streamed_response_can_be_continued_as_soon_as_it_ended(node) -> None:  # type: ignore[no-untyped-def]
    """Its totals are kept before its terminal event is sent: a client that saw the end
    may refer to it at once."""
    body = {"model": "gpt-4o", "input": "Stream, then go on", "stream": True}
    with trio.fail_after(30):
        events = await stream_events(node, {**body, "max_output_tokens": 8})
        done = events[-1][1]["response"]
        async with httpx.AsyncClient(timeout=10) as client:
            follow = await client.post(
                f"{node}/v1/responses",
                json={"model": "gpt-4o", "input": "And?", "previous_response_id": done["id"]},
                headers={"Authorization": "Bearer sk-e2e-big"},
            )
    assert follow.status_code == 200, follow.text
    carried = done["usage"]["input_tokens"] + done["usage"]["output_tokens"]
    assert follow.json()["usage"]["input_tokens"] > carried

"""Proxy mode for the Responses API, real processes: tokenguard in front of a Responses
upstream. The upstream is a tokenguard node in mock mode (a real Responses server, which
bills honestly: its usage is what it generated) or a scripted trio HTTP server
(tests/support/proxy_upstreams.py) for what a mock never does: a ``response.failed``
terminal event, a stream dropped mid-way, error answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from tests.support.openai_spec import check, stream_event_schema
from tests.support.proxy_nodes import (
    DEFAULT_MAX_TOKENS,
    PROXY_KEY,
    UPSTREAM_SECRET,
    in_thread,
    node,
    proxy_node,
    sdk,
    upstream_config,
    used,
)
from tests.support.proxy_upstreams import dropping, fixed, scripted_upstream, streaming
from tokenguard.api.dialects.response_objects import sse_named, usage_block

INPUT = "Tell me about rate limits, through a proxy"


def response_stub(status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    """The Response object a scripted upstream's events carry (enough for the SDK)."""
    return {
        "id": "resp_scripted",
        "object": "response",
        "created_at": 0,
        "status": status,
        "model": "gpt-4o",
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        **({"usage": usage} if usage is not None else {}),
    }


def scripted_events(terminal: str | None, usage: dict[str, Any] | None) -> list[bytes]:
    """A Responses stream: created, three deltas, then ``terminal`` (if any)."""
    events = [{"type": "response.created", "response": response_stub("in_progress", None)}]
    for word in ("OK", " the", " rate"):
        events.append(
            {
                "type": "response.output_text.delta",
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": word,
                "logprobs": [],
            }
        )
    if terminal is not None:
        status = terminal.removeprefix("response.")
        events.append({"type": terminal, "response": response_stub(status, usage)})
    return [sse_named({**e, "sequence_number": n}) for n, e in enumerate(events)]


async def raw_stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    events = []
    async with httpx.AsyncClient(timeout=20) as client:
        async with client.stream("POST", f"{url}/v1/responses", json=body, headers=headers) as sse:
            assert sse.status_code == 200
            assert "x-ratelimit-remaining-requests" in sse.headers
            async for line in sse.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    return events


# --- a tokenguard mock node as the upstream -----------------------------------------------


async def test_the_sdk_through_a_proxy_gets_and_is_charged_the_upstreams_responses(
    workdir: Path,
) -> None:
    with trio.fail_after(90):
        async with (
            node(workdir, "upstream", upstream_config()) as (upstream_url, _),
            proxy_node(workdir, f"{upstream_url}/v1") as (proxy_url, _),
        ):
            via = sdk(proxy_url, PROXY_KEY)

            def run() -> tuple[Any, Any, Any, Any, Any]:
                made = via.responses.create(model="gpt-4o", input=INPUT)  # no length: default
                follow = via.responses.create(
                    model="gpt-4o", input="And?", max_output_tokens=6, previous_response_id=made.id
                )
                got = via.responses.retrieve(made.id)
                items = via.responses.input_items.list(made.id)
                via.responses.delete(follow.id)
                try:
                    via.responses.retrieve(follow.id)
                except openai.NotFoundError as gone:  # the upstream deleted it
                    return made, follow, got, items, gone
                return made, follow, got, items, None

            made, follow, got, items, gone = await in_thread(run)
            assert made.usage.output_tokens <= DEFAULT_MAX_TOKENS
            assert follow.status == "incomplete" and follow.usage.output_tokens == 6
            # the upstream billed the conversation as the follow-up's input; the proxy had
            # reserved the same from its records, and settled to what the upstream said
            carried = made.usage.input_tokens + made.usage.output_tokens
            assert follow.usage.input_tokens > carried
            assert got.id == made.id and got.output_text == made.output_text
            assert [item.type for item in items.data] == ["message"]
            assert gone is not None and gone.status_code == 404
            events = await raw_stream(
                proxy_url,
                {"model": "gpt-4o", "input": INPUT, "max_output_tokens": 5, "stream": True},
            )
            for number, event in enumerate(events):
                assert event["sequence_number"] == number
                check(stream_event_schema(event["type"]), event)
            assert events[-1]["type"] == "response.incomplete"
            streamed = events[-1]["response"]["usage"]
            assert await used(proxy_url) == {
                "requests": 3,
                "input_tokens": made.usage.input_tokens
                + follow.usage.input_tokens
                + streamed["input_tokens"],
                "output_tokens": made.usage.output_tokens + 6 + 5,
            }


async def test_an_id_the_upstream_did_not_make_for_the_key_is_not_forwarded(
    workdir: Path,
) -> None:
    with trio.fail_after(60):
        async with (
            scripted_upstream(fixed(200, {"id": "resp_x", "object": "response"})) as upstream,
            proxy_node(workdir, upstream.base_url) as (proxy_url, _),
        ):
            headers = {"Authorization": f"Bearer {PROXY_KEY}"}
            async with httpx.AsyncClient(timeout=10) as client:
                for method, path in [
                    ("GET", "/v1/responses/resp_x"),
                    ("DELETE", "/v1/responses/resp_x"),
                    ("GET", "/v1/responses/..%2Fchat%2Fcompletions/input_items"),
                ]:
                    answer = await client.request(method, f"{proxy_url}{path}", headers=headers)
                    assert answer.status_code == 404
            assert upstream.received == []


# --- scripted upstreams: each terminal event, a broken stream, errors ---------------------


@pytest.mark.parametrize(
    "terminal", ["response.completed", "response.incomplete", "response.failed"]
)
async def test_a_relayed_stream_settles_to_its_terminal_events_usage(
    workdir: Path, terminal: str
) -> None:
    """The upstream's usage says 30 in (12 of them cached) and 25 out (20 of them
    reasoning): that is what the key pays, whatever the text it relayed."""
    usage = usage_block(30, 25, reasoning_tokens=20)
    usage["input_tokens_details"]["cached_tokens"] = 12
    with trio.fail_after(60):
        async with (
            scripted_upstream(streaming(scripted_events(terminal, usage))) as upstream,
            proxy_node(workdir, upstream.base_url) as (proxy_url, _),
        ):
            body = {"model": "gpt-4o", "input": INPUT, "stream": True, "max_output_tokens": 40}
            events = await raw_stream(proxy_url, body)
            assert [e["type"] for e in events][-1] == terminal
            (sent,) = upstream.received
            assert sent.path == "/v1/responses"
            assert sent.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
            assert sent.body == body  # no stream_options, no max_tokens: the Responses API's
            assert await used(proxy_url) == {"requests": 1, "input_tokens": 30, "output_tokens": 25}


async def test_a_stream_dropped_mid_way_ends_in_an_error_event_and_keeps_the_reservation(
    workdir: Path,
) -> None:
    with trio.fail_after(60):
        async with (
            scripted_upstream(dropping(scripted_events(None, None))) as upstream,
            proxy_node(workdir, upstream.base_url) as (proxy_url, _),
        ):
            via = sdk(proxy_url, PROXY_KEY)

            def stream() -> list[Any]:
                return list(
                    via.responses.create(
                        model="gpt-4o", input=INPUT, stream=True, max_output_tokens=40
                    )
                )

            # A Responses stream tells of a failure with an `error` event (the SDK
            # yields it; it raises for nothing), numbered after the last one relayed.
            events = await in_thread(stream)
            types = [event.type for event in events]
            assert types == ["response.created", *["response.output_text.delta"] * 3, "error"]
            error = events[-1]
            assert "closed the connection in the middle of the stream" in error.message
            assert error.sequence_number == 4
            check("ResponseErrorEvent", error.model_dump())
            assert (await used(proxy_url))["output_tokens"] == 40


async def test_a_client_that_leaves_a_relayed_stream_pays_the_reservation(workdir: Path) -> None:
    """The route's default ``on_client_gone = "cancel"``: the upstream may bill it all."""
    with trio.fail_after(60):
        async with (
            node(workdir, "upstream", upstream_config(token_delay_ms=50)) as (upstream_url, _),
            proxy_node(workdir, f"{upstream_url}/v1") as (proxy_url, _),
        ):
            headers = {"Authorization": f"Bearer {PROXY_KEY}"}
            body = {"model": "gpt-4o", "input": INPUT, "stream": True, "max_output_tokens": 300}
            async with httpx.AsyncClient(timeout=20) as client:
                url = f"{proxy_url}/v1/responses"
                async with client.stream("POST", url, json=body, headers=headers) as sse:
                    async for line in sse.aiter_lines():
                        if '"response.output_text.delta"' in line:
                            break  # hang up at the first token
            while (await used(proxy_url))["output_tokens"] != 300:  # noqa: ASYNC110
                await trio.sleep(0.05)  # settled once the proxy noticed


@pytest.mark.parametrize("status", [500, 429, 400])
async def test_upstream_errors_pass_through_and_cost_no_output(workdir: Path, status: int) -> None:
    error = {
        "error": {
            "message": "upstream says no",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    with trio.fail_after(60):
        async with (
            scripted_upstream(fixed(status, error, {"retry-after": "7"})) as upstream,
            proxy_node(workdir, upstream.base_url) as (proxy_url, _),
        ):
            async with httpx.AsyncClient(timeout=10) as client:
                answer = await client.post(
                    f"{proxy_url}/v1/responses",
                    json={"model": "gpt-4o", "input": INPUT, "max_output_tokens": 40},
                    headers={"Authorization": f"Bearer {PROXY_KEY}"},
                )
            assert answer.status_code == status
            assert answer.json() == error
            assert answer.headers["retry-after"] == "7"
            assert "x-ratelimit-remaining-requests" in answer.headers
            assert (await used(proxy_url))["output_tokens"] == 0

"""Proxy mode with real processes, in front of a scripted upstream.

For what a mock node never does (tests/support/proxy_upstreams.py): a model no route
serves (404, nothing spent); a stream dropped mid-way (the reservation kept, or the
relayed tokens, per route); fixed 500 and 429 answers (passed through, ``retry-after``
kept, ``x-ratelimit-*`` added) and a usage block that disagrees with tokenguard's count;
the reply capped in the field the route names; a relayed stream closed when the request
ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from tests.support.processes import free_ports
from tests.support.proxy_nodes import (
    DEFAULT_MAX_TOKENS,
    MESSAGES,
    PROXY_KEY,
    UPSTREAM_SECRET,
    in_thread,
    proxy_node,
    sdk,
    texts_counted,
    used,
)
from tests.support.proxy_upstreams import (
    content_chunk,
    dropping,
    fixed,
    scripted_upstream,
    sse_event,
)
from tokenguard.api.responses import RELAYED_STREAM, close_relayed_stream
from tokenguard.counting import count_chat_prompt, count_text

# --- a scripted upstream --------------------------------------------------------------------


async def test_a_model_no_route_serves_is_a_404_that_costs_nothing(workdir: Path) -> None:
    with trio.fail_after(40):
        async with (
            scripted_upstream(fixed(200, {})) as upstream,
            proxy_node(workdir, upstream.base_url, default=False) as (proxy_url, _),
        ):
            via = sdk(proxy_url, PROXY_KEY)
            with pytest.raises(openai.NotFoundError) as caught:
                await in_thread(
                    lambda: via.chat.completions.create(model="gpt-9", messages=MESSAGES)
                )
            assert caught.value.code == "model_not_found"
            assert upstream.received == []
            assert await used(proxy_url) == {"requests": 0, "input_tokens": 0, "output_tokens": 0}


DROPPED_TEXT = ("OK", " the", " rate")


@pytest.mark.parametrize(
    ("policy", "output"),
    [(None, DEFAULT_MAX_TOKENS), ("refund", count_text("gpt-4o", "".join(DROPPED_TEXT)))],
)
async def test_a_stream_dropped_mid_way_keeps_the_reservation_unless_refunded(
    workdir: Path, policy: str | None, output: int
) -> None:
    """The upstream broke its stream after the request went out: it may bill the whole
    reply, so the reservation is kept, unless the route refunds upstream failures (then
    the key pays the tokens the upstream sent)."""
    role = {
        **content_chunk(""),
        "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
    }
    events = [sse_event(role)] + [sse_event(content_chunk(w)) for w in DROPPED_TEXT]
    route_extra = f'on_upstream_error = "{policy}"' if policy else ""
    with trio.fail_after(40):
        async with (
            scripted_upstream(dropping(events)) as upstream,
            proxy_node(workdir, upstream.base_url, route_extra=route_extra) as (proxy_url, _),
        ):
            via = sdk(proxy_url, PROXY_KEY)
            received: list[str] = []

            def stream() -> None:
                for chunk in via.chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, stream=True
                ):
                    received.append(chunk.choices[0].delta.content or "")

            with pytest.raises(openai.APIError) as caught:
                await in_thread(stream)
            assert "closed the connection in the middle of the stream" in caught.value.message
            assert "".join(received) == "".join(DROPPED_TEXT)

            # What the upstream was sent: the validated body, tokenguard's credential, the
            # reservation as max_tokens, and a request for the usage chunk.
            (sent,) = upstream.received
            assert sent.path == "/v1/chat/completions"
            assert sent.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"
            assert sent.body == {
                "model": "gpt-4o",
                "messages": MESSAGES,
                "stream": True,
                "max_tokens": DEFAULT_MAX_TOKENS,
                "stream_options": {"include_usage": True},
            }
            # No usage came: settled once the proxy has seen the drop (another process:
            # poll).
            with trio.fail_after(5):
                while (await used(proxy_url))["output_tokens"] != output:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert await used(proxy_url) == {
                "requests": 1,
                "input_tokens": count_chat_prompt("gpt-4o", MESSAGES),
                "output_tokens": output,
            }


async def test_upstream_errors_pass_through_with_ratelimit_headers(workdir: Path) -> None:
    server_error = {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
    }
    too_many = {
        "error": {
            "message": "Rate limit reached for gpt-4o (upstream)",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    dead_port = free_ports()
    dead_route = f"""
[upstream.models."gpt-dead"]
base_url = "http://127.0.0.1:{dead_port}/v1"
"""
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    request = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 30}
    prompt = count_chat_prompt("gpt-4o", MESSAGES)
    with trio.fail_after(40):
        async with (
            scripted_upstream(fixed(500, server_error)) as upstream,
            proxy_node(workdir, upstream.base_url, extra=dead_route) as (proxy_url, proxy),
            httpx.AsyncClient(timeout=10) as client,
        ):
            url = f"{proxy_url}/v1/chat/completions"
            response = await client.post(url, json=request, headers=headers)
            assert response.status_code == 500
            assert response.json() == server_error
            assert response.headers["x-ratelimit-remaining-requests"] == "49"
            assert response.headers["x-ratelimit-limit-output-tokens"] == "100000"

            upstream.answer = fixed(
                429,
                too_many,
                {"retry-after": "7", "retry-after-ms": "7000", "x-ratelimit-limit-requests": "3"},
            )
            with pytest.raises(openai.RateLimitError) as caught:
                await in_thread(
                    lambda: sdk(proxy_url, PROXY_KEY).chat.completions.create(**request)
                )
            limited = caught.value.response
            assert limited.status_code == 429 and limited.json() == too_many
            assert limited.headers["retry-after"] == "7"
            assert limited.headers["retry-after-ms"] == "7000"
            # tokenguard's own limits, not the upstream's.
            assert limited.headers["x-ratelimit-limit-requests"] == "50"
            assert limited.headers["x-ratelimit-remaining-requests"] == "48"

            # Unreachable: a 502 in OpenAI's shape, with the headers.
            response = await client.post(
                url, json={**request, "model": "gpt-dead"}, headers=headers
            )
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "upstream_unavailable"
            assert "x-ratelimit-remaining-requests" in response.headers

            # Errors are not billed: every output reservation was refunded.
            assert await used(proxy_url) == {
                "requests": 3,
                "input_tokens": 3 * prompt,
                "output_tokens": 0,
            }

            # The upstream counts the prompt differently: settled to its count, logged.
            # Its reply's text is not counted: the usage says how long it was (the
            # token-count cache saw no new text; the prompt is too short for it).
            content = "Fine, and a long answer too. " * 20
            reply = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": "gpt-4o",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt + 100,
                    "completion_tokens": 12,
                    "total_tokens": 0,
                },
            }
            upstream.answer = fixed(200, reply)
            counted_before = await texts_counted(client, proxy_url)
            response = await client.post(url, json=request, headers=headers)
            assert response.status_code == 200 and response.json() == reply
            assert await used(proxy_url) == {
                "requests": 4,
                "input_tokens": 4 * prompt + 100,
                "output_tokens": 12,
            }
            assert f"counted {prompt}, the upstream reported {prompt + 100} (+100)" in (
                proxy.output()
            )
            assert await texts_counted(client, proxy_url) == counted_before

            # No usage: the reply's text is counted, and settled to.
            upstream.answer = fixed(200, {**reply, "usage": None})
            response = await client.post(url, json=request, headers=headers)
            assert response.status_code == 200
            assert await used(proxy_url) == {
                "requests": 5,
                "input_tokens": 5 * prompt + 100,
                "output_tokens": 12 + count_text("gpt-4o", content),
            }
            assert await texts_counted(client, proxy_url) == counted_before + 1


async def test_the_reply_is_capped_in_the_field_the_route_names(workdir: Path) -> None:
    """A request naming no max_tokens is capped at its reservation for the upstream:
    as ``max_tokens`` by default, as ``max_completion_tokens`` on a route that says so
    (OpenAI's reasoning models refuse ``max_tokens``), never both."""
    reply = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    reasoning_route = """
[upstream.models."o3*"]
output_limit_field = "max_completion_tokens"
"""
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    with trio.fail_after(40):
        async with (
            scripted_upstream(fixed(200, reply)) as upstream,
            proxy_node(workdir, upstream.base_url, extra=reasoning_route) as (proxy_url, _),
            httpx.AsyncClient(timeout=10) as client,
        ):
            for model in ("gpt-4o", "o3-mini"):
                response = await client.post(
                    f"{proxy_url}/v1/chat/completions",
                    json={"model": model, "messages": MESSAGES},
                    headers=headers,
                )
                assert response.status_code == 200, response.text
    default_body, reasoning_body = (r.body for r in upstream.received)
    assert default_body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert "max_completion_tokens" not in default_body
    assert reasoning_body["max_completion_tokens"] == DEFAULT_MAX_TOKENS
    assert "max_tokens" not in reasoning_body


class ClosingRecorder:
    """Stands for a relayed stream: counts its closes."""

    def __init__(self) -> None:
        self.closes = 0

    async def aclose(self) -> None:
        self.closes += 1


@pytest.mark.parametrize("fails", [False, True])
async def test_a_relayed_stream_the_response_never_iterated_is_closed_when_the_request_ends(
    fails: bool,
) -> None:
    """A client that leaves while the answer's headers go out: quart never iterates (so
    never closes) the body; the stream is closed all the same (its upstream response,
    its key's slot, its settlement)."""
    stream = ClosingRecorder()
    scope: dict[str, Any] = {"type": "http"}

    async def handler(scope: Any, receive: Any, send: Any) -> None:
        scope[RELAYED_STREAM] = stream
        if fails:
            raise trio.BrokenResourceError("the client left")

    app = close_relayed_stream(handler)
    if fails:
        with pytest.raises(trio.BrokenResourceError):
            await app(scope, None, None)  # type: ignore[arg-type]
    else:
        await app(scope, None, None)  # type: ignore[arg-type]
    assert stream.closes == 1 and RELAYED_STREAM not in scope

"""Proxy mode with real processes, in front of a tokenguard node in mock mode.

The upstream is a real OpenAI-shaped server (plain, streamed, slow); the client is the
official openai SDK, or raw httpx for headers and bytes: chat (plain, streamed, usage
chunk stripped), legacy completions, embeddings, ``/v1/models``, exact settlement; a
slow upstream's stream relayed as it arrives; a read timeout after the request went
out keeps the reservation, unless the route refunds it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from tests.support.proxy_nodes import (
    MESSAGES,
    PROXY_KEY,
    UPSTREAM_SECRET,
    in_thread,
    node,
    proxy_node,
    sdk,
    upstream_config,
    used,
)
from tokenguard.counting import count_chat_prompt, count_text

# --- a tokenguard mock node as the upstream -------------------------------------------------


async def test_sdk_through_proxy_gets_the_upstreams_answers(workdir: Path) -> None:
    with trio.fail_after(60):
        async with (
            node(workdir, "upstream", upstream_config()) as (upstream_url, _),
            proxy_node(workdir, f"{upstream_url}/v1") as (proxy_url, proxy),
        ):
            direct, via = sdk(upstream_url, UPSTREAM_SECRET), sdk(proxy_url, PROXY_KEY)

            async def via_and_direct(call: Callable[[openai.OpenAI], Any]) -> tuple[Any, Any]:
                """``call``'s answer through tokenguard, then straight from the upstream."""
                return await in_thread(lambda: call(via)), await in_thread(lambda: call(direct))

            def chat(client: openai.OpenAI) -> Any:
                return client.chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, max_tokens=7
                )

            plain, expected = await via_and_direct(chat)
            assert plain.choices[0].message.content == expected.choices[0].message.content
            assert plain.usage.completion_tokens == expected.usage.completion_tokens == 7
            prompt = count_chat_prompt("gpt-4o", MESSAGES)
            assert plain.usage.prompt_tokens == prompt

            def stream(client: openai.OpenAI, **options: Any) -> tuple[str, list[Any]]:
                chunks = list(
                    client.chat.completions.create(
                        model="gpt-4o", messages=MESSAGES, max_tokens=9, stream=True, **options
                    )
                )
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                return text, [c.usage for c in chunks if c.usage is not None]

            text, usages = await in_thread(lambda: stream(via))
            direct_text, _ = await in_thread(lambda: stream(direct))
            assert text == direct_text and count_text("gpt-4o", text) == 9
            assert usages == []  # tokenguard asked the upstream for usage; the client did not
            asked_text, asked = await in_thread(
                lambda: stream(via, stream_options={"include_usage": True})
            )
            assert asked_text == text
            assert [(u.prompt_tokens, u.completion_tokens) for u in asked] == [(prompt, 9)]

            def legacy(client: openai.OpenAI) -> Any:
                return client.completions.create(
                    model="gpt-3.5-turbo-instruct", prompt=["Say hi", "Say bye"], max_tokens=4
                )

            completion, expected_completion = await via_and_direct(legacy)
            assert [c.text for c in completion.choices] == [
                c.text for c in expected_completion.choices
            ]
            assert completion.usage.completion_tokens == 8
            legacy_prompt = count_text("gpt-3.5-turbo-instruct", "Say hi") + count_text(
                "gpt-3.5-turbo-instruct", "Say bye"
            )
            assert completion.usage.prompt_tokens == legacy_prompt

            def embed(client: openai.OpenAI) -> Any:
                # The SDK asks for base64 and decodes it.
                return client.embeddings.create(
                    model="text-embedding-3-small", input=["alpha beta", "gamma"], dimensions=8
                )

            vectors, expected_vectors = await via_and_direct(embed)
            assert [d.embedding for d in vectors.data] == [
                d.embedding for d in expected_vectors.data
            ]
            assert len(vectors.data[0].embedding) == 8
            embed_prompt = vectors.usage.prompt_tokens
            assert embed_prompt == count_text("text-embedding-3-small", "alpha beta") + count_text(
                "text-embedding-3-small", "gamma"
            )

            models = await in_thread(lambda: [m.id for m in via.models.list()])
            assert models == ["gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small"]

            # Settled exactly: 4 completions' and 1 embedding's real usage, no reservation left.
            assert await used(proxy_url) == {
                "requests": 5,
                "input_tokens": 3 * prompt + legacy_prompt + embed_prompt,
                "output_tokens": 7 + 9 + 9 + 8,
            }
            # The upstream saw tokenguard's credential, never the client's key.
            assert UPSTREAM_SECRET not in proxy.output() and PROXY_KEY not in proxy.output()


async def test_a_slow_upstreams_stream_is_relayed_as_it_arrives(workdir: Path) -> None:
    # 150 ms per token: a stream's events are never 1 s apart.
    async with (
        node(workdir, "upstream", upstream_config(token_delay_ms=150)) as (upstream_url, _),
        proxy_node(workdir, f"{upstream_url}/v1", read_timeout=1.0) as (proxy_url, _),
    ):
        headers = {"Authorization": f"Bearer {PROXY_KEY}"}
        body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10, "stream": True}
        arrivals: list[float] = []
        with trio.fail_after(20):
            async with (
                httpx.AsyncClient(timeout=10) as client,
                client.stream(
                    "POST", f"{proxy_url}/v1/chat/completions", json=body, headers=headers
                ) as response,
            ):
                assert response.status_code == 200
                assert response.headers["x-ratelimit-remaining-output-tokens"] == str(100000 - 10)
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0][
                        "delta"
                    ].get("content"):
                        arrivals.append(time.monotonic())
        # Relayed as they arrived, not buffered until the end.
        assert len(arrivals) == 10
        assert arrivals[-1] - arrivals[0] > 1.0
        assert min(b - a for a, b in zip(arrivals, arrivals[1:], strict=False)) > 0.05
        assert (await used(proxy_url))["output_tokens"] == 10


@pytest.mark.parametrize(("policy", "kept"), [(None, 20), ("keep", 20), ("refund", 0)])
async def test_a_read_timeout_after_the_request_went_out_keeps_the_reservation_unless_refunded(
    workdir: Path, policy: str | None, kept: int
) -> None:
    """The upstream got the request and may bill it: a 504 keeps the output reservation
    (by default), or refunds it on a route whose ``on_upstream_error`` says so."""
    route_extra = f'on_upstream_error = "{policy}"' if policy else ""
    # 150 ms per token: a whole 20-token reply takes 3 s, past the 1 s read timeout.
    async with (
        node(workdir, "upstream", upstream_config(token_delay_ms=150)) as (upstream_url, _),
        proxy_node(workdir, f"{upstream_url}/v1", read_timeout=1.0, route_extra=route_extra) as (
            proxy_url,
            _,
        ),
        httpx.AsyncClient(timeout=10) as client,
    ):
        with trio.fail_after(20):
            response = await client.post(
                f"{proxy_url}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20},
                headers={"Authorization": f"Bearer {PROXY_KEY}"},
            )
        assert response.status_code == 504
        error = response.json()["error"]
        assert error["code"] == "upstream_timeout" and error["type"] == "server_error"
        assert "did not answer within 1 s" in error["message"]
        assert response.headers["x-ratelimit-limit-requests"] == "50"
        assert await used(proxy_url) == {
            "requests": 1,
            "input_tokens": count_chat_prompt("gpt-4o", MESSAGES),
            "output_tokens": kept,
        }

"""The official ``anthropic`` SDK against a real tokenguard node in mock mode.

What a team's code does with the SDK pointed at tokenguard (``base_url``): plain and
streamed messages, the ``messages.stream`` helper, ``count_tokens``, a 429 it raises as
``RateLimitError`` with Anthropic's headers, a retry the SDK times by ``retry-after``,
and a concurrency refusal. Everything the SDK parses is checked for unknown fields.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest
import trio

from tests.support.anthropic_types import known_only
from tests.support.processes import free_ports, running_tokenguard, wait_healthy, write_config
from tokenguard.counting.claude import estimate_claude_prompt

pytestmark = pytest.mark.slow

MODEL = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "Tell me about rate limits, in Claude's words"}]
KEYS = """
[[keys]]
key = "sk-ant-big"
name = "big"
rpm = 1000
input_tpm = 100000
output_tpm = 100000

[[keys]]
key = "sk-ant-one"
name = "one"
rpm = 1

[[keys]]
key = "sk-ant-lease"
name = "lease"
rpm = 100
max_concurrent = 1
"""


@contextlib.asynccontextmanager
async def mock_node(workdir: Path, *, window: int = 60, bucket: int = 5) -> AsyncIterator[str]:
    """A real ``tokenguard serve`` node (mock mode, 20 ms a token); yields its URL."""
    body = f"[mock]\ntoken_delay_ms = 20\n{KEYS}"
    path = write_config(workdir / "node.toml", body, window=window, bucket=bucket)
    port = free_ports()
    args = ["serve", "--config", str(path), "--port", str(port)]
    async with running_tokenguard(args, output_path=workdir / "node.out"):
        url = f"http://127.0.0.1:{port}"
        with trio.fail_after(120):
            await wait_healthy(url)
        yield url


def sdk(url: str, key: str, max_retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=max_retries, timeout=30)


async def in_thread(call: Callable[[], Any]) -> Any:
    with trio.fail_after(120):
        return await trio.to_thread.run_sync(call)


async def test_the_sdk_creates_streams_and_counts_through_tokenguard(workdir: Path) -> None:
    async with mock_node(workdir) as url:
        client = sdk(url, "sk-ant-big")
        prompt = estimate_claude_prompt(None, MESSAGES, None)

        message = await in_thread(
            lambda: client.messages.create(model=MODEL, max_tokens=12, messages=MESSAGES)
        )
        known_only(message)
        assert message.usage.input_tokens == prompt
        assert message.usage.output_tokens <= 12
        assert message.stop_reason in ("end_turn", "max_tokens")

        def raw_stream() -> list[Any]:
            return list(
                client.messages.create(model=MODEL, max_tokens=6, messages=MESSAGES, stream=True)
            )

        events = await in_thread(raw_stream)
        for event in events:
            known_only(event)
        assert [e.type for e in events[:2]] == ["message_start", "content_block_start"]
        assert [e.type for e in events[-3:]] == [
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
        text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
        assert text == message.content[0].text[: len(text)]
        assert events[-2].usage.output_tokens == 6 and events[-2].delta.stop_reason == "max_tokens"

        def helper() -> tuple[str, Any]:
            with client.messages.stream(model=MODEL, max_tokens=12, messages=MESSAGES) as stream:
                return "".join(stream.text_stream), stream.get_final_message()

        streamed, final = await in_thread(helper)
        known_only(final)
        assert streamed == final.content[0].text == message.content[0].text
        assert final.usage.output_tokens == message.usage.output_tokens
        assert final.usage.input_tokens == prompt

        counted = await in_thread(
            lambda: client.messages.count_tokens(model=MODEL, messages=MESSAGES)
        )
        assert known_only(counted).input_tokens == prompt


async def test_a_429_is_the_sdks_rate_limit_error_with_anthropics_headers(workdir: Path) -> None:
    async with mock_node(workdir) as url:
        client = sdk(url, "sk-ant-one")
        await in_thread(
            lambda: client.messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
        )
        with pytest.raises(anthropic.RateLimitError) as refused:
            await in_thread(
                lambda: client.messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
            )
        error = refused.value
        assert error.status_code == 429
        assert error.body["type"] == "error" and error.body["error"]["type"] == "rate_limit_error"
        headers = error.response.headers
        assert headers["anthropic-ratelimit-requests-limit"] == "1"
        assert headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert headers["anthropic-ratelimit-requests-reset"].endswith("Z")
        assert int(headers["retry-after"]) >= 1


async def test_an_sdk_that_retries_once_gets_through_when_retry_after_says(workdir: Path) -> None:
    # A 2 s window: the refused request's retry-after is at most 2 s, and the SDK's one
    # retry, that long later, is admitted.
    async with mock_node(workdir, window=2, bucket=1) as url:
        client = sdk(url, "sk-ant-one", max_retries=1)

        def create() -> Any:
            return client.messages.with_raw_response.create(
                model=MODEL, max_tokens=4, messages=MESSAGES
            )

        first = await in_thread(create)
        assert first.retries_taken == 0
        second = await in_thread(create)
        assert second.http_response.status_code == 200
        assert second.retries_taken == 1  # refused once, admitted on the retry
        assert known_only(second.parse()).usage.output_tokens <= 4


async def test_a_concurrency_refusal_is_the_sdks_rate_limit_error(workdir: Path) -> None:
    async with mock_node(workdir) as url:
        client = sdk(url, "sk-ant-lease")

        def open_stream() -> Any:
            stream = client.messages.create(
                model=MODEL, max_tokens=40, messages=MESSAGES, stream=True
            )
            next(iter(stream))  # the lease is held until the stream ends
            return stream

        stream = await in_thread(open_stream)
        try:
            with pytest.raises(anthropic.RateLimitError) as refused:
                await in_thread(
                    lambda: client.messages.create(model=MODEL, max_tokens=4, messages=MESSAGES)
                )
            assert refused.value.body["error"]["type"] == "rate_limit_error"
            assert "Concurrency limit" in refused.value.body["error"]["message"]
            assert int(refused.value.response.headers["retry-after"]) >= 1
        finally:
            stream.close()

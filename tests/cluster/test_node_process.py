"""`tokenguard serve` as a real process, driven by the official openai SDK and raw HTTP."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import openai
import pytest
import trio

from tests.support.processes import (
    START_TIMEOUT,
    free_ports,
    running_node_process,
    running_tokenguard,
)
from tokenguard.counting import count_text

CONFIG = """
[mock]
token_delay_ms = 20

[[keys]]
key = "sk-e2e-small"
name = "small"
rpm = 3
input_tpm = 5000
output_tpm = 5000

[[keys]]
key = "sk-e2e-big"
name = "big"
rpm = 1000
input_tpm = 100000
output_tpm = 2000
"""


@pytest.fixture
async def node(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = tmp_path / "tokenguard.toml"
    config.write_text(CONFIG)
    async with running_node_process(config, tmp_path / "node.out") as (url, proc):
        yield url, proc


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10)


async def test_openai_sdk_chat_stream_and_rate_limit(node) -> None:  # type: ignore[no-untyped-def]
    url, _ = node
    client = sdk(url, "sk-e2e-small")
    messages = [{"role": "user", "content": "Hello from the official SDK"}]

    def plain() -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=5)

    def streamed() -> tuple[str, object]:
        stream = client.chat.completions.create(
            model="gpt-4o",
            messages=messages,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        return text, usage

    with trio.fail_after(30):
        completion = await trio.to_thread.run_sync(plain)
        assert completion.choices[0].message.content
        assert completion.usage.completion_tokens <= 5
        text, usage = await trio.to_thread.run_sync(streamed)
        assert usage is not None and usage.completion_tokens == count_text("gpt-4o", text)
        await trio.to_thread.run_sync(plain)  # the key's third and last request
        with pytest.raises(openai.RateLimitError) as caught:
            await trio.to_thread.run_sync(plain)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert "requests per min" in error.message
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"


async def test_client_disconnect_mid_stream_settles_what_was_sent(node) -> None:  # type: ignore[no-untyped-def]
    url, _ = node
    headers = {"Authorization": "Bearer sk-e2e-big"}
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "a long story please"}],
        "max_tokens": 1000,
        "stream": True,
    }
    received = ""
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as client:
            async with client.stream(
                "POST", f"{url}/v1/chat/completions", json=body, headers=headers
            ) as response:
                assert response.status_code == 200
                # The reservation of 1000 was taken at admission.
                assert response.headers["x-ratelimit-remaining-output-tokens"] == "1000"
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        received += delta.get("content") or ""
                    if count_text("gpt-4o", received) >= 3:
                        break  # hang up mid-stream (tokens are 20 ms apart)
            # Settlement happens when the server notices the disconnect: poll for it.
            while True:
                usage = (await client.get(f"{url}/v1/usage", headers=headers)).json()
                used = usage["dimensions"]["output_tokens"]["used"]
                if used < 1000:
                    break
                await trio.sleep(0.05)
    # Charged for what it was sent: at least what we read, far less than the reservation.
    assert count_text("gpt-4o", received) <= used <= count_text("gpt-4o", received) + 3


async def raw_request(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
            data.split(b"content-length: ")[1].split(b"\r\n")[0]
            if b"content-length: " in data
            else 0
        ):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
        return data


async def test_path_variants_never_bypass_the_limiter(node) -> None:  # type: ignore[no-untyped-def]
    """Odd spellings of the path either 404 or are counted by the same limiter."""
    url, _ = node
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    admitted = 0
    paths = ["//v1/chat/completions", "/v1//chat/completions", "/v1/chat/completions/"]
    for path in paths + ["/v1/chat/completions"] * 3:
        request = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-e2e-small\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n{body}"
        ).encode()
        with trio.fail_after(10):
            answer = await raw_request(port, request)
        status = int(answer.split(b" ", 2)[1])
        assert status in (200, 404, 429), (path, answer[:200])
        if status == 404:
            assert b'"code":"unknown_url"' in answer
        admitted += status == 200
    async with httpx.AsyncClient() as client:
        auth = {"Authorization": "Bearer sk-e2e-small"}
        usage = await client.get(f"{url}/v1/usage", headers=auth)
    # rpm = 3: whatever the spelling, no more than 3 got through, and each one counted.
    assert admitted == 3
    assert usage.json()["dimensions"]["requests"]["used"] == 3


async def test_demo_config_banner_and_bad_config(tmp_path: Path) -> None:
    port = free_ports()
    async with running_tokenguard(
        ["serve", "--port", str(port)], output_path=tmp_path / "demo.out"
    ) as proc:
        with trio.fail_after(START_TIMEOUT):
            output = await proc.wait_output("sk-demo-free")
    assert f"http://127.0.0.1:{port}" in output
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiers.free]\nrpm = 3\nrmp = 4\n")
    async with running_tokenguard(
        ["serve", "--config", str(bad), "--port", str(free_ports())],
        output_path=tmp_path / "bad.out",
    ) as proc:
        with trio.fail_after(START_TIMEOUT):
            status = await proc.wait()
    assert status == 2
    assert f"{bad}: tiers.free.rmp: unknown key" in proc.output()
    assert "Traceback" not in proc.output()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess

    from tests.support.processes import tokenguard_command

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = subprocess.run(
            [*tokenguard_command(), "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert str(port) in result.stderr

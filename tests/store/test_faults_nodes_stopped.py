"""Faults with real processes: nodes killed or stopped under load.

A node killed with ``kill -9`` mid-stream keeps its reservation until the window ends;
``SIGTERM`` under load finishes every request and takes no new ones. The client that
disconnects mid-stream is in tests/cluster/test_node_process.py, ``SIGTERM`` during one
stream of a cluster in tests/cluster/test_supervisor.py, a node and the embedded Redis
killed in tests/cluster/test_cluster.py. Every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import httpx
import pytest
import trio

from tests.support.node_load import (
    MODEL,
    chat,
)
from tests.support.processes import (
    START_TIMEOUT,
    free_ports,
    running_cluster,
    running_tokenguard,
    wait_healthy,
    wait_refused,
    write_config,
)
from tokenguard.upstreams import mock

# --- real processes: nodes killed or stopped -------------------------------------------------


def _prompt_with_long_reply(tokens: int) -> str:
    for i in range(10_000):
        content = f"tell me a story {i}"
        if (
            mock.mock_reply(
                MODEL, [{"role": "user", "content": content}], 1, 10_000
            ).completion_tokens
            > tokens
        ):
            return content
    raise AssertionError("no such prompt")


@pytest.mark.slow
async def test_a_node_killed_mid_stream_keeps_its_reservation_until_the_window_ends(
    workdir: Path,
) -> None:
    """``kill -9`` of the node serving a stream: the client sees the stream break, the
    supervisor restarts the node, and the stream's whole reservation (output_tpm 500,
    max_tokens 500) stays counted (no other node admits it again: none lost) until its
    bucket leaves the 6 s window, then frees. (When exactly, window + bucket at most,
    is the window's arithmetic, tested on an injected clock in test_limiter.py.)"""
    config = write_config(
        workdir / "c.toml",
        "[mock]\ntoken_delay_ms = 100\n\n"
        '[[keys]]\nkey = "sk-s"\nname = "s"\nrpm = 100\noutput_tpm = 500\n',
        window=6,
        bucket=1,
    )
    prompt = _prompt_with_long_reply(40)
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(workdir / "state", nodes=2, config=config) as cluster:
            victim = cluster.node_pid(0)
            async with httpx.AsyncClient(timeout=10) as client:
                broken = False
                admitted_at = trio.current_time()
                try:
                    async with client.stream(
                        "POST",
                        f"{cluster.urls[0]}/v1/chat/completions",
                        headers={"Authorization": "Bearer sk-s"},
                        json={
                            "model": MODEL,
                            "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 500,
                            "stream": True,
                        },
                    ) as response:
                        assert response.status_code == 200
                        lines = response.aiter_lines()
                        assert (await lines.__anext__()).startswith("data: ")
                        os.kill(victim, signal.SIGKILL)
                        rest = [line async for line in lines]
                        assert "data: [DONE]" not in rest
                except (httpx.RemoteProtocolError, httpx.ReadError):
                    broken = True
                assert broken or "data: [DONE]" not in rest
                # The other node sees the reservation whole: 500 reserved, none free.
                refused = await chat(client, cluster.urls[1], "sk-s", max_tokens=1)
                assert refused.status_code == 429
                with trio.fail_after(START_TIMEOUT):
                    await wait_healthy(cluster.urls[0], node_id=0)
                while True:
                    sent = trio.current_time()
                    async with client.stream(  # closed at once: only the status matters
                        "POST",
                        f"{cluster.urls[1]}/v1/chat/completions",
                        headers={"Authorization": "Bearer sk-s"},
                        json={
                            "model": MODEL,
                            "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 500,
                            "stream": True,
                        },
                    ) as again:
                        status = again.status_code
                    if status == 200:
                        break
                    assert status == 429
                    await trio.sleep(0.1)
                released_after = sent - admitted_at
            assert cluster.node_pid(0) != victim
            output = cluster.supervisor.output()
    assert f"node 0 (pid {victim}) exited (killed by SIGKILL)" in output
    # Not before the window is over (less the request's own way to the node).
    assert released_after >= 5
    print(f"reservation released {released_after:.2f} s after admission (window 6 s)")


@pytest.mark.slow
async def test_sigterm_under_load_finishes_every_request_and_takes_no_new_ones(
    workdir: Path,
) -> None:
    """30 requests in flight (20 plain, 10 streams) when the node gets SIGTERM: it
    refuses new connections while they are still running, every in-flight request
    completes (streams to ``[DONE]``), and it exits 0."""
    config = write_config(
        workdir / "c.toml",
        '[mock]\ntoken_delay_ms = 60\n\n[[keys]]\nkey = "sk-t"\nname = "t"\nrpm = 1000\n',
    )
    port = free_ports()
    url = f"http://127.0.0.1:{port}"
    tokens = 20
    prompt = _prompt_with_long_reply(tokens)
    grace = 30.0  # the requests need 1.2 s: a slow machine has time to finish them
    args = ["serve", "--config", str(config), "--port", str(port), "--grace", str(grace)]
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_tokenguard(args, output_path=workdir / "node.out") as node:
            with trio.fail_after(START_TIMEOUT):
                await wait_healthy(url)
            outcomes: list[str] = []
            limits = httpx.Limits(max_connections=100)
            client = httpx.AsyncClient(timeout=20, limits=limits)

            async def plain() -> None:
                response = await chat(client, url, "sk-t", prompt, max_tokens=tokens)
                outcomes.append(f"plain {response.status_code}")

            async def streamed() -> None:
                async with client.stream(
                    "POST",
                    f"{url}/v1/chat/completions",
                    headers={"Authorization": "Bearer sk-t"},
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": tokens,
                        "stream": True,
                    },
                ) as response:
                    lines = [line async for line in response.aiter_lines()]
                outcomes.append(f"stream {response.status_code} {'data: [DONE]' in lines}")

            async with client, trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(plain)
                for _ in range(10):
                    nursery.start_soon(streamed)
                # Every request admitted (replies take 20 x 60 ms = 1.2 s): then stop.
                async with httpx.AsyncClient(timeout=5) as probe:
                    while True:
                        usage = await probe.get(
                            f"{url}/v1/usage", headers={"Authorization": "Bearer sk-t"}
                        )
                        if usage.json()["dimensions"]["requests"]["used"] == 30:
                            break
                        await trio.sleep(0.02)
                signalled = trio.current_time()
                node.send_signal(signal.SIGTERM)
                await wait_refused("127.0.0.1", port)
                refused_after = trio.current_time() - signalled
                finished_when_refused = len(outcomes)
            status = await node.wait()
            exited_after = trio.current_time() - signalled
    print(f"SIGTERM: refused after {refused_after:.3f} s, exited after {exited_after:.2f} s")
    assert Counter(outcomes) == {"plain 200": 20, "stream 200 True": 10}
    assert finished_when_refused < 30  # refused while requests were still running
    assert status == 0

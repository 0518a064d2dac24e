"""Several node processes sharing one Redis: exact limits across nodes, skewed clocks,
and failures (a node killed, a node hung, the embedded Redis killed).

Real processes only: clusters are ``tokenguard serve --nodes N`` with the embedded
redis-server; the clock-skew test runs two standalone nodes on a redis-server of their
own. Each test is bounded by ``trio.fail_after``; :mod:`tests.support.processes` stops every
process it started.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.support.processes import (
    START_TIMEOUT,
    free_ports,
    running_cluster,
    running_tokenguard,
    wait_healthy,
    write_config,
)
from tests.support.redis_servers import running_redis_server
from tokenguard.cli.serve import CLOCK_OFFSET_ENV
from tokenguard.counting import count_chat_prompt
from tokenguard.counting.claude import estimate_claude_prompt

MODEL = "gpt-4o"


def messages_of(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


async def chat(
    client: httpx.AsyncClient, url: str, key: str, content: str = "hi"
) -> httpx.Response:
    return await client.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": messages_of(content), "max_tokens": 16},
    )


async def respond(
    client: httpx.AsyncClient, url: str, key: str, content: str = "hi", **body: Any
) -> httpx.Response:
    """The Responses API's request of ``content`` (counted as chat's one-message prompt)."""
    return await client.post(
        f"{url}/v1/responses",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "input": content, "max_output_tokens": 16, **body},
    )


def prompt_tokens(response: httpx.Response) -> int:
    """The input tokens an answer of either surface reports."""
    usage = response.json()["usage"]
    return usage["input_tokens"] if "input_tokens" in usage else usage["prompt_tokens"]


async def usage(client: httpx.AsyncClient, url: str, key: str) -> dict[str, Any]:
    """The key's usage per dimension, as ``GET /v1/usage`` on ``url`` says."""
    response = await client.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()["dimensions"]


def many_connections() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=30, limits=httpx.Limits(max_connections=300, max_keepalive_connections=300)
    )


# --- exactness across nodes ---------------------------------------------------------------


async def test_requests_are_exact_across_three_nodes(workdir: Path) -> None:
    """200 concurrent requests spread at random over 3 nodes and both surfaces (chat
    completions, responses), rpm = 50: exactly 50 pass."""
    config = write_config(
        workdir / "c.toml",
        '[[keys]]\nkey = "sk-50"\nname = "fifty"\nrpm = 50\ninput_tpm = 1000000\n',
    )
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            statuses: list[int] = []
            async with many_connections() as client:

                async def one() -> None:
                    surface = random.choice((chat, respond))
                    response = await surface(client, random.choice(cluster.urls), "sk-50")
                    statuses.append(response.status_code)

                async with trio.open_nursery() as nursery:
                    for _ in range(200):
                        nursery.start_soon(one)
                used = await usage(client, cluster.urls[1], "sk-50")
    assert Counter(statuses) == {200: 50, 429: 150}
    assert used["requests"]["used"] == 50


async def test_input_tokens_are_exact_across_three_nodes(workdir: Path) -> None:
    """Prompts of known, varied sizes against input_tpm = 1000 over 3 nodes, each sent as
    a chat completion or a response at random (one budget for both surfaces): the
    admitted tokens never pass the limit, and a prompt was refused only when it did not
    fit."""
    config = write_config(
        workdir / "c.toml", '[[keys]]\nkey = "sk-tpm"\nname = "tpm"\ninput_tpm = 1000\n'
    )
    rng = random.Random(7)
    prompts = [" ".join(["word"] * rng.randint(5, 60)) for _ in range(200)]
    sizes = {p: count_chat_prompt(MODEL, messages_of(p)) for p in prompts}
    admitted: list[int] = []
    refused: list[int] = []
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            async with many_connections() as client:

                async def one(prompt: str) -> None:
                    surface = rng.choice((chat, respond))
                    response = await surface(client, rng.choice(cluster.urls), "sk-tpm", prompt)
                    if response.status_code == 200:
                        assert prompt_tokens(response) == sizes[prompt]
                        admitted.append(sizes[prompt])
                    else:
                        assert response.status_code == 429, response.text
                        assert "input tokens" in response.json()["error"]["message"]
                        refused.append(sizes[prompt])

                async with trio.open_nursery() as nursery:
                    for prompt in prompts:
                        nursery.start_soon(one, prompt)
                used = await usage(client, cluster.urls[2], "sk-tpm")
    assert len(admitted) + len(refused) == 200 and refused
    assert sum(admitted) <= 1000
    assert sum(admitted) + min(refused) > 1000
    assert used["input_tokens"]["used"] == sum(admitted)


async def test_one_budget_is_exact_across_chat_on_node_0_and_messages_on_node_2(
    workdir: Path,
) -> None:
    """One key spends input_tpm = 1000 through /v1/chat/completions on node 0 and
    Anthropic's /v1/messages on node 2 at once: one budget, exact across both surfaces
    and both nodes (the admitted prompts never pass it; one was refused only when it did
    not fit), and each surface refuses in its own shape."""
    config = write_config(
        workdir / "c.toml", '[[keys]]\nkey = "sk-mixed"\nname = "mixed"\ninput_tpm = 1000\n'
    )
    rng = random.Random(11)
    prompts = [" ".join(["word"] * rng.randint(5, 60)) for _ in range(200)]
    claude = "claude-sonnet-4-5"
    chat_sizes = {p: count_chat_prompt(MODEL, messages_of(p)) for p in prompts}
    messages_sizes = {p: estimate_claude_prompt(None, messages_of(p), None) for p in prompts}
    admitted: list[int] = []
    refused: list[int] = []
    surfaces: Counter[str] = Counter()
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            async with many_connections() as client:

                async def via_chat(prompt: str) -> None:
                    response = await chat(client, cluster.urls[0], "sk-mixed", prompt)
                    if response.status_code == 200:
                        admitted.append(chat_sizes[prompt])
                        surfaces["chat"] += 1
                    else:
                        assert response.status_code == 429, response.text
                        assert "input tokens" in response.json()["error"]["message"]
                        refused.append(chat_sizes[prompt])

                async def via_messages(prompt: str) -> None:
                    response = await client.post(
                        f"{cluster.urls[2]}/v1/messages",
                        headers={"x-api-key": "sk-mixed", "anthropic-version": "2023-06-01"},
                        json={"model": claude, "messages": messages_of(prompt), "max_tokens": 16},
                    )
                    if response.status_code == 200:
                        usage_block = response.json()["usage"]
                        assert usage_block["input_tokens"] == messages_sizes[prompt]
                        admitted.append(messages_sizes[prompt])
                        surfaces["messages"] += 1
                    else:
                        assert response.status_code == 429, response.text
                        error = response.json()["error"]
                        assert error["type"] == "rate_limit_error"
                        assert "input tokens" in error["message"]
                        refused.append(messages_sizes[prompt])

                # One of each first, so both surfaces spend; then all the rest at once.
                await via_messages(prompts[0])
                await via_chat(prompts[1])
                async with trio.open_nursery() as nursery:
                    for i, prompt in enumerate(prompts[2:]):
                        nursery.start_soon(via_chat if i % 2 else via_messages, prompt)
                used = await usage(client, cluster.urls[1], "sk-mixed")
    assert len(admitted) + len(refused) == 200 and refused
    assert surfaces["chat"] and surfaces["messages"], surfaces
    assert sum(admitted) <= 1000
    assert sum(admitted) + min(refused) > 1000
    assert used["input_tokens"]["used"] == sum(admitted)


async def test_a_response_made_on_node_0_is_charged_as_input_on_node_2(workdir: Path) -> None:
    """The follow-up (``previous_response_id``) goes to a node that never saw the first
    response: the store's record tells it the first one's totals, which it charges as
    input, as OpenAI bills the conversation."""
    config = write_config(
        workdir / "c.toml", '[[keys]]\nkey = "sk-chain"\nname = "chain"\ninput_tpm = 100000\n'
    )
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            async with many_connections() as client:
                first = await respond(client, cluster.urls[0], "sk-chain", "Tell me a story.")
                assert first.status_code == 200, first.text
                made = first.json()
                follow = await respond(
                    client,
                    cluster.urls[2],
                    "sk-chain",
                    "And then?",
                    previous_response_id=made["id"],
                )
                assert follow.status_code == 200, follow.text
                used = await usage(client, cluster.urls[1], "sk-chain")
    carried = made["usage"]["input_tokens"] + made["usage"]["output_tokens"]
    alone = count_chat_prompt(MODEL, messages_of("And then?"))
    assert follow.json()["usage"]["input_tokens"] == alone + carried
    assert used["input_tokens"]["used"] == made["usage"]["input_tokens"] + alone + carried


# --- skewed clocks -----------------------------------------------------------------------


def _seconds(duration: str) -> float:
    """Parse OpenAI's ``x-ratelimit-reset-*`` format: ``1m0.5s``, ``59.2s``, ``250ms``."""
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)(ms|h|m|s)", duration):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


async def test_nodes_with_skewed_clocks_share_one_window(workdir: Path) -> None:
    """Node B's clock runs 30 s ahead of node A's: with the Redis driver counting on
    Redis's TIME, both still see one window (rpm = 4: 2 + 2, then both refuse) and give
    the same reset time."""
    config = write_config(workdir / "c.toml", '[[keys]]\nkey = "sk-4"\nname = "four"\nrpm = 4\n')
    with trio.fail_after(START_TIMEOUT + 60), running_redis_server(workdir / "redis") as server:
        port = free_ports(2)
        common = ["serve", "--store", server.url, "--config", str(config)]
        async with (
            running_tokenguard(
                [*common, "--port", str(port), "--node-id", "0"],
                output_path=workdir / "a.out",
            ),
            running_tokenguard(
                [*common, "--port", str(port + 1), "--node-id", "1"],
                output_path=workdir / "b.out",
                env={CLOCK_OFFSET_ENV: "30"},
            ),
        ):
            a, b = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"
            with trio.fail_after(START_TIMEOUT):
                await wait_healthy(a, node_id=0)
                await wait_healthy(b, node_id=1)
            async with httpx.AsyncClient(timeout=10) as client:
                began = time.time()
                answers = [await chat(client, url, "sk-4") for url in (a, a, b, b)]
                assert [r.status_code for r in answers] == [200, 200, 200, 200]
                # The skew is real: B stamps its replies 30 s ahead (+ the time between
                # the two answers; each stamp truncated to the second).
                skew = answers[2].json()["created"] - answers[0].json()["created"]
                assert 30 - 1 <= skew <= 30 + (time.time() - began) + 1
                refused = [await chat(client, url, "sk-4") for url in (a, b)]
                elapsed = time.time() - began
    assert [r.status_code for r in refused] == [429, 429]
    resets = [_seconds(r.headers["x-ratelimit-reset-requests"]) for r in refused]
    # Both see the first admission leave with its bucket: 60-65 s after it, less the
    # time since (a slow machine takes longer between the calls).
    assert abs(resets[0] - resets[1]) <= 5 + elapsed  # within one bucket
    assert all(60 - elapsed - 1 <= reset <= 65 for reset in resets)


# --- failures ----------------------------------------------------------------------------


async def test_killed_node_is_restarted_while_others_keep_serving(workdir: Path) -> None:
    """kill -9 of node 1 under load: it is healthy again within 5 s, nodes 0 and 2 never
    refuse a connection, and a key's rpm stays exact across the restart."""
    config = write_config(
        workdir / "c.toml",
        '[[keys]]\nkey = "sk-load"\nname = "load"\nrpm = 1000000\n\n'
        '[[keys]]\nkey = "sk-30"\nname = "thirty"\nrpm = 30\n',
    )
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            urls = cluster.urls
            async with many_connections() as client:
                for _ in range(10):
                    assert (await chat(client, urls[1], "sk-30")).status_code == 200

                errors: dict[int, list[Exception]] = {0: [], 1: [], 2: []}
                served = Counter[int]()
                stop = trio.Event()

                async def load(node: int) -> None:
                    async with httpx.AsyncClient(timeout=10) as own:
                        while not stop.is_set():
                            try:
                                response = await chat(own, urls[node], "sk-load")
                                assert response.status_code == 200, response.text
                                served[node] += 1
                            except httpx.TransportError as exc:
                                errors[node].append(exc)
                                await trio.sleep(0.02)

                async with trio.open_nursery() as nursery:
                    for node in (0, 1, 2, 0, 1, 2):
                        nursery.start_soon(load, node)
                    await trio.sleep(0.5)
                    victim = cluster.node_pid(1)
                    before = served.copy()
                    os.kill(victim, signal.SIGKILL)
                    killed = time.monotonic()
                    with trio.fail_after(START_TIMEOUT):
                        await wait_healthy(urls[1], node_id=1)
                    back_after = time.monotonic() - killed
                    await trio.sleep(0.5)
                    stop.set()

                assert cluster.node_pid(1) != victim
                assert errors[0] == [] and errors[2] == []
                assert served[0] > before[0] and served[2] > before[2]
                assert served[1] > before[1]  # the new node 1 took load again

                statuses: list[int] = []

                async def one(url: str) -> None:
                    statuses.append((await chat(client, url, "sk-30")).status_code)

                async with trio.open_nursery() as nursery:
                    for i in range(45):
                        nursery.start_soon(one, urls[i % 3])
                used = await usage(client, urls[1], "sk-30")
            output = cluster.supervisor.output()
    print(f"node 1 back {back_after:.2f} s after kill -9")
    assert Counter(statuses) == {200: 20, 429: 25}  # 10 + 20 == rpm
    assert used["requests"]["used"] == 30
    assert f"node 1 (pid {victim}) exited (killed by SIGKILL); restart #1 in 0.5 s" in output


async def test_hung_node_is_killed_after_three_failed_probes(workdir: Path) -> None:
    """A node that stops answering (SIGSTOP) is SIGKILLed after 3 failed probes in a row
    and restarted."""
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(workdir / "state", nodes=2) as cluster:
            victim = cluster.node_pid(1)
            os.kill(victim, signal.SIGSTOP)
            hung = time.monotonic()
            with trio.fail_after(START_TIMEOUT):
                while True:
                    try:
                        if cluster.node_pid(1) != victim:
                            break
                    except LookupError:  # between the kill and the new process
                        pass
                    await trio.sleep(0.1)
            replaced_after = time.monotonic() - hung
            with trio.fail_after(START_TIMEOUT):
                await wait_healthy(cluster.urls[1], node_id=1)
            output = cluster.supervisor.output()
    print(f"hung node replaced after {replaced_after:.2f} s")
    assert replaced_after > 2.5  # three probes failed first, not one
    assert f"node 1 (pid {victim}) failed 3 health probes in a row and was killed" in output


async def test_killed_embedded_redis_is_restarted_and_windows_survive(workdir: Path) -> None:
    """kill -9 of the embedded redis-server: it is restarted on the same append-only
    file, so a key spent before the kill is still refused after it. (Policy
    ``closed``, so that the outage shows as 503s; the other policies are in
    tests/store/test_faults_redis_down.py.)"""
    config = write_config(
        workdir / "c.toml",
        '[[keys]]\nkey = "sk-3"\nname = "three"\nrpm = 3\n\n'
        '[[keys]]\nkey = "sk-fresh"\nname = "fresh"\nrpm = 3\n',
    )
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(
            workdir / "state", nodes=2, config=config, args=("--on-store-error", "closed")
        ) as cluster:
            urls = cluster.urls
            nodes = [cluster.node_pid(0), cluster.node_pid(1)]
            async with httpx.AsyncClient(timeout=10) as client:
                for url in (urls[0], urls[1], urls[0]):
                    assert (await chat(client, url, "sk-3")).status_code == 200
                assert (await chat(client, urls[1], "sk-3")).status_code == 429
                await trio.sleep(1.5)  # appendfsync everysec: let the spend reach the disk
                old = cluster.redis_pid()
                os.kill(old, signal.SIGKILL)
                with trio.fail_after(START_TIMEOUT):
                    while True:
                        response = await chat(client, urls[1], "sk-3")
                        if response.status_code != 503:  # store_unavailable until it is back
                            break
                        await trio.sleep(0.1)
                assert response.status_code == 429
                assert (await chat(client, urls[0], "sk-fresh")).status_code == 200
            assert cluster.redis_pid() != old
            # The nodes did not need restarting: they reconnected.
            assert [cluster.node_pid(0), cluster.node_pid(1)] == nodes
            output = cluster.supervisor.output()
    assert f"redis-server (pid {old}) exited (killed by SIGKILL); restart #1" in output

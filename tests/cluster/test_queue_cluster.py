"""The admission queue on real node processes (``tokenguard serve --nodes N``, the
embedded Redis): requests that would get a 429 wait for room instead, when their rules
allow it.

Order and counts are read from the server's own records: the usage feed's ``queued``
and ``admitted`` events (their ``ts``, the node's clock; every node runs on this
machine) and the answers' ``x-tokenguard-queued-ms``. Nothing asserts how fast the test
machine is; ``trio.fail_after`` only guards against a hang.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from trio_websocket import WebSocketConnection

from tests.support.processes import (
    START_TIMEOUT,
    TokenguardProcess,
    running_cluster,
    running_node_process,
    write_config,
)
from tests.support.usage_feed import next_events, subscriber

pytestmark = pytest.mark.slow

WINDOW = 10
ADMIN_TOKEN = "admin-token-for-the-queue-tests-0123456789"
KEYS = f"""\
[feed]
admin_token = "{ADMIN_TOKEN}"

[[keys]]
key = "sk-wait"
name = "wait"
rpm = 2
tpm = 100000
max_wait_seconds = 15

[[keys]]
key = "sk-now"
name = "now"
rpm = 2

[teams.shared]
rpm = 1

[[keys]]
key = "sk-inter"
name = "inter"
team = "shared"
max_wait_seconds = 15

[[keys]]
key = "sk-batch"
name = "batch"
team = "shared"
priority = "batch"
max_wait_seconds = 15
"""
MESSAGES = [{"role": "user", "content": "hello"}]


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def chat_body(model: str = "gpt-4o") -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "max_tokens": 4}


async def post(
    client: httpx.AsyncClient, url: str, key: str, model: str = "gpt-4o", **headers: str
) -> httpx.Response:
    return await client.post(
        f"{url}/v1/chat/completions", headers=auth(key, **headers), json=chat_body(model)
    )


class FeedLog:
    """Every event a feed subscriber received, kept while the test runs."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def run(self) -> None:
        while True:
            self.events.extend(await next_events(self.ws))
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, kind: str, model: str) -> dict[str, Any]:
        """The first event of ``kind`` for ``model``, once it came."""
        while True:
            for event in self.events:
                if event["type"] == kind and event.get("model") == model:
                    return event
            await self._changed.wait()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]


@asynccontextmanager
async def one_node(workdir: Path) -> AsyncIterator[tuple[str, TokenguardProcess]]:
    """``tokenguard serve`` of :data:`KEYS` (one node, its memory store): its URL."""
    config = write_config(workdir / "c.toml", KEYS, window=WINDOW, bucket=1)
    async with running_node_process(config, workdir / "node.out") as running:
        yield running


@asynccontextmanager
async def feed_log(url: str, token: str) -> AsyncIterator[FeedLog]:
    """The events of the usage feed of the node at ``url``, as ``token`` sees them,
    kept from once every node knows someone watches."""
    ws_url = url.replace("http://", "ws://") + "/v1/usage/stream"
    async with subscriber(ws_url, token) as ws, trio.open_nursery() as nursery:
        await watching(ws)
        feed = FeedLog(ws)
        nursery.start_soon(feed.run)
        yield feed
        nursery.cancel_scope.cancel()


async def watching(ws: WebSocketConnection) -> None:
    ready = json.loads(await ws.get_message())
    assert ready["type"] == "ready"
    await trio.sleep(0.5)  # every node hears that someone watches


async def test_six_concurrent_requests_over_three_nodes_are_all_admitted_in_arrival_order(
    workdir: Path,
) -> None:
    config = write_config(workdir / "c.toml", KEYS, window=WINDOW, bucket=1)
    with trio.fail_after(START_TIMEOUT + 120):
        async with running_cluster(workdir / "state", nodes=3, config=config) as cluster:
            answers: dict[int, httpx.Response] = {}
            async with (
                feed_log(cluster.urls[0], "sk-wait") as feed,
                httpx.AsyncClient(timeout=60) as client,
            ):

                async def send(i: int) -> None:
                    url = cluster.urls[(i + 1) % 3]  # request i arrives at node i+1 mod 3
                    answers[i] = await post(client, url, "sk-wait", f"gpt-4o-q{i}")

                async with trio.open_nursery() as requests:
                    for i in range(6):
                        requests.start_soon(send, i)
                        # The next one goes once the server has this one (admitted for
                        # the first two, then waiting): the arrival order is i's.
                        kind = "admitted" if i < 2 else "queued"
                        await feed.wait_for(kind, f"gpt-4o-q{i}")
                for i in range(6):
                    await feed.wait_for("admitted", f"gpt-4o-q{i}")

            assert [answers[i].status_code for i in range(6)] == [200] * 6
            queued_ms = [int(answers[i].headers["x-tokenguard-queued-ms"]) for i in range(6)]
            assert queued_ms[:2] == [0, 0]
            assert all(ms > 0 for ms in queued_ms[2:])
            # In arrival order: each admission's time (when the store admitted it, in
            # whole ms: two of one turn may share a ms) is no earlier than the one
            # before it.
            by_model = {e["model"]: e for e in feed.of("admitted")}
            admitted = [by_model[f"gpt-4o-q{i}"] for i in range(6)]
            stamps = [e["ts"] for e in admitted]
            assert stamps == sorted(stamps), stamps
            assert {e["node"] for e in admitted} == {0, 1, 2}
            # Never more than 2 in any 10 s: any three admissions span a window. (The
            # store admits on its clock; a node stamps the event a moment later, so
            # the span seen from the events may be short of it by that moment.)
            times = [e["ts"] / 1000 for e in admitted]
            for first, third in zip(times, times[2:], strict=False):
                assert third - first >= WINDOW - 0.5, times
            dequeued = feed.of("dequeued")
            assert sorted(e["model"] for e in dequeued) == [f"gpt-4o-q{i}" for i in range(2, 6)]
            assert {e["outcome"] for e in dequeued} == {"admitted"}


async def fill(client: httpx.AsyncClient, url: str, key: str, n: int = 2) -> None:
    """Use up ``key``'s requests for this window."""
    for _ in range(n):
        assert (await post(client, url, key)).status_code == 200


async def test_a_request_whose_wait_would_exceed_its_bound_is_refused_without_waiting(
    workdir: Path,
) -> None:
    with trio.fail_after(START_TIMEOUT + 60):
        async with one_node(workdir) as (url, _):
            async with httpx.AsyncClient(timeout=60) as client:
                await fill(client, url, "sk-wait")
                # The room frees in about a window: more than the 2 s this one allows.
                refused = await post(client, url, "sk-wait", **{"x-tokenguard-max-wait": "2"})
                # Asking more than the rules' 15 s is asking for 15 s: a window's wait
                # is within it, so this one waits (and is answered by the next test).
                assert refused.status_code == 429, refused.text
                assert refused.headers["x-tokenguard-queued-ms"] == "0"
                assert int(refused.headers["retry-after-ms"]) > 2000
                assert refused.json()["error"]["code"] == "rate_limit_exceeded"
                # A key without max_wait_seconds: the 429 of before, no queue header.
                await fill(client, url, "sk-now")
                now = await post(client, url, "sk-now")
                assert now.status_code == 429
                assert "x-tokenguard-queued-ms" not in now.headers
                assert "retry-after" in now.headers


async def test_a_client_that_leaves_while_waiting_consumes_nothing(workdir: Path) -> None:
    with trio.fail_after(START_TIMEOUT + 60):
        async with one_node(workdir) as (url, _):
            async with (
                feed_log(url, "sk-wait") as feed,
                httpx.AsyncClient(timeout=60) as client,
            ):
                await fill(client, url, "sk-wait")
                before = (await client.get(f"{url}/v1/usage", headers=auth("sk-wait"))).json()
                async with trio.open_nursery() as leaving:
                    leaving.start_soon(post, client, url, "sk-wait", "gpt-4o-gone")
                    await feed.wait_for("queued", "gpt-4o-gone")
                    leaving.cancel_scope.cancel()  # the client hangs up
                gone = await feed.wait_for("dequeued", "gpt-4o-gone")
                assert gone["outcome"] == "gone"
                after = (await client.get(f"{url}/v1/usage", headers=auth("sk-wait"))).json()
            used = [
                {d: e and e["used"] for d, e in u["dimensions"].items()} for u in (before, after)
            ]
            assert used[0] == used[1]
            assert used[1]["requests"] == 2
            assert used[1]["total_tokens"] > 0
            assert not [e for e in feed.of("admitted") if e["model"] == "gpt-4o-gone"]


async def test_interactive_requests_go_before_batch_ones_on_a_shared_team_limit(
    workdir: Path,
) -> None:
    with trio.fail_after(START_TIMEOUT + 90):
        async with one_node(workdir) as (url, _):
            answers: dict[str, httpx.Response] = {}
            async with (
                feed_log(url, ADMIN_TOKEN) as feed,
                httpx.AsyncClient(timeout=60) as client,
            ):
                await fill(client, url, "sk-inter", 1)  # the team's one request

                async def send(key: str, model: str) -> None:
                    answers[model] = await post(client, url, key, model)

                async with trio.open_nursery() as requests:
                    requests.start_soon(send, "sk-batch", "gpt-4o-batch")
                    await feed.wait_for("queued", "gpt-4o-batch")
                    requests.start_soon(send, "sk-inter", "gpt-4o-inter")  # arrives later
                    await feed.wait_for("queued", "gpt-4o-inter")
                # The feed publishes in batches: an answer can come before its event.
                for model in ("gpt-4o-inter", "gpt-4o-batch"):
                    await feed.wait_for("admitted", model)
            assert [answers[m].status_code for m in ("gpt-4o-inter", "gpt-4o-batch")] == [200] * 2
            admitted = sorted(feed.of("admitted"), key=lambda e: e["ts"])
            assert [e["model"] for e in admitted[1:]] == ["gpt-4o-inter", "gpt-4o-batch"]
            queued = {e["model"]: e for e in feed.of("queued")}
            assert queued["gpt-4o-batch"]["priority"] == "batch"
            assert queued["gpt-4o-inter"]["priority"] == "interactive"


async def test_a_node_shutting_down_answers_its_waiters_503(workdir: Path) -> None:
    with trio.fail_after(START_TIMEOUT + 60):
        async with one_node(workdir) as (url, node):
            async with httpx.AsyncClient(timeout=60) as client:
                await fill(client, url, "sk-wait")
                async with trio.open_nursery() as nursery:
                    answer: list[httpx.Response] = []

                    async def wait_in_line() -> None:
                        answer.append(await post(client, url, "sk-wait"))

                    nursery.start_soon(wait_in_line)
                    waiting = b'tokenguard_queue_waiting{key="wait"} 1.0'
                    while waiting not in (await client.get(f"{url}/metrics")).content:  # noqa: ASYNC110
                        await trio.sleep(0.05)
                    node.send_signal(signal.SIGTERM)
            (closed,) = answer
            assert closed.status_code == 503, closed.text
            assert closed.json()["error"]["code"] == "shutting_down"
            assert int(closed.headers["retry-after"]) >= 1
            assert "x-tokenguard-queued-ms" not in closed.headers


async def test_the_openai_sdk_without_retries_gets_its_answer_by_waiting(workdir: Path) -> None:
    config = write_config(workdir / "c.toml", KEYS, window=WINDOW, bucket=1)
    with trio.fail_after(START_TIMEOUT + 60):
        async with running_cluster(workdir / "state", nodes=2, config=config) as cluster:

            def sdk(key: str, node: int) -> openai.OpenAI:
                return openai.OpenAI(
                    api_key=key, base_url=f"{cluster.urls[node]}/v1", max_retries=0, timeout=60
                )

            def three(key: str) -> list[str]:
                replies = []
                for i in range(3):
                    raw = sdk(key, i % 2).chat.completions.with_raw_response.create(
                        model="gpt-4o", messages=MESSAGES, max_tokens=4
                    )
                    replies.append(raw.headers.get("x-tokenguard-queued-ms", "-"))
                    assert raw.parse().choices
                return replies

            # Without a wait bound the third request of a window fails...
            with pytest.raises(openai.RateLimitError):
                await trio.to_thread.run_sync(three, "sk-now")
            # ...with one, it is answered once the room frees (the third one waited).
            queued_ms = await trio.to_thread.run_sync(three, "sk-wait")
            assert queued_ms[:2] == ["0", "0"]
            assert int(queued_ms[2]) > 0

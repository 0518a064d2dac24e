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
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection

from tests.observe.test_feed import next_events, subscriber
from tests.support.processes import START_TIMEOUT, running_cluster, write_config

pytestmark = pytest.mark.slow

WINDOW = 10
KEYS = """\
[[keys]]
key = "sk-wait"
name = "wait"
rpm = 2
max_wait_seconds = 15

[[keys]]
key = "sk-now"
name = "now"
rpm = 2
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
            ws_url = cluster.urls[0].replace("http://", "ws://") + "/v1/usage/stream"
            answers: dict[int, httpx.Response] = {}
            async with (
                subscriber(ws_url, "sk-wait") as ws,
                httpx.AsyncClient(timeout=60) as client,
                trio.open_nursery() as nursery,
            ):
                await watching(ws)
                feed = FeedLog(ws)
                nursery.start_soon(feed.run)

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
                nursery.cancel_scope.cancel()

            assert [answers[i].status_code for i in range(6)] == [200] * 6
            queued_ms = [int(answers[i].headers["x-tokenguard-queued-ms"]) for i in range(6)]
            assert queued_ms[:2] == [0, 0]
            assert all(ms > 0 for ms in queued_ms[2:])
            admitted = sorted(feed.of("admitted"), key=lambda e: e["ts"])
            assert [e["model"] for e in admitted] == [f"gpt-4o-q{i}" for i in range(6)]
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

"""How the live usage feed delivers: a stalled subscriber gets ``lagged`` and a bounded
backlog, a dead one is cleaned up, node shutdown closes subscribers with 1001 at once, a
store that cannot publish never blocks a request, and events are made only while someone
watches. In one process, on the memory driver: a real node, real websocket clients, real
HTTP requests (tests/support/usage_feed.py). Every test is bounded by
``trio.fail_after``.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, wrap_client_stream

from drivers.memory import MemoryStore
from tests.support.usage_feed import (
    TEST_TIMEOUT,
    Node,
    chat,
    collect,
    next_event,
    of_type,
    running_node,
    settings_for,
    subscriber,
)
from tokenguard.api.app import create_app
from tokenguard.observe import feed as feed_module
from tokenguard.observe.subscriber import Subscriber, Viewer
from tokenguard.store.window_store import open_store

# --- slow, stalled, dead ------------------------------------------------------------------


def test_a_subscriber_backlog_drops_its_oldest_events_and_counts_them() -> None:
    sub = Subscriber(Viewer("admin"), limit=3)
    for i in range(5):
        sub.offer(f'{{"n":{i}}}')
    assert sub.dropped == 2

    async def take() -> tuple[int, list[str]]:
        return await sub.take()

    dropped, bodies = trio.run(take)
    assert dropped == 2
    assert bodies == ['{"n":2}', '{"n":3}', '{"n":4}']


def test_a_burst_is_taken_whole_by_a_subscriber_that_kept_up() -> None:
    # Events arrive in batches (a node publishes every 20 ms): a subscriber with nothing
    # pending takes a batch longer than its backlog whole; one already behind keeps only
    # the newest `limit`.
    sub = Subscriber(Viewer("admin"), limit=3)
    sub.offer_all([f'{{"n":{i}}}' for i in range(5)])
    assert (sub.pending, sub.dropped) == (5, 0)
    sub.offer_all(['{"n":5}', '{"n":6}'])
    assert (sub.pending, sub.dropped) == (3, 4)

    async def take() -> tuple[int, list[str]]:
        return await sub.take()

    assert trio.run(take) == (4, ['{"n":4}', '{"n":5}', '{"n":6}'])


@pytest.mark.parametrize("query", ["", "?batch=1"], ids=["one-per-message", "batched"])
async def test_a_stalled_subscriber_gets_lagged_and_no_more_than_its_backlog(query: str) -> None:
    backlog = 20
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings_for(backlog=backlog)) as node:
            async with (
                subscriber(node.ws_url, "sk-alpha", query=query, receive_buffer=4096) as stalled,
                subscriber(node.ws_url, "sk-alpha") as live,
                httpx.AsyncClient() as client,
            ):
                await next_event(stalled)
                await next_event(live)
                live_events: list[dict[str, Any]] = []

                async def read_live() -> None:
                    live_events.extend(
                        await collect(
                            live, lambda ev: len(of_type(ev, "admitted", "settled")) == 800
                        )
                    )

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_live)
                    # The stalled client reads nothing while these are sent.
                    for _ in range(400):
                        assert (await chat(client, node.url, "sk-alpha")).status_code == 200
                # The live one was not held back by the stalled one: it got all 800, and
                # was never told it lagged.
                assert not of_type(live_events, "lagged")
                (held,) = [s for s in node.feed.subscribers if s.dropped]
                assert held.pending == backlog  # the bound, and not one more

                read = await collect(stalled, lambda ev: any(e.get("seq") == 800 for e in ev))
                lags = of_type(read, "lagged")
                # By default a lag comes only once the socket is stuck; batched, 25 ms of
                # waiting between messages may also overflow so small a backlog.
                assert len(lags) >= 1 if query else len(lags) == 1
                assert all(lag["dropped"] > 0 and lag["node"] == 0 for lag in lags)
                # After the last one: the newest events, up to the last one sent.
                rest = read[read.index(lags[-1]) + 1 :]
                assert 0 < len(of_type(rest, "admitted", "settled")) <= backlog
                ids = [e["id"] for e in read]
                assert ids == list(range(ids[0], ids[0] + len(ids)))
                # Nothing vanished unannounced: each event was delivered or counted dropped
                # (the count includes snapshots, hence at least).
                delivered = len(of_type(read, "admitted", "settled"))
                assert delivered < 800 <= delivered + sum(lag["dropped"] for lag in lags)


async def test_a_dead_subscriber_is_cleaned_up(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        sock = trio.socket.socket()
        host, port = node.url.removeprefix("http://").split(":")
        await sock.connect((host, int(port)))
        stream = trio.SocketStream(sock)
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,
                host,
                "/v1/usage/stream",
                extra_headers=[(b"Authorization", b"Bearer sk-alpha")],
            )
            assert json.loads(await ws.get_message())["type"] == "ready"
            assert len(node.feed.subscribers) == 1
            # Gone without a close handshake, as a crashed client or a lost network.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.close()
            nursery.cancel_scope.cancel()
        # Polling: the feed has no event for "a subscriber left", and needs none.
        while node.feed.subscribers:  # noqa: ASYNC110
            await trio.sleep(0.02)


async def test_node_shutdown_closes_subscribers_with_1001_at_once() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings_for(), grace=30) as node:
            async with subscriber(node.ws_url, "sk-alpha") as ws:
                await next_event(ws)
                start = trio.current_time()
                node.shutdown.set()
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1001
                assert trio.current_time() - start < 15  # not the 30 s grace


class StuckStore(MemoryStore):
    """A store whose publishing never completes (a hung connection)."""

    async def publish(self, channel: str, messages: Any) -> None:
        await trio.sleep_forever()


async def test_a_store_that_cannot_publish_never_blocks_a_request() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings_for(), store=StuckStore()) as node:
            node.feed.outgoing_limit = 50
            # A subscriber, so that events are made (its `ready` comes once the node's
            # announcement, stuck too, was given up on).
            async with subscriber(node.ws_url, "sk-alpha") as ws, httpx.AsyncClient() as client:
                assert (await next_event(ws))["type"] == "ready"
                for _ in range(100):
                    response = await chat(client, node.url, "sk-alpha")
                    assert response.status_code == 200
            # Bounded: the oldest queued events were dropped, and counted.
            assert node.feed.queued == 50
            # The first batch (one request's events, or its first) is stuck in flight.
            assert node.feed.dropped_outgoing in (200 - 50 - 2, 200 - 50 - 1)


# --- presence: events are made only while someone watches ------------------------------------


async def test_no_events_are_made_while_nobody_watches(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                assert (await chat(client, node.url, "sk-alpha")).status_code == 200
            assert not node.feed.watched
            assert node.feed.queued == 0
            async with subscriber(node.ws_url, "sk-alpha") as ws:
                assert (await next_event(ws))["type"] == "ready"
                assert node.feed.watched
                assert (await chat(client, node.url, "sk-alpha", max_tokens=9)).status_code == 200
                events = await collect(ws, lambda ev: bool(of_type(ev, "settled")))
    # The first event this node ever made is the one after `ready`: none before it.
    (admitted,) = of_type(events, "admitted")
    assert admitted["seq"] == 1
    assert admitted["reserved"]["output_tokens"] == 9
    assert of_type(events, "settled")[0]["seq"] == 2


async def test_a_subscriber_on_one_node_switches_every_node_on_and_off(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Two feeds sharing one store, as two nodes share Redis: a subscriber on B makes A
    publish within a second; once it leaves, A stops after the presence TTL."""
    settings = settings_for()
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(MemoryStore()) as store, trio.open_nursery() as nursery:
            feeds = []
            for node_id in (0, 1):
                node_settings = attrs.evolve(settings, node_id=node_id)
                app = create_app(node_settings, store)
                feeds.append(app.extensions["tokenguard"].feed)
                await nursery.start(feeds[-1].run)
            a, b = feeds
            await trio.sleep(5)
            assert not a.watched and not b.watched
            with b.subscription(Viewer("admin")):
                start = trio.current_time()
                await b.announced()
                assert trio.current_time() - start < 1
                assert a.watched and b.watched
                await trio.sleep(10)  # renewed while the subscriber stays
                assert a.watched
            left = trio.current_time()
            while a.watched:  # noqa: ASYNC110
                await trio.sleep(0.1)
            assert feed_module.PRESENCE_TTL - 0.5 <= trio.current_time() - left
            assert trio.current_time() - left <= feed_module.PRESENCE_TTL + 0.2
            assert not b.watched
            nursery.cancel_scope.cancel()

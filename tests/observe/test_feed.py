"""The live usage feed in one process, on the memory driver: a real node (the app under
hypercorn, on a free port of 127.0.0.1), real websocket clients (trio-websocket), real
HTTP requests.

What is shown: a key's subscriber sees its own events, in order, and nothing else; the
admin sees every key and may filter; the token comes in the header or in a first
message; anything else is closed with 1008 before a single event; every event's
fields; snapshots every second; a stalled subscriber gets ``lagged`` and a bounded
backlog; a dead one is cleaned up; node shutdown closes subscribers with 1001 at once;
a store that cannot publish never blocks a request. Every test is bounded by
``trio.fail_after``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import httpx
import pytest
import trio
from hypercorn.trio import serve
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from drivers.memory import MemoryStore
from tokenguard.api.app import create_app
from tokenguard.cluster.node import hypercorn_config
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import ADMIN_TOKEN_ENV, ConfigError, Settings
from tokenguard.observe import feed as feed_module
from tokenguard.observe import feed_session
from tokenguard.observe.feed import Feed
from tokenguard.observe.subscriber import Subscriber, Viewer
from tokenguard.store.window_store import WindowStore, open_store

TEST_TIMEOUT = 120.0  # a hang guard: 400 requests take a starved machine a while
ADMIN = "admin-token-for-the-feed-tests"
CONFIG: dict[str, Any] = {
    "feed": {"admin_token": ADMIN},
    "keys": [
        {"key": "sk-alpha", "name": "alpha", "rpm": 1000, "input_tpm": 10**6, "output_tpm": 10**6},
        {"key": "sk-beta", "name": "beta", "rpm": 1000, "input_tpm": 10**6, "output_tpm": 10**6},
        {"key": "sk-tiny", "name": "tiny", "rpm": 1, "output_tpm": 100},
    ],
}
SECRETS = ("sk-alpha", "sk-beta", "sk-tiny", ADMIN)
MESSAGES = [{"role": "user", "content": "Say hello to the feed."}]


def settings_for(config: dict[str, Any] = CONFIG, **feed: Any) -> Settings:
    config = {**config, "feed": {**config.get("feed", {}), **feed}}
    return parse_settings(config, "<test>", environ={})


@attrs.define
class Node:
    url: str
    feed: Feed
    shutdown: trio.Event

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/usage/stream"


@asynccontextmanager
async def running_node(
    settings: Settings, store: WindowStore | None = None, grace: float = 10.0
) -> AsyncIterator[Node]:
    """The app under hypercorn on a free port, as ``tokenguard serve`` runs it."""
    shutdown = trio.Event()
    async with open_store(store or MemoryStore()) as running:
        app = create_app(settings, running, shutdown=shutdown)
        config = hypercorn_config("127.0.0.1", 0, grace=grace)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
            try:
                yield Node(binds[0], app.extensions["tokenguard"].feed, shutdown)
            finally:
                shutdown.set()


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with running_node(settings_for()) as running:
        yield running


@asynccontextmanager
async def subscriber(
    url: str,
    token: str | None = None,
    *,
    query: str = "",
    headers: list[tuple[bytes, bytes]] | None = None,
    receive_buffer: int | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """A websocket client of the feed; ``token`` goes in the Authorization header.
    ``receive_buffer`` shrinks the client's socket receive buffer (a stalled reader
    then fills the server's socket quickly)."""
    host, _, rest = url.removeprefix("ws://").partition("/")
    hostname, port = host.split(":")
    if headers is None:
        headers = [] if token is None else [(b"Authorization", f"Bearer {token}".encode())]
    sock = trio.socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect((hostname, int(port)))
    stream = trio.SocketStream(sock)
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery, stream, hostname, "/" + rest + query, extra_headers=headers
        )
        try:
            yield ws
        finally:
            await ws.aclose()
            nursery.cancel_scope.cancel()


async def next_events(ws: WebSocketConnection) -> list[dict[str, Any]]:
    """The events of the next message: one, or (batched mode) one per line."""
    text = await ws.get_message()
    assert isinstance(text, str)
    for secret in SECRETS:
        assert secret not in text  # keys appear by name, never themselves
    return [json.loads(line) for line in text.split("\n")]


async def next_event(ws: WebSocketConnection) -> dict[str, Any]:
    """The next message, which must carry exactly one event."""
    (event,) = await next_events(ws)
    return event


async def collect(
    ws: WebSocketConnection, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """Events (snapshots included), message after message, until ``done(events)``."""
    events: list[dict[str, Any]] = []
    while not done(events):
        events.extend(await next_events(ws))
    return events


def of_type(events: list[dict[str, Any]], *types: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] in types]


async def chat(
    client: httpx.AsyncClient, url: str, key: str, max_tokens: int = 20, **body: Any
) -> httpx.Response:
    return await client.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": max_tokens, **body},
    )


async def refused_code(ws: WebSocketConnection) -> int:
    """The close code, asserting that not a single message came before it."""
    with pytest.raises(ConnectionClosed) as closed:
        message = await ws.get_message()
        raise AssertionError(f"got a message before the close: {message!r}")
    assert closed.value.reason is not None
    return closed.value.reason.code


# --- who sees what --------------------------------------------------------------------------


async def test_a_key_sees_its_own_events_in_order_and_nothing_else(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-alpha") as ws, httpx.AsyncClient() as client:
            ready = await next_event(ws)
            assert ready["type"] == "ready"
            assert (ready["id"], ready["role"], ready["key"], ready["node"]) == (
                1,
                "key",
                "alpha",
                0,
            )
            for i in range(3):
                assert (await chat(client, node.url, "sk-beta")).status_code == 200
                assert (
                    await chat(client, node.url, "sk-alpha", max_tokens=10 + i)
                ).status_code == 200
            events = await collect(ws, lambda ev: len(of_type(ev, "admitted", "settled")) == 6)
        assert {e["key"] for e in events} == {"alpha"}
        ids = [e["id"] for e in events]
        assert ids == list(range(2, 2 + len(events)))  # every message, numbered from 1
        traffic = of_type(events, "admitted", "settled")
        assert [e["type"] for e in traffic] == ["admitted", "settled"] * 3
        assert [e["reserved"]["output_tokens"] for e in traffic[::2]] == [10, 11, 12]
        seqs = [e["seq"] for e in traffic]
        assert seqs == sorted(seqs) and len(set(seqs)) == 6
        assert all(e["node"] == 0 and isinstance(e["ts"], int) for e in events)


async def test_the_admin_sees_every_key_and_may_filter(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            subscriber(node.ws_url, ADMIN) as everything,
            subscriber(node.ws_url, ADMIN, query="?key=beta") as only_beta,
            httpx.AsyncClient() as client,
        ):
            assert (await next_event(everything))["role"] == "admin"
            ready = await next_event(only_beta)
            assert (ready["role"], ready["key"]) == ("admin", "beta")
            await chat(client, node.url, "sk-alpha")
            await chat(client, node.url, "sk-beta")
            all_events = await collect(
                everything, lambda ev: len(of_type(ev, "admitted", "settled")) == 4
            )
            beta_events = await collect(
                only_beta, lambda ev: len(of_type(ev, "admitted", "settled")) == 2
            )
        assert [e["key"] for e in of_type(all_events, "admitted")] == ["alpha", "beta"]
        assert {e["key"] for e in beta_events} == {"beta"}


async def test_the_token_may_come_in_a_first_message(node: Node) -> None:
    """Browsers cannot set headers on a websocket: ``{"type": "auth", ...}`` instead."""
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url) as ws, httpx.AsyncClient() as client:
            await ws.send_message(json.dumps({"type": "auth", "token": "sk-beta"}))
            ready = await next_event(ws)
            assert (ready["type"], ready["role"], ready["key"]) == ("ready", "key", "beta")
            await chat(client, node.url, "sk-beta")
            events = await collect(ws, lambda ev: bool(of_type(ev, "admitted")))
        assert of_type(events, "admitted")[0]["key"] == "beta"


@pytest.mark.parametrize(
    ("token", "headers", "first_message", "query"),
    [
        ("sk-wrong", None, None, ""),  # unknown key in the header
        (None, [(b"Authorization", b"Basic c2stYWxwaGE=")], None, ""),  # not Bearer
        (
            None,
            [(b"Authorization", b"Bearer sk-alpha"), (b"Authorization", b"Bearer sk-beta")],
            None,
            "",
        ),  # two headers: we never pick one
        (None, None, {"type": "auth", "token": "sk-wrong"}, ""),  # unknown key in a message
        (None, None, {"type": "hello", "token": "sk-alpha"}, ""),  # not an auth message
        (None, None, "sk-alpha", ""),  # not JSON
        ("sk-alpha", None, None, "?key=beta"),  # a key may not look at another key
        (ADMIN, None, None, "?key=nobody"),  # the admin may filter only on a real key
    ],
)
async def test_refused_with_1008_and_nothing_leaks(
    node: Node,
    token: str | None,
    headers: list[tuple[bytes, bytes]] | None,
    first_message: Any,
    query: str,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            httpx.AsyncClient() as client,
            subscriber(node.ws_url, token, headers=headers, query=query) as ws,
        ):
            # Traffic meanwhile: a refused socket must not get any of it.
            await chat(client, node.url, "sk-alpha")
            if first_message is not None:
                text = (
                    first_message if isinstance(first_message, str) else json.dumps(first_message)
                )
                await ws.send_message(text)
            assert await refused_code(ws) == 1008
        assert node.feed.subscribers == ()


async def test_no_token_within_the_time_allowed_is_refused(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed_session, "AUTH_SECONDS", 0.3)
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url) as ws:
            start = trio.current_time()
            assert await refused_code(ws) == 1008
            assert trio.current_time() - start < 4.5  # AUTH_SECONDS as set, not its 5 s


async def test_no_admin_view_without_an_admin_token() -> None:
    config = {k: v for k, v in CONFIG.items() if k != "feed"}
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(parse_settings(config, "<test>", environ={})) as node:
            async with subscriber(node.ws_url, ADMIN) as ws:
                assert await refused_code(ws) == 1008


def test_the_admin_token_is_validated_and_may_come_from_the_environment() -> None:
    with pytest.raises(ConfigError, match=r"<test>: feed.admin_token: .*at least 16"):
        settings_for(admin_token="short")
    same_as_a_key = {"feed": {"admin_token": "x" * 20}, "keys": [{"key": "x" * 20, "name": "x"}]}
    with pytest.raises(ConfigError, match=r"<test>: feed.admin_token: .*also an API key"):
        parse_settings(same_as_a_key, "<test>", environ={})
    with pytest.raises(ConfigError, match=r"<test>: feed.backlog: must be at least 1"):
        settings_for(backlog=0)
    with pytest.raises(ConfigError, match=rf"\${ADMIN_TOKEN_ENV} \(environment\): .*at least 16"):
        parse_settings(CONFIG, "<test>", environ={ADMIN_TOKEN_ENV: "short"})
    from_env = parse_settings(CONFIG, "<test>", environ={ADMIN_TOKEN_ENV: "e" * 16})
    from_file = settings_for()
    assert from_env.feed.admin_digest != from_file.feed.admin_digest  # the environment wins
    assert ADMIN not in repr(from_file)  # only its digest is kept, and not shown
    no_admin = parse_settings({"keys": CONFIG["keys"]}, "<test>", environ={})
    assert no_admin.feed.admin_digest is None


# --- the events ---------------------------------------------------------------------------


async def test_admitted_rejected_and_settled_events_carry_the_numbers(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-tiny") as ws, httpx.AsyncClient() as client:
            await next_event(ws)
            began = trio.current_time()
            first = await chat(client, node.url, "sk-tiny", max_tokens=60)
            assert first.status_code == 200
            refused = await chat(client, node.url, "sk-tiny", max_tokens=5)
            assert refused.status_code == 429
            never = await chat(client, node.url, "sk-tiny", max_tokens=101)
            assert never.status_code == 429
            since = trio.current_time() - began  # the admission's age, at most
            events = await collect(ws, lambda ev: len(of_type(ev, "rejected")) == 2)
        admitted, settled = of_type(events, "admitted", "settled")
        usage = first.json()["usage"]
        assert (admitted["model"], admitted["surface"]) == ("gpt-4o", "chat")
        assert admitted["reserved"] == {"input_tokens": usage["prompt_tokens"], "output_tokens": 60}
        assert admitted["usage"]["requests"] == {
            "used": 1,
            "limit": 1,
            "remaining": 0,
            "reset_seconds": admitted["usage"]["requests"]["reset_seconds"],
        }
        assert admitted["usage"]["input_tokens"] is None  # unlimited
        assert admitted["usage"]["output_tokens"]["used"] == 60  # the reservation
        assert settled["output_tokens"] == usage["completion_tokens"]
        assert settled["reserved_output_tokens"] == 60
        assert settled["refund"] == 60 - usage["completion_tokens"] > 0
        rejected, never_fits = of_type(events, "rejected")
        assert (rejected["dimension"], rejected["limit"], rejected["used"]) == ("requests", 1, 1)
        assert rejected["surface"] == "chat"
        assert rejected["requested"] == 1
        # The admission leaves with its bucket: 60-65 s after it, less its age.
        assert 60 - since <= rejected["retry_after"] <= 65
        assert int(refused.headers["retry-after"]) == pytest.approx(rejected["retry_after"], abs=1)
        # Larger than the output limit itself: it can never fit, so no wait is given.
        assert never_fits["dimension"] == "output_tokens"
        assert (never_fits["requested"], never_fits["retry_after"]) == (101, None)


async def test_events_name_the_api_surface_of_the_request(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-beta") as ws, httpx.AsyncClient() as client:
            await next_event(ws)
            answer = await client.post(
                f"{node.url}/v1/responses",
                json={"model": "gpt-4o", "input": "hi", "max_output_tokens": 5},
                headers={"Authorization": "Bearer sk-beta"},
            )
            assert answer.status_code == 200
            await chat(client, node.url, "sk-beta")
            events = await collect(ws, lambda ev: len(of_type(ev, "admitted")) == 2)
    assert [e["surface"] for e in of_type(events, "admitted")] == ["responses", "chat"]


async def test_snapshots_every_second_while_a_key_is_active(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-beta") as ws, httpx.AsyncClient() as client:
            await next_event(ws)
            # The first snapshot comes at once, even before any traffic.
            first = await next_event(ws)
            assert first["type"] == "snapshot"
            assert first["usage"]["requests"]["used"] == 0
            await chat(client, node.url, "sk-beta")
            start = trio.current_time()
            events = await collect(
                ws,
                lambda ev: (
                    sum(e["type"] == "snapshot" and e["usage"]["requests"]["used"] == 1 for e in ev)
                    == 3
                ),
            )
            elapsed = trio.current_time() - start
            usage = (
                await client.get(
                    f"{node.url}/v1/usage", headers={"Authorization": "Bearer sk-beta"}
                )
            ).json()["dimensions"]
        snapshots = [e for e in of_type(events, "snapshot") if e["usage"]["requests"]["used"] == 1]
        assert elapsed > 1.5  # three snapshots, a second apart (or more, if slow)
        last = snapshots[-1]
        assert last["window_seconds"] == 60
        for dimension in ("requests", "input_tokens", "output_tokens"):
            assert last["usage"][dimension]["used"] == usage[dimension]["used"]
            assert last["usage"][dimension]["limit"] == usage[dimension]["limit"]


# --- batched mode ------------------------------------------------------------------------


async def test_batched_mode_sends_every_pending_event_in_one_message_in_order(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``?batch=1``: each message is the pending events, one JSON object per line, each
    with its own ``id``; a message never carries more than ``BATCH_MOST``. Publishing
    every 0.5 s (not 20 ms) makes the batching certain here."""
    node.feed.publish_seconds = 0.5
    monkeypatch.setattr(feed_session, "BATCH_MOST", 4)
    with trio.fail_after(TEST_TIMEOUT):
        async with (
            subscriber(node.ws_url, ADMIN, query="?batch=1") as admin,
            subscriber(node.ws_url, "sk-alpha", query="?batch=1") as alpha,
            httpx.AsyncClient() as client,
        ):
            for ws in (admin, alpha):
                (ready,) = await next_events(ws)  # `ready` comes alone
                assert (ready["type"], ready["id"], ready["batch"]) == ("ready", 1, True)
            sent = []
            for i in range(6):
                key = ("sk-alpha", "sk-beta")[i % 2]
                assert (await chat(client, node.url, key, max_tokens=10 + i)).status_code == 200
                sent.append((key.removeprefix("sk-"), 10 + i))
            messages: dict[WebSocketConnection, list[list[dict[str, Any]]]] = {admin: [], alpha: []}
            for ws, count in ((admin, 12), (alpha, 6)):
                while sum(len(of_type(m, "admitted", "settled")) for m in messages[ws]) < count:
                    messages[ws].append(await next_events(ws))
    for ws, keys in ((admin, {"alpha", "beta"}), (alpha, {"alpha"})):
        events = [e for message in messages[ws] for e in message]
        assert [e["id"] for e in events] == list(range(2, 2 + len(events)))
        assert all(len(message) <= 4 for message in messages[ws])
        assert any(len(message) > 1 for message in messages[ws])  # batched indeed
        traffic = of_type(events, "admitted", "settled")
        assert [e["type"] for e in traffic] == ["admitted", "settled"] * (len(traffic) // 2)
        assert [e["seq"] for e in traffic] == sorted(e["seq"] for e in traffic)
        admitted = [
            (e["key"], e["reserved"]["output_tokens"]) for e in of_type(traffic, "admitted")
        ]
        assert admitted == [s for s in sent if s[0] in keys]


async def test_batch_is_0_or_1(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-alpha", query="?batch=0") as ws:
            ready = await next_event(ws)
            assert (ready["type"], ready["batch"]) == ("ready", False)
        async with subscriber(node.ws_url, "sk-alpha", query="?batch=yes") as ws:
            assert await refused_code(ws) == 1008


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


async def test_shadow_mode_and_team_limits_show_in_the_events() -> None:
    """A request only shadow mode let through is followed by ``would_reject``; a team's
    limit that refuses is named as the team's."""
    config = {
        "teams": {"crew": {"rpm": 2}},
        "keys": [
            {"key": "sk-shadow", "name": "shadow", "rpm": 1, "mode": "shadow"},
            {"key": "sk-member", "name": "member", "team": "crew", "rpm": 100},
        ],
    }
    settings = parse_settings(config, "<test>", environ={})
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings) as node:
            async with (
                subscriber(node.ws_url, "sk-shadow") as shadow,
                subscriber(node.ws_url, "sk-member") as member,
                httpx.AsyncClient() as client,
            ):
                await next_event(shadow)
                await next_event(member)
                shadowed = [(await chat(client, node.url, "sk-shadow")).status_code for _ in "ab"]
                assert shadowed == [200, 200]
                statuses = [(await chat(client, node.url, "sk-member")).status_code for _ in "abc"]
                assert statuses == [200, 200, 429]
                shadow_events = await collect(shadow, lambda ev: bool(of_type(ev, "would_reject")))
                member_events = await collect(member, lambda ev: bool(of_type(ev, "rejected")))
    (would,) = of_type(shadow_events, "would_reject")
    assert [e["type"] for e in of_type(shadow_events, "admitted", "would_reject")] == [
        "admitted",
        "admitted",
        "would_reject",
    ]
    assert (would["dimension"], would["scope"], would["limit"], would["used"]) == (
        "requests",
        "key",
        1,
        1,
    )
    assert would["requested"] == 1 and would["window_seconds"] == 60
    (rejected,) = of_type(member_events, "rejected")
    assert (rejected["dimension"], rejected["scope"], rejected["limit"]) == ("requests", "team", 2)
    # The gauges show the tightest limit: the team's 2, not the key's own 100.
    admitted = of_type(member_events, "admitted")[-1]
    assert admitted["usage"]["requests"]["limit"] == 2


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


# --- Origin: which browser pages may open the feed --------------------------------------------


@asynccontextmanager
async def handshake(
    node: Node, origins: list[str], token: str = "sk-alpha"
) -> AsyncIterator[WebSocketConnection]:
    """A websocket client sending ``Host: 127.0.0.1:PORT`` (as a browser does) and these
    ``Origin`` headers."""
    host = node.url.removeprefix("http://")
    hostname, port = host.split(":")
    stream = await trio.open_tcp_stream(hostname, int(port))
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    headers += [(b"Origin", origin.encode()) for origin in origins]
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery, stream, host, "/v1/usage/stream", extra_headers=headers
        )
        try:
            yield ws
        finally:
            await ws.aclose()
            nursery.cancel_scope.cancel()


async def refused_origin(node: Node, origins: list[str]) -> dict[str, Any]:
    """The 403's body, asserting the handshake got a 403 and no websocket."""
    try:
        async with handshake(node, origins):
            raise AssertionError("the websocket was accepted")
    except* ConnectionRejected as group:
        (rejected,) = group.exceptions
    assert isinstance(rejected, ConnectionRejected)
    assert rejected.status_code == 403
    headers = {k.decode().lower(): v.decode() for k, v in rejected.headers}
    assert headers["content-type"] == "application/json"
    assert rejected.body is not None
    body = json.loads(rejected.body)
    assert body["error"]["code"] == "origin_not_allowed"
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body


async def test_only_the_nodes_own_origin_and_allowed_ones_may_open_the_feed() -> None:
    settings = settings_for(allowed_origins=["https://Dash.Example.com"])
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings) as node:
            own = node.url  # http://127.0.0.1:PORT: the dashboard's own origin
            for origins in ([own], [own + "/"], ["https://dash.example.com"], []):
                async with handshake(node, origins) as ws:
                    assert (await next_event(ws))["type"] == "ready", origins
            port = int(node.url.rsplit(":", 1)[1])
            for origins in (
                ["https://evil.example"],
                [f"http://127.0.0.1:{port + 1}"],  # another port is another origin
                ["http://dash.example.com"],  # another scheme than the one allowed
                ["null"],  # a sandboxed frame, a file:// page
                [own, "https://evil.example"],  # two: ambiguous
            ):
                body = await refused_origin(node, origins)
                assert "allowed_origins" in body["error"]["message"], origins
            assert not node.feed.subscribers


def test_allowed_origins_are_validated() -> None:
    assert settings_for(allowed_origins=["http://a.example:8080"]).feed.allowed_origins == {
        "http://a.example:8080"
    }
    assert settings_for().feed.allowed_origins == frozenset()
    for bad in (
        "https://a.example",  # not a list
        ["https://a.example/path"],
        ["ftp://a.example"],
        ["a.example"],
        ["https://user@a.example"],
        ["https://a.example:99999"],
        [7],
    ):
        with pytest.raises(ConfigError, match=r"<test>: feed\.allowed_origins: "):
            settings_for(allowed_origins=bad)


async def test_settled_events_carry_the_money_reserved_and_spent() -> None:
    config = {
        "prices": {"gpt-4o": {"input": 1.0, "output": 1.0}},  # micro-units = tokens
        "keys": [{"key": "sk-spender", "name": "spender", "spend_per_day": 1.0}],
    }
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings_for(config)) as node:
            async with subscriber(node.ws_url, "sk-spender") as ws, httpx.AsyncClient() as client:
                await next_event(ws)
                answer = await chat(client, node.url, "sk-spender", max_tokens=60)
                assert answer.status_code == 200
                events = await collect(ws, lambda ev: len(of_type(ev, "settled")) == 1)
    (settled,) = of_type(events, "settled")
    usage = answer.json()["usage"]
    assert settled["reserved_spend"] == usage["prompt_tokens"] + 60
    assert settled["spend"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_events_name_the_end_user_and_a_per_user_refusals_scope() -> None:
    """The key's subscriber sees which of its end users each event is about (from the
    body or the configured header), and a refusal by a per-user limit says so."""
    config = {
        "limits": {"user_header": "X-End-User"},
        "keys": [{"key": "sk-app", "name": "app", "per_user": {"rpm": 1}}],
    }
    with trio.fail_after(TEST_TIMEOUT):
        async with running_node(settings_for(config)) as node:
            async with subscriber(node.ws_url, "sk-app") as ws, httpx.AsyncClient() as client:
                await next_event(ws)
                assert (await chat(client, node.url, "sk-app", user="alice")).status_code == 200
                assert (await chat(client, node.url, "sk-app", user="alice")).status_code == 429
                by_header = await client.post(
                    f"{node.url}/v1/chat/completions",
                    headers={"Authorization": "Bearer sk-app", "X-End-User": "bob"},
                    json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20},
                )
                assert by_header.status_code == 200
                events = await collect(ws, lambda ev: len(of_type(ev, "settled")) == 2)
    traffic = of_type(events, "admitted", "rejected", "settled")
    assert [(e["type"], e.get("user")) for e in traffic] == [
        ("admitted", "alice"),
        ("settled", "alice"),
        ("rejected", "alice"),
        ("admitted", "bob"),
        ("settled", "bob"),
    ]
    (rejected,) = of_type(events, "rejected")
    assert (rejected["scope"], rejected["dimension"], rejected["limit"]) == ("user", "requests", 1)


async def test_events_of_a_request_naming_nobody_carry_no_user(node: Node) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with subscriber(node.ws_url, "sk-alpha") as ws, httpx.AsyncClient() as client:
            await next_event(ws)
            assert (await chat(client, node.url, "sk-alpha")).status_code == 200
            events = await collect(ws, lambda ev: len(of_type(ev, "settled")) == 1)
    assert all("user" not in e for e in of_type(events, "admitted", "settled"))

"""The live usage feed's node and clients: a real node in one process (the app under
hypercorn on a free port of 127.0.0.1, the memory store unless a test gives another) and
real websocket clients of a node's feed (trio-websocket), for the feed tests
(tests/observe/test_feed_*.py) and every test that watches a node through its feed.

:func:`running_node` runs a node of :func:`settings_for` (:data:`CONFIG`: two roomy keys,
a tiny one, the admin token :data:`ADMIN`); :func:`subscriber` opens a websocket to a
feed; :func:`next_events` reads a message's events and asserts no secret of
:data:`SECRETS` is in it; :func:`chat` sends a chat completion. Each test bounds its
waits with ``trio.fail_after(TEST_TIMEOUT)``.
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
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from drivers.memory import MemoryStore
from tokenguard.api.app import create_app
from tokenguard.cluster.node import hypercorn_config
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import Settings
from tokenguard.observe.feed import Feed
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

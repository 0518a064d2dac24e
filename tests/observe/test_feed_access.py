"""Who may open the live usage feed and what each sees: a key's subscriber sees its own
events, in order, and nothing else; the admin sees every key and may filter; the token
comes in the header or in a first message; anything else is closed with 1008 before a
single event; only the node's own origin and allowed ones may open it from a browser. In
one process, on the memory driver: a real node, real websocket clients, real HTTP
requests (tests/support/usage_feed.py). Every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, wrap_client_stream

from tests.support.usage_feed import (
    ADMIN,
    CONFIG,
    TEST_TIMEOUT,
    Node,
    chat,
    collect,
    next_event,
    of_type,
    refused_code,
    running_node,
    settings_for,
    subscriber,
)
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import ADMIN_TOKEN_ENV, ConfigError
from tokenguard.observe import feed_session

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

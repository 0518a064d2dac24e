"""The usage feed before authentication, against a real node process.

A bad first message on ``/v1/usage/stream`` (too long, too deep, not JSON, not the auth
message, an unknown key) closes the socket unparsed with one log line, never a
traceback, and the node stays healthy.
"""

from __future__ import annotations

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.support.hostile_node import Node, hostile_node_fixture

node = hostile_node_fixture()  # its log is checked when the module is done


# --- the usage feed before authentication -------------------------------------------------

FEED_CASES = [
    # id, first message, close code
    ("longer than the auth cap", "x" * 8_000, 1008),
    ("far longer: hypercorn's cap", "x" * 1_000_000, 1009),
    ("deep nesting under the cap", "[" * 4_000, 1008),
    ("deep nesting far past the cap", "[" * 200_000, 1009),
    ("not JSON", "sk-h", 1008),
    ("a JSON array", '["auth", "sk-h"]', 1008),
    ("another type", '{"type": "hello", "token": "sk-h"}', 1008),
    ("a token that is not a string", '{"type": "auth", "token": 5}', 1008),
    ("a lone surrogate", '{"type": "auth", "token": "\\ud800"}', 1008),
    ("duplicate keys", '{"type": "auth", "token": "sk-h", "token": "x"}', 1008),
    ("bytes that are not UTF-8", b'{"type": "auth", "token": "\xff"}', 1008),
    ("an unknown key", '{"type": "auth", "token": "sk-unknown"}', 1008),
]


@pytest.mark.parametrize(
    ("message", "code"), [c[1:] for c in FEED_CASES], ids=[c[0] for c in FEED_CASES]
)
async def test_the_feed_closes_bad_first_messages_unparsed_with_one_line(
    node: Node, message: str | bytes, code: int
) -> None:
    url = f"ws://127.0.0.1:{node.port}/v1/usage/stream"
    with trio.fail_after(15):
        async with open_websocket_url(url, message_queue_size=1) as ws:
            try:
                await ws.send_message(message)
            except ConnectionClosed:
                pass  # hypercorn closed it before the whole message was sent
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == code
    if code == 1008:
        assert "closed a websocket before authentication" in node.log()
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(f"{node.url}/healthz")).status_code == 200

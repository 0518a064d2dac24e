"""The Redis driver's own connections (drivers/redis.py ``_Wire``, ``reply_reader``): the
RESP replies they read, whole or in pieces, and a real standalone Redis served through
them (the rest of tests/drivers covers restarts, timeouts, passwords and NOSCRIPT).
Every I/O test is bounded by ``trio.fail_after``."""

from __future__ import annotations

from typing import Any

import pytest
import redis.exceptions
import trio

from drivers.redis import RedisStore, pack_command, reply_reader
from tests.support.redis_servers import RedisServer
from tokenguard.store.window_store import StoreError, open_store


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"$5\r\n1 2 3\r\n", b"1 2 3"),
        (b"$0\r\n\r\n", b""),
        (b"$-1\r\n", None),
        (b":42\r\n", 42),
        (b":-7\r\n", -7),
        (b"+OK\r\n", b"OK"),
        (b"*2\r\n:1\r\n$2\r\nab\r\n", [1, b"ab"]),
        (b"*0\r\n", []),
        (b"*-1\r\n", None),
    ],
)
def test_replies_parse_whole_and_never_from_a_piece(wire: bytes, expected: Any) -> None:
    for cut in range(len(wire)):
        reader = reply_reader()
        reader.feed(wire[:cut])
        assert reader.gets() is False  # not all in yet
        reader.feed(wire[cut:] + b":9\r\n")
        assert reader.gets() == expected
        assert reader.gets() == 9


def test_error_replies_are_redis_py_exceptions() -> None:
    reader = reply_reader()
    reader.feed(b"-NOSCRIPT No matching script.\r\n-ERR bad thing\r\n")
    reply = reader.gets()
    assert isinstance(reply, redis.exceptions.NoScriptError)
    reply = reader.gets()
    assert type(reply) is redis.exceptions.ResponseError
    assert str(reply) == "bad thing"
    reader.feed(b"?what\r\n")
    with pytest.raises(redis.exceptions.InvalidResponse):
        reader.gets()


def test_commands_pack_as_resp() -> None:
    assert pack_command(b"PUBLISH", b"ch", b"a\r\nb") == (
        b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$4\r\na\r\nb\r\n"
    )


async def test_a_standalone_store_publishes_on_its_own_connection(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    assert store._publish_wire is not None  # standalone, no TLS: trio's own sockets
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            received: list[bytes] = []
            async with store.subscribe("test-wire") as messages:
                # A big message (several reads), in order with the next ones.
                await store.publish("test-wire", [b"x" * 200_000, b"second"])
                await store.publish("test-wire", [b"third"])
                async for message in messages:
                    received.append(message)
                    if len(received) == 3:
                        break
            assert received == [b"x" * 200_000, b"second", b"third"]
            nursery.cancel_scope.cancel()


async def test_a_subscription_comes_back_after_a_redis_restart(
    extra_redis_server: RedisServer,
) -> None:
    """The subscription's own connection is lost with the server, re-established with
    backoff once it is back; publishing (its own connection too) works again."""
    with trio.fail_after(30):
        async with open_store(extra_redis_server.url + "?timeout=0.5") as store:
            async with store.subscribe("test-restart") as messages:
                await store.publish("test-restart", [b"before"])
                assert await messages.receive() == b"before"  # type: ignore[attr-defined]
                extra_redis_server.stop()
                with pytest.raises(StoreError):
                    await store.publish("test-restart", [b"lost"])
                extra_redis_server.start()
                # Published until the subscription is back (messages meanwhile are lost).
                while True:
                    try:
                        await store.publish("test-restart", [b"after"])
                    except StoreError:
                        pass  # the first use of the publishing connection after it
                    with trio.move_on_after(0.2):
                        assert await messages.receive() == b"after"  # type: ignore[attr-defined]
                        break

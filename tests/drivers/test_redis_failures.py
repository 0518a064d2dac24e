"""The Redis driver when the server fails or is reached otherwise, against real redis-servers.

An unreachable server fails ``run``; a lost server gives store errors, then recovers; a
hung one times out as a store error; passwords, unix sockets and Sentinel; a master
without its replicas refusing writes consumes nothing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from bench.ports import free_ports
from drivers.redis import (
    RedisStore,
)
from tests.support.redis_rows import TEST_TIMEOUT, a_row
from tests.support.redis_sentinels import start_redis_sentinel
from tests.support.redis_servers import RedisServer, running_redis_server
from tokenguard.store.window_store import StoreError, open_store

# --- failures ------------------------------------------------------------------------------


async def test_an_unreachable_server_fails_run_with_store_error() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        store = RedisStore.from_url(f"redis://127.0.0.1:{free_ports()}/0?timeout=0.5")
        async with trio.open_nursery() as nursery:
            with pytest.raises(StoreError, match="cannot use Redis"):
                await nursery.start(store.run)


async def test_a_lost_server_gives_store_errors_then_recovers(
    extra_redis_server: RedisServer,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(extra_redis_server.url + "?timeout=0.5") as store:
            admission = await store.admit("p", [a_row(amount=2)])
            assert admission.admitted

            extra_redis_server.stop()
            with trio.fail_after(3):
                with pytest.raises(StoreError):
                    await store.admit("p", [a_row()])
                with pytest.raises(StoreError):
                    await store.usage("p", [a_row()])
                with pytest.raises(StoreError):
                    await store.settle(admission.reservation, [-1])

            extra_redis_server.start()  # same port, empty (no persistence), no scripts
            after = await store.admit("p", [a_row(amount=5)])
            assert after.admitted
            assert after.states[0].used == 5


async def test_a_hung_server_times_out_as_store_error(extra_redis_server: RedisServer) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(extra_redis_server.url + "?timeout=0.2") as store:
            assert (await store.admit("p", [a_row()])).admitted
            assert extra_redis_server.process is not None
            pid = extra_redis_server.process.pid
            os.kill(pid, signal.SIGSTOP)  # alive, connected, silent
            try:
                with pytest.raises(StoreError, match="[Tt]imeout"):
                    await store.admit("p", [a_row()])
            finally:
                os.kill(pid, signal.SIGCONT)
            assert (await store.admit("p", [a_row()])).admitted


async def test_a_wrong_password_fails_run_and_a_right_one_works(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with running_redis_server(
            tmp_path / "auth", extra_args=("--requirepass", "s3cret")
        ) as server:
            url = f"redis://:s3cret@{server.host}:{server.port}/1"
            async with open_store(url) as store:
                assert store.url == f"redis://:***@{server.host}:{server.port}/1"
                assert (await store.admit("p", [a_row()])).admitted
            wrong = RedisStore.from_url(f"redis://:nope@{server.host}:{server.port}/1")
            async with trio.open_nursery() as nursery:
                with pytest.raises(StoreError, match="cannot use Redis"):
                    await nursery.start(wrong.run)
            with server.client(password="s3cret", db=1) as client:
                assert client.dbsize() == 1


async def test_a_unix_socket_server_works(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with running_redis_server(tmp_path / "sock", unix_socket=True) as server:
            assert server.url.startswith("unix://")
            async with open_store(server.url) as store:
                assert (await store.admit("p", [a_row(amount=2)])).admitted
                assert (await store.usage("p", [a_row()]))[0].used == 2


async def test_sentinel_finds_the_master(extra_redis_server: RedisServer, tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        sentinel = start_redis_sentinel(tmp_path / "sentinel", extra_redis_server, "tg")
        try:
            url = f"redis+sentinel://{sentinel.host}:{sentinel.port}/tg/0"
            async with open_store(url) as store:
                assert (await store.admit("p", [a_row(amount=3)])).admitted
            with extra_redis_server.client() as client:
                assert client.dbsize() == 1  # the counter landed on the master
        finally:
            sentinel.stop()


async def test_a_master_without_its_replicas_refusing_writes_consumes_nothing(
    extra_redis_server: RedisServer,
) -> None:
    """``min-replicas-to-write`` (docs/redis.md: it bounds what a failover can lose): a
    master with fewer live replicas refuses every write with NOREPLICAS. The admission is
    a StoreError (the node's failure policy answers it) and nothing is consumed; reads
    still work; once the master accepts writes again, so does the store."""
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(extra_redis_server.url) as store:
            assert (await store.admit("p", [a_row(amount=2)])).admitted
            with extra_redis_server.client() as client:
                client.config_set("min-replicas-to-write", 1)  # and there is none
            with pytest.raises(StoreError, match="NOREPLICAS"):
                await store.admit("p", [a_row(amount=5)])
            assert (await store.usage("p", [a_row()]))[0].used == 2
            with extra_redis_server.client() as client:
                client.config_set("min-replicas-to-write", 0)
            assert (await store.admit("p", [a_row(amount=5)])).admitted
            assert (await store.usage("p", [a_row()]))[0].used == 7

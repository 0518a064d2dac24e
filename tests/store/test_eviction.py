"""The store server's eviction policy, reported: the Redis driver reads
``maxmemory-policy`` at start and after a reconnect; one that can evict the registry or
the window counters is a warning in the log, and shows on ``/readyz`` and ``/metrics``.

Real redis-servers, started with the policy on their command line (or with ``CONFIG``
renamed away, as managed Redis services refuse it), the real driver in process, and a
real node process.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from drivers.redis import RedisStore
from tests.support.metrics_samples import parse, value
from tests.support.processes import free_ports, running_tokenguard, wait_healthy, write_config
from tests.support.redis_servers import RedisServer, running_redis_server
from tokenguard.store.rows import Row
from tokenguard.store.window_store import StoreError, evictable, open_store

TEST_TIMEOUT = 30.0


@pytest.mark.parametrize(
    ("policy", "evicts"),
    [
        ("noeviction", ()),
        ("volatile-lru", ("windows",)),
        ("volatile-ttl", ("windows",)),
        ("allkeys-lru", ("registry", "windows")),
        ("allkeys-random", ("registry", "windows")),
        ("unknown", None),
    ],
)
def test_what_each_policy_may_evict(policy: str, evicts: tuple[str, ...] | None) -> None:
    assert evictable(policy) == evicts


@pytest.mark.parametrize(
    ("policy", "warning"),
    [
        ("noeviction", None),
        ("volatile-lru", "can evict windows"),
        ("allkeys-lru", "can evict registry and windows"),
    ],
)
async def test_the_driver_reads_the_policy_at_start_and_warns_of_evictions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, policy: str, warning: str | None
) -> None:
    caplog.set_level(logging.INFO, "drivers.redis")
    with (
        trio.fail_after(TEST_TIMEOUT),
        running_redis_server(tmp_path, extra_args=("--maxmemory-policy", policy)) as server,
    ):
        async with open_store(RedisStore.from_url(server.url)) as store:
            assert store.eviction_policy == policy
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warning is None:
        assert not any("maxmemory-policy" in w for w in warnings), warnings
    else:
        assert any(warning in w and policy in w for w in warnings), warnings


async def test_a_server_that_refuses_config_gives_unknown_not_an_error(tmp_path: Path) -> None:
    """Managed Redis services refuse ``CONFIG``: the policy is "unknown" and the store
    works."""
    with (
        trio.fail_after(TEST_TIMEOUT),
        running_redis_server(tmp_path, extra_args=("--rename-command", "CONFIG", "")) as server,
    ):
        async with open_store(RedisStore.from_url(server.url)) as store:
            assert store.eviction_policy == "unknown"
            row = Row("key:e", "requests", 60_000, 5_000, 10, 1)
            assert (await store.admit("e", [row])).admitted


async def test_the_policy_is_read_again_after_a_reconnect(extra_redis_server: RedisServer) -> None:
    """Redis restarted, on the same port, with another policy: once the driver has
    reconnected (a call made), it reads the new one."""
    row = Row("key:e", "requests", 60_000, 5_000, 1000, 1)
    with trio.fail_after(TEST_TIMEOUT):
        async with open_store(RedisStore.from_url(extra_redis_server.url)) as store:
            assert store.eviction_policy == "noeviction"
            extra_redis_server.stop()
            extra_redis_server.extra_args = ("--maxmemory-policy", "allkeys-lfu")
            await trio.to_thread.run_sync(extra_redis_server.start)
            while True:
                try:
                    await store.admit("e", [row])
                    break
                except StoreError:  # (the stale connection, then a fresh one)
                    await trio.sleep(0.05)
            while store.eviction_policy != "allkeys-lfu":  # noqa: ASYNC110
                await trio.sleep(0.05)


async def test_a_node_on_an_allkeys_policy_reports_it_in_log_readyz_and_metrics(
    workdir: Path,
) -> None:
    with (
        trio.fail_after(TEST_TIMEOUT * 2),
        running_redis_server(
            workdir / "redis", extra_args=("--maxmemory-policy", "allkeys-lru")
        ) as server,
    ):
        config = write_config(workdir / "c.toml", '[[keys]]\nkey = "sk-e"\nname = "e"\nrpm = 9\n')
        port = free_ports(1)
        args = ["serve", "--store", server.url, "--config", str(config), "--port", str(port)]
        async with running_tokenguard(args, output_path=workdir / "node.out") as node:
            url = f"http://127.0.0.1:{port}"
            await wait_healthy(url)
            async with httpx.AsyncClient(timeout=10) as client:
                ready = await client.get(f"{url}/readyz")
                metrics = parse((await client.get(f"{url}/metrics")).text)
            output = node.output()
    assert ready.status_code == 200  # a warning, not unreadiness
    body = ready.json()
    assert body["eviction_policy"] == "allkeys-lru"
    assert body["evictable"] == ["registry", "windows"]
    info = value(
        metrics,
        "tokenguard_store_eviction_policy_info",
        policy="allkeys-lru",
        evicts="registry,windows",
    )
    assert info == 1.0
    assert "WARNING" in output and "maxmemory-policy allkeys-lru can evict registry" in output

"""The stores of the window-store contract suite: every test of tests/drivers/ that asks
for ``harness`` runs once on each driver.

``driver`` is parametrised over ``memory`` (on a fake clock the test moves), ``redis``
(the session's redis-server) and ``redis-cluster`` (the session's 3-master cluster);
``harness`` opens a store of it for one test. The servers are the session's
(tests/conftest.py): they start once per session (per xdist worker) and are flushed
before every test, so each test starts on empty servers. A new driver is added to
``driver``'s parameters; every file of the suite then runs on it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from drivers.memory import MemoryStore
from drivers.redis import RedisStore
from tests.support.redis_servers import RedisClusterServers, RedisServer
from tests.support.window_harness import START_MS, Driver, FakeClock, Harness
from tokenguard.store.window_store import open_store


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    if request.param == "memory":
        clock = FakeClock(START_MS)
        yield Driver("memory", lambda: MemoryStore(clock=clock), clock=clock)
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        yield Driver("redis", lambda: RedisStore.from_url(server.url), servers=[server])
    else:
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        yield Driver(
            "redis-cluster", lambda: RedisStore.from_url(cluster.url), servers=cluster.servers
        )


@pytest.fixture
async def harness(driver: Driver) -> AsyncIterator[Harness]:
    # Opening is bounded by the driver itself (1 s socket timeouts for Redis).
    async with open_store(driver.make_store()) as running:
        yield Harness(driver, running)

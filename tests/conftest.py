"""Shared fixtures: real Redis servers for the tests (see tests/support/redis_servers.py
and tests/support/redis_clusters.py).

* ``redis_url`` (session): one standalone redis-server, ``redis://127.0.0.1:PORT/0``.
* ``redis_cluster_url`` (session): a 3-master Redis Cluster,
  ``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3``.
* ``redis_server`` / ``redis_cluster`` (session): the same, as objects (ports, clients).
* ``extra_redis_server`` (function): a standalone server of the test's own, which the
  test may stop, kill and start again; always stopped at teardown.

Every test starts with empty servers: an autouse fixture runs FLUSHALL on every session
server started so far (on every primary of the cluster). Servers start only when a test
asks for them, and are always stopped at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import short_tmp_dir
from tests.support.redis_clusters import running_redis_cluster
from tests.support.redis_servers import RedisClusterServers, RedisServer, running_redis_server


@pytest.fixture(scope="session")
def _session_redis() -> list[RedisServer | RedisClusterServers]:
    """The session's servers started so far, for flushing between tests."""
    return []


@pytest.fixture(scope="session")
def redis_server(
    tmp_path_factory: pytest.TempPathFactory,
    _session_redis: list[RedisServer | RedisClusterServers],
) -> Iterator[RedisServer]:
    with running_redis_server(tmp_path_factory.mktemp("redis")) as server:
        _session_redis.append(server)
        yield server
        _session_redis.remove(server)


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    _session_redis: list[RedisServer | RedisClusterServers],
) -> Iterator[RedisClusterServers]:
    with running_redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        _session_redis.append(cluster)
        yield cluster
        _session_redis.remove(cluster)


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    return redis_cluster.url


@pytest.fixture(autouse=True)
def _fresh_redis(_session_redis: list[RedisServer | RedisClusterServers]) -> None:
    # Before the test, not after: a server started by this very test is empty anyway,
    # and a failed test leaves its data for inspection until the next one.
    for server in _session_redis:
        server.flushall()


@pytest.fixture
def extra_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A standalone server for one test, free to be stopped and started again."""
    with running_redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short temporary directory (unix socket paths must stay under 108 bytes)."""
    with short_tmp_dir() as path:
        yield path

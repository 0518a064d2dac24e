"""Real Redis Sentinels for the tests: one Sentinel, or a master, a replica and a Sentinel.

:func:`start_redis_sentinel` starts a Sentinel (quorum 1) that knows its master from its
config at once; :func:`running_redis_sentinel_group` starts a master, a replica synced
with it and a Sentinel that knows the replica, and stops them all whatever happens.
Every server is a :class:`~tests.support.redis_servers.RedisServer`, stopped as it
guarantees.

Raises ``RuntimeError`` (with the server's log) when a server cannot be started.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from bench.ports import free_ports
from tests.support.redis_servers import (
    START_TIMEOUT,
    RedisServer,
    ServerExited,
    start_redis_server,
    wait_replicated,
)
from tokenguard.cluster.redis_server import RedisServerSpec


def start_redis_sentinel(
    directory: Path,
    master: RedisServer,
    service_name: str = "mymaster",
    attempts: int = 5,
    *,
    down_after_ms: int = 5000,
    failover_timeout_ms: int | None = None,
) -> RedisServer:
    """Start a Sentinel on a free port, monitoring ``master`` as ``service_name`` (quorum
    1). It knows the master from its config at once, so clients can use it right away.

    It deems the master down after ``down_after_ms`` without an answer, and (being the
    only Sentinel, quorum 1) then fails it over to a replica; ``failover_timeout_ms``
    (Sentinel's default, 3 minutes, when None) bounds a failover attempt and spaces
    retries. It learns the master's replicas from the master's INFO (see
    :func:`wait_sentinel_knows_replica`).
    """
    failover = (
        ""
        if failover_timeout_ms is None
        else f"sentinel failover-timeout {service_name} {failover_timeout_ms}\n"
    )
    last_error: RuntimeError | None = None
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        spec = RedisServerSpec(state_dir=directory, port=free_ports(), appendonly=False)
        config = directory / "sentinel.conf"
        # Sentinel rewrites its config file, so it must be a writable file of its own.
        config.write_text(
            f"port {spec.port}\n"
            f"bind {spec.bind}\n"
            f"dir {directory}\n"
            f"sentinel monitor {service_name} {master.host} {master.port} 1\n"
            f"sentinel down-after-milliseconds {service_name} {down_after_ms}\n"
            f"{failover}"
        )
        server = RedisServer(spec=spec, sentinel_config=config)
        try:
            server.start()
            return server
        except ServerExited as exc:
            last_error = exc
    raise RuntimeError(f"could not start redis sentinel in {attempts} attempts") from last_error


def wait_sentinel_knows_replica(
    sentinel: RedisServer, service_name: str, replica: RedisServer, timeout: float = START_TIMEOUT
) -> None:
    """Block until ``sentinel`` lists ``replica`` as a healthy replica of ``service_name``
    (so a failover can promote it); ``RuntimeError`` if not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with sentinel.client() as client:
        while True:
            known = client.sentinel_slaves(service_name)
            if any(
                r["port"] == replica.port
                and not (r["is_sdown"] or r["is_odown"] or r["is_disconnected"])
                and r.get("master-link-status") == "ok"
                for r in known
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel does not know replica {replica.url}: {known}")
            time.sleep(0.02)


@attrs.define
class RedisSentinelGroup:
    """A master, one replica of it and a Sentinel monitoring the master (quorum 1)."""

    master: RedisServer
    replica: RedisServer
    sentinel: RedisServer
    service_name: str

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:PORT/SERVICE/0``: the store URL for this group."""
        return f"redis+sentinel://{self.sentinel.host}:{self.sentinel.port}/{self.service_name}/0"

    def master_address(self) -> tuple[str, int]:
        """Where the Sentinel says the master is now (it changes once a failover ends)."""
        with self.sentinel.client() as client:
            host, port = client.sentinel_get_master_addr_by_name(self.service_name)
        return host.decode() if isinstance(host, bytes) else host, int(port)

    def stop(self) -> None:
        """Stop every process (the Sentinel first: it then reconfigures nothing)."""
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


@contextlib.contextmanager
def running_redis_sentinel_group(
    directory: Path,
    service_name: str = "mymaster",
    *,
    down_after_ms: int = 5000,
    failover_timeout_ms: int | None = None,
) -> Iterator[RedisSentinelGroup]:
    """A master, a replica in sync with it, and a Sentinel (see
    :func:`start_redis_sentinel`) that already knows the replica, so it can fail over
    at once; every process is stopped at the end, whatever happens.

    The Sentinel starts last: it learns replicas from the master's INFO, which it reads
    on connecting and then only every 10 s.
    """
    servers: list[RedisServer] = []
    try:
        master = start_redis_server(directory / "master")
        servers.append(master)
        replica = start_redis_server(directory / "replica", replicaof=master)
        servers.append(replica)
        wait_replicated(master, replica)
        sentinel = start_redis_sentinel(
            directory / "sentinel",
            master,
            service_name,
            down_after_ms=down_after_ms,
            failover_timeout_ms=failover_timeout_ms,
        )
        servers.insert(0, sentinel)
        wait_sentinel_knows_replica(sentinel, service_name, replica)
        yield RedisSentinelGroup(master, replica, sentinel, service_name)
    finally:
        for server in servers:
            server.stop()

"""Real Redis Clusters for the tests: 3 masters, with or without a replica per master.

:func:`start_redis_cluster` returns only once every node reports ``cluster_state:ok``
and knows every other node; :func:`start_redis_cluster_with_replicas` also waits until
every replica is known to every node and has synced with its master. Every server is a
:class:`~tests.support.redis_servers.RedisServer`, stopped as it guarantees.

Raises ``RuntimeError`` (with the servers' logs) when the cluster cannot be started.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from tests.support.redis_servers import (
    RedisClusterServers,
    RedisServer,
    replication,
    start_redis_server,
    wait_replicated,
)
from tokenguard.cluster.redis_server import find_redis_binary

CLUSTER_TIMEOUT = 30.0


def _cluster_ready(servers: Sequence[RedisServer]) -> bool:
    for server in servers:
        info = server.command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line and line.strip()
        )
        if fields.get("cluster_state") != "ok":
            return False
        if int(fields.get("cluster_known_nodes", 0)) != len(servers):
            return False
    return True


def _create_cluster(servers: Sequence[RedisServer], *, replicas: int) -> None:
    """Join cluster-enabled ``servers`` into one cluster with ``redis-cli --cluster
    create`` (``replicas`` per master); ``RuntimeError`` with its output if it fails."""
    create = subprocess.run(
        [
            find_redis_binary("redis-cli"),
            "--cluster",
            "create",
            *(f"{s.host}:{s.port}" for s in servers),
            "--cluster-replicas",
            str(replicas),
            "--cluster-yes",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=CLUSTER_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    if create.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}")


def _joined_cluster(
    directory: Path, masters: int, *, replicas: int = 0, extra_args: Sequence[str] = ()
) -> list[RedisServer]:
    """Start ``masters * (1 + replicas)`` cluster-enabled servers (``extra_args`` on each
    command line) and join them with ``redis-cli --cluster create``; return them once
    every node says ``cluster_state:ok`` and, with replicas, every replica is known and
    linked. Every server is stopped if that fails."""
    servers: list[RedisServer] = []
    try:
        for i in range(masters * (1 + replicas)):
            servers.append(
                start_redis_server(directory / f"node{i}", cluster=True, extra_args=extra_args)
            )
        _create_cluster(servers, replicas=replicas)
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        while not (
            _cluster_ready(servers)
            and (not replicas or _replicas_linked(servers, masters * replicas))
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ready after {CLUSTER_TIMEOUT} s")
            time.sleep(0.05)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def start_redis_cluster(directory: Path, masters: int = 3) -> RedisClusterServers:
    """Start ``masters`` cluster-enabled servers and join them with ``redis-cli --cluster
    create`` (no replicas); return once every node says ``cluster_state:ok``."""
    return RedisClusterServers(servers=_joined_cluster(directory, masters))


@contextlib.contextmanager
def running_redis_cluster(directory: Path, masters: int = 3) -> Iterator[RedisClusterServers]:
    """:func:`start_redis_cluster` for the duration of the ``with``; always stopped."""
    cluster = start_redis_cluster(directory, masters)
    try:
        yield cluster
    finally:
        cluster.stop()


@attrs.frozen
class ClusterNodeLine:
    """One line of ``CLUSTER NODES``: who a node is, as some node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None  # the master it replicates, if a replica
    slots: tuple[tuple[int, int], ...]  # (first, last) ranges it serves, if a master

    @classmethod
    def parse(cls, line: str) -> ClusterNodeLine:
        node_id, address, flags, master, *_ = fields = line.split()
        ranges = []
        for item in fields[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            first, _, last = item.partition("-")
            ranges.append((int(first), int(last or first)))
        return cls(
            node_id=node_id,
            port=int(address.split("@")[0].rsplit(":", 1)[1]),
            flags=frozenset(flags.split(",")),
            master_id=None if master == "-" else master,
            slots=tuple(ranges),
        )


def cluster_nodes(server: RedisServer) -> list[ClusterNodeLine]:
    """``CLUSTER NODES`` as ``server`` sees the cluster."""
    reply = server.command("CLUSTER", "NODES")
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return [ClusterNodeLine.parse(line) for line in text.splitlines() if line.strip()]


@attrs.define
class RedisReplicatedCluster:
    """A local Redis Cluster of masters, each with one replica: ``replicas[i]``
    replicates ``masters[i]``; ``masters`` are in slot order (the first serves slot 0)."""

    masters: list[RedisServer]
    replicas: list[RedisServer]

    @property
    def servers(self) -> list[RedisServer]:
        return [*self.masters, *self.replicas]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,...``: every node (masters and replicas) a seed."""
        return "redis+cluster://" + ",".join(f"{s.host}:{s.port}" for s in self.servers)

    def master_of_slot(self, slot: int) -> int:
        """The index (in ``masters``) of the master that served ``slot`` at the start."""
        for i, master in enumerate(self.masters):
            (me,) = [n for n in cluster_nodes(master) if "myself" in n.flags]
            if any(first <= slot <= last for first, last in me.slots):
                return i
        raise LookupError(f"no master serves slot {slot}")

    def is_master(self, server: RedisServer) -> bool:
        """True if ``server`` says it is a master now (a replica says so once promoted)."""
        return replication(server).get("role") == "master"

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _replicas_linked(servers: Sequence[RedisServer], replicas: int) -> bool:
    """True once every node knows ``replicas`` replicas, each of a master, and every
    replica has finished its first sync."""
    for server in servers:
        nodes = cluster_nodes(server)
        masters = {n.node_id for n in nodes if "master" in n.flags}
        known = [n for n in nodes if "slave" in n.flags and n.master_id in masters]
        if len(known) != replicas or any("fail" in n.flags or "fail?" in n.flags for n in nodes):
            return False
        info = replication(server)
        if info.get("role") == "slave" and info.get("master_link_status") != "up":
            return False
    return True


def start_redis_cluster_with_replicas(
    directory: Path, masters: int = 3, *, node_timeout_ms: int = 2000
) -> RedisReplicatedCluster:
    """Start ``masters`` masters and as many replicas (cluster-enabled servers, each with
    ``cluster-node-timeout`` ``node_timeout_ms``: a master unreachable that long is
    deemed failing, and its replica soon promoted), joined by ``redis-cli --cluster
    create --cluster-replicas 1``. Returns once every node says ``cluster_state:ok``,
    knows every other node and every replica is linked to its master and synced."""
    servers = _joined_cluster(
        directory,
        masters,
        replicas=1,
        extra_args=("--cluster-node-timeout", str(node_timeout_ms)),
    )
    try:
        # Who replicates whom, as the cluster says (redis-cli picks the pairs).
        by_port = {s.port: s for s in servers}
        nodes = cluster_nodes(servers[0])
        primaries = sorted((n for n in nodes if "master" in n.flags), key=lambda n: n.slots)
        replica_of = {n.master_id: by_port[n.port] for n in nodes if "slave" in n.flags}
        cluster = RedisReplicatedCluster(
            masters=[by_port[n.port] for n in primaries],
            replicas=[replica_of[n.node_id] for n in primaries],
        )
        for master, replica in zip(cluster.masters, cluster.replicas, strict=True):
            wait_replicated(master, replica)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return cluster


@contextlib.contextmanager
def running_redis_cluster_with_replicas(
    directory: Path, masters: int = 3, *, node_timeout_ms: int = 2000
) -> Iterator[RedisReplicatedCluster]:
    """:func:`start_redis_cluster_with_replicas` for the duration of the ``with``;
    every process always stopped."""
    cluster = start_redis_cluster_with_replicas(directory, masters, node_timeout_ms=node_timeout_ms)
    try:
        yield cluster
    finally:
        cluster.stop()

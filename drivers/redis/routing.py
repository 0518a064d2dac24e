"""Redis Cluster: a batch of calls routed by slot, one pipeline per node, redirects
followed (:class:`_ClusterRouting`, mixed into :class:`~drivers.redis.store.RedisStore`)."""

from __future__ import annotations

from typing import Any

import redis
import redis.exceptions
from redis.cluster import RedisCluster

from drivers.redis.batching import _Call
from drivers.redis.wire import _REDIS_ERRORS

# Redis errors that mean "this node does not own the slot (any more)": the cluster
# client's own execute_command follows the redirect and refreshes its slot table.
_REDIRECTS = (
    redis.exceptions.MovedError,
    redis.exceptions.AskError,
    redis.exceptions.TryAgainError,
)
# Replies after which a cluster's slot table is read again: a node is unreachable or
# the cluster is failing one over (CLUSTERDOWN until a replica is promoted).
_TOPOLOGY_CHANGING = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,
)


class _ClusterRouting:
    """The store's cluster batches."""

    def _send_cluster(
        self, cluster: RedisCluster, calls: list[_Call], packed: list[bytes], replies: list[Any]
    ) -> None:
        """Group the calls by the node owning their slot: one pipeline per node.

        redis-py's ClusterPipeline refuses ``evalsha()`` and, through
        ``execute_command``, asks the server for each command's keys (``COMMAND
        GETKEYS``, a round trip per call); the hash tag gives us the slot instead.
        Calls redirected unexecuted (MOVED, ASK, TRYAGAIN) are sent again one by one
        through the cluster client, which follows redirects and updates its slot table.
        After a connection error, a timeout or CLUSTERDOWN the slot table is read again
        before the next batch: a master may have died and a replica be promoted.
        """
        if self._refresh_topology:
            try:
                cluster.nodes_manager.initialize()
                self._refresh_topology = False
            except _REDIS_ERRORS as exc:
                replies[:] = [exc] * len(calls)
                return
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, call in enumerate(calls):
            try:
                node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(call.keys[0]))
            except _REDIS_ERRORS as exc:
                replies[i] = exc
                continue
            by_node.setdefault(node.name, (node, []))[1].append(i)
        groups = [
            (cluster.get_redis_connection(node).connection_pool, indexes)
            for node, indexes in by_node.values()
        ]
        self._send_groups(groups, calls, packed, replies)
        for i, reply in enumerate(replies):
            if isinstance(reply, _TOPOLOGY_CHANGING):
                # CLUSTERDOWN too: a refresh made while a master is failed but not yet
                # replaced read the old table, and without another one the next batch
                # went to the dead master again after the promotion (a closing probe's
                # write-back failed: the breaker closed 1 s late). Not sent again: the
                # cluster client would sleep 0.25 s in a flusher's thread, try once
                # more and fail; CLUSTERDOWN lasts until the promotion.
                self._refresh_topology = True
            elif isinstance(reply, _REDIRECTS):
                call = calls[i]
                self._count(round_trips=1)
                try:
                    replies[i] = cluster.execute_command(
                        "EVALSHA", call.script.sha, len(call.keys), *call.keys, call.argv
                    )
                except _REDIS_ERRORS as exc:
                    replies[i] = exc

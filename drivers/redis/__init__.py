"""The Redis window store: counters shared by every node, checked by Lua on the server.

Store URLs (see ``docs/redis.md``)::

    redis://[[user]:password@]host[:port][/db][?timeout=0.5]
    rediss://...                                   (TLS; ?ssl_ca_certs=, ?ssl_cert_reqs=)
    unix://[[user]:password@]/path/to.sock[?db=0]
    redis+sentinel://[[user]:password@]host[:port][,host2[:port2]]/service_name[/db]
    redis+cluster://[[user]:password@]host[:port][,host2[:port2]]

Guarantees:

* Same semantics as :mod:`drivers.memory`, to the millisecond: admission, settlement and
  usage are each ONE Lua script (``admit.lua``, ``settle.lua``, ``usage.lua``) run
  atomically by Redis, on the Redis server's own clock (``TIME``), so nodes with skewed
  clocks agree. An admission consumes every row or none.
* Every key of a partition is ``tg:{<partition>}:<row.counter>``: one hash tag, so an
  admission touches one slot and works unchanged on Redis Cluster. Partitions are key
  ids, never API keys. Each key expires when its newest bucket leaves the window.
* The trio event loop never blocks: redis-py's synchronous client runs in worker threads
  (at most ``pipelines`` of them, a :class:`trio.CapacityLimiter`), and the calls that
  arrive while round trips are in flight are coalesced into the next pipelines
  (auto-pipelining): ``calls`` and ``round_trips`` count both. The driver packs the
  ``EVALSHA`` commands itself and sends them on redis-py's pooled connections; on a
  standalone Redis without TLS (``redis://``, ``unix://``), each of the ``pipelines``
  has a connection of its own on trio's sockets instead (:class:`_Wire`: no thread hop
  per batch, which was most of an admission's latency and CPU).
* Scripts are loaded once and called by SHA; after ``NOSCRIPT`` (a restart, a failover,
  ``SCRIPT FLUSH``) they are loaded again and the call retried, unseen by callers.
* On Redis Cluster, a batch goes out as one pipeline per node that owns some of its
  slots, all at once; redirected calls are resent through redis-py's cluster client.
* Publish/subscribe is Redis pub/sub (``PUBLISH``/``SUBSCRIBE``; on a cluster, plain
  ``PUBLISH`` reaches the subscribers of every node), kept off the pipelines above:
  one publishing connection of its own (standalone without TLS: on trio's sockets;
  otherwise redis-py in a thread of its own), and per subscription its own connection
  read by a worker thread of its own, ``PUBSUB_POLL`` seconds at a time. A lost
  subscription is re-established with backoff (messages published meanwhile are lost);
  a subscription buffers at most ``SUBSCRIPTION_BUFFER`` messages, then drops new ones
  (``pubsub_dropped``).

* The registry (API keys and tiers, :mod:`tokenguard.limiting.keyring`) is one hash and a
  version counter under the hash tag ``{registry}``, written and read by
  ``registry_put.lua`` / ``registry_load.lua`` (atomic, one slot: Cluster-safe), sent
  with ``EVAL`` from a thread of its own, off the pipelines. No expiry.
* The server's ``maxmemory-policy`` is read (``CONFIG GET``) at start, again within
  ``EVICTION_POLL`` of the store answering after a lost connection (a restart, a
  failover), and every ``EVICTION_RECHECK`` seconds: ``eviction_policy``, ``"unknown"``
  when the server refuses to say. One that can evict counters or the registry
  (``volatile-*``, ``allkeys-*``: :func:`tokenguard.store.window_store.evictable`) is logged as a
  warning.

Raises:

* :class:`~tokenguard.store.window_store.StoreError` for every failure of Redis or of the network
  (connection refused or lost, timeouts, server errors, cluster down), from ``admit``,
  ``settle`` and ``usage``, and from :meth:`RedisStore.run` when the server cannot be
  reached at start. Socket timeouts default to 1 s (``?timeout=``).
* ``ValueError`` from :meth:`RedisStore.from_url` for a malformed URL.

A caller cancelled while its call is in flight does not un-send it: an admission may
then be consumed with nobody told (the app shields admissions for this reason). Calls
that may have run are never sent twice, except admissions after a dropped connection
(counted twice at worst: fewer admissions, never more); settlements never.

The package, concept by concept: :mod:`~drivers.redis.urls` (URLs, :class:`RedisTarget`),
:mod:`~drivers.redis.scripts` (the Lua in ``lua/``, keys, argument packing),
:mod:`~drivers.redis.wire` (RESP, pooled and trio connections),
:mod:`~drivers.redis.batching` (auto-pipelining, refunds),
:mod:`~drivers.redis.routing` (Redis Cluster slots), :mod:`~drivers.redis.pubsub`,
and :mod:`~drivers.redis.store` (:class:`RedisStore`).
"""

from drivers.redis.scripts import REGISTRY_RECORDS, REGISTRY_VERSION, key_name, key_prefix
from drivers.redis.store import RedisStore
from drivers.redis.urls import DEFAULT_TIMEOUT, SCHEMES, RedisTarget, parse_redis_url
from drivers.redis.wire import pack_command, reply_reader

__all__ = [
    "DEFAULT_TIMEOUT",
    "REGISTRY_RECORDS",
    "REGISTRY_VERSION",
    "SCHEMES",
    "RedisStore",
    "RedisTarget",
    "key_name",
    "key_prefix",
    "pack_command",
    "parse_redis_url",
    "reply_reader",
]

"""The live usage feed of one node: its events out to the cluster, the cluster's in to
its websocket subscribers.

Out: the request path calls :meth:`Feed.admitted`, :meth:`Feed.rejected` and
:meth:`Feed.settled`, which build their events (:mod:`tokenguard.observe.feed_events`)
and only append them to a bounded queue (they never await, never raise for a full
queue: past ``outgoing_limit`` the oldest queued events are dropped and counted in
``dropped_outgoing``). One publisher task drains the queue in batches, one
store message per batch (newline-separated JSON events), at most one batch per
``PUBLISH_SECONDS`` unless a full one waits, through
:meth:`~tokenguard.store.window_store.WindowStore.publish`, so every node sharing the store gets
them, this one included. Only while someone watches (:attr:`Feed.watched`): a node with
local subscribers announces it on the same channel at once and every
``PRESENCE_SECONDS``, and a node builds and publishes events only while it has local
subscribers or heard an announcement within ``PRESENCE_TTL``; otherwise the three calls
return at once. A new session sends ``ready`` once its node's announcement came back
through the store (:meth:`Feed.announced`), so events after ``ready`` are not missed
for want of presence; events from just before may be.

In: one subscription to the store's channel hands each event to the local subscribers
allowed to see it (:mod:`tokenguard.observe.subscriber`). Each subscriber has its own
backlog of at most ``backlog`` events; beyond it its oldest events are dropped, and the
next thing it takes is the count of them (sent as a ``lagged`` message). A slow
subscriber therefore costs a bounded amount of memory and never slows anyone else. A
snapshot task reads, every second, the usage of every key that had an event in the last
window (plus one bucket), and hands a ``snapshot`` to the local subscribers that see
that key.

Ordering: the events of one node reach every subscriber in the order that node produced
them (one publisher task, one message per batch, the store keeps a publisher's order).
Events of different nodes interleave in arrival order. Delivery is at most once.

One websocket session at ``/v1/usage/stream`` is
:func:`tokenguard.observe.feed_session.serve_websocket`'s. Event fields are documented
in ``docs/usage-feed.md``.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import secrets
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import trio

from tokenguard.config.settings import Settings
from tokenguard.limiting.keyring import Keyring
from tokenguard.limiting.limiter import Decision, Limiter
from tokenguard.limiting.usage import usage_by_dimension
from tokenguard.log_throttle import LogThrottle
from tokenguard.model import ApiKey, digest_of
from tokenguard.observe.feed_events import (
    admitted_events,
    dequeued_event,
    near_limit_events,
    now_ms,
    queued_event,
    rejected_event,
    settled_event,
)
from tokenguard.observe.subscriber import Subscriber, Viewer
from tokenguard.store.rows import RowState
from tokenguard.store.window_store import StoreError, WindowStore

log = logging.getLogger("tokenguard.observe.feed")

CHANNEL = "tokenguard:usage-feed"
# Events waiting to be published; past it the oldest are dropped (a store outage).
OUTGOING_LIMIT = 10_000
# Events per published message, at most.
PUBLISH_BATCH = 500
# At most one published message per PUBLISH_SECONDS (unless a full batch is waiting):
# under load the events of that time go out as one store message (one PUBLISH, one
# message for every node to read, one wakeup of each subscriber's session, one websocket
# message in batched mode; with 10 batched subscribers, ~0.2 ms of node CPU per request
# less than publishing at once). The first event after a quiet spell goes out at once;
# an event waits at most this long.
PUBLISH_SECONDS = 0.02
SNAPSHOT_SECONDS = 1.0
# Store reads in flight at once for one round of snapshots.
SNAPSHOT_READS = 8
RESUBSCRIBE_SECONDS = (0.1, 5.0)
# Presence: events are built and published only while someone in the cluster watches.
# A node with local subscribers announces it on the channel at once and then every
# PRESENCE_SECONDS; a node publishes while it has local subscribers or heard an
# announcement in the last PRESENCE_TTL seconds (a few announcements may be lost).
PRESENCE_SECONDS = 0.5
PRESENCE_TTL = 2.0
PRESENCE_PREFIX = b'{"type":"watching"'
# How long a new session waits for its node's announcement to come back through the
# store (by then every node sharing the store has it) before it sends `ready` anyway.
PRESENCE_ECHO_SECONDS = 1.0


class Feed:
    """The event bus of one node (see the module docstring). Run it with :meth:`run`."""

    def __init__(
        self,
        settings: Settings,
        store: WindowStore,
        limiter: Limiter,
        *,
        channel: str = CHANNEL,
        outgoing_limit: int = OUTGOING_LIMIT,
        snapshot_seconds: float = SNAPSHOT_SECONDS,
        publish_seconds: float = PUBLISH_SECONDS,
        closing: trio.Event | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self.node_id = settings.node_id
        self.store = store
        self.limiter = limiter
        self.channel = channel
        self.backlog = settings.feed.backlog
        self.allowed_origins = settings.feed.allowed_origins
        self.outgoing_limit = outgoing_limit
        self.snapshot_seconds = snapshot_seconds
        self.publish_seconds = publish_seconds
        # Set when the node starts to shut down: sessions then close with 1001.
        self.closing = closing if closing is not None else trio.Event()
        # The live keys (tokenguard/limiting/keyring.py); the config's when none is given.
        self.keyring = keyring if keyring is not None else Keyring(settings, store)
        self._admin_digest = settings.feed.admin_digest
        # A key is active while its amounts may still count: a window and a bucket.
        self._active_seconds = settings.window_seconds + settings.bucket_seconds
        self._outgoing: deque[dict[str, Any]] = deque()
        self._outgoing_ready = trio.Event()
        self._seq = 0
        self._subscribers: set[Subscriber] = set()
        self._active: dict[str, float] = {}  # key name -> trio time of its last event
        self._probe: dict[str, bool] = {}  # key name -> snapshot even at zero usage
        self._snapshot_now = trio.Event()
        self._cancel = trio.CancelScope()
        self._refusal_log = LogThrottle()
        self.dropped_outgoing = 0
        self.publish_failures = 0
        self.dropped_by_departed = 0  # dropped_total of the subscribers that left
        # Presence (see PRESENCE_SECONDS): this node's announcement, told apart from
        # other nodes' by a random instance id; until when a heard one holds.
        self._presence = json.dumps(
            {"type": "watching", "node": self.node_id, "instance": secrets.token_hex(8)},
            separators=(",", ":"),
        ).encode()
        self._watched_until = -math.inf
        self._echoed_at = -math.inf  # trio time this node last heard its own
        self._echo = trio.Event()  # set (and replaced) each time it hears its own
        self._announce_now = trio.Event()

    @property
    def _keys_by_digest(self) -> Mapping[str, ApiKey]:
        return self.keyring.keys_by_digest

    @property
    def _keys_by_name(self) -> Mapping[str, ApiKey]:
        return self.keyring.keys_by_name

    # -- producing: on the request path, never awaits

    @property
    def watched(self) -> bool:
        """Whether some subscriber, on this node or another, may see events now. Only
        then are events built and published (nobody watching costs nothing)."""
        return bool(self._subscribers) or trio.current_time() < self._watched_until

    def stamped(self, event: dict[str, Any]) -> dict[str, Any]:
        """``event`` with this node's id and the server's time (``node``, ``ts``): a
        message made for local subscribers only (a snapshot, a session's control)."""
        return {**event, "node": self.node_id, "ts": now_ms()}

    def emit(self, event: dict[str, Any], ts: int | None = None) -> None:
        """Queue ``event`` for every node's subscribers; adds ``node``, ``seq`` and
        ``ts`` (``ts`` given: when what it reports happened; else now)."""
        self._seq += 1
        event["node"] = self.node_id
        event["seq"] = self._seq
        event["ts"] = now_ms() if ts is None else ts
        if len(self._outgoing) >= self.outgoing_limit:
            self._outgoing.popleft()
            self.dropped_outgoing += 1
        self._outgoing.append(event)
        self._outgoing_ready.set()

    def admitted(
        self, decision: Decision, model: str, surface: str | None = None, at_ms: int | None = None
    ) -> None:
        """``admitted``, then ``would_reject`` if only shadow mode let it through.
        ``surface``: the request's API surface (``chat``, ``responses`` ...), when it
        has one; every event about a request carries it. ``at_ms``: when the store
        admitted it, if that was before now (a waiter: see ``Admissions``), as ``ts``."""
        if not self.watched:
            return
        admitted, *shadow = admitted_events(decision, model, surface)
        self.emit(admitted, at_ms)  # a waiter's: when the store admitted it
        for event in shadow:
            self.emit(event)

    def rejected(self, decision: Decision, model: str, surface: str | None = None) -> None:
        """``rejected``, naming the limit that refused ``decision`` (none: no event)."""
        if not self.watched:
            return
        event = rejected_event(decision, model, surface)
        if event is not None:
            self.emit(event)

    def waiting(
        self, decision: Decision | None, key: ApiKey, model: str, priority: str, bound: float
    ) -> None:
        """``queued``: a request of ``key`` waits for room (at most ``bound`` seconds)
        instead of its 429: the limit that refused it, when it tried (``decision``),
        else none (it joined behind a request already waiting)."""
        if not self.watched:
            return
        self.emit(queued_event(decision, key, model, priority, bound))

    def waited(self, key: ApiKey, model: str, outcome: str, waited_ms: int) -> None:
        """``dequeued``: a waiting request of ``key`` left the queue after ``waited_ms``:
        ``outcome`` ``admitted``, ``rejected`` (no room within its bound), ``gone`` (its
        client left) or ``closed`` (its node shut down)."""
        if not self.watched:
            return
        self.emit(dequeued_event(key, model, outcome, waited_ms))

    def near_limit(self, decision: Decision, model: str, surface: str | None = None) -> None:
        """``near_limit`` for each row whose near-limit mark this admission crossed
        first in its window (the store tells one admission per window and counter,
        whichever node made it: so one event per window, cluster-wide)."""
        if not self.watched:
            return
        for event in near_limit_events(decision, model, surface):
            self.emit(event)

    def settled(
        self, decision: Decision, output_tokens: int, cached_input_tokens: int = 0, spent: int = 0
    ) -> None:
        """A settlement: the output reserved and used; ``cached_input_tokens`` (the
        upstream's prompt-cache hits) only when there were some; for a priced request
        (under a spend limit) the money reserved and spent, in micro-units."""
        if not self.watched:
            return
        self.emit(settled_event(decision, output_tokens, cached_input_tokens, spent))

    # -- who sees what

    def refused_unauthenticated(self, problem: str) -> None:
        """A socket closed (1008) before authentication for ``problem``: one log line,
        at most one a second (with the count of those held back), never a traceback."""
        held = self._refusal_log.ready()
        if held is not None:
            log.warning(
                "usage feed: closed a websocket before authentication (1008): %s "
                "(%d more since the last line)",
                problem,
                held,
            )

    def viewer_for(self, token: str, key_filter: str | None) -> Viewer | str:
        """The viewer a bearer token is, or why it is refused (a message for 1008).

        A key's token may name only its own key as filter; the admin token may name
        any configured key. With no admin token configured there is no admin view.
        """
        digest = digest_of(token)
        key = self._keys_by_digest.get(digest)
        if key is not None:
            if key_filter not in (None, key.name):
                return "a key's token sees only that key's events"
            return Viewer("key", key.name)
        admin = self._admin_digest
        if admin is not None and hmac.compare_digest(digest, admin):
            if key_filter is not None and key_filter not in self._keys_by_name:
                return "unknown key name"
            return Viewer("admin", key_filter)
        return "invalid token"

    @contextmanager
    def subscription(self, viewer: Viewer) -> Iterator[Subscriber]:
        """Register a local subscriber for the duration of the ``with``. Its first
        snapshots come at once: its own key's (even at zero), or, for the admin, every
        key in use (or the filtered key's)."""
        subscriber = Subscriber(viewer, self.backlog)
        self._subscribers.add(subscriber)
        if viewer.key is not None:
            self._probe[viewer.key] = True
        else:
            for name in self._keys_by_name:
                self._probe.setdefault(name, False)
        self._snapshot_now.set()
        self._announce_now.set()
        try:
            yield subscriber
        finally:
            self._subscribers.discard(subscriber)
            self.dropped_by_departed += subscriber.dropped_total

    async def announced(self) -> None:
        """Return once every node sharing the store knows this node has subscribers
        (its announcement came back through the store), or after
        ``PRESENCE_ECHO_SECONDS`` (the store is slow or down). Events made before
        then may be missing; call it after :meth:`subscription` is entered."""
        if trio.current_time() - self._echoed_at < PRESENCE_TTL - PRESENCE_SECONDS:
            return  # announced recently: every node still counts this one as watched
        echo = self._echo
        with trio.move_on_after(PRESENCE_ECHO_SECONDS):
            await echo.wait()

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        """The local subscribers, now."""
        return tuple(self._subscribers)

    @property
    def queued(self) -> int:
        """Events waiting to be published (at most ``outgoing_limit``)."""
        return len(self._outgoing)

    # -- background work

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish, listen and snapshot until cancelled or :meth:`stop`. Started once
        the store subscription is up (or its first attempt failed: it is retried)."""
        with self._cancel:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._listen_forever)
                nursery.start_soon(self._publish_forever)
                nursery.start_soon(self._snapshot_forever)
                nursery.start_soon(self._announce_forever)
                task_status.started()

    def stop(self) -> None:
        """End :meth:`run` (the node is shutting down)."""
        self._cancel.cancel()

    async def _publish_forever(self) -> None:
        # One task, one message in flight: a node's events keep their order.
        failing = False  # log when publishing starts failing and when it recovers
        while True:
            if not self._outgoing:
                self._outgoing_ready = trio.Event()
                await self._outgoing_ready.wait()
            started = trio.current_time()
            outgoing = self._outgoing
            batch = [outgoing.popleft() for _ in range(min(PUBLISH_BATCH, len(outgoing)))]
            message = "\n".join(
                json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in batch
            ).encode()
            try:
                await self.store.publish(self.channel, [message])
            except StoreError as exc:
                if not failing:
                    log.warning("usage feed: cannot publish, dropping events: %s", exc)
                    failing = True
                self.publish_failures += len(batch)
            else:
                if failing:
                    log.warning(
                        "usage feed: publishing again (%d events dropped so far)",
                        self.publish_failures,
                    )
                    failing = False
            # Gather the events of the next moment into one message (PUBLISH_SECONDS).
            if len(outgoing) < PUBLISH_BATCH:
                await trio.sleep_until(started + self.publish_seconds)

    async def _announce_forever(self) -> None:
        # At once when a subscriber arrives, then every PRESENCE_SECONDS while any stay.
        while True:
            with trio.move_on_after(PRESENCE_SECONDS if self._subscribers else math.inf):
                await self._announce_now.wait()
            self._announce_now = trio.Event()
            if not self._subscribers:
                continue
            try:
                await self.store.publish(self.channel, [self._presence])
            except StoreError as exc:
                log.debug("usage feed: cannot announce subscribers: %s", exc)

    def _heard(self, message: bytes) -> None:
        now = trio.current_time()
        self._watched_until = now + PRESENCE_TTL
        if message == self._presence:
            self._echoed_at = now
            self._echo.set()
            self._echo = trio.Event()

    async def _listen_forever(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        backoff = RESUBSCRIBE_SECONDS[0]
        started = False
        while True:
            try:
                async with self.store.subscribe(self.channel) as messages:
                    backoff = RESUBSCRIBE_SECONDS[0]
                    if not started:
                        started = True
                        task_status.started()
                    async for message in messages:
                        self._deliver(message)
            except StoreError as exc:
                log.warning("usage feed: cannot subscribe (retrying): %s", exc)
            if not started:
                started = True
                task_status.started()  # serve anyway; events come once subscribed
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RESUBSCRIBE_SECONDS[1])

    def _deliver(self, message: bytes) -> None:
        """Hand one published batch to the local subscribers that see each event."""
        if message.startswith(PRESENCE_PREFIX):
            self._heard(message)  # an announcement, never batched with events
            return
        if not self._subscribers:
            return  # nobody here: not even worth parsing
        now = trio.current_time()
        events: list[tuple[str, str]] = []  # (key name, encoded event)
        for line in message.split(b"\n"):
            try:
                event = json.loads(line)
                key = event["key"]
            except (ValueError, TypeError, KeyError):
                log.warning("usage feed: ignoring a malformed event %r", line[:200])
                continue
            self._active[key] = now
            events.append((key, line.decode()))
        for subscriber in self._subscribers:
            viewer = subscriber.viewer
            subscriber.offer_all([body for key, body in events if viewer.sees(key)])

    async def _snapshot_forever(self) -> None:
        while True:
            with trio.move_on_after(self.snapshot_seconds):
                await self._snapshot_now.wait()
            self._snapshot_now = trio.Event()
            await self._snapshot_round()

    async def _snapshot_round(self) -> None:
        """One snapshot per active (or probed) key that some local subscriber sees."""
        now = trio.current_time()
        for name, last in list(self._active.items()):
            if now - last > self._active_seconds:
                del self._active[name]
        probe, self._probe = self._probe, {}
        if not self._subscribers:
            return
        names = {*self._active, *probe}
        wanted = [
            n
            for n in names
            if n in self._keys_by_name and any(s.viewer.sees(n) for s in self._subscribers)
        ]
        limit = trio.CapacityLimiter(SNAPSHOT_READS)

        async def one(name: str) -> None:
            key = self._keys_by_name[name]
            async with limit:
                try:
                    states = await self.limiter.usage(key)
                except StoreError as exc:
                    log.debug("usage feed: no snapshot of %s: %s", name, exc)
                    return
            if name not in self._active and not probe.get(name):
                if not any(s.used for s in states):
                    return  # probed for an admin, and idle: nothing to show
                self._active[name] = now
            self._offer_snapshot(key, states)

        async with trio.open_nursery() as nursery:
            for name in wanted:
                nursery.start_soon(one, name)

    def _offer_snapshot(self, key: ApiKey, states: Sequence[RowState]) -> None:
        event = {
            "type": "snapshot",
            "key": key.name,
            "window_seconds": self.limiter.window_seconds,
            "usage": usage_by_dimension(states),
        }
        body = json.dumps(self.stamped(event), ensure_ascii=False, separators=(",", ":"))
        for subscriber in self._subscribers:
            if subscriber.viewer.sees(key.name):
                subscriber.offer(body)

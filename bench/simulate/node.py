"""One simulated node: the product's own parts, wired as ``serve_node`` wires them.

A :class:`SimNode` is one incarnation of node ``index`` (a crash ends it; the node's
restart is a new one): its :class:`~bench.simulate.store.FaultyStore` connection to
the shared store, a :class:`~tokenguard.store.guarded.GuardedStore` over it (deadlines,
breaker, the ``[store] on_store_error`` policy, local windows on the node's own
clock, which clock skew moves), the :class:`~tokenguard.limiting.keyring.Keyring`, and the
node's :class:`~tokenguard.api.gateway.Gateway` (limiter, settler, output reservation) in
front of a :class:`Witness` that reports every settlement to the oracle.

:meth:`SimNode.chat` is one chat completion through the gateway as the HTTP handler
makes it, without HTTP and without the tokenizer (the prompt's token count is drawn
by the traffic): authenticate, reserve, admit, answer for the request's duration
(a stream), settle to what was produced.

A *stall* holds the node's store traffic and its new requests (see
:mod:`bench.simulate.store`); its timers keep firing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Self

import trio

from bench.simulate.product import (
    ANYTHING,
    OPENAI,
    Admission,
    APIError,
    ChatDialect,
    Cost,
    Gateway,
    GuardedStore,
    Keyring,
    Lease,
    MemoryStore,
    Registry,
    RegistryExpect,
    Reservation,
    Row,
    RowState,
    Settings,
    StoreError,
    WindowStore,
    partition_of,
)
from bench.simulate.store import FaultyStore, SimStore

if TYPE_CHECKING:
    from bench.simulate.oracle import Oracle
    from bench.simulate.traffic import Request


class Witness(WindowStore):
    """The gateway's store: the node's guarded store, with each settlement the
    product makes (limiter, settler) reported to the oracle as it is made."""

    never_waits = False

    def __init__(
        self, inner: GuardedStore, on_settle: Callable[[Reservation, Sequence[int]], None]
    ):
        self.inner = inner
        self.url = inner.url
        self._on_settle = on_settle

    @classmethod
    def from_url(cls, url: str) -> Self:
        raise ValueError("a witness wraps a store; it is not built from a URL")

    async def admit(self, partition: str, rows: Sequence[Row]) -> Admission:
        return await self.inner.admit(partition, rows)

    async def settle(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        self._on_settle(reservation, deltas)
        await self.inner.settle(reservation, deltas)

    async def renew(self, leases: Sequence[Lease]) -> None:
        await self.inner.renew(leases)

    async def usage(self, partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
        return await self.inner.usage(partition, rows)

    async def publish(self, channel: str, messages: Sequence[bytes]) -> None:
        await self.inner.publish(channel, messages)

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self.inner.subscribe(channel)

    async def registry_version(self) -> int:
        return await self.inner.registry_version()

    async def registry_load(self) -> tuple[int, Registry]:
        return await self.inner.registry_load()

    async def registry_put(
        self, kind: str, name: str, record: str | None, *, expect: RegistryExpect = ANYTHING
    ) -> int | None:
        return await self.inner.registry_put(kind, name, record, expect=expect)


class SimNode:
    """One incarnation of node ``index`` (see the module docstring). ``clock_offset``
    is its wall clock's skew (seconds) against the store's ``store_clock``."""

    def __init__(
        self,
        index: int,
        incarnation: int,
        settings: Settings,
        sim: SimStore,
        oracle: Oracle,
        store_clock: Callable[[], float],
        clock_offset: float = 0.0,
    ) -> None:
        self.index = index
        self.incarnation = incarnation
        self.settings = settings
        self.oracle = oracle
        self.stalled = False
        self.dead = False
        self.serving = False
        self._resumed = trio.Event()
        self.faulty = FaultyStore(sim, self)
        # The local windows run on the node's own (possibly skewed) wall clock.
        self.fallback = MemoryStore(clock=lambda: store_clock() + clock_offset)
        # As resilience.guarded_store() builds it for a supervised node (ids 0 .. n-1).
        self.guarded = GuardedStore(
            self.faulty,
            policy=settings.on_store_error,  # type: ignore[arg-type]
            timeout=settings.store_timeout_ms / 1000,
            cluster_size=settings.supervised_nodes,
            node_id=index,
            spread=True,
            fallback=self.fallback,
        )
        self.keyring = Keyring(settings, self.guarded)
        witness = Witness(self.guarded, self._settling)
        self.gateway = Gateway.build(settings, witness, keyring=self.keyring)
        self.dialect = ChatDialect()
        self._cancel = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self.in_flight = 0

    @property
    def name(self) -> str:
        return f"{self.index}.{self.incarnation}"

    # -- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start as ``serve_node`` and the app do (the guarded store, the keyring, which
        waits at most its startup time for the registry, the usage feed, the settler),
        then serve until :meth:`crash` or cancellation."""
        with self._cancel:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.guarded.run)
                await nursery.start(self.keyring.run)
                await nursery.start(self.gateway.feed.run)
                await nursery.start(self.gateway.settler.run)
                self._nursery = nursery
                self.serving = True
                self.oracle.node_serving(self)
                task_status.started()
                await trio.sleep_forever()

    def crash(self) -> None:
        """Die at once, as ``kill -9``: nothing not yet sent reaches the store (shielded
        work left running fails on its next call), no request goes on."""
        self.dead = True
        self.serving = False
        self.faulty.dead = True
        self._resumed.set()
        self._cancel.cancel()

    def begin_stall(self) -> None:
        self.stalled = True
        self._resumed = trio.Event()

    def end_stall(self) -> None:
        self.stalled = False
        self._resumed.set()

    async def wait_unstalled(self) -> None:
        while self.stalled and not self.dead:
            await self._resumed.wait()

    def registry_loaded(self, applied_at: float) -> None:
        """The keyring got a registry read the store applied at ``applied_at``."""
        if not self.dead:
            self.oracle.registry_loaded(self, applied_at)

    def _settling(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        if not self.dead:
            self.oracle.settling(self, reservation, deltas)

    def start_request(self, request: Request) -> bool:
        """Take a request (False: the node is not serving: a refused connection)."""
        if not self.serving or self._nursery is None:
            return False
        self._nursery.start_soon(self.chat, request)
        return True

    # -- one request

    async def chat(self, request: Request) -> None:
        """One chat completion through the gateway (see the module docstring)."""
        self.in_flight += 1
        try:
            await self._chat(request)
        finally:
            self.in_flight -= 1

    async def _chat(self, request: Request) -> None:
        if self.stalled:
            await self.wait_unstalled()
        oracle = self.oracle
        key = self.keyring.by_digest(request.digest)  # as Pipeline.authenticate
        if self.dead:
            return
        oracle.authenticated(self, request, key)
        if key is None:
            return
        chat = self.dialect.parse(request.body)
        reserved = self.gateway.pipeline.output_reservation(key, chat, request.input_tokens)
        cost = Cost(requests=1, input_tokens=request.input_tokens, output_tokens=reserved)
        # The rows as the limiter asks for them (a local admission's carry its share).
        rows = self.gateway.limiter.rows(key, cost, chat.model)
        oracle.attempting(rows, partition_of(key))
        started = trio.current_time()
        try:
            decision = await self.gateway.admissions.admit(key, cost, chat.model, OPENAI)
        except APIError as error:
            if not self.dead:
                oracle.answered(self, request, key, started, error.status, None, rows)
            return
        except StoreError:
            if not self.dead:
                oracle.answered(self, request, key, started, 503, None, rows)
            return
        if self.dead:
            return
        oracle.answered(self, request, key, started, 200, decision, rows)
        await trio.sleep(request.duration)
        if self.stalled:
            await self.wait_unstalled()
        produced = request.produced(reserved)
        if self.dead:
            return
        oracle.finished(self, decision, produced)
        await self.gateway.admissions.settle(decision, produced)

    # -- what the end-of-run checks read

    @property
    def settled_down(self) -> bool:
        """Serving, no request in progress, the store's breaker closed and not holding,
        nothing left to settle."""
        status = self.guarded.status()
        return (
            self.serving
            and not self.in_flight
            and status["breaker"] == "closed"
            and "holding_seconds" not in status
            and not self.gateway.settler.queued
        )

    def sizes(self) -> dict[str, Any]:
        """The sizes of what could grow: the guarded store's write-back queue, the
        cluster usage it remembers, its calls waiting; leases held; the settler's queue;
        the limiter's row cache. (Private fields of the product: the brief's list.)"""
        guarded = self.guarded
        return {
            "unsynced": len(guarded._unsynced),
            "seen": len(guarded._seen),
            "waiting": len(guarded._waiting),
            "store_leases": len(self.faulty.leases),
            "local_leases": len(self.fallback.leases),
            "settler_queue": self.gateway.settler.queued,
            "templates": len(self.gateway.limiter._templates),
            "feed_queue": self.gateway.feed.queued,
            "breaker": guarded.breaker.state,
        }


__all__ = ["SimNode", "Witness"]

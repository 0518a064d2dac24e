"""The simulated store: one memory driver shared by every node, behind a fault layer.

:class:`SimStore` is the store server: the memory driver (``drivers/memory.py``) on the
simulated clock, replaced by an empty one when the store loses its data (counters and
registry alike), the faults in effect (:mod:`bench.simulate.faults`), the calls it is
serving, and publish/subscribe between the nodes.

:class:`FaultyStore` is one node's connection to it, a
:class:`~tokenguard.store.window_store.WindowStore` that the node's guarded store uses as its
primary, like the Redis driver: it keeps and renews the leases of its own admissions
(:class:`~tokenguard.store.leases.HeldLeases`), tells when it last sent calls
(``last_sent``), and fails with :class:`~tokenguard.store.window_store.StoreError`. What a call
meets, in order:

* the node's own stall: nothing is sent while the node is stalled;
* the store refusing (an outage, a restart after a store loss): ``StoreError`` at once,
  nothing applied;
* otherwise the call is *sent*. With no latency and nothing hung it is applied at once
  and answered at the next checkpoint. Else the server applies it after half the
  latency, once nothing holds it (a hang, a partition of this node), and answers after
  the other half: in a task of the server's, so a call that its caller gave up on (a
  missed deadline) is still applied, as a real store would (counted, not served). A
  store that went down before applying it fails it; one that went down before
  answering loses the answer.
* the node's stall again: a reply is not read while the node is stalled.

A crashed node's connection (``dead``) fails every call it had not sent.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol, Self, TypeVar

import attrs
import outcome
import trio

from bench.simulate.faults import Fault
from bench.simulate.product import (
    ANYTHING,
    Admission,
    HeldLeases,
    Lease,
    MemoryStore,
    Registry,
    RegistryExpect,
    Reservation,
    Row,
    RowState,
    StoreError,
    WindowStore,
)

T = TypeVar("T")

# Messages a subscription holds before new ones are dropped for it (as the memory driver).
SUBSCRIPTION_BUFFER = 4096
# How often the server drops idle counters (the memory driver's own sweep interval).
SWEEP_SECONDS = 10.0


class StoreWitness(Protocol):
    """Who is told what the store applied (the oracle)."""

    def registry_written(self, kind: str, name: str, record: str | None) -> None: ...

    def store_lost(self) -> None: ...


class NodeLink(Protocol):
    """What a connection needs of its node: its index, its stall, and where to report
    the registry reads it completes."""

    index: int
    stalled: bool

    async def wait_unstalled(self) -> None: ...

    def registry_loaded(self, applied_at: float) -> None: ...


class _Subscription:
    __slots__ = ("node", "send")

    def __init__(self, node: int, send: trio.MemorySendChannel[bytes]) -> None:
        self.node = node
        self.send = send


class SimStore:
    """The shared store server (see the module docstring). ``clock`` is the store's
    clock (seconds); ``rng`` draws latencies and message losses; ``witness`` is told of
    every registry write the store applied and of every loss of its data."""

    def __init__(
        self, clock: Callable[[], float], rng: random.Random, witness: StoreWitness
    ) -> None:
        self.clock = clock
        self.rng = rng
        self.witness = witness
        self.memory = MemoryStore(clock=clock)
        self.generation = 0  # one more at each loss of the store's data
        self._refusing = 0
        self._hangs = 0
        self._partitioned: dict[int, int] = {}
        self._healed = trio.Event()
        self._slow: list[float] = []
        self._losses: list[float] = []
        self._subscriptions: dict[str, list[_Subscription]] = {}
        self._nursery: trio.Nursery | None = None
        self.dropped_messages = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve calls that wait (slow, hung) and sweep idle counters, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(SWEEP_SECONDS)
                self.memory.sweep()

    # -- faults

    def begin(self, fault: Fault) -> None:
        kind = fault.kind
        if kind in ("outage", "store-loss"):
            self._refusing += 1
            if kind == "store-loss":
                self.memory = MemoryStore(clock=self.clock)
                self.generation += 1
                self.witness.store_lost()
        elif kind == "hang":
            self._hangs += 1
        elif kind == "partition":
            assert fault.node is not None
            self._partitioned[fault.node] = self._partitioned.get(fault.node, 0) + 1
        elif kind == "slow":
            self._slow.append(fault.magnitude)
        elif kind == "pubsub-loss":
            self._losses.append(fault.magnitude)

    def end(self, fault: Fault) -> None:
        kind = fault.kind
        if kind in ("outage", "store-loss"):
            self._refusing -= 1
        elif kind == "hang":
            self._hangs -= 1
            self._heal()
        elif kind == "partition":
            assert fault.node is not None
            self._partitioned[fault.node] -= 1
            if not self._partitioned[fault.node]:
                del self._partitioned[fault.node]
            self._heal()
        elif kind == "slow":
            self._slow.remove(fault.magnitude)
        elif kind == "pubsub-loss":
            self._losses.remove(fault.magnitude)

    def _heal(self) -> None:
        self._healed.set()
        self._healed = trio.Event()

    def refuses(self) -> bool:
        return self._refusing > 0

    def holds(self, node: int) -> bool:
        """Whether calls of ``node`` are held (the store hung, or the node cut off)."""
        return self._hangs > 0 or node in self._partitioned

    def latency(self) -> float:
        """One call's round trip now (0 unless the store is slow)."""
        if not self._slow:
            return 0.0
        return max(self._slow) * self.rng.uniform(0.5, 1.5)

    # -- serving a call that waits

    async def serve(self, node: int, apply: Callable[[], Awaitable[T]], latency: float) -> T:
        """Apply ``apply`` as the server would for a call sent now that waits (see the
        module docstring); its outcome. Cancelling the caller does not stop it."""
        assert self._nursery is not None
        done = trio.Event()
        result: list[outcome.Outcome[T]] = []
        self._nursery.start_soon(self._serve_one, node, apply, latency, done, result)
        await done.wait()
        return result[0].unwrap()

    async def _serve_one(
        self,
        node: int,
        apply: Callable[[], Awaitable[T]],
        latency: float,
        done: trio.Event,
        result: list[outcome.Outcome[T]],
    ) -> None:
        generation = self.generation
        await trio.sleep(latency / 2)
        while self.holds(node):
            await self._healed.wait()
        if self.refuses() or self.generation != generation:
            result.append(outcome.Error(StoreError("connection lost: the store went down")))
        else:
            result.append(await outcome.acapture(apply))
            await trio.sleep(latency / 2)
            while self.holds(node):
                await self._healed.wait()
            if self.refuses() or self.generation != generation:
                result[0] = outcome.Error(StoreError("connection lost before the reply"))
        done.set()

    # -- publish/subscribe

    def publish(self, channel: str, messages: Sequence[bytes]) -> None:
        loss = max(self._losses, default=0.0)
        for subscription in self._subscriptions.get(channel, ()):
            if self.holds(subscription.node):
                self.dropped_messages += len(messages)
                continue
            for message in messages:
                if loss and self.rng.random() < loss:
                    self.dropped_messages += 1
                    continue
                try:
                    subscription.send.send_nowait(message)
                except trio.WouldBlock:
                    self.dropped_messages += 1

    @asynccontextmanager
    async def subscription(self, node: int, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        send, receive = trio.open_memory_channel[bytes](SUBSCRIPTION_BUFFER)
        entry = _Subscription(node, send)
        subscriptions = self._subscriptions.setdefault(channel, [])
        subscriptions.append(entry)
        try:
            async with receive:
                yield receive
        finally:
            subscriptions.remove(entry)
            send.close()


class FaultyStore(WindowStore):
    """One node's connection to the :class:`SimStore` (see the module docstring)."""

    never_waits = False

    def __init__(self, sim: SimStore, node: NodeLink) -> None:
        self.sim = sim
        self.node = node
        self.url = f"sim://node{node.index}"
        self.leases = HeldLeases()  # the leases of this connection's admissions
        # The store generation each lease was taken in: after a loss of the store's
        # data its id means nothing there (the Redis driver's ids are random per
        # connection, so they never name another node's lease).
        self._lease_generation: weakref.WeakKeyDictionary[Lease, int] = weakref.WeakKeyDictionary()
        self.dead = False
        self.calls = 0

    @classmethod
    def from_url(cls, url: str) -> Self:
        raise ValueError("a simulated store is built by the simulation, not from a URL")

    def _alive(self) -> None:
        if self.dead:
            raise StoreError(f"{self.url}: the node is dead")

    async def _call(self, apply: Callable[[], Awaitable[T]], *, yields: bool = False) -> T:
        """``await apply()`` as the store would (see the module docstring). ``yields``:
        ``apply`` itself passes a checkpoint (the memory driver's registry calls do),
        which stands for the reply's arrival; otherwise one is added."""
        node = self.node
        if node.stalled:
            await node.wait_unstalled()
        self._alive()
        sim = self.sim
        if sim.refuses():
            await trio.lowlevel.checkpoint()
            raise StoreError(f"{self.url}: connection refused")
        self.calls += 1
        self.last_sent = trio.current_time()
        latency = sim.latency()
        if latency or sim.holds(node.index):
            result = await sim.serve(node.index, apply, latency)
        else:
            result = await apply()
            if not yields:
                await trio.lowlevel.checkpoint()  # the reply, read
        if node.stalled:
            await node.wait_unstalled()
        self._alive()
        return result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (a store that refuses, or a dead node, fails with StoreError) and
        renew this connection's leases until cancelled."""
        await trio.lowlevel.checkpoint()
        self._alive()
        if self.sim.refuses():
            raise StoreError(f"{self.url}: cannot connect")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.leases.renew_forever, self.renew)
            task_status.started()
            await trio.sleep_forever()

    async def admit(self, partition: str, rows: Sequence[Row]) -> Admission:
        sim = self.sim

        async def apply() -> tuple[int, Admission]:
            return sim.generation, await sim.memory.admit(partition, rows)

        generation, admission = await self._call(apply)
        reservation = admission.reservation
        if reservation is not None and reservation.lease is not None:
            self.leases.add(reservation.lease)
            self._lease_generation[reservation.lease] = generation
        return admission

    async def settle(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        reservation.check_deltas(deltas)
        lease = reservation.lease
        if lease is not None:
            self.leases.discard(lease)
        sim = self.sim

        async def apply() -> None:
            settled = reservation
            if lease is not None and self._lease_generation.get(lease) != sim.generation:
                settled = attrs.evolve(reservation, lease=None)
            await sim.memory.settle(settled, deltas)

        await self._call(apply)

    async def renew(self, leases: Sequence[Lease]) -> None:
        sim = self.sim

        async def apply() -> None:
            held = self._lease_generation
            await sim.memory.renew([x for x in leases if held.get(x) == sim.generation])

        await self._call(apply, yields=True)

    async def usage(self, partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
        sim = self.sim

        async def apply() -> tuple[RowState, ...]:
            return await sim.memory.usage(partition, rows)

        return await self._call(apply)

    async def publish(self, channel: str, messages: Sequence[bytes]) -> None:
        sim = self.sim

        async def apply() -> None:
            sim.publish(channel, messages)

        await self._call(apply)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[bytes]]:
        await trio.lowlevel.checkpoint()
        self._alive()
        if self.sim.refuses():
            raise StoreError(f"{self.url}: cannot subscribe")
        async with self.sim.subscription(self.node.index, channel) as messages:
            yield messages

    async def registry_version(self) -> int:
        sim = self.sim

        async def apply() -> int:
            return await sim.memory.registry_version()

        return await self._call(apply, yields=True)

    async def registry_load(self) -> tuple[int, Registry]:
        sim = self.sim
        applied: list[float] = []

        async def apply() -> tuple[int, Registry]:
            loaded = await sim.memory.registry_load()
            applied.append(trio.current_time())
            return loaded

        loaded = await self._call(apply, yields=True)
        self.node.registry_loaded(applied[0])
        return loaded

    async def registry_put(
        self, kind: str, name: str, record: str | None, *, expect: RegistryExpect = ANYTHING
    ) -> int | None:
        sim = self.sim

        async def apply() -> int | None:
            version = await sim.memory.registry_put(kind, name, record, expect=expect)
            if version is not None:
                sim.witness.registry_written(kind, name, record)
            return version

        return await self._call(apply, yields=True)


__all__ = ["FaultyStore", "NodeLink", "SimStore", "StoreWitness"]

"""One seeded simulation of a whole cluster, and many of them, in this process.

:func:`simulate` runs one seed: it draws the configuration, the faults and the traffic
from the seed, starts the store and the nodes on trio's :class:`~trio.testing.MockClock`
(autojump: simulated time jumps to the next timer whenever every task waits), runs
the clients, the admin and the faults for the simulated minutes, then stops the
traffic, ends every fault, lets the nodes recover, and makes the oracle's end checks.

Determinism (:func:`deterministic`): everything random is drawn from streams seeded by
the seed and a name (``random.Random("<seed>/<name>")``: str seeds hash with SHA-512,
whatever ``PYTHONHASHSEED``); trio's own scheduler, which shuffles each batch of
runnable tasks with a module-level ``random.Random``, is switched to its
deterministic mode (the one hypothesis uses: each batch sorted by task creation
order, then shuffled) and seeded; the cyclic garbage collector is off during a run
(it would run at points that depend on what ran before in the process, and it frees
the weakly held leases a node renews) and collects the run's garbage after it (what
existed before is frozen meanwhile, so that costs little); the product's log
lines are muted. The product's own wall-clock reads (``time.time()`` in admin
records' ``updated_at``, ``time.monotonic()`` for the breaker's "open since" and its
log throttles) do not change what it decides, and are not in the trace.
"""

from __future__ import annotations

import gc
import logging
import random
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio
import trio.testing

from bench.simulate.faults import FAULT_KINDS, Fault, draw_faults
from bench.simulate.node import SimNode
from bench.simulate.oracle import Oracle, Violation
from bench.simulate.plants import planted
from bench.simulate.store import SimStore
from bench.simulate.trace import Trace
from bench.simulate.traffic import (
    LONGEST_REQUEST,
    WATCHED_SHARE,
    Admin,
    Client,
    KeyPool,
    SimConfig,
    Watcher,
    draw_config,
)

# The store's clock at simulated time 0 (plus up to an hour, per seed: buckets start
# anywhere in their cycle).
EPOCH = 1_700_000_000.0
# Clients and admin start once the nodes had time to start.
TRAFFIC_START = 2.5
# After the traffic stops, requests end and nodes recover (probe, write-back, hold):
# the end checks wait until every node has settled down, this long at most.
DRAIN_SECONDS = LONGEST_REQUEST + 10.0
DRAIN_POLL = 0.25
# Clock skew drawn at most (faults.py), so a quiet window is long enough on every node.
MOST_SKEW = 3.0
DEFAULT_NODES = 3


@attrs.frozen
class Options:
    """What every simulation of a run shares."""

    minutes: float = 1.0
    nodes: int = DEFAULT_NODES
    faults: tuple[str, ...] = FAULT_KINDS
    plant: str | None = None
    shares_per_node: bool = False  # see Oracle


@attrs.frozen
class Outcome:
    """One seed's result: a violation or none, the trace's hash, and figures."""

    seed: int
    violation: Violation | None
    trace_hash: str
    events: int
    counts: dict[str, int]
    faults: tuple[Fault, ...]
    simulated: float
    wall: float
    policy: str = ""


@contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Pin what the run does not draw from its seed (see the module docstring)."""
    scheduler: Any = trio._core._run  # trio's run loop module: its scheduling RNG
    saved = (scheduler._ALLOW_DETERMINISTIC_SCHEDULING, scheduler._r.getstate())
    collecting = gc.isenabled()
    gc.disable()
    gc.freeze()  # what exists now is not the run's: its collections skip it
    muted = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    scheduler._ALLOW_DETERMINISTIC_SCHEDULING = True
    scheduler._r.seed(f"{seed}/trio")
    try:
        yield
    finally:
        scheduler._ALLOW_DETERMINISTIC_SCHEDULING, state = saved
        scheduler._r.setstate(state)
        logging.disable(muted)
        gc.collect()  # the run's own garbage only
        gc.unfreeze()
        if collecting:
            gc.enable()


class Cluster:
    """The nodes: each node's current incarnation, started, crashed, restarted."""

    def __init__(
        self,
        nursery: trio.Nursery,
        config: SimConfig,
        sim: SimStore,
        oracle: Oracle,
        trace: Trace,
        store_clock: Callable[[], float],
        offsets: dict[int, float],
    ) -> None:
        self.nodes = config.settings.supervised_nodes
        self._nursery = nursery
        self._config = config
        self._sim = sim
        self._oracle = oracle
        self._trace = trace
        self._store_clock = store_clock
        self._offsets = offsets
        self._current: list[SimNode | None] = [None] * self.nodes
        self._incarnations = [0] * self.nodes

    def node(self, index: int) -> SimNode | None:
        return self._current[index]

    def live(self) -> list[SimNode]:
        return [n for n in self._current if n is not None and not n.dead]

    def start(self, index: int) -> None:
        self._incarnations[index] += 1
        settings = attrs.evolve(self._config.settings, node_id=index)
        node = SimNode(
            index,
            self._incarnations[index],
            settings,
            self._sim,
            self._oracle,
            self._store_clock,
            self._offsets.get(index, 0.0),
        )
        self._current[index] = node
        self._nursery.start_soon(node.run)

    def crash(self, index: int) -> None:
        node = self._current[index]
        if node is None:
            return
        node.crash()
        self._oracle.node_crashed(node)
        self._current[index] = None


class FaultDriver:
    """Begins and ends each fault at its time; :meth:`lift_all` ends those still on."""

    def __init__(
        self,
        faults: tuple[Fault, ...],
        sim: SimStore,
        cluster: Cluster,
        clock: trio.testing.MockClock,
        trace: Trace,
    ) -> None:
        self.faults = faults
        self.sim = sim
        self.cluster = cluster
        self.clock = clock
        self.trace = trace
        self._active: dict[int, SimNode | None] = {}

    async def run(self) -> None:
        edges = []
        for i, fault in enumerate(self.faults):
            if fault.kind == "skew":
                self.trace.add(fault.node, "fault", fault.describe())
                continue
            edges.append((fault.start, 1, i))
            if fault.kind != "loop-stall":
                edges.append((fault.end, 0, i))
        for when, begin, i in sorted(edges):
            await trio.sleep_until(when)
            if begin:
                self._begin(i)
            elif i in self._active:
                self._end(i)

    def _begin(self, i: int) -> None:
        fault = self.faults[i]
        self.trace.add(fault.node, "fault", fault.describe())
        kind = fault.kind
        stalled = None
        if kind == "crash":
            assert fault.node is not None
            self.cluster.crash(fault.node)
        elif kind == "stall":
            assert fault.node is not None
            stalled = self.cluster.node(fault.node)
            if stalled is not None:
                stalled.begin_stall()
        elif kind == "loop-stall":
            self.clock.jump(fault.duration)  # no task runs meanwhile: every node stalls
            return
        else:
            self.sim.begin(fault)
        self._active[i] = stalled

    def _end(self, i: int) -> None:
        fault = self.faults[i]
        stalled = self._active.pop(i)
        self.trace.add(fault.node, "fault-end", fault.kind)
        if fault.kind == "crash":
            assert fault.node is not None
            self.cluster.start(fault.node)
        elif fault.kind == "stall":
            if stalled is not None:
                stalled.end_stall()
        else:
            self.sim.end(fault)

    def lift_all(self) -> None:
        for i in sorted(self._active):
            self._end(i)


def _stream(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}/{name}")


async def _simulate(
    seed: int, options: Options, clock: trio.testing.MockClock, trace: Trace
) -> tuple[Oracle, SimConfig, tuple[Fault, ...]]:
    seconds = options.minutes * 60
    config = draw_config(_stream(seed, "config"), options.nodes, seed)
    settings = config.settings
    faults = draw_faults(_stream(seed, "faults"), options.faults, seconds, options.nodes)
    base = EPOCH + _stream(seed, "clock").uniform(0, 3600)

    def store_clock() -> float:
        return base + trio.current_time()

    oracle = Oracle(config, faults, trace, shares_per_node=options.shares_per_node)
    quiet = (
        max(settings.window_seconds + settings.bucket_seconds, settings.lease_seconds)
        + 2 * MOST_SKEW
    )
    oracle.long_window = quiet
    sim = SimStore(store_clock, _stream(seed, "store"), oracle)
    offsets = {f.node: f.magnitude for f in faults if f.kind == "skew" and f.node is not None}
    pool = KeyPool(config.keys)
    trace.add(None, "config", f"policy {settings.on_store_error}, {len(config.keys)} keys")
    async with trio.open_nursery() as root:
        oracle.abort = root.cancel_scope.cancel
        await root.start(sim.run)
        cluster = Cluster(root, config, sim, oracle, trace, store_clock, offsets)
        for index in range(options.nodes):
            cluster.start(index)
        root.start_soon(oracle.watch)
        driver = FaultDriver(faults, sim, cluster, clock, trace)
        client = Client(
            _stream(seed, "client"), cluster, pool, trace, seconds, faults, TRAFFIC_START
        )
        admin = Admin(
            _stream(seed, "admin"), cluster, pool, config, trace, seconds, TRAFFIC_START, seed
        )
        watching = _stream(seed, "watcher")
        async with trio.open_nursery() as actors:
            actors.start_soon(driver.run)
            actors.start_soon(client.run)
            actors.start_soon(admin.run)
            if watching.random() < WATCHED_SHARE:
                watcher = Watcher(
                    watching, cluster, config.keys[0], oracle.feed_event, trace, TRAFFIC_START
                )
                actors.start_soon(watcher.run)
            await trio.sleep_until(seconds)
            actors.cancel_scope.cancel()
        driver.lift_all()
        trace.add(None, "traffic-end")
        await _wind_down(cluster, sim, oracle, clock, quiet)
        root.cancel_scope.cancel()
    return oracle, config, faults


async def _wind_down(
    cluster: Cluster, sim: SimStore, oracle: Oracle, clock: trio.testing.MockClock, quiet: float
) -> None:
    """With the traffic stopped and every fault over: once every node has settled down
    (or after ``DRAIN_SECONDS``), the oracle's end checks; then, a quiet window later
    (a jump of the clock: no task runs meanwhile), what is left in the stores."""
    drained = trio.current_time() + DRAIN_SECONDS
    while trio.current_time() < drained:
        await trio.sleep(DRAIN_POLL)
        if all(node.settled_down for node in cluster.live()):
            break
    oracle.overdue()
    oracle.final(cluster.live())
    clock.jump(quiet)
    remaining = {"the store": sim.memory.sweep()}
    for node in cluster.live():
        remaining[f"node {node.name}'s local windows"] = node.fallback.sweep()
    oracle.final_counters(remaining)


def simulate(seed: int, options: Options) -> Outcome:
    """Run seed ``seed`` (see the module docstring). An exception out of the run is a
    violation of its own (``exception``), with its traceback."""
    started = time.perf_counter()
    clock = trio.testing.MockClock(autojump_threshold=0)
    trace = Trace(clock.current_time)
    result: tuple[Oracle, SimConfig, tuple[Fault, ...]] | None = None
    violation: Violation | None = None
    with deterministic(seed), planted(options.plant):
        try:
            result = trio.run(_simulate, seed, options, clock, trace, clock=clock)
        except BaseException as exc:  # noqa: BLE001 - a failed run is a finding
            if isinstance(exc, KeyboardInterrupt):
                raise
            text = "".join(traceback.format_exception(exc)).rstrip()
            trace.add(None, "EXCEPTION", repr(exc))
            violation = Violation("exception", text, clock.current_time(), tuple(trace.last()))
    counts: dict[str, int] = {}
    faults: tuple[Fault, ...] = ()
    policy = ""
    if result is not None:
        oracle, config, faults = result
        violation = oracle.violation
        counts = oracle.summary()
        policy = config.settings.on_store_error
    return Outcome(
        seed=seed,
        violation=violation,
        trace_hash=trace.digest,
        events=trace.events,
        counts=counts,
        faults=faults,
        simulated=clock.current_time(),
        wall=time.perf_counter() - started,
        policy=policy,
    )


def replay_command(seed: int, options: Options) -> str:
    """The command that replays ``seed`` exactly."""
    parts = ["python -m bench simulate", f"--seed {seed}", f"--minutes {options.minutes:g}"]
    if options.nodes != DEFAULT_NODES:
        parts.append(f"--nodes {options.nodes}")
    if options.faults != FAULT_KINDS:
        parts.append(f"--faults {','.join(options.faults) or 'none'}")
    if options.plant is not None:
        parts.append(f"--plant {options.plant}")
    if options.shares_per_node:
        parts.append("--shares-per-node")
    return " ".join(parts)


__all__ = ["Options", "Outcome", "deterministic", "replay_command", "simulate"]

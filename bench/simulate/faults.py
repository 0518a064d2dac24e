"""The fault model: which faults a simulation suffers, when, and how badly, drawn per seed.

Every fault is one :class:`Fault` (a kind, a start, a duration, a node for the faults of
one node, and a magnitude), drawn by :func:`draw_faults` from the seed's own random
stream, so a seed always suffers the same faults at the same simulated times. The
kinds (:data:`FAULT_KINDS`), and what the simulation does for each
(:mod:`bench.simulate.store` and :mod:`bench.simulate.runner` apply them):

* ``outage``: the store refuses every call at once (connection refused), 0.1-30 s.
* ``hang``: the store takes calls but answers none until the hang ends, 0.1-30 s;
  then it applies and answers them (a ``SIGSTOP``/``SIGCONT``).
* ``slow``: every call takes ``magnitude`` seconds (5-500 ms, each call 0.5-1.5 times
  that), half on the way there and half back, for 1-30 s.
* ``partition``: one node's calls are lost on the way until it heals (0.1-30 s), then
  arrive (TCP resends them): a hang of one node's connection.
* ``store-loss``: the store restarts empty (every counter and the registry gone) and
  refuses calls while it restarts, 0.1-5 s.
* ``crash``: one node dies at once (``kill -9``: what it had not sent never reaches
  the store) and a fresh process takes its place 0.5-5 s later.
* ``stall``: one node neither sends nor reads anything, nor takes requests, for
  0.02-2 s (a GC pass, a starved CPU); its timers still fire (see docs/design.md).
* ``loop-stall``: the whole event loop stops for 0.02-1 s while time goes on: every
  node wakes late together.
* ``skew``: one node's wall clock is off by 0.01-3 s for the whole run (the store's
  clock stays authoritative: only that node's local windows use it).
* ``pubsub-loss``: published messages are lost with probability ``magnitude``
  (0.1-1) for 1-30 s.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

import attrs

FAULT_KINDS = (
    "outage",
    "hang",
    "slow",
    "partition",
    "store-loss",
    "crash",
    "stall",
    "loop-stall",
    "skew",
    "pubsub-loss",
)
NODE_FAULTS = frozenset({"partition", "crash", "stall", "skew"})
# Faults that cut a node off from the store, or slow it, while they last (a revocation
# or a created key may then take longer than the keyring's second to reach the node).
IMPAIRING = frozenset(FAULT_KINDS) - {"skew", "pubsub-loss"}

# Episodes per simulated minute, on average (a Poisson draw).
FAULTS_PER_MINUTE = 2.0
# Seeds that draw no fault at all (to check the exact bound on whole runs).
FAULT_FREE_SHARE = 0.15
# The first and last seconds of a run stay fault-free: nodes start, then drain.
QUIET_START = 3.0


@attrs.frozen
class Fault:
    """One fault: ``kind`` from ``start`` for ``duration`` simulated seconds (``node``:
    the node it strikes, for the faults of one node; ``magnitude``: latency in seconds,
    clock offset in seconds, or a loss probability, by kind)."""

    kind: str
    start: float
    duration: float
    node: int | None = None
    magnitude: float = 0.0

    @property
    def end(self) -> float:
        return self.start + self.duration

    def describe(self) -> str:
        where = "" if self.node is None else f" node {self.node}"
        size = ""
        if self.kind == "slow":
            size = f" {self.magnitude * 1000:.0f} ms"
        elif self.kind == "skew":
            size = f" {self.magnitude:+.3f} s"
        elif self.kind == "pubsub-loss":
            size = f" p={self.magnitude:.2f}"
        span = "whole run" if math.isinf(self.duration) else f"{self.duration:.3f} s"
        return f"{self.kind}{where}{size} at {self.start:.3f} s for {span}"


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--faults``: a comma-separated list of kinds, ``all``, or ``none``; ``-kind``
    removes one from all (``-store-loss``). Raises ``ValueError`` naming an unknown kind."""
    text = text.strip()
    if text in ("", "none"):
        return ()
    if text == "all":
        return FAULT_KINDS
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all(p.startswith("-") for p in parts):
        removed = {p[1:] for p in parts}
        _check_kinds(removed)
        return tuple(k for k in FAULT_KINDS if k not in removed)
    _check_kinds(parts)
    return tuple(k for k in FAULT_KINDS if k in parts)


def _check_kinds(kinds: Iterable[str]) -> None:
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}")


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def draw_faults(
    rng: random.Random, kinds: Iterable[str], seconds: float, nodes: int
) -> tuple[Fault, ...]:
    """The faults of one simulation of ``seconds``, over ``nodes`` nodes, from ``kinds``;
    ordered by start. Some seeds (``FAULT_FREE_SHARE``) draw none."""
    kinds = tuple(kinds)
    if not kinds or rng.random() < FAULT_FREE_SHARE:
        return ()
    faults: list[Fault] = []
    if "skew" in kinds:
        for node in range(nodes):
            if rng.random() < 0.5:
                offset = _log_uniform(rng, 0.01, 3.0) * rng.choice((-1, 1))
                faults.append(Fault("skew", 0.0, math.inf, node, offset))
    episodic = [k for k in kinds if k != "skew"]
    if not episodic:
        return tuple(faults)
    window = max(0.0, seconds - 2 * QUIET_START)
    count = _poisson(rng, FAULTS_PER_MINUTE * seconds / 60) or 1
    for _ in range(count):
        kind = rng.choice(episodic)
        start = QUIET_START + rng.uniform(0, window)
        faults.append(_draw_one(rng, kind, start, nodes))
    return tuple(sorted(faults, key=lambda f: (f.start, f.kind, f.node or 0)))


def _draw_one(rng: random.Random, kind: str, start: float, nodes: int) -> Fault:
    node = rng.randrange(nodes) if kind in NODE_FAULTS else None
    if kind in ("outage", "hang", "partition"):
        return Fault(kind, start, _log_uniform(rng, 0.1, 30.0), node)
    if kind == "slow":
        return Fault(kind, start, rng.uniform(1.0, 30.0), node, _log_uniform(rng, 0.005, 0.5))
    if kind == "store-loss":
        return Fault(kind, start, _log_uniform(rng, 0.1, 5.0), node)
    if kind == "crash":
        return Fault(kind, start, rng.uniform(0.5, 5.0), node)
    if kind == "stall":
        return Fault(kind, start, _log_uniform(rng, 0.02, 2.0), node)
    if kind == "loop-stall":
        return Fault(kind, start, _log_uniform(rng, 0.02, 1.0), node)
    if kind == "pubsub-loss":
        return Fault(kind, start, rng.uniform(1.0, 30.0), node, rng.uniform(0.1, 1.0))
    raise ValueError(f"unknown fault kind {kind!r}")


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth's method: the means here are small)."""
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1

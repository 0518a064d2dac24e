"""What the simulated clients and operators do: the config, the requests, admin changes.

All of it is drawn from the seed's own random streams, in one task each, so a seed
always sends the same requests at the same simulated times:

* :func:`draw_config`: the ``[store]`` policy, the window and lease times, 2-3 tiers
  (requests, input, output and total tokens per window, some per hour, a default
  reservation, some ``max_concurrent``, some per-model rules), 0-2 teams, 3-8 config
  keys (each in a tier, some in a team, some with their own limits, a few in shadow
  mode). Limits are small, so that bursts reach them.
* :class:`Client`: requests at a low background rate plus bursts on one hot key (some
  of them at the start or end of a fault), each to one node: a model, ``max_tokens``
  or none, ``n``, an input token count, a stream or not, a duration, and how much of
  the reservation the reply produces (a stream that ends early produces less). A
  request sent to a node that is not serving (crashed, restarting) is a refused
  connection. Revoked keys stay in use: their refusal is what the oracle checks.
* :class:`Admin`: through a random node's keyring, as its admin API does: create a key,
  change one (its limit, tier, team, ``max_concurrent``, a per-model rule), revoke one,
  change a tier's limits; each call bounded by a client timeout.
* :class:`Watcher` (half the seeds): a usage-feed subscriber, as a websocket session
  is one without the websocket, watching the busiest key's events on one node; when
  that node dies it moves to another. The events it gets crossed the store's
  publish/subscribe from every node (so lost messages, hangs and crashes touch them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import attrs
import trio

from bench.simulate.faults import Fault
from bench.simulate.product import (
    KeyringError,
    Settings,
    StoreError,
    Viewer,
    digest_of,
    parse_settings,
)
from bench.simulate.trace import Trace

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-3.5-turbo")
WINDOWS = ((60, 5), (10, 1), (20, 2), (30, 5))  # (seconds, bucket_seconds)
LEASE_SECONDS = (2.0, 5.0, 30.0)
POLICIES = (("local", 0.8), ("closed", 0.2))
# An admin call's client gives up after this long (the store may hang).
ADMIN_TIMEOUT = 5.0
ADMIN_PER_MINUTE = 3.0
BURSTS_PER_MINUTE = 3.0
# Chance that a fault's start (and, separately, its end) gets a burst of its own.
FAULT_BURST = 0.6
# The longest a request lasts (a stream), seconds.
LONGEST_REQUEST = 8.0
# Seeds with a feed watcher; how long it waits before watching on another node.
WATCHED_SHARE = 0.5
RECONNECT_SECONDS = 1.0


@attrs.frozen
class SimKey:
    """An API key the clients know: its name, plaintext and digest; ``source`` is
    ``config`` or ``admin`` (created through the admin API)."""

    name: str
    plaintext: str
    digest: str
    source: str = "config"


@attrs.frozen
class SimConfig:
    """One seed's configuration: the node settings (node 0's; each node its own id) and
    what the clients and the admin know of it."""

    settings: Settings
    keys: tuple[SimKey, ...]
    tiers: tuple[str, ...]
    teams: tuple[str, ...]
    table: dict[str, Any]


def _limits(rng: random.Random, small: bool) -> dict[str, Any]:
    """A tier's or a key's limits table (config field names)."""
    table: dict[str, Any] = {}
    if small:
        table["rpm"] = rng.randint(3, 15)
        if rng.random() < 0.7:
            table["output_tpm"] = rng.randint(100, 1500)
        if rng.random() < 0.5:
            table["input_tpm"] = rng.randint(300, 3000)
        table["default_max_tokens"] = rng.randint(16, 128)
    else:
        table["rpm"] = rng.randint(20, 80)
        if rng.random() < 0.7:
            table["tpm"] = rng.randint(2000, 20000)
        if rng.random() < 0.3:
            table["rph"] = rng.randint(40, 400)
        table["default_max_tokens"] = rng.randint(64, 256)
    if rng.random() < 0.3:
        table["max_concurrent"] = rng.randint(1, 4)
    if rng.random() < 0.3:
        table["models"] = {"gpt-4o*": {"rpm": rng.randint(2, 10)}}
    return table


def draw_config(rng: random.Random, nodes: int, seed: int) -> SimConfig:
    """The seed's configuration (see the module docstring)."""
    window, bucket = rng.choice(WINDOWS)
    policy = rng.choices([p for p, _ in POLICIES], [w for _, w in POLICIES])[0]
    tiers = {f"t{i}": _limits(rng, small=i % 2 == 0) for i in range(rng.randint(2, 3))}
    teams: dict[str, Any] = {}
    for i in range(rng.choice((0, 0, 1, 2))):
        team: dict[str, Any] = {"rpm": rng.randint(10, 40)}
        if rng.random() < 0.5:
            team["tpm"] = rng.randint(2000, 10000)
        teams[f"team{i}"] = team
    keys: list[SimKey] = []
    entries: list[dict[str, Any]] = []
    for i in range(rng.randint(3, 8)):
        key = SimKey(f"k{i}", f"sk-sim-{seed}-{i}", digest_of(f"sk-sim-{seed}-{i}"))
        keys.append(key)
        entry: dict[str, Any] = {"name": key.name, "key": key.plaintext}
        entry["tier"] = rng.choice(sorted(tiers))
        if teams and rng.random() < 0.4:
            entry["team"] = rng.choice(sorted(teams))
        if rng.random() < 0.2:
            entry["rpm"] = rng.randint(2, 30)
        if rng.random() < 0.05:
            entry["mode"] = "shadow"
        entries.append(entry)
    table: dict[str, Any] = {
        "store": {"on_store_error": policy, "timeout_ms": 100},
        "window": {"seconds": window, "bucket_seconds": bucket},
        "limits": {"lease_seconds": rng.choice(LEASE_SECONDS)},
        "tiers": tiers,
        "teams": teams,
        "keys": entries,
    }
    settings = parse_settings(table, f"<simulation seed {seed}>", environ={})
    settings = attrs.evolve(settings, supervised_nodes=nodes)
    return SimConfig(settings, tuple(keys), tuple(sorted(tiers)), tuple(sorted(teams)), table)


@attrs.frozen
class Request:
    """One chat completion a client sends: ``share`` of the reservation is produced."""

    number: int
    key: SimKey
    body: dict[str, Any]
    input_tokens: int
    duration: float
    share: float

    @property
    def digest(self) -> str:
        return self.key.digest

    def produced(self, reserved: int) -> int:
        return int(reserved * self.share)


class NodeSet(Protocol):
    """The cluster as the clients see it: node ``i``'s current incarnation."""

    nodes: int

    def node(self, index: int) -> Any: ...


class KeyPool:
    """The keys the clients use: the config's, then those the admin created; revoked
    ones stay, drawn less often."""

    def __init__(self, keys: Iterable[SimKey]) -> None:
        self.keys = list(keys)
        self.revoked: set[str] = set()

    def add(self, key: SimKey) -> None:
        self.keys.append(key)

    def draw(self, rng: random.Random) -> SimKey:
        # Zipf-like: the first keys are the busiest; a revoked key a fifth as often.
        weights = [
            (0.2 if k.name in self.revoked else 1.0) / (i + 1) for i, k in enumerate(self.keys)
        ]
        return rng.choices(self.keys, weights)[0]

    def live(self) -> list[SimKey]:
        return [k for k in self.keys if k.name not in self.revoked]


def _arrivals(
    rng: random.Random, seconds: float, nodes: int, faults: Sequence[Fault], start: float
) -> list[tuple[float, int | None, int]]:
    """Request times: ``(time, node or None for any, burst id or -1)``, sorted."""
    out: list[tuple[float, int | None, int]] = []
    rate = rng.uniform(0.3, 2.0)
    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            break
        out.append((t, None, -1))
    anchors = [start + rng.uniform(0, seconds - start) for _ in range(_count(rng, seconds))]
    for fault in faults:
        for edge in (fault.start, fault.end):
            if math.isfinite(edge) and edge < seconds and rng.random() < FAULT_BURST:
                anchors.append(max(start, edge + rng.uniform(-0.5, 0.2)))
    for burst, anchor in enumerate(sorted(anchors)):
        node = rng.randrange(nodes) if rng.random() < 0.5 else None
        spread = rng.uniform(0.05, 2.0)
        for _ in range(rng.randint(5, 40)):
            when = anchor + rng.uniform(0, spread)
            if when < seconds:
                out.append((when, node, burst))
    out.sort(key=lambda a: (a[0], a[2]))
    return out


def _count(rng: random.Random, seconds: float) -> int:
    mean = BURSTS_PER_MINUTE * seconds / 60
    return max(1, round(rng.gauss(mean, math.sqrt(mean))))


class Client:
    """The clients: every request of the run (see the module docstring)."""

    def __init__(
        self,
        rng: random.Random,
        cluster: NodeSet,
        pool: KeyPool,
        trace: Trace,
        seconds: float,
        faults: Sequence[Fault],
        start: float,
    ) -> None:
        self.rng = rng
        self.cluster = cluster
        self.pool = pool
        self.trace = trace
        self.schedule = _arrivals(rng, seconds, cluster.nodes, faults, start)
        self.sent = 0
        self.refused_connections = 0

    async def run(self) -> None:
        rng = self.rng
        hot: dict[int, SimKey] = {}
        for when, node_hint, burst in self.schedule:
            await trio.sleep_until(when)
            if burst >= 0:
                key = hot.get(burst)
                if key is None:
                    key = hot[burst] = self.pool.draw(rng)
            else:
                key = self.pool.draw(rng)
            index = node_hint if node_hint is not None else rng.randrange(self.cluster.nodes)
            request = self._request(key)
            node = self.cluster.node(index)
            if node is None or not node.start_request(request):
                self.refused_connections += 1
                self.trace.add(index, "connect-refused", f"#{request.number} {key.name}")

    def _request(self, key: SimKey) -> Request:
        rng = self.rng
        self.sent += 1
        body: dict[str, Any] = {
            "model": rng.choice(MODELS),
            "messages": [{"role": "user", "content": "hi"}],
        }
        if rng.random() < 0.7:
            body["max_tokens"] = rng.randint(1, 200)
        if rng.random() < 0.1:
            body["n"] = 2
        stream = rng.random() < 0.5
        if stream:
            body["stream"] = True
            duration = math.exp(rng.uniform(math.log(0.1), math.log(LONGEST_REQUEST)))
            early = rng.random() < 0.3
            share = rng.uniform(0, 1) if early else rng.uniform(0.5, 1)
        else:
            duration = rng.uniform(0, 0.3)
            share = rng.uniform(0.3, 1)
        return Request(self.sent, key, body, rng.randint(1, 300), duration, share)


class Admin:
    """Admin changes through a random node's keyring (see the module docstring)."""

    def __init__(
        self,
        rng: random.Random,
        cluster: NodeSet,
        pool: KeyPool,
        config: SimConfig,
        trace: Trace,
        seconds: float,
        start: float,
        seed: int,
    ) -> None:
        self.rng = rng
        self.cluster = cluster
        self.pool = pool
        self.config = config
        self.trace = trace
        self.seconds = seconds
        self.start = start
        self.seed = seed
        self.created = 0
        self.calls = 0

    async def run(self) -> None:
        rng = self.rng
        t = self.start
        while True:
            t += rng.expovariate(ADMIN_PER_MINUTE / 60)
            if t >= self.seconds:
                return
            await trio.sleep_until(t)
            index = rng.randrange(self.cluster.nodes)
            op = rng.choice(("create", "update", "update", "revoke", "tier"))
            node = self.cluster.node(index)
            if node is None or not node.serving:
                self.trace.add(index, "admin-refused", op)
                continue
            self.calls += 1
            try:
                with trio.move_on_after(ADMIN_TIMEOUT) as scope:
                    what = await self._change(node.keyring, op)
            except (KeyringError, StoreError) as exc:
                self.trace.add(index, "admin-failed", f"{op}: {type(exc).__name__}")
                continue
            if scope.cancelled_caught:
                self.trace.add(index, "admin-timeout", op)
            elif what:
                self.trace.add(index, "admin", what)

    async def _change(self, keyring: Any, op: str) -> str | None:
        rng = self.rng
        config = self.config
        if op == "create":
            self.created += 1
            plaintext = f"sk-sim-{self.seed}-admin-{self.created}"
            key = SimKey(f"a{self.created}", plaintext, digest_of(plaintext), "admin")
            tier = rng.choice(config.tiers)
            team = rng.choice(config.teams) if config.teams and rng.random() < 0.3 else None
            await keyring.create_key(key.name, key.digest, tier=tier, team=team)
            self.pool.add(key)
            return f"create {key.name} tier {tier} team {team}"
        live = self.pool.live()
        if op == "revoke":
            if len(live) <= max(2, len(self.pool.keys) // 2):
                return None
            key = rng.choice(live)
            await keyring.revoke_key(key.name)
            self.pool.revoked.add(key.name)
            return f"revoke {key.name}"
        # Every change sets a default reservation no earlier change set: a write that
        # changed nothing would depend on the wall clock (the keyring stamps records
        # with time.time(), and the store skips a write of the record it already has).
        unique = {"default_max_tokens": 16 + self.calls}
        if op == "tier":
            tier = rng.choice(config.tiers)
            limits = _limits(rng, small=rng.random() < 0.5) | unique
            await keyring.put_tier(tier, limits)
            return f"tier {tier} {sorted(limits)}"
        key = rng.choice(live)
        patch = self._patch() | unique
        await keyring.update_key(key.name, patch)
        return f"update {key.name} {patch}"

    def _patch(self) -> dict[str, Any]:
        rng = self.rng
        config = self.config
        choice = rng.randrange(5)
        if choice == 0:
            return {"rpm": rng.randint(2, 60)}
        if choice == 1:
            return {"tier": rng.choice(config.tiers)}
        if choice == 2 and config.teams:
            return {"team": rng.choice((*config.teams, None))}
        if choice == 3:
            return {"max_concurrent": rng.choice((None, 1, 2, 3))}
        return {"models": {"gpt-4o*": {"rpm": rng.randint(2, 10)}}}


class Watcher:
    """A usage-feed subscriber (see the module docstring); ``on_event(node, body)`` is
    told every event it takes on ``node``."""

    def __init__(
        self,
        rng: random.Random,
        cluster: NodeSet,
        key: SimKey,
        on_event: Callable[[Any, str], None],
        trace: Trace,
        start: float,
    ) -> None:
        self.rng = rng
        self.cluster = cluster
        self.key = key
        self.on_event = on_event
        self.trace = trace
        self.start = start

    async def run(self) -> None:
        await trio.sleep_until(self.start + self.rng.uniform(0, 10))
        while True:
            index = self.rng.randrange(self.cluster.nodes)
            node = self.cluster.node(index)
            if node is not None and node.serving:
                self.trace.add(index, "watching", self.key.name)
                await self._watch(node)
            await trio.sleep(RECONNECT_SECONDS)

    async def _watch(self, node: Any) -> None:
        feed = node.gateway.feed
        with feed.subscription(Viewer("key", self.key.name)) as subscriber:
            await feed.announced()
            while not node.dead:
                with trio.move_on_after(RECONNECT_SECONDS):
                    _, events = await subscriber.take()
                    for body in events:
                        self.on_event(node, body)

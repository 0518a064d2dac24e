"""Decisions per second through the limiter: 3 base rules alone, and with a spend rule
and a per-user rule on top (issue #19), measured side by side in one run.

``python -m bench decisions --spend-and-users`` runs, in alternating rounds on one
store, the limiter's whole admission path (rows built from the key's rules per request,
the end user's digest, the model's price; admit, then settle to a real cost as a
request does) for ``keys`` keys of two configurations:

* ``base``: ``rpm``, ``input_tpm``, ``output_tpm`` (the 3 rules of the rules scenario);
* ``spend+user``: those, ``spend_per_day`` and ``per_user = {rpm}``, each request for
  one of ``users`` end users.

It prints each configuration's median decisions per second over the rounds and their
ratio. No limit is ever reached.

``python -m bench decisions --spend-and-users --at-node`` measures the same at the node,
where the issue's goal (at least 0.8) is stated: two ``tokenguard serve`` processes
(mock upstream; the store given, memory by default), one whose :data:`TP_SECRETS` keys
have the 3 base rules and one whose keys also have ``spend_per_day`` and ``per_user =
{rpm}`` (``[limits] user_header = "X-End-User"``), loaded in turn by wrk with one
script: the suite's chat requests (~100-token prompts, ``max_tokens`` 64, gpt-4o, priced
by the shipped table), each naming one of :data:`END_USERS` end users in the header
(the base node ignores it). Rounds alternate their order; each node is checked
afterwards to have counted spend and a per-user row (:func:`exercised`), so the figure
is of the rules it claims.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import trio

from bench.feed import _wait_healthy
from bench.ports import SUITE_PORTS, free_ports
from bench.suite.configs import HUGE as NEVER_REACHED
from bench.suite.configs import THREE_RULES, TP_SECRETS
from bench.wrk import run_wrk
from bench.wrk_script import chat_script
from tokenguard.cluster.redis_server import stop_process
from tokenguard.config.prices import Price
from tokenguard.limiting.limiter import Cost, Limiter
from tokenguard.model import ApiKey, Limits, digest_of, user_digest
from tokenguard.store.window_store import WindowStore, open_store, store_from_url

HUGE = 10**12
BASE = Limits(rpm=HUGE, input_tpm=HUGE, output_tpm=HUGE)
SPEND_AND_USERS = Limits(
    rpm=HUGE, input_tpm=HUGE, output_tpm=HUGE, spend_per_day=HUGE, per_user=Limits(rpm=HUGE)
)
PRICE = Price(input=2_500_000, cached_input=1_250_000, output=10_000_000)  # gpt-4o's


async def measure(
    limiter: Limiter, limits: Limits, *, seconds: float, concurrency: int, keys: int, users: int
) -> float:
    """Decisions per second for ``seconds`` with keys of ``limits``."""
    key_list = [ApiKey(f"k{k}", digest_of(f"{limits!r}{k}"), limits) for k in range(keys)]
    per_user = limits.per_user is not None
    digests = [user_digest(f"user-{u}") for u in range(users)] if per_user else [None]
    price = PRICE if limits.spend_per_day else None
    rng = random.Random(0)
    decisions = 0
    deadline = trio.current_time() + seconds

    async def worker() -> None:
        nonlocal decisions
        while trio.current_time() < deadline:
            key = key_list[rng.randrange(keys)]
            user = digests[rng.randrange(len(digests))]
            cost = Cost(input_tokens=50, output_tokens=50, price=price)
            decision = await limiter.admit(key, cost, "gpt-4o", user)
            decisions += 1
            if decision.admitted:
                await limiter.settle(decision, output_tokens=40)

    wall = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return decisions / (time.perf_counter() - wall)


async def compare(
    url: str, *, seconds: float, concurrency: int, rounds: int, keys: int = 100, users: int = 1000
) -> dict[str, list[float]]:
    """Alternating rounds of both configurations on one store: per-round figures."""
    figures: dict[str, list[float]] = {"base": [], "spend+user": []}
    async with open_store(store_from_url(url)) as store:
        limiter = limiter_on(store)
        for limits in (BASE, SPEND_AND_USERS):  # warm-up: connections, scripts, caches
            await measure(
                limiter, limits, seconds=0.3, concurrency=concurrency, keys=keys, users=users
            )
        for i in range(rounds):
            order = [("base", BASE), ("spend+user", SPEND_AND_USERS)]
            for name, limits in order if i % 2 == 0 else order[::-1]:
                figures[name].append(
                    await measure(
                        limiter,
                        limits,
                        seconds=seconds,
                        concurrency=concurrency,
                        keys=keys,
                        users=users,
                    )
                )
    return figures


def limiter_on(store: WindowStore) -> Limiter:
    return Limiter(store, window_seconds=60, bucket_seconds=5)


# --- at the node ---------------------------------------------------------------------

END_USERS = 100  # one per slot of wrk's request pool
START_TIMEOUT = 60.0
# A daily budget far out of reach that still fits a Lua double in micro-units.
BUDGET = 10**6


def node_config(with_spend_and_users: bool) -> str:
    """A node's config: :data:`TP_SECRETS` keys with the 3 base rules, and (``True``)
    ``spend_per_day`` and ``per_user = { rpm }`` on top, the end user from
    ``X-End-User``. Every limit is out of reach."""
    lines = ["[window]", "seconds = 60", "bucket_seconds = 5"]
    if with_spend_and_users:
        lines += ["", "[limits]", 'user_header = "X-End-User"']
    for i, secret in enumerate(TP_SECRETS):
        lines += ["", "[[keys]]", f'key = "{secret}"', f'name = "tp-{i}"']
        lines += [f"{rule} = {NEVER_REACHED}" for rule in THREE_RULES]
        if with_spend_and_users:
            lines += [f"spend_per_day = {BUDGET}", f"per_user = {{ rpm = {NEVER_REACHED} }}"]
    return "\n".join(lines) + "\n"


@attrs.frozen
class NodeFigures:
    """Requests per second per round of each node, and what the spend node counted."""

    base: list[float]
    spend_and_users: list[float]
    failed: int  # answers >= 400 and transport errors, over every round
    spend_used: int  # micro-units, tp-0's spend row, after the rounds
    user_requests: int  # requests of tp-0's end user user-0, after the rounds

    @property
    def ratio(self) -> float:
        """The medians' ratio."""
        return statistics.median(self.spend_and_users) / statistics.median(self.base)

    @property
    def paired_ratio(self) -> float:
        """The median over rounds of the ratio within a round (both nodes measured
        back to back, under the same background load)."""
        pairs = zip(self.spend_and_users, self.base, strict=True)
        return statistics.median(s / b for s, b in pairs)


@asynccontextmanager
async def running_node(config: Path, store: str | None, log: Path) -> AsyncIterator[str]:
    """``tokenguard serve --config CONFIG [--store STORE]`` on a free port, healthy;
    stopped when the ``async with`` ends."""
    port = free_ports(within=SUITE_PORTS)
    argv = [sys.executable, "-m", "tokenguard", "serve", "--config", str(config)]
    argv += ["--port", str(port), *(["--store", store] if store else [])]
    with open(log, "wb") as out:  # noqa: ASYNC230 (a local file, opened once)
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        with trio.fail_after(START_TIMEOUT):
            await _wait_healthy(url, process)  # as bench.proxy does
        yield url
    finally:
        with trio.CancelScope(shield=True):
            await stop_process(process)


async def exercised(url: str) -> tuple[int, int]:
    """tp-0's spend used, and its end user user-0's requests (``/v1/usage?user=``)."""
    headers = {"Authorization": f"Bearer {TP_SECRETS[0]}"}
    async with httpx.AsyncClient(timeout=10.0) as client:
        usage = await client.get(f"{url}/v1/usage", params={"user": "user-0"}, headers=headers)
    limits = usage.json()["limits"]
    spend = sum(e["used"] for e in limits if e["dimension"] == "spend")
    user = sum(e["used"] for e in limits if e["scope"] == "user")
    return spend, user


async def compare_at_nodes(
    store: str | None, *, seconds: float, connections: int, rounds: int, workdir: Path
) -> NodeFigures:
    """Both nodes up at once on ``store``; ``rounds`` wrk runs of each, order alternating."""
    script = workdir / "chat-users.lua"
    script.write_text(chat_script(TP_SECRETS, end_users=END_USERS), encoding="utf-8")
    configs = {}
    for name, with_rules in (("base", False), ("spend+user", True)):
        configs[name] = workdir / f"{name}.toml"
        configs[name].write_text(node_config(with_rules), encoding="utf-8")
    figures: dict[str, list[float]] = {"base": [], "spend+user": []}
    failed = 0
    async with (
        running_node(configs["base"], store, workdir / "base.log") as base,
        running_node(configs["spend+user"], store, workdir / "spend.log") as spend,
    ):
        urls = {"base": base, "spend+user": spend}
        for url in urls.values():  # warm-up: connections, encodings, scripts
            await run_wrk(url + "/v1/chat/completions", script, connections=connections, seconds=1)
        for i in range(rounds):
            order = ["base", "spend+user"] if i % 2 == 0 else ["spend+user", "base"]
            for name in order:
                result = await run_wrk(
                    urls[name] + "/v1/chat/completions",
                    script,
                    connections=connections,
                    seconds=seconds,
                )
                figures[name].append(result.rps)
                failed += sum(result.errors.values())
        spend_used, user_requests = await exercised(spend)
    return NodeFigures(figures["base"], figures["spend+user"], failed, spend_used, user_requests)


def main_at_nodes(args: argparse.Namespace) -> int:
    """Print each store's node figures; exit 1 when a run failed requests or the spend
    node did not count what it should."""
    status = 0
    for url in args.store or ["memory://"]:
        with tempfile.TemporaryDirectory(prefix="spend-bench-") as workdir:
            found = trio.run(
                lambda url=url, workdir=workdir: compare_at_nodes(
                    None if url == "memory://" else url,
                    seconds=args.seconds,
                    connections=args.concurrency,
                    rounds=args.rounds,
                    workdir=Path(workdir),
                )
            )
        rounds = ", ".join(
            f"{b:,.0f}/{s:,.0f}" for b, s in zip(found.base, found.spend_and_users, strict=True)
        )
        print(  # noqa: T201
            f"{url:<40} node, 3 rules {statistics.median(found.base):>8,.0f} req/s  "
            f"3 + spend + per-user {statistics.median(found.spend_and_users):>8,.0f} req/s  "
            f"ratio {found.ratio:.2f} (per round, median {found.paired_ratio:.2f})  "
            f"(rounds base/spend+user: {rounds}; failed "
            f"{found.failed}; tp-0 spent {found.spend_used} micro-units, its user-0 made "
            f"{found.user_requests} requests)",
            flush=True,
        )
        if found.failed or not found.spend_used or not found.user_requests:
            status = 1
    return status


def main(args: argparse.Namespace) -> int:
    if args.at_node:
        return main_at_nodes(args)
    for url in args.store or ["memory://"]:
        figures = trio.run(
            lambda url=url: compare(
                url, seconds=args.seconds, concurrency=args.concurrency, rounds=args.rounds
            )
        )
        base = statistics.median(figures["base"])
        spend = statistics.median(figures["spend+user"])
        print(  # noqa: T201
            f"{url:<40} base (3 rules) {base:>10,.0f}/s  spend+user (5 rules) {spend:>10,.0f}/s"
            f"  ratio {spend / base:.2f}  ({args.rounds} rounds of {args.seconds:g} s)",
            flush=True,
        )
    return 0

"""Store-only decisions per second: the limiter's admission path with no HTTP.

``python -m bench decisions --store memory:// --seconds 5 --concurrency 64`` runs
``concurrency`` trio tasks in one process, each admitting a request (and settling its
output reservation, as a real request would, every ``settle_every`` decisions) for one
of ``keys`` keys, and reports decisions per second. ``--rules`` sets how many rows each
admission carries (3 = requests, input and output tokens; more rows model richer limits
as extra windows of the same atomic call).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence

import attrs
import trio

from tokenguard.store.rows import Row
from tokenguard.store.window_store import WindowStore, open_store, store_from_url

DIMENSIONS = ("requests", "input_tokens", "output_tokens")


@attrs.frozen
class DecisionsResult:
    store: str
    concurrency: int
    rules: int
    decisions: int
    admitted: int
    seconds: float
    cpu_seconds: float

    @property
    def per_second(self) -> float:
        return self.decisions / self.seconds


def rows_for(key: int, rules: int) -> list[Row]:
    """``rules`` rows for one key: the three per-minute dimensions first, then extra
    windows (hour- and day-like, scaled down) cycling over the dimensions."""
    rows = []
    for i in range(rules):
        dimension = DIMENSIONS[i % 3]
        window_ms, bucket_ms = [(60_000, 5_000), (3_600_000, 60_000), (86_400_000, 3_600_000)][
            min(i // 3, 2)
        ]
        amount = 1 if dimension == "requests" else 50
        rows.append(
            Row(
                scope=f"key:bench{key}",
                dimension=dimension if i < 3 else f"{dimension}@{window_ms}",
                window_ms=window_ms,
                bucket_ms=bucket_ms,
                limit=10**12,
                amount=amount,
            )
        )
    return rows


async def measure(
    store: WindowStore,
    *,
    seconds: float,
    concurrency: int,
    rules: int = 3,
    keys: int = 100,
    settle_every: int = 1,
) -> DecisionsResult:
    """Run decisions against a running store for ``seconds``; return the counts."""
    rows = {k: rows_for(k, rules) for k in range(keys)}
    # Built once, not per decision: the benchmark measures the store, not itself.
    partitions = {k: f"bench{k}" for k in range(keys)}
    refunds = {k: [-10 if r.dimension.startswith("output") else 0 for r in rows[k]] for k in rows}
    decisions = admitted = 0
    rng = random.Random(0)
    deadline = trio.current_time() + seconds

    async def worker() -> None:
        nonlocal decisions, admitted
        while trio.current_time() < deadline:
            key = rng.randrange(keys)
            admission = await store.admit(partitions[key], rows[key])
            decisions += 1
            if admission.admitted:
                admitted += 1
                if settle_every and decisions % settle_every == 0:
                    await store.settle(admission.reservation, refunds[key])

    wall, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return DecisionsResult(
        store=store.url,
        concurrency=concurrency,
        rules=rules,
        decisions=decisions,
        admitted=admitted,
        seconds=time.perf_counter() - wall,
        cpu_seconds=time.process_time() - cpu,
    )


async def run_decisions(
    url: str, *, seconds: float, concurrency: int, rules: int = 3, settle_every: int = 1
) -> DecisionsResult:
    async with open_store(store_from_url(url)) as store:
        # A short warm-up: connections, script loading, first allocations.
        await measure(store, seconds=0.3, concurrency=concurrency, rules=rules)
        return await measure(
            store,
            seconds=seconds,
            concurrency=concurrency,
            rules=rules,
            settle_every=settle_every,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", action="append", help="store URL (repeatable)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rules", type=int, action="append", help="rows per admission")
    parser.add_argument(
        "--settle-every", type=int, default=1, help="settle every Nth admission (0: never)"
    )
    parser.add_argument(
        "--spend-and-users",
        action="store_true",
        help="through the limiter: 3 rules vs 3 + spend + per-user, side by side (#19)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="with --spend-and-users")
    parser.add_argument(
        "--at-node",
        action="store_true",
        help="with --spend-and-users: two node processes under wrk, not the limiter alone",
    )


def format_result(result: DecisionsResult) -> str:
    return (
        f"{result.store:<40} rules {result.rules:>2}  concurrency {result.concurrency:>3}  "
        f"{result.per_second:>10,.0f} decisions/s  (cpu {result.cpu_seconds / result.seconds:.0%})"
    )


def main(args: argparse.Namespace) -> int:
    if args.spend_and_users:
        # Imported here: it reads the suite's configs, and the suite imports this module.
        from bench import spend_rules

        return spend_rules.main(args)
    urls: Sequence[str] = args.store or ["memory://"]
    for url in urls:
        for rules in args.rules or [3]:
            result = trio.run(
                lambda url=url, rules=rules: run_decisions(
                    url,
                    seconds=args.seconds,
                    concurrency=args.concurrency,
                    rules=rules,
                    settle_every=args.settle_every,
                )
            )
            print(format_result(result), flush=True)
    return 0

"""The ``decisions`` scenario: store-only decisions per second (``python -m bench
decisions`` in processes of its own), the memory and Redis drivers with 3 and 8 rules
per decision, and ``redis-benchmark`` on the same Redis for scale.
"""

from __future__ import annotations

import re
import shlex
import sys
import time

import attrs
import trio

from bench.charts import Panel
from bench.procfs import cpu_seconds
from bench.suite.context import Suite
from bench.suite.figures import fmt_int, fmt_pct, median, spread
from bench.suite.goals import GOALS, Goal, goal_at_least
from bench.suite.machine import REPO
from bench.suite.profile import Profile
from bench.suite.redis_benchmark import BenchFigure, redis_benchmark_figures
from bench.suite.section import Section
from bench.suite.targets import RedisInfo, SuiteError

DECISIONS_CONCURRENCY = 64
STORES = ("memory", "redis")
DRIVER_LABELS = {"memory": "memory store", "redis": "Redis driver"}


async def run_decisions_process(
    url: str,
    rules: int,
    seconds: float,
    concurrency: int = DECISIONS_CONCURRENCY,
    settle_every: int = 1,
) -> tuple[float, float]:
    """``python -m bench decisions`` in its own process: (decisions/s, CPU share)."""
    argv = [
        sys.executable, "-m", "bench", "decisions",
        "--store", url,
        "--seconds", f"{seconds:g}",
        "--concurrency", str(concurrency),
        "--rules", str(rules),
        "--settle-every", str(settle_every),
    ]  # fmt: skip
    with trio.fail_after(seconds + 60):
        done = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, cwd=str(REPO)
        )
    out = done.stdout.decode(errors="replace")
    match = re.search(r"([\d,]+) decisions/s\s+\(cpu (\d+)%\)", out)
    if done.returncode != 0 or match is None:
        raise SuiteError(
            f"{shlex.join(argv)} failed ({done.returncode}):\n{out}"
            f"{done.stderr.decode(errors='replace')[-3000:]}"
        )
    return float(match.group(1).replace(",", "")), int(match.group(2)) / 100


@attrs.define
class DecisionRates:
    """What the scenario measured: (decisions/s, CPU share of the process) per round for
    each (store, rules) cell, and the extra runs with 3 rules."""

    cells: list[tuple[str, str, int]]
    results: dict[tuple[str, int], list[tuple[float, float]]]
    redis_cpu: list[float] = attrs.field(factory=list)
    # One task at a time: the latency of one decision (an admit and its settle).
    single: dict[str, list[float]] = attrs.field(factory=lambda: {s: [] for s in STORES})
    # Admissions alone, never settled: what the admit path alone sustains.
    admit_only: dict[str, list[float]] = attrs.field(factory=lambda: {s: [] for s in STORES})

    def rates(self, store: str, rules: int) -> list[float]:
        return [r for r, _ in self.results[store, rules]]

    def ratio(self, store: str) -> list[float]:
        """Per round: the rate with 8 rules over the rate with 3."""
        pairs = zip(self.rates(store, 8), self.rates(store, 3), strict=True)
        return [e / t for e, t in pairs if t > 0]


async def scenario_decisions(suite: Suite) -> Section:
    section = suite.section("decisions", "Store-only decisions per second (no HTTP)")
    p = suite.profile
    info = await suite.redis()
    measured = await _measure(suite, info)
    figures, missing = await redis_benchmark_figures(suite, info, p.redis_benchmark_requests)
    section.intro = _intro(p, info)
    section.commands = [
        f"python -m bench decisions --store memory:// --seconds {p.decisions_seconds:g} "
        f"--concurrency {DECISIONS_CONCURRENCY} --rules 3 --rules 8",
        f"python -m bench decisions --store unix:///path/to/redis.sock "
        f"--seconds {p.decisions_seconds:g} --concurrency {DECISIONS_CONCURRENCY} "
        "--rules 3 --rules 8",
        "python -m bench decisions --store unix:///path/to/redis.sock --settle-every 0",
        "python -m bench decisions --store unix:///path/to/redis.sock --concurrency 1",
    ]
    section.body = [
        *_rates_table(measured),
        *_redis_benchmark_table(figures),
        *_closing(p, measured),
    ]
    section.notes += _redis_benchmark_notes(measured, figures, missing)
    section.goals = _goals(p, measured)
    section.ratios = [
        (f"store-only decisions/s, 8 rules / 3 rules, {label}", median(measured.ratio(store)))
        for store, label in DRIVER_LABELS.items()
    ]
    section.data = {
        "results": {f"{s}/{r}": v for (s, r), v in measured.results.items()},
        "single_task_rates": measured.single,
        "admit_only_rates": measured.admit_only,
        "redis_cpu": measured.redis_cpu,
        "redis_benchmark": [attrs.asdict(f) for f in figures],
    }
    _chart(suite, section, measured, figures)
    return section


async def _measure(suite: Suite, info: RedisInfo) -> DecisionRates:
    """Every cell once a round, the order rotating, then the extra runs of the round."""
    p = suite.profile
    urls = {"memory": "memory://", "redis": info.url}
    cells = [(store, urls[store], rules) for store in STORES for rules in (3, 8)]
    measured = DecisionRates(cells, {(s, r): [] for s, _, r in cells})
    for rnd in range(p.decisions_rounds):
        order = cells[rnd % len(cells) :] + cells[: rnd % len(cells)]
        for store, url, rules in order:
            before, t0 = cpu_seconds(info.pid), time.monotonic()
            rate, cpu = await run_decisions_process(url, rules, p.decisions_seconds)
            if store == "redis" and rules == 3 and info.pid is not None:
                # Over the whole process (its start and warm-up too): a lower bound.
                cpu_share = (cpu_seconds(info.pid) - before) / (time.monotonic() - t0)
                measured.redis_cpu.append(cpu_share)
            measured.results[store, rules].append((rate, cpu))
            suite.say(f"decisions round {rnd + 1} {store} rules {rules}: {rate:,.0f}/s")
        if not p.decisions_extras:
            continue
        for store in STORES:
            rate, _ = await run_decisions_process(
                urls[store], 3, p.decisions_seconds, settle_every=0
            )
            measured.admit_only[store].append(rate)
            rate, _ = await run_decisions_process(
                urls[store], 3, p.decisions_seconds / 2, concurrency=1
            )
            measured.single[store].append(rate)
    return measured


def _intro(p: Profile, info: RedisInfo) -> str:
    return (
        f"`Limiter` admissions straight through the window store in one process: "
        f"{DECISIONS_CONCURRENCY} trio tasks, 100 keys, each admission settled as a real "
        f"request would be (`python -m bench decisions`, {p.decisions_seconds:g} s per "
        f"measurement after a 0.3 s warm-up, {p.decisions_rounds} interleaved round(s), a "
        "fresh process each). Rules = rows per atomic admission: 3 (requests, input and "
        "output tokens per minute) or 8 (plus hour- and day-like windows). The Redis is "
        + (
            "the suite's private redis-server (unix socket, append-only, like the "
            "supervisor's embedded one)."
            if info.embedded
            else f"`{info.url}` (given with `--redis`)."
        )
    )


def _rates_table(measured: DecisionRates) -> list[str]:
    rows = [
        "| store | rules | decisions/s (median) | range | CPU of the process | 8 rules / 3 rules |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for store, _, rules in measured.cells:
        values = measured.rates(store, rules)
        low, high = spread(values)
        cpu = median([c for _, c in measured.results[store, rules]])
        r = fmt_pct(median(measured.ratio(store))) if rules == 8 else ""
        rows.append(
            f"| {store} | {rules} | {fmt_int(median(values))} | {fmt_int(low)}–{fmt_int(high)} "
            f"| {cpu:.0%} | {r} |"
        )
    return rows


def _redis_benchmark_table(figures: list[BenchFigure]) -> list[str]:
    if not figures:
        return []
    rows = [
        "",
        "For scale, `redis-benchmark` against the same Redis (the admit script is the "
        "driver's own `admit.lua` with three rows, on 100 random keys: SHA, the keys "
        "and the arguments are filled in as the driver sends them):",
        "",
        "| redis-benchmark | ops/s | p50 | command |",
        "| --- | ---: | ---: | --- |",
    ]
    for f in figures:
        p50 = "-" if f.p50_ms is None else f"{f.p50_ms:.3f} ms"
        rows.append(f"| {f.label} | {fmt_int(f.rps)} | {p50} | `{f.command}` |")
    return rows


def _redis_benchmark_notes(
    measured: DecisionRates, figures: list[BenchFigure], missing: str | None
) -> list[str]:
    """The driver's rate as a share of redis-benchmark's for the same script, or why
    there is no redis-benchmark figure."""
    notes = []
    scripted = [f for f in figures if "admit.lua" in f.label]
    if scripted:
        pipelined = scripted[-1].rps
        driver = median(measured.rates("redis", 3))
        cpu = measured.redis_cpu
        notes.append(
            f"The Redis driver's rate with 3 rules is {fmt_pct(driver / pipelined)} of "
            "redis-benchmark's for the same script pipelined on the same Redis"
            + (f"; redis-server used {median(cpu):.0%} of a core meanwhile." if cpu else ".")
        )
    if missing:
        notes.append(missing)
    return notes


def _closing(p: Profile, measured: DecisionRates) -> list[str]:
    """What a decision is, the extra runs' figures, and where the rows' cost is read."""
    lines = [
        "",
        "Each decision above is an admission and, as for a real request, the settlement "
        "of its output reservation: two store calls.",
    ]
    if p.decisions_extras:
        admit_only, single = measured.admit_only, measured.single
        lines[-1] += (
            " Admissions alone (`--settle-every 0`, "
            f"3 rules): memory store {fmt_int(median(admit_only['memory']))}/s, Redis driver "
            f"{fmt_int(median(admit_only['redis']))}/s. One decision at a time "
            "(`--concurrency 1`, 3 rules, settled): the latency of an admit and its settle "
            f"from one trio task, nothing batched: memory store "
            f"{1e6 / median(single['memory']):.0f} µs, Redis driver "
            f"{1e6 / median(single['redis']):.0f} µs."
        )
    return [
        *lines,
        "",
        "Where a row's cost goes in each driver, what was tried to bring the 8 / 3 ratio "
        "up, and what the same rules cost a node serving HTTP: "
        "[rules-cost.md](rules-cost.md) and the `rules` section below.",
    ]


def _goals(p: Profile, measured: DecisionRates) -> list[Goal]:
    mem3, red3 = median(measured.rates("memory", 3)), median(measured.rates("redis", 3))
    goals = [
        goal_at_least(
            "Decisions/s, memory store, 3 rules (admit + settle)", mem3, GOALS["memory_decisions"]
        ),
        goal_at_least(
            "Decisions/s, Redis driver, 3 rules (admit + settle)", red3, GOALS["redis_decisions"]
        ),
        *(
            goal_at_least(
                f"Decisions/s, 8 rules / 3 rules, {label}",
                median(measured.ratio(store)),
                GOALS["rules_ratio"],
                percent=True,
            )
            for store, label in DRIVER_LABELS.items()
        ),
    ]
    if p.decisions_extras:
        goals.insert(
            2,
            goal_at_least(
                "Decisions/s, Redis driver, 3 rules, admissions only (no settle)",
                median(measured.admit_only["redis"]),
                GOALS["redis_decisions"],
            ),
        )
    return goals


def _chart(
    suite: Suite, section: Section, measured: DecisionRates, figures: list[BenchFigure]
) -> None:
    rates = measured.rates
    panels = [
        Panel(
            kind="bar",
            title="decisions per second (median, min-max)",
            x=list(DRIVER_LABELS.values()),
            series={
                f"{rules} rules": [median(rates(store, rules)) for store in STORES]
                for rules in (3, 8)
            },
            spread={
                f"{rules} rules": [spread(rates(store, rules)) for store in STORES]
                for rules in (3, 8)
            },
            hlines=[
                (GOALS["memory_decisions"], "goal: memory 50k/s"),
                (GOALS["redis_decisions"], "goal: Redis 20k/s"),
            ],
            ylabel="decisions/s",
            labels=True,
        )
    ]
    if figures:
        panels.append(
            Panel(
                kind="bar",
                title="Redis driver vs redis-benchmark, same Redis",
                x=["driver\n3 rules", *(f.short for f in figures)],
                series={"ops/s": [median(rates("redis", 3)), *(f.rps for f in figures)]},
                ylabel="operations/s",
                labels=True,
            )
        )
    suite.chart("decisions", "Store-only decisions per second", panels, section)

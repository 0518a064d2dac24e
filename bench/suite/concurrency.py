"""The ``concurrency`` scenario: the three single nodes at 1 to 256 connections, the
three measured back to back at each level.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.charts import Panel
from bench.suite.context import Suite
from bench.suite.figures import fmt_int, fmt_ms, fmt_pct
from bench.suite.runs import Run, error_notes
from bench.suite.section import Section
from bench.suite.targets import VARIANT_LABELS, VARIANTS, Target, trouble_before, trouble_notes


async def scenario_concurrency(suite: Suite) -> Section:
    section = suite.section("concurrency", "Concurrency sweep: 1 to 256 connections")
    p = suite.profile
    nodes = await suite.singles()
    trouble = trouble_before(nodes)
    table = await _sweep(suite, nodes)
    suite.sample_singles("after load")
    section.intro = (
        "The three single nodes of the previous section at each number of connections, "
        f"{p.sweep_seconds} s each, the three measured back to back at each level (the "
        "order rotating). One measurement per cell: single cells are noisier than the "
        "ratios above. " + suite.client.note
    )
    section.commands = [
        suite.client.commands(connections=level, seconds=p.sweep_seconds, share=0.0)
        for level in (p.sweep_levels[0], p.sweep_levels[-1])
    ]
    section.body = _table(table)
    section.notes += trouble_notes(nodes, trouble)
    section.notes += error_notes(
        {f"{v} at {lv}": [row[v]] for lv, row in table.items() for v in VARIANTS}, "sweep"
    )
    section.data = {
        str(level): {v: r.result.to_dict() for v, r in row.items()} for level, row in table.items()
    }
    _chart(suite, section, table)
    return section


async def _sweep(suite: Suite, nodes: dict[str, Target]) -> dict[int, dict[str, Run]]:
    """One measurement of each node per level, the order rotating from level to level."""
    p = suite.profile
    table: dict[int, dict[str, Run]] = {}
    for i, level in enumerate(p.sweep_levels):
        runs = await suite.interleave(
            {v: nodes[v] for v in VARIANTS[i % 3 :] + VARIANTS[: i % 3]},
            rounds=1,
            connections=level,
            seconds=p.sweep_seconds,
            label=f"concurrency {level}",
        )
        table[level] = {v: runs[v][0] for v in VARIANTS}
    return table


def _table(table: dict[int, dict[str, Run]]) -> list[str]:
    rows = [
        "| connections | limits off req/s | memory req/s | (vs off) | Redis req/s | (vs off) "
        "| p50 ms off / memory / Redis | p99 ms off / memory / Redis |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level, row in table.items():
        off = row["off"].result.rps
        mem, red = row["memory"].result.rps, row["redis"].result.rps

        def lats(name: str, row: dict[str, Run] = row) -> str:
            return " / ".join(fmt_ms(row[v].result.latency.get(name)) for v in VARIANTS)

        mem_ratio = mem / off if off else float("nan")
        red_ratio = red / off if off else float("nan")
        rows.append(
            f"| {level} | {fmt_int(off)} | {fmt_int(mem)} | {fmt_pct(mem_ratio)} "
            f"| {fmt_int(red)} | {fmt_pct(red_ratio)} | {lats('p50')} | {lats('p99')} |"
        )
    return rows


def _chart(suite: Suite, section: Section, table: dict[int, dict[str, Run]]) -> None:
    levels = list(table)

    def series(metric: Callable[[Run], float | None]) -> dict[str, list[float | None]]:
        return {VARIANT_LABELS[v]: [metric(table[lv][v]) for lv in levels] for v in VARIANTS}

    def ms(name: str) -> Callable[[Run], float | None]:
        def get(run: Run) -> float | None:
            value = run.result.latency.get(name)
            return None if value is None else value * 1000

        return get

    suite.chart(
        "concurrency",
        "Concurrency sweep, one node",
        [
            Panel(
                kind="line",
                title="throughput",
                x=levels,
                series=series(lambda r: r.result.rps),
                xlabel="connections",
                ylabel="requests/s",
                logx=True,
                ymin=0,
            ),
            *(
                Panel(
                    kind="line",
                    title=f"{name} latency",
                    x=levels,
                    series=series(ms(name)),
                    xlabel="connections",
                    ylabel="ms",
                    logx=True,
                    logy=True,
                )
                for name in ("p50", "p99")
            ),
        ],
        section,
    )

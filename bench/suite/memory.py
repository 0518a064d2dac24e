"""The ``memory`` section: resident memory per process, idle and after load, from the
samples the other scenarios took (it runs no load of its own, so it runs last).
"""

from __future__ import annotations

import attrs

from bench.charts import Panel
from bench.suite.context import RssSample, Suite
from bench.suite.figures import MB, fmt_mb, median
from bench.suite.goals import GOALS, Goal, goal_at_most
from bench.suite.section import Section

PHASES = ("idle", "after load")
# The table's order: by the first of these each process's name starts with.
PROCESS_ORDER = ("single node", "cluster node", "supervisor", "redis-server")


async def scenario_memory(suite: Suite) -> Section:
    section = suite.section("memory", "Resident memory per process")
    section.intro = (
        "VmRSS from `/proc/PID/status` of each process, sampled by the other scenarios: "
        "*idle* about a second after the node became healthy, *after load* right after "
        "that scenario's load ended. Cluster nodes are found as the supervisor's children "
        "with `--node-id` on their command line. MB = 10^6 bytes."
    )
    section.commands = ["grep VmRSS /proc/$(pgrep -f 'tokenguard serve.*--node-id 0')/status"]
    if not suite.rss:
        section.body = ["No samples: run the scenarios that start nodes."]
        return section
    by: dict[tuple[str, str], list[int]] = {}
    for sample in suite.rss:
        by.setdefault((sample.process, sample.phase), []).append(sample.kib)
    processes = sorted(
        dict.fromkeys(s.process for s in suite.rss),
        key=lambda name: next((i for i, o in enumerate(PROCESS_ORDER) if name.startswith(o)), 9),
    )
    section.body = _table(by, processes)
    section.goals = _goals(suite.rss)
    section.data = {"samples": [attrs.asdict(s) for s in suite.rss]}
    _chart(suite, section, by, processes)
    return section


def _table(by: dict[tuple[str, str], list[int]], processes: list[str]) -> list[str]:
    rows = [
        "| process | idle, median (max) MB | after load, median (max) MB | samples |",
        "| --- | ---: | ---: | ---: |",
    ]
    for process in processes:
        cells = []
        count = 0
        for phase in PHASES:
            values = by.get((process, phase), [])
            count += len(values)
            cells.append(f"{fmt_mb(median(values))} ({fmt_mb(max(values))})" if values else "-")
        rows.append(f"| {process} | {cells[0]} | {cells[1]} | {count} |")
    return rows


def _goals(samples: list[RssSample]) -> list[Goal]:
    goals = []
    nodes = [s for s in samples if "node" in s.process]
    for phase in PHASES:
        values = [s.kib for s in nodes if s.phase == phase]
        if values:
            goals.append(
                goal_at_most(
                    f"Resident memory per node process, {phase} (largest)",
                    max(values) * 1024 / MB,
                    GOALS["rss_mb"],
                    "MB",
                )
            )
    return goals


def _chart(
    suite: Suite, section: Section, by: dict[tuple[str, str], list[int]], processes: list[str]
) -> None:
    suite.chart(
        "memory",
        "Resident memory per process",
        [
            Panel(
                kind="bar",
                title="VmRSS, largest sample",
                x=[p.replace(", ", "\n").replace(" (", "\n(") for p in processes],
                series={
                    phase: [
                        max(by[p, phase]) * 1024 / MB if (p, phase) in by else None
                        for p in processes
                    ]
                    for phase in PHASES
                },
                hlines=[(GOALS["rss_mb"], "goal: 80 MB per node")],
                ylabel="MB",
                labels=True,
            )
        ],
        section,
    )

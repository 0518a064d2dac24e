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
        "VmRSS from `/proc/PID/status` of each process, and PSS (its share of pages it "
        "shares with other processes) and USS (its private pages: what stopping it "
        "frees) from `/proc/PID/smaps_rollup`, sampled by the other scenarios: "
        "*idle* about a second after the node became healthy, *after load* right after "
        "that scenario's load ended. Cluster nodes are found as the supervisor's children "
        "with `--node-id` on their command line. MB = 10^6 bytes."
    )
    section.commands = [
        "grep VmRSS /proc/$(pgrep -f 'tokenguard serve.*--node-id 0')/status",
        "grep -E '^(Pss|Private)' /proc/$(pgrep -f 'tokenguard serve.*--node-id 0')/smaps_rollup",
    ]
    if not suite.rss:
        section.body = ["No samples: run the scenarios that start nodes."]
        return section
    by: dict[tuple[str, str], list[RssSample]] = {}
    for sample in suite.rss:
        by.setdefault((sample.process, sample.phase), []).append(sample)
    processes = sorted(
        dict.fromkeys(s.process for s in suite.rss),
        key=lambda name: next((i for i, o in enumerate(PROCESS_ORDER) if name.startswith(o)), 9),
    )
    section.body = _table(by, processes)
    section.goals = _goals(suite.rss)
    section.data = {"samples": [attrs.asdict(s) for s in suite.rss]}
    _chart(suite, section, by, processes)
    return section


def _table(by: dict[tuple[str, str], list[RssSample]], processes: list[str]) -> list[str]:
    rows = [
        "| process | idle RSS, median (max) MB | idle PSS / USS, max MB "
        "| after load RSS, median (max) MB | after load PSS / USS, max MB | samples |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for process in processes:
        cells = []
        count = 0
        for phase in PHASES:
            samples = by.get((process, phase), [])
            count += len(samples)
            values = [s.kib for s in samples]
            cells.append(f"{fmt_mb(median(values))} ({fmt_mb(max(values))})" if values else "-")
            cells.append(_shared(samples))
        rows.append(f"| {process} | {' | '.join(cells)} | {count} |")
    return rows


def _shared(samples: list[RssSample]) -> str:
    """The largest PSS and USS of ``samples``, "-" where none was read."""
    pss = [s.pss_kib for s in samples if s.pss_kib is not None]
    uss = [s.uss_kib for s in samples if s.uss_kib is not None]
    if not pss or not uss:
        return "-"
    return f"{fmt_mb(max(pss))} / {fmt_mb(max(uss))}"


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
    suite: Suite,
    section: Section,
    by: dict[tuple[str, str], list[RssSample]],
    processes: list[str],
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
                        max(s.kib for s in by[p, phase]) * 1024 / MB if (p, phase) in by else None
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

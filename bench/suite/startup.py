"""The ``startup`` scenario: ``tokenguard serve`` (1 node) and ``serve --nodes 3`` until
every node answers ``/healthz``, repeated; resident memory at idle is sampled meanwhile.
"""

from __future__ import annotations

import trio

from bench.charts import Panel
from bench.suite.context import Suite
from bench.suite.figures import median
from bench.suite.goals import GOALS, goal_at_most
from bench.suite.section import Section
from bench.suite.targets import Target


async def scenario_startup(suite: Suite) -> Section:
    section = suite.section("startup", "Startup: `tokenguard serve` to every node healthy")
    singles, clusters = await _measure(suite)
    three = [c.startup_seconds for c in clusters]
    store = "embedded Redis" if suite.given_redis is None else "the given Redis"
    section.intro = (
        "Time from spawning the command to the moment every node answers `GET /healthz` "
        "with 200 (polled every 20 ms by the suite), "
        f"{suite.profile.startup_repeats} repetition(s), alternating. The 3-node cluster "
        f"starts its {store} and its three node processes side by side; the supervisor's "
        "own figure (printed as `nodes healthy after`) is shown too."
    )
    section.commands = [
        "time tokenguard serve --config bench.toml --port 8000   # until /healthz answers",
        "tokenguard serve --nodes 3 --config bench.toml --port 8000 --state-dir DIR",
    ]
    reported = [c.reported_ready for c in clusters if c.reported_ready is not None]
    section.body = _table(singles, three, reported)
    budget = GOALS["startup_per_node"]
    section.goals = [
        goal_at_most(name, value, budget, "s")
        for name, value in (
            ("Startup, 1 node: `tokenguard serve` to healthy (median)", median(singles)),
            (
                "Startup, 3 nodes: `serve --nodes 3` to all healthy, per node (median / 3)",
                median(three) / 3,
            ),
            (
                "Startup, 3 nodes, strict reading: slowest node healthy (median)",
                median([max(c.node_ready) for c in clusters]),
            ),
        )
    ]
    section.data = {
        "single_seconds": singles,
        "cluster_seconds": three,
        "cluster_node_ready": [c.node_ready for c in clusters],
        "cluster_reported": reported,
    }
    _chart(suite, section, singles, three)
    return section


async def _measure(suite: Suite) -> tuple[list[float], list[Target]]:
    """Start, time, sample and stop one node and one 3-node cluster, taking turns:
    the single node's startup seconds and the clusters."""
    p = suite.profile
    singles: list[float] = []
    clusters: list[Target] = []
    for rep in range(p.startup_repeats):
        single = await suite.start_single("memory", name="startup-single")
        singles.append(single.startup_seconds)
        await trio.sleep(p.settle)
        suite.sample_rss("single node, memory store", "idle", single.node_pids)
        await single.proc.stop()
        cluster = await suite.start_cluster(
            3, config=suite.tp_config, store=suite.given_redis, name="startup-cluster"
        )
        clusters.append(cluster)
        await trio.sleep(p.settle)
        suite.sample_rss("cluster node (of 3)", "idle", cluster.node_pids)
        suite.sample_rss("supervisor", "idle", [cluster.proc.pid])
        suite.sample_rss("redis-server (embedded)", "idle", [cluster.redis_pid])
        await cluster.proc.stop()
        suite.say(
            f"startup {rep + 1}/{p.startup_repeats}: 1 node {single.startup_seconds:.2f} s, "
            f"3 nodes {cluster.startup_seconds:.2f} s "
            f"(nodes {', '.join(f'{t:.2f}' for t in cluster.node_ready)})"
        )
    return singles, clusters


def _table(singles: list[float], three: list[float], reported: list[float]) -> list[str]:
    rows = [
        "| command | median | min | max | per node |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| `tokenguard serve` (1 node) | {median(singles):.2f} s | {min(singles):.2f} s | "
        f"{max(singles):.2f} s | {median(singles):.2f} s |",
        f"| `tokenguard serve --nodes 3` | {median(three):.2f} s | {min(three):.2f} s | "
        f"{max(three):.2f} s | {median(three) / 3:.2f} s |",
    ]
    if reported:
        rows.append(
            f"| (the supervisor's own `nodes healthy after`) | {median(reported):.2f} s | "
            f"{min(reported):.2f} s | {max(reported):.2f} s | |"
        )
    return rows


def _chart(suite: Suite, section: Section, singles: list[float], three: list[float]) -> None:
    suite.chart(
        "startup",
        "Startup: spawn to every node healthy",
        [
            Panel(
                kind="bar",
                title="seconds, per repetition",
                x=[f"run {i + 1}" for i in range(len(singles))],
                series={"1 node": singles, "3 nodes": three},
                ylabel="seconds",
                hlines=[(GOALS["startup_per_node"], "goal: 2 s per node")],
                labels=True,
                value_format="{:.2f}",
            )
        ],
        section,
    )

"""The ``nodes`` scenario: 1 vs 2 vs 3 nodes on one Redis, the same total connections
split over the nodes.
"""

from __future__ import annotations

import attrs
import trio

from bench.suite.context import Suite
from bench.suite.runs import error_notes, latency_panel, runs_data, throughput_panel, variant_table
from bench.suite.section import Section
from bench.suite.targets import Target, trouble_before, trouble_notes


async def scenario_nodes(suite: Suite) -> Section:
    section = suite.section("nodes", "1 vs 2 vs 3 nodes on one Redis")
    p = suite.profile
    targets = await _targets(suite)
    trouble = trouble_before(targets)
    runs = await suite.interleave(
        targets,
        rounds=p.nodes_rounds,
        connections=p.nodes_connections,
        seconds=p.nodes_seconds,
        label="nodes",
    )
    await _sample_and_stop(suite, targets)
    section.intro = (
        f"N node processes (`serve --nodes N` with `--store` pointing at one Redis; the "
        f"1-node case is the single Redis-store node above), {p.nodes_connections} "
        f"connections in total split evenly over the nodes, {p.nodes_rounds} round(s) of "
        f"{p.nodes_seconds} s, order rotating. On a {suite.machine.usable_cores}-core "
        "machine the nodes, Redis and the client share the cores: more nodes cannot add "
        "CPU that is not there, so read the node CPU column with the throughput. "
        + suite.client.note
    )
    section.commands = [
        "tokenguard serve --nodes 3 --config bench.toml --port 8000 --store unix:///path/to/redis.sock",
        suite.client.commands(
            connections=p.nodes_connections, seconds=p.nodes_seconds, share=0.0, nodes=3
        ),
    ]
    rows, ratios = variant_table(
        runs, "1 node", compared="vs 1 node", first="nodes", cpu="nodes' CPU (% of a core)"
    )
    section.body = rows
    section.notes.append(
        "With several nodes, p50/p99 are the request-weighted means of the per-node wrk "
        "figures (exact percentiles cannot be merged from summaries); node CPU is the sum "
        "over the nodes, in cores."
    )
    section.notes += error_notes(runs, "nodes")
    section.notes += trouble_notes(targets, trouble)
    section.ratios = [(f"{n}, Redis store / 1 node", ratios[n]) for n in ("2 nodes", "3 nodes")]
    section.data = {"runs": runs_data(runs), "ratios": ratios}
    names = {n: n for n in targets}
    suite.chart(
        "nodes",
        "1 vs 2 vs 3 nodes, Redis store",
        [
            throughput_panel(
                f"throughput, {p.nodes_connections} connections in total", runs, names
            ),
            latency_panel("latency", runs, names, "{:.1f}"),
        ],
        section,
    )
    return section


async def _targets(suite: Suite) -> dict[str, Target]:
    """The single Redis-store node and 2- and 3-node clusters on the same Redis (started
    here, sampled idle, warmed)."""
    info = await suite.redis()
    singles = await suite.singles()
    targets: dict[str, Target] = {"1 node": singles["redis"]}
    for n in (2, 3):
        started = await suite.start_cluster(
            n, config=suite.tp_config, store=info.url, name=f"cluster-{n}"
        )
        # Its store is the suite's Redis: that is the Redis whose CPU is measured.
        cluster = attrs.evolve(started, redis_pid=info.pid)
        targets[f"{n} nodes"] = cluster
        await trio.sleep(0.5)
        suite.sample_rss(f"cluster node (of {n})", "idle", cluster.node_pids)
        await suite.warm(cluster)
    return targets


async def _sample_and_stop(suite: Suite, targets: dict[str, Target]) -> None:
    """Sample the clusters' and the Redis' memory after load, and stop the clusters."""
    for name, target in targets.items():
        if name != "1 node":
            suite.sample_rss(f"cluster node (of {name[0]})", "after load", target.node_pids)
            suite.sample_rss("supervisor", "after load", [target.proc.pid])
            await target.proc.stop()
    suite.sample_rss("redis-server (suite's)", "after load", [(await suite.redis()).pid])

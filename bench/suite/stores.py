"""The ``stores`` scenario: one node with limits off vs the memory store vs the Redis
store, throughput at :attr:`Profile.connections` connections and latency unloaded.
"""

from __future__ import annotations

import attrs

from bench.suite.context import Suite
from bench.suite.figures import fmt_ms, median
from bench.suite.goals import GOALS, Goal, goal_at_least, goal_at_most
from bench.suite.profile import Profile
from bench.suite.runs import (
    Run,
    added_p50,
    error_notes,
    latency_panel,
    paired_ratios,
    rps_of,
    runs_data,
    throughput_panel,
    variant_table,
)
from bench.suite.section import Section
from bench.suite.targets import STORE_VARIANTS, VARIANT_LABELS, trouble_before, trouble_notes


async def scenario_stores(suite: Suite) -> Section:
    section = suite.section("stores", "One node: limits off vs memory store vs Redis store")
    p = suite.profile
    nodes = await suite.singles()
    trouble = trouble_before(nodes)
    tp = await suite.interleave(
        nodes, rounds=p.rounds, connections=p.connections, seconds=p.seconds, label="stores"
    )
    lat = await suite.interleave(
        nodes, rounds=p.latency_rounds, connections=1, seconds=p.latency_seconds, label="latency"
    )
    suite.sample_singles("after load")
    section.intro = (
        "The same node process three times, started side by side: `--no-limits` (admits "
        "everything without counting: the baseline), the in-process memory store, and the "
        "Redis store. Throughput at "
        f"{p.connections} connections, {p.rounds} rounds of {p.seconds} s; latency unloaded "
        f"(1 connection), {p.latency_rounds} round(s) of {p.latency_seconds} s. The order "
        "rotates every round; ratios are per round, then the median. " + suite.client.note
    )
    section.commands = [
        "tokenguard serve --config bench.toml --port 8000 --no-limits",
        "tokenguard serve --config bench.toml --port 8001",
        "tokenguard serve --config bench.toml --port 8002 --store unix:///path/to/redis.sock",
        suite.client.commands(connections=p.connections, seconds=p.seconds, share=0.0),
        suite.client.commands(connections=1, seconds=p.latency_seconds, share=0.0),
    ]
    ratios, added = _tables(section, p, tp, lat)
    section.notes += error_notes(tp, "throughput") + error_notes(lat, "latency")
    section.notes += trouble_notes(nodes, trouble)
    section.goals = _goals(ratios, added)
    if suite.client.client_bound:
        section.goals[:2] = [
            attrs.evolve(g, met=None, detail="not judged: client-bound (no wrk)")
            for g in section.goals[:2]
        ]
    lat_ratios = {v: median(paired_ratios(lat, "off", v)) for v in STORE_VARIANTS}
    section.ratios = [
        (f"1 node, {VARIANT_LABELS[v]} / limits off, {load}", measured[v])
        for load, measured in (
            (f"{p.connections} connections", ratios),
            ("1 connection", lat_ratios),
        )
        for v in STORE_VARIANTS
    ]
    _chart(suite, section, p, tp, lat)
    return section


def _tables(
    section: Section, p: Profile, tp: dict[str, list[Run]], lat: dict[str, list[Run]]
) -> tuple[dict[str, float], dict[str, float]]:
    """The throughput and latency tables and the added latency into ``section`` (body
    and data); the median throughput ratios vs limits off, and the added latency
    unloaded (seconds)."""
    rows, ratios = variant_table(tp, "off", compared="vs limits off")
    lat_rows, _ = variant_table(lat, "off", compared="vs limits off")
    added = {v: added_p50(lat["off"], lat[v]) for v in STORE_VARIANTS}
    added_loaded = {v: added_p50(tp["off"], tp[v]) for v in STORE_VARIANTS}
    section.body = [
        f"Throughput, {p.connections} connections:",
        "",
        *rows,
        "",
        "Latency unloaded, 1 connection (one request at a time):",
        "",
        *lat_rows,
        "",
        "Added median latency vs limits off (per round, then the median): "
        f"memory store {fmt_ms(added['memory'])} ms, Redis store {fmt_ms(added['redis'])} ms "
        f"unloaded; at {p.connections} connections (queueing included) "
        f"{fmt_ms(added_loaded['memory'])} ms and {fmt_ms(added_loaded['redis'])} ms.",
    ]
    section.data = {
        "throughput": runs_data(tp),
        "latency": runs_data(lat),
        "ratios": ratios,
        "added_latency_unloaded_s": added,
        "added_latency_loaded_s": added_loaded,
    }
    return ratios, added


def _goals(ratios: dict[str, float], added: dict[str, float]) -> list[Goal]:
    return [
        *(
            goal_at_least(
                f"Throughput, 1 node, {VARIANT_LABELS[v]} / limits off",
                ratios.get(v, float("nan")),
                GOALS[f"{v}_ratio"],
                percent=True,
            )
            for v in STORE_VARIANTS
        ),
        goal_at_most(
            "Added median latency, Redis store vs limits off (unloaded)",
            added["redis"] * 1000,
            GOALS["added_latency_ms"],
            "ms",
        ),
    ]


def _chart(
    suite: Suite, section: Section, p: Profile, tp: dict[str, list[Run]], lat: dict[str, list[Run]]
) -> None:
    suite.chart(
        "stores",
        "One node: limits off vs memory store vs Redis store",
        [
            throughput_panel(
                f"throughput, {p.connections} connections (median, min-max)",
                tp,
                VARIANT_LABELS,
                hlines=[(0.85 * median(rps_of(tp["off"])), "goal: 85% of limits off")],
            ),
            latency_panel("latency, 1 connection (unloaded)", lat, VARIANT_LABELS, "{:.2f}"),
            latency_panel(f"latency, {p.connections} connections", tp, VARIANT_LABELS, "{:.1f}"),
        ],
        section,
    )

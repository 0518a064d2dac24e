"""The ``rules`` scenario: what more rules cost a request seen from a client, the
memory and Redis single nodes next to twins whose keys hold 8 rules each instead of 3.
"""

from __future__ import annotations

from bench.suite.context import Suite
from bench.suite.runs import error_notes, runs_data, throughput_panel, variant_table
from bench.suite.section import Section
from bench.suite.targets import (
    STORE_VARIANTS,
    VARIANT_LABELS,
    Target,
    trouble_before,
    trouble_notes,
)

# Each store's node with 3 rules per key (``memory``) and its 8-rule twin (``memory-8``).
RULES_LABELS = {
    f"{store}{suffix}": f"{VARIANT_LABELS[store]}, {count} rules"
    for store in STORE_VARIANTS
    for suffix, count in (("", 3), ("-8", 8))
}


async def scenario_rules(suite: Suite) -> Section:
    section = suite.section("rules", "One node: 8 rules per request vs 3")
    p = suite.profile
    nodes = await _nodes(suite)
    trouble = trouble_before(nodes)
    tp = await suite.interleave(
        nodes, rounds=p.rounds, connections=p.connections, seconds=p.seconds, label="rules"
    )
    section.intro = (
        "What more rules cost a request, seen from a client: the single nodes of the "
        "`stores` section (3 rules per key: per-minute requests, input and output tokens) "
        "next to the same nodes started with every key holding 8 rules (those, per-hour "
        "requests, input and output tokens, per-day requests and input tokens: the rows of "
        "`python -m bench decisions --rules 8`), all never reached. Throughput at "
        f"{p.connections} connections, {p.rounds} rounds of {p.seconds} s, the order rotating "
        "every round; each 8-rule node is compared with its 3-rule twin measured in the "
        "same round. (The store-only ratio, without HTTP, is in the `decisions` section.) "
        + suite.client.note
    )
    section.commands = [
        "tokenguard serve --config bench.toml --port 8001",
        "tokenguard serve --config bench8.toml --port 8003",
        "tokenguard serve --config bench.toml --port 8002 --store unix:///path/to/redis.sock",
        "tokenguard serve --config bench8.toml --port 8004 --store unix:///path/to/redis.sock",
        suite.client.commands(connections=p.connections, seconds=p.seconds, share=0.0),
    ]
    rows, paired = variant_table(
        tp,
        {f"{store}-8": store for store in STORE_VARIANTS},
        compared="8 rules / 3 rules",
        labels=RULES_LABELS,
    )
    ratios = {store: paired[f"{store}-8"] for store in STORE_VARIANTS}
    section.body = [f"Throughput, {p.connections} connections:", "", *rows]
    section.notes += error_notes(tp, "throughput") + trouble_notes(nodes, trouble)
    section.ratios = [
        (
            f"1 node, 8 rules / 3 rules, {VARIANT_LABELS[store]}, {p.connections} connections",
            ratios[store],
        )
        for store in STORE_VARIANTS
    ]
    section.data = {"throughput": runs_data(tp), "ratios": ratios}
    suite.chart(
        "rules",
        "One node: 8 rules per request vs 3",
        [
            throughput_panel(
                f"throughput, {p.connections} connections (median, min-max)", tp, RULES_LABELS
            )
        ],
        section,
    )
    return section


async def _nodes(suite: Suite) -> dict[str, Target]:
    """The memory and Redis single nodes and their 8-rule twins (started here, warmed),
    named as in :data:`RULES_LABELS`."""
    singles = await suite.singles()
    eight = await suite.start_singles(STORE_VARIANTS, suffix="-8", config=suite.tp8_config)
    for target in eight.values():
        await suite.warm(target)
    nodes: dict[str, Target] = {}
    for store in STORE_VARIANTS:
        nodes[store], nodes[f"{store}-8"] = singles[store], eight[store]
    return nodes

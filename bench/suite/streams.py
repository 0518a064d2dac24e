"""The ``streams`` scenario: LLM-shaped load, thousands of paced streams through one
proxy node vs straight to its fake upstream (``python -m bench streams``, which starts
the upstream, the node and its client processes itself), and a run hitting a key's
limit, audited.
"""

from __future__ import annotations

from bench import streams, streams_report
from bench.suite.context import Suite
from bench.suite.goals import Goal, goal_at_most
from bench.suite.section import Section


async def scenario_streams(suite: Suite) -> Section:
    section = suite.section("streams", "Streams: LLM-shaped load through one proxy node")
    p = suite.profile
    options = streams.StreamsOptions(
        streams=p.streams_levels, audit=True, audit_streams=p.streams_audit
    )
    result = await streams.run_streams(options)
    o = result.options
    levels = ",".join(str(n) for n in o.streams)
    section.intro = (
        f"Paced streams (TTFT {o.ttft:g} s, then {o.tokens_per_second:g} tokens/s for "
        f"{o.max_tokens} tokens) from {o.clients} client processes, through one proxy node "
        "(memory store) and straight to its fake upstream, side by side; then a run of "
        f"{o.audit_streams} streams of one key whose output limit they exceed, audited "
        "against what the upstream billed. *Added* figures are proxy minus direct."
    )
    section.commands = [
        f"python -m bench streams --streams {levels} --audit --audit-streams {o.audit_streams}"
    ]
    section.body = streams_report.format_report(result).splitlines()[2:]
    data = streams_report.result_json(result)
    section.data = data
    section.goals = _goals(result)
    suite.chart("streams", streams_report.CHART_TITLE, streams_report.chart_panels(data), section)
    return section


def _goals(result: streams.StreamsResult) -> list[Goal]:
    goals = []
    if result.audit is not None:
        excess = result.audit.definite_excess
        goals.append(
            Goal(
                "Streams, a key's limit hit: definite over-admission",
                "= 0",
                str(excess),
                excess == 0,
            )
        )
    for level in result.levels:
        if level.streams == 1000:
            for q, target in (("p50", 5.0), ("p99", 50.0)):
                added = level.added("ttft_ms", q)
                if added is not None:
                    goals.append(
                        goal_at_most(f"Added TTFT {q}, 1,000 streams", added, target, "ms")
                    )
        if level.streams == 2000 and level.proxy.node_peak_rss_mib is not None:
            goals.append(
                goal_at_most("Node RSS at 2,000 streams", level.proxy.node_peak_rss_mib, 300, "MiB")
            )
    return goals

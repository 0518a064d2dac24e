"""The ``streaming`` scenario: the three single nodes with a share of the requests
streamed (``stream: true``), at several shares.
"""

from __future__ import annotations

from bench.charts import Panel
from bench.suite.context import Suite
from bench.suite.figures import fmt_int, fmt_ms, fmt_pct, median
from bench.suite.runs import Run, error_notes, lat_of, paired_ratios, rps_of, runs_data
from bench.suite.section import Section
from bench.suite.targets import (
    STORE_VARIANTS,
    VARIANT_LABELS,
    VARIANTS,
    Target,
    trouble_before,
    trouble_notes,
)

# Per share streamed: each variant's runs.
ByShare = dict[float, dict[str, list[Run]]]


async def scenario_streaming(suite: Suite) -> Section:
    section = suite.section("streaming", "Share of streamed requests")
    p = suite.profile
    nodes = await suite.singles()
    trouble = trouble_before(nodes)
    by_share = await _measure(suite, nodes)
    ratios = {
        share: {v: median(paired_ratios(runs, "off", v)) for v in STORE_VARIANTS}
        for share, runs in by_share.items()
    }
    suite.sample_singles("after load")
    section.intro = (
        f"The three single nodes at {p.connections} connections with a share of the "
        "requests streamed (`stream: true`, with a final usage chunk; spread evenly over "
        f"the request pool), {p.stream_rounds} round(s) of {p.stream_seconds} s per share. "
        "A streamed reply is ~40 SSE chunks, each a separate write, and settles its output "
        "reservation when the stream ends. " + suite.client.note
    )
    section.commands = [
        suite.client.commands(connections=p.connections, seconds=p.stream_seconds, share=share)
        for share in (p.stream_shares[0], p.stream_shares[-1])
    ]
    section.body = _table(by_share, ratios)
    for share, runs in by_share.items():
        section.notes += error_notes(runs, f"{share:.0%} streamed")
    section.notes += trouble_notes(nodes, trouble)
    last = max(by_share)
    section.ratios = [
        (f"{last:.0%} streamed, {VARIANT_LABELS[v]} / limits off", ratios[last][v])
        for v in STORE_VARIANTS
    ]
    section.data = {f"{share:g}": runs_data(runs) for share, runs in by_share.items()}
    _chart(suite, section, by_share, ratios)
    return section


async def _measure(suite: Suite, nodes: dict[str, Target]) -> ByShare:
    p = suite.profile
    by_share: ByShare = {}
    for share in p.stream_shares:
        by_share[share] = await suite.interleave(
            nodes,
            rounds=p.stream_rounds,
            connections=p.connections,
            seconds=p.stream_seconds,
            share=share,
            label=f"stream share {share:g}",
        )
    return by_share


def _table(by_share: ByShare, ratios: dict[float, dict[str, float]]) -> list[str]:
    rows = [
        "| streamed | limits off req/s | memory req/s | (vs off) | Redis req/s | (vs off) "
        "| p50 ms off / memory / Redis |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for share, runs in by_share.items():
        med = {v: median(rps_of(runs[v])) for v in VARIANTS}
        p50 = " / ".join(fmt_ms(median(lat_of(runs[v], "p50"))) for v in VARIANTS)
        rows.append(
            f"| {share:.0%} | {fmt_int(med['off'])} | {fmt_int(med['memory'])} | "
            f"{fmt_pct(ratios[share]['memory'])} | {fmt_int(med['redis'])} | "
            f"{fmt_pct(ratios[share]['redis'])} | {p50} |"
        )
    return rows


def _chart(
    suite: Suite, section: Section, by_share: ByShare, ratios: dict[float, dict[str, float]]
) -> None:
    shares = [f"{s:.0%}" for s in by_share]
    suite.chart(
        "streaming",
        "Share of streamed requests, one node",
        [
            Panel(
                kind="bar",
                title=f"throughput, {suite.profile.connections} connections",
                x=shares,
                series={
                    VARIANT_LABELS[v]: [median(rps_of(by_share[s][v])) for s in by_share]
                    for v in VARIANTS
                },
                xlabel="share streamed",
                ylabel="requests/s",
            ),
            Panel(
                kind="bar",
                title="throughput vs limits off (paired)",
                x=shares,
                series={
                    VARIANT_LABELS[v]: [ratios[s][v] * 100 for s in by_share]
                    for v in STORE_VARIANTS
                },
                xlabel="share streamed",
                ylabel="% of limits off",
                hlines=[(85.0, "goal: 85%")],
                labels=True,
                value_format="{:.0f}",
            ),
        ],
        section,
    )

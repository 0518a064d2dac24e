"""The report of ``python -m bench streams`` (:mod:`bench.streams`): its table, its JSON
and its chart.

*Added* figures are the proxy run's minus the direct run's at one concurrency. The
busiest process of a run is named, and flagged as the bottleneck when it used
:data:`SATURATED` of a core or more.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from bench.charts import Panel, render

if TYPE_CHECKING:
    from bench.streams import RunResult, StreamsResult

SATURATED = 0.9  # of one core: the process is the bottleneck


def _f(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def _busiest(run: RunResult) -> str:
    name, cores = max(run.cpu_cores.items(), key=lambda item: item[1])
    flag = " (saturated: the bottleneck)" if cores >= SATURATED else ""
    return f"{name} {cores:.2f}{flag}"


def format_report(result: StreamsResult) -> str:
    o = result.options
    lines = [
        f"Streams: TTFT {o.ttft:g} s, then {o.tokens_per_second:g} tokens/s for "
        f"{o.max_tokens} tokens; {o.clients} client processes, starts spread over "
        f"{o.ramp:g} s; one proxy node (memory store, {o.keys} keys), one fake upstream",
        "",
        "| streams | added TTFT p50 / p99 ms | added inter-token p99 ms | errors direct | "
        "errors proxy | node CPU µs/token | node RSS idle / peak MiB | KiB/stream | "
        "peak fds | busiest process (cores), proxy run |",
        "| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for level in result.levels:
        p = level.proxy
        lines.append(
            f"| {level.streams} | {_f(level.added('ttft_ms', 'p50'))} / "
            f"{_f(level.added('ttft_ms', 'p99'))} | {_f(level.added('gap_ms', 'p99'))} | "
            f"{_errors(level.direct.errors)} | {_errors(p.errors)} | "
            f"{_f(p.node_cpu_us_per_token, '{:.0f}')} | {_f(p.node_idle_rss_mib, '{:.0f}')} / "
            f"{_f(p.node_peak_rss_mib, '{:.0f}')} | {_f(p.node_rss_kib_per_stream, '{:.0f}')} | "
            f"{p.node_peak_fds} | {_busiest(p)} |"
        )
    lines.append("")
    lines.append(
        "Raw (proxy, direct): TTFT p50 ms "
        + "; ".join(
            f"{lv.streams}: {_f(lv.proxy.ttft_ms['p50'])}, {_f(lv.direct.ttft_ms['p50'])}"
            for lv in result.levels
        )
    )
    lines.append(
        "Raw (proxy, direct): inter-token p99 ms "
        + "; ".join(
            f"{lv.streams}: {_f(lv.proxy.gap_ms['p99'])}, {_f(lv.direct.gap_ms['p99'])}"
            for lv in result.levels
        )
    )
    if result.broke_at is None:
        lines.append("No level broke: every proxy run had no error its direct run had not.")
    else:
        level = next(lv for lv in result.levels if lv.streams == result.broke_at)
        lines.append(
            f"Broke at {result.broke_at} streams: {_errors(level.new_errors)} "
            f"(busiest: {_busiest(level.proxy)})"
        )
    if result.audit is not None:
        a = result.audit
        lines.append(
            f"Audit: {a.streams} streams of one key, output limit {a.limit} tokens per "
            f"{a.window:g} s: {a.admitted} admitted, {a.refused} refused (429), "
            f"{a.billed_requests} billed upstream; definite over-admission {a.definite_excess} "
            f"tokens, possible {a.possible_excess}"
        )
    return "\n".join(lines)


def result_json(result: StreamsResult) -> dict[str, Any]:
    def run(r: RunResult) -> dict[str, Any]:
        return attrs.asdict(r, filter=lambda a, _: a.name != "starts")

    return {
        "options": attrs.asdict(result.options),
        "levels": [
            {"streams": lv.streams, "direct": run(lv.direct), "proxy": run(lv.proxy)}
            for lv in result.levels
        ],
        "broke_at": result.broke_at,
        "audit": None if result.audit is None else attrs.asdict(result.audit),
    }


CHART_TITLE = "LLM-shaped streams through one proxy node"


def chart(data: dict[str, Any], path: Path, stamp: str) -> Path:
    """:func:`chart_panels` drawn into the PNG ``path``."""
    return render(path, CHART_TITLE, chart_panels(data), stamp)


def chart_panels(data: dict[str, Any]) -> list[Panel]:
    """Added TTFT and the node's memory against concurrency, from :func:`result_json`'s
    figures (so a saved run can be drawn again)."""
    levels = data["levels"]
    x = [level["streams"] for level in levels]

    def added(field: str, q: str) -> list[float | None]:
        values: list[float | None] = []
        for level in levels:
            ours, theirs = level["proxy"][field][q], level["direct"][field][q]
            values.append(None if ours is None or theirs is None else ours - theirs)
        return values

    panels = [
        Panel(
            kind="line",
            title="added time to first token (proxy - direct)",
            x=x,
            series={"p50": added("ttft_ms", "p50"), "p99": added("ttft_ms", "p99")},
            xlabel="concurrent streams",
            ylabel="ms",
            hlines=[(5.0, "goal p50: 5 ms"), (50.0, "goal p99: 50 ms")],
        ),
        Panel(
            kind="line",
            title="node resident memory, peak",
            x=x,
            series={"RSS": [level["proxy"]["node_peak_rss_mib"] for level in levels]},
            xlabel="concurrent streams",
            ylabel="MiB",
            hlines=[(300.0, "goal: 300 MB at 2,000 streams")],
        ),
    ]
    return panels

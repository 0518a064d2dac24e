"""A load run's report, as text and as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from bench.audit.report import format_audit
from bench.load.summary import LoadResult


def _ms(stats: dict[str, float], name: str) -> str:
    return f"{stats[name] * 1000:.1f}" if name in stats else "-"


def _table(title: str, table: dict[str, dict[str, int]], columns: list[str]) -> list[str]:
    width = max([len(title), *(len(k) for k in table)])
    lines = [f"  {title:<{width}} " + " ".join(f"{c:>7}" for c in columns)]
    for name, row in sorted(table.items()):
        lines.append(f"  {name:<{width}} " + " ".join(f"{row.get(c, 0):>7}" for c in columns))
    return lines


def format_report(result: LoadResult) -> str:
    """The end-of-run report: throughput, latency, statuses, nodes, keys, errors, audit."""
    s = result.summary
    o = result.options
    columns = list(s.statuses)
    lines = [
        f"tokenguard load: {s.requests} requests to {len(o.urls)} node(s), "
        f"{len(o.keys)} key(s), concurrency {o.concurrency}, {s.streamed} streamed, seed {o.seed}",
        f"  wall {s.wall_seconds:.2f} s, throughput {s.throughput:.1f} req/s; "
        f"client CPU {s.cpu_seconds:.2f} s = {100 * s.cpu_share:.0f}% of one core"
        + (
            "  ** client-bound: the client, not the server, limited throughput **"
            if s.client_bound
            else ""
        ),
        f"  latency ms: p50 {_ms(s.latency, 'p50')}  p95 {_ms(s.latency, 'p95')}  "
        f"p99 {_ms(s.latency, 'p99')}  max {_ms(s.latency, 'max')}",
    ]
    for cls, stats in s.latency_by_status.items():
        lines.append(
            f"    {cls:>5}: p50 {_ms(stats, 'p50')}  p95 {_ms(stats, 'p95')}  "
            f"p99 {_ms(stats, 'p99')}  max {_ms(stats, 'max')}"
        )
    lines.append("  statuses: " + ", ".join(f"{k}: {v}" for k, v in s.statuses.items()))
    lines.append(
        f"  admitted usage: {s.input_tokens} input tokens, {s.output_tokens} output tokens"
    )
    lines += _table("node", s.by_node, columns)
    lines += _table("key", s.by_key, columns)
    if s.errors:
        lines.append("  errors: " + ", ".join(f"{k}: {v}" for k, v in s.errors.items()))
    else:
        lines.append("  errors: none")
    lines.append(format_audit(result.audit))
    return "\n".join(lines)


def write_json(result: LoadResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")

"""A load run's figures (:class:`Summary`) and result (:class:`LoadResult`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from bench.audit.findings import AuditReport
from bench.audit.report import audit_dict
from bench.load.options import CLIENT_BOUND_SHARE, LoadOptions
from bench.load.records import RequestRecord, status_class


@attrs.frozen
class Summary:
    """The run in numbers. Latencies are seconds, over requests that got an HTTP answer."""

    requests: int
    wall_seconds: float
    cpu_seconds: float
    throughput: float
    latency: dict[str, float]
    latency_by_status: dict[str, dict[str, float]]
    statuses: dict[str, int]
    by_node: dict[str, dict[str, int]]
    by_key: dict[str, dict[str, int]]
    errors: dict[str, int]
    streamed: int
    input_tokens: int
    output_tokens: int

    @property
    def cpu_share(self) -> float:
        """The client's CPU time as a share of one core over the run."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def client_bound(self) -> bool:
        return self.cpu_share > CLIENT_BOUND_SHARE

    def to_dict(self) -> dict[str, Any]:
        data = attrs.asdict(self)
        data["cpu_share"] = self.cpu_share
        data["client_bound"] = self.client_bound
        return data


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 (nearest rank), max and mean; empty input gives an empty dict."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "p50": rank(50),
        "p95": rank(95),
        "p99": rank(99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


def _count(records: Sequence[RequestRecord], group: str) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for r in records:
        row = table.setdefault(getattr(r, group), {})
        cls = status_class(r)
        row[cls] = row.get(cls, 0) + 1
    return table


def summarize(records: Sequence[RequestRecord], wall: float, cpu: float) -> Summary:
    answered = [r for r in records if r.status is not None]
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    by_status: dict[str, list[float]] = {}
    for r in records:
        cls = status_class(r)
        statuses[cls] = statuses.get(cls, 0) + 1
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
        if r.status is not None:
            by_status.setdefault(cls, []).append(r.latency)
    admitted = [r for r in records if r.status == 200]
    return Summary(
        requests=len(records),
        wall_seconds=wall,
        cpu_seconds=cpu,
        throughput=len(records) / wall if wall > 0 else 0.0,
        latency=percentiles([r.latency for r in answered]),
        latency_by_status={k: percentiles(v) for k, v in sorted(by_status.items())},
        statuses=dict(sorted(statuses.items())),
        by_node=_count(records, "url"),
        by_key=_count(records, "key"),
        errors=dict(sorted(errors.items())),
        streamed=sum(1 for r in records if r.streamed),
        input_tokens=sum(r.input_tokens or 0 for r in admitted),
        output_tokens=sum(r.output_tokens or 0 for r in admitted),
    )


@attrs.frozen
class LoadResult:
    options: LoadOptions
    started_wall: float
    records: tuple[RequestRecord, ...]
    summary: Summary
    audit: AuditReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.options.describe(),
            "started_wall": self.started_wall,
            "summary": self.summary.to_dict(),
            "audit": audit_dict(self.audit),
            "records": [r.to_dict() for r in self.records],
        }

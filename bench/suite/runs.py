"""Measurements of nodes under load, and how the suite compares and shows them.

A :class:`Run` is one measurement of one target. Variants measured in the same rounds
are compared per round (:func:`paired_ratios`) and then by the median: a ratio of two
things measured side by side carries over to other machines, absolute figures less so.
Every answer should be a 200; :func:`error_notes` says where some were not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from bench.charts import Panel
from bench.suite.figures import fmt_int, fmt_ms, fmt_pct, median, spread
from bench.suite.targets import VARIANT_LABELS
from bench.wrk import WrkResult


@attrs.frozen
class Run:
    """One measurement: the client's result and the CPU the servers used meanwhile
    (share of one core; a cluster's nodes added up)."""

    variant: str
    round: int
    result: WrkResult
    node_cpu: float
    redis_cpu: float | None


def paired_ratios(runs: dict[str, list[Run]], base: str, other: str) -> list[float]:
    """Per round: ``other``'s throughput over ``base``'s, measured next to each other."""
    return [
        o.result.rps / b.result.rps
        for b, o in zip(runs[base], runs[other], strict=True)
        if b.result.rps > 0
    ]


def rps_of(runs: Sequence[Run]) -> list[float]:
    return [r.result.rps for r in runs]


def lat_of(runs: Sequence[Run], name: str) -> list[float]:
    return [r.result.latency[name] for r in runs if name in r.result.latency]


def error_notes(runs: dict[str, list[Run]], where: str) -> list[str]:
    """A note per variant whose runs had failed requests (anything but a 200): its
    throughput figure counts them."""
    notes = []
    for name, rs in runs.items():
        errors: dict[str, int] = {}
        for r in rs:
            for k, v in r.result.errors.items():
                errors[k] = errors.get(k, 0) + v
        if any(errors.values()):
            total = sum(r.result.requests for r in rs)
            notes.append(
                f"**{where}, {name}: {sum(errors.values())} of {total} requests failed** "
                f"({', '.join(f'{k} {v}' for k, v in errors.items() if v)}): "
                "the throughput figure includes them."
            )
    return notes


def added_p50(base: Sequence[Run], other: Sequence[Run]) -> float:
    """The median over rounds of ``other``'s p50 latency minus ``base``'s (seconds)."""
    pairs = zip(lat_of(base, "p50"), lat_of(other, "p50"), strict=True)
    return median([b - a for a, b in pairs])


def runs_data(runs: Mapping[str, Sequence[Run]]) -> dict[str, list[dict[str, Any]]]:
    """Each variant's client results, for ``--json``."""
    return {k: [r.result.to_dict() for r in v] for k, v in runs.items()}


def variant_table(
    runs: dict[str, list[Run]],
    base: str | Mapping[str, str],
    *,
    compared: str,
    first: str = "node",
    cpu: str = "node CPU",
    labels: Mapping[str, str] = VARIANT_LABELS,
) -> tuple[list[str], dict[str, float]]:
    """A markdown table of throughput, ratio vs its base, latency and CPU per variant
    (its columns named ``first``, ``compared`` and ``cpu``); the median ratios.

    ``base``: the variant every other one is compared with, or each compared variant's
    own base (a variant without one is a baseline)."""
    bases = {n: base for n in runs if n != base} if isinstance(base, str) else base
    rows = [
        f"| {first} | req/s (median) | range | {compared} (paired) | p50 ms | p99 ms "
        f"| {cpu} | Redis CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios: dict[str, float] = {}
    for name, rs in runs.items():
        values = rps_of(rs)
        low, high = spread(values)
        if bases.get(name) is None:
            shown = "1 (baseline)"
        else:
            rr = paired_ratios(runs, bases[name], name)
            ratios[name] = median(rr)
            lo, hi = spread(rr)
            shown = f"**{fmt_pct(ratios[name])}** ({fmt_pct(lo)}–{fmt_pct(hi)})"
        redis = [r.redis_cpu for r in rs if r.redis_cpu is not None]
        cpu_cells = f"{median([r.node_cpu for r in rs]):.0%} | " + (
            f"{median(redis):.0%}" if redis else "-"
        )
        rows.append(
            f"| {labels.get(name, name)} | {fmt_int(median(values))} | "
            f"{fmt_int(low)}–{fmt_int(high)} | {shown} | {fmt_ms(median(lat_of(rs, 'p50')))} | "
            f"{fmt_ms(median(lat_of(rs, 'p99')))} | {cpu_cells} |"
        )
    return rows, ratios


def throughput_panel(
    title: str,
    runs: Mapping[str, Sequence[Run]],
    labels: Mapping[str, str],
    hlines: Sequence[tuple[float, str]] = (),
) -> Panel:
    """Bars of each variant's median throughput (min-max whiskers), in ``labels``'
    order and under its labels."""
    return Panel(
        kind="bar",
        title=title,
        x=list(labels.values()),
        series={"req/s": [median(rps_of(runs[n])) for n in labels]},
        spread={"req/s": [spread(rps_of(runs[n])) for n in labels]},
        hlines=hlines,
        ylabel="requests/s",
        labels=True,
    )


def latency_panel(
    title: str, runs: Mapping[str, Sequence[Run]], labels: Mapping[str, str], value_format: str
) -> Panel:
    """Bars of each variant's median p50 and p99 latency in ms, in ``labels``' order."""
    return Panel(
        kind="bar",
        title=title,
        x=list(labels.values()),
        series={
            name: [median(lat_of(runs[n], name)) * 1000 for n in labels] for name in ("p50", "p99")
        },
        ylabel="ms",
        labels=True,
        value_format=value_format,
    )

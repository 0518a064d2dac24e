"""Summaries of measured values and how the report prints them.

A missing value is ``nan`` (``median([])``) and prints as ``-``, so a table built from a
scenario that measured nothing still renders.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

MB = 1_000_000


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> tuple[float, float]:
    return (min(values), max(values)) if values else (float("nan"), float("nan"))


def fmt_int(value: float) -> str:
    return "-" if value != value else f"{value:,.0f}"


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1000:.2f}"


def fmt_pct(ratio: float) -> str:
    return "-" if ratio != ratio else f"{ratio * 100:.1f}%"


def fmt_mb(kib: float) -> str:
    return f"{kib * 1024 / MB:.1f}"

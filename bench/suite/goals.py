"""The suite's goals: the targets, and a goal judged against a measured value.

A goal whose value was not measured (``nan``) is neither met nor missed (``met`` is
``None``, shown as ``–``); a missed goal says by how much in ``detail``.
"""

from __future__ import annotations

import attrs

from bench.suite.figures import fmt_pct

GOALS = {
    "memory_decisions": 50_000,
    "redis_decisions": 20_000,
    "rules_ratio": 0.70,
    "memory_ratio": 0.85,
    "redis_ratio": 0.85,
    "added_latency_ms": 1.0,
    "startup_per_node": 2.0,
    "rss_mb": 80.0,
}


@attrs.frozen
class Goal:
    """One line of the goals tables: what is wanted (``target``), what was measured,
    whether that meets it (``None``: not judged) and, if not, by how much."""

    name: str
    target: str
    measured: str
    met: bool | None
    section: str = ""
    detail: str = ""


def mark(met: bool | None) -> str:
    return {True: "✓", False: "✗", None: "–"}[met]


def goal_at_least(
    name: str, value: float, target: float, *, percent: bool = False, section: str = ""
) -> Goal:
    """Met if ``value`` is at least ``target`` (shown as a percentage if ``percent``)."""
    if value != value:
        return Goal(name, "", "not measured", None, section)
    met = value >= target
    if percent:
        shown, wanted = fmt_pct(value), f"≥ {target * 100:.0f}%"
        detail = "" if met else f"missed by {(target - value) * 100:.1f} points"
    else:
        shown, wanted = f"{value:,.0f}", f"≥ {target:,.0f}"
        detail = "" if met else f"missed by {target - value:,.0f} ({(1 - value / target):.0%})"
    return Goal(name, wanted, shown, met, section, detail)


def goal_at_most(name: str, value: float, target: float, unit: str, *, section: str = "") -> Goal:
    """Met if ``value`` (in ``unit``) is at most ``target``."""
    if value != value:
        return Goal(name, "", "not measured", None, section)
    met = value <= target
    detail = "" if met else f"over by {value - target:.2f} {unit} ({value / target - 1:.0%})"
    return Goal(name, f"≤ {target:g} {unit}", f"{value:.2f} {unit}", met, section, detail)

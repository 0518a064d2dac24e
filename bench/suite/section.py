"""One section of the report: what a scenario measured, in the report's parts.

A scenario fills one :class:`Section` (prose, commands, markdown body lines, goals,
charts, notes, headline ratios, and ``data`` for ``--json``); :mod:`bench.suite.report`
renders them all. A scenario that failed has only ``error``.
"""

from __future__ import annotations

from typing import Any

import attrs

from bench.suite.goals import Goal


@attrs.define
class Section:
    """A scenario's results. ``body`` and ``notes`` are markdown, ``charts`` paths
    relative to the report; ``ratios`` go into the report's headline table."""

    key: str
    title: str
    started: str
    intro: str = ""
    commands: list[str] = attrs.field(factory=list)
    body: list[str] = attrs.field(factory=list)
    goals: list[Goal] = attrs.field(factory=list)
    charts: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    data: dict[str, Any] = attrs.field(factory=dict)
    error: str | None = None
    # (what is compared, the median paired ratio): the headline table of the report
    ratios: list[tuple[str, float]] = attrs.field(factory=list)

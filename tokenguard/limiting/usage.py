"""A key's usage as clients are told it: ``GET /v1/usage`` and the usage feed's events.

One entry per row (:func:`usage_entry`), and per dimension the tightest enforced row
over every scope and window (:func:`usage_by_dimension`, the same choice as the
``x-ratelimit-*`` headers: :func:`~tokenguard.limiting.limiter.tightest_by_dimension`).
Field names and order are documented in ``docs/usage-feed.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenguard.limiting.limiter import tightest_by_dimension
from tokenguard.model import DIMENSIONS, SPEND
from tokenguard.store.rows import RowState


def usage_entry(state: RowState) -> dict[str, Any]:
    """One row's usage: ``used``, ``limit``, ``remaining`` and ``reset_seconds``."""
    return {
        "used": state.used,
        "limit": state.limit,
        "remaining": state.remaining,
        "reset_seconds": state.reset_after,
    }


def scope_kind(scope: str) -> str:
    """``key``, ``team``, ``user`` (a key's per-user row) or ``team_user`` (a team's)."""
    kind = "team" if scope.startswith("team:") else "key"
    if ":user:" not in scope:
        return kind
    return "user" if kind == "key" else "team_user"


def usage_by_dimension(states: Iterable[RowState]) -> dict[str, Any]:
    """Per dimension, the tightest enforced row's entry (over every scope and window);
    ``None`` for an unlimited dimension. ``total_tokens`` and ``spend`` (micro-units
    of the operator's currency) only when some rule limits them."""
    by_dimension = tightest_by_dimension(states)
    usage = {d: usage_entry(by_dimension[d]) if d in by_dimension else None for d in DIMENSIONS}
    for optional in ("total_tokens", SPEND):
        if optional in by_dimension:
            usage[optional] = usage_entry(by_dimension[optional])
    return usage

"""The usage feed's events about requests, as JSON-ready dicts: what each says.

One builder per event type a request causes (``admitted``, ``would_reject``,
``rejected``, ``queued``, ``dequeued``, ``near_limit``, ``settled``). They only read the
decision they are given, never await and never raise for any decision the limiter makes;
:meth:`tokenguard.observe.feed.Feed.emit` then adds the node, sequence number and time.
The fields are documented in ``docs/usage-feed.md``; every event about a request names
its key, and its end user when the request named one.
"""

from __future__ import annotations

import time
from typing import Any

from tokenguard.limiting.limiter import Decision
from tokenguard.limiting.usage import scope_kind, usage_by_dimension
from tokenguard.model import ApiKey
from tokenguard.store.rows import RowState


def now_ms() -> int:
    """The server timestamp of events: milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def limit_of(state: RowState) -> dict[str, Any]:
    """Which limit a row is: dimension, scope (``key`` or ``team``), window, numbers."""
    row = state.row
    return {
        "dimension": row.dimension,
        "scope": scope_kind(row.scope),
        "window_seconds": row.window_ms / 1000,
        "limit": state.limit,
        "used": state.used,
        "requested": row.amount,
    }


def end_user_of(decision: Decision) -> dict[str, str]:
    """``{"user": id}`` for a request that named its end user (the id as sent: events
    reach only the key's own subscribers and the admin); ``{}`` otherwise."""
    return {} if decision.end_user is None else {"user": decision.end_user}


def admitted_events(decision: Decision, model: str, surface: str | None) -> list[dict[str, Any]]:
    """``admitted``, then ``would_reject`` when only shadow mode let it through."""
    cost = decision.cost
    events: list[dict[str, Any]] = [
        {
            "type": "admitted",
            "key": decision.key.name,
            "model": model,
            "surface": surface,
            "reserved": {
                "input_tokens": cost.input_tokens,
                "output_tokens": cost.output_tokens,
            },
            "usage": usage_by_dimension(decision.admission.states),
            **end_user_of(decision),
        }
    ]
    shadow = decision.shadow_refusal if decision.would_refuse else None
    if shadow is not None:
        events.append(
            {"type": "would_reject", "key": decision.key.name, "model": model}
            | {"surface": surface}
            | end_user_of(decision)
            | limit_of(shadow)
        )
    return events


def rejected_event(decision: Decision, model: str, surface: str | None) -> dict[str, Any] | None:
    """``rejected``, naming the limit that refused; ``None`` for a decision that names
    none (nothing to say)."""
    state = decision.refusal
    if state is None:
        return None
    return (
        {"type": "rejected", "key": decision.key.name, "model": model, "surface": surface}
        | end_user_of(decision)
        | limit_of(state)
        | {"retry_after": decision.admission.retry_after}
    )


def queued_event(
    decision: Decision | None, key: ApiKey, model: str, priority: str, bound: float
) -> dict[str, Any]:
    """``queued``: with the limit that refused the request when it tried (``decision``)."""
    event: dict[str, Any] = {
        "type": "queued",
        "key": key.name,
        "model": model,
        "priority": priority,
        "max_wait_seconds": bound,
    }
    state = decision.refusal if decision is not None else None
    if state is not None:
        event |= limit_of(state) | {"retry_after": decision.admission.retry_after}
    return event


def dequeued_event(key: ApiKey, model: str, outcome: str, waited_ms: int) -> dict[str, Any]:
    """``dequeued``: how a wait ended (``outcome``) and how long it was."""
    return {
        "type": "dequeued",
        "key": key.name,
        "model": model,
        "outcome": outcome,
        "waited_ms": waited_ms,
    }


def near_limit_events(decision: Decision, model: str, surface: str | None) -> list[dict[str, Any]]:
    """One ``near_limit`` per row whose near-limit mark this admission crossed first."""
    return [
        {"type": "near_limit", "key": decision.key.name, "model": model}
        | {"surface": surface}
        | end_user_of(decision)
        | limit_of(state)
        | {"ratio": round(state.used / state.limit, 4), "alert_at": state.row.alert_at}
        for state in decision.near_limits
    ]


def settled_event(
    decision: Decision, output_tokens: int, cached_input_tokens: int, spent: int
) -> dict[str, Any]:
    """``settled``: the output reserved and used, the refund; ``cached_input_tokens``
    only when there were some; the money reserved and spent for a priced request."""
    reserved = decision.cost.output_tokens
    event: dict[str, Any] = {
        "type": "settled",
        "key": decision.key.name,
        "reserved_output_tokens": reserved,
        "output_tokens": output_tokens,
        "refund": reserved - output_tokens,
        **end_user_of(decision),
    }
    if cached_input_tokens:
        event["cached_input_tokens"] = cached_input_tokens
    if decision.cost.price is not None:
        event["reserved_spend"] = decision.cost.spend
        event["spend"] = spent
    return event

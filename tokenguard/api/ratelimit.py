"""Rate-limit answers: OpenAI's ``x-ratelimit-*`` headers, ``retry-after``, and the 429.

Every answer to an admitted request carries the rate-limit headers of the tightest row
of each dimension (:func:`openai_header_fields`), formatted straight to ASGI bytes: on
every response, through werkzeug's ``Headers``, they cost about as much as the
admission. A refused admission is a 429 (:func:`rate_limit_error`) that names whose
limit (key or team, per-model rule), dimension and window, limit, used, asked and the
wait, in the dialect's own headers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tokenguard.config.prices import money_text
from tokenguard.errors import APIError
from tokenguard.limiting.limiter import Decision, tightest_with_shares
from tokenguard.limiting.rules import describe_limit, describe_scope
from tokenguard.model import SPEND
from tokenguard.store.window_store import LEASE_RETRY_SECONDS, Row, RowState

if TYPE_CHECKING:
    from tokenguard.api.dialect import Conventions


# The text of each millisecond count's fraction of a second: "" for 0, ".25" for 250
# (formatting it per header, on every response, cost more than the rest).
_FRACTIONS = ("",) + tuple(f".{ms:03d}".rstrip("0") for ms in range(1, 1000))


def openai_duration(seconds: float) -> str:
    """Format a duration as OpenAI does in ``x-ratelimit-reset-*``: ``6m0s``, ``1s``, ``250ms``.

    Rounded up to the millisecond, so a client that waits this long is never early.
    """
    # (Less a nanosecond's share: a float like 250.00000000003 ms is 250 ms, not 251.)
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    text = f"{whole}{_FRACTIONS[fraction]}s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


_HEADER_NAMES = {
    "requests": "requests",
    "input_tokens": "input-tokens",
    "output_tokens": "output-tokens",
}


# Per header family (a dimension, or "tokens"): its three names, formatted once.
_HEADER_TRIPLES = {
    name: (
        f"x-ratelimit-limit-{name}",
        f"x-ratelimit-remaining-{name}",
        f"x-ratelimit-reset-{name}",
    )
    for name in (*_HEADER_NAMES.values(), "tokens")
}


# The same names as ASGI header names (bytes): the hot path's form.
_RAW_TRIPLES = {
    name: tuple(header.encode("ascii") for header in triple)
    for name, triple in _HEADER_TRIPLES.items()
}
_RAW_TRIPLES_BY_DIMENSION = {
    dimension: _RAW_TRIPLES[name] for dimension, name in _HEADER_NAMES.items()
}
# The dimensions whose tightest row the ``*-tokens`` headers report.
_TOKEN_DIMENSIONS = frozenset(("input_tokens", "output_tokens", "total_tokens"))


def openai_header_fields(states: tuple[RowState, ...]) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-*`` headers for a request's rows, as ASGI header pairs
    (lowercase ASCII names and values, as bytes): what every admitted request's
    response carries, built without a str-to-bytes step per header.

    Each header reports the tightest enforced row of its dimension over every scope and
    window (the smallest share of its limit remaining): ``*-requests`` of the request
    rows, ``*-input-tokens`` and ``*-output-tokens`` of theirs, and ``*-tokens`` of the
    input, output and total-tokens rows together. Shadow rows are never reported;
    unlimited dimensions have no headers.
    """
    fields: list[tuple[bytes, bytes]] = []
    by_dimension, shares = tightest_with_shares(states)
    tokens: RowState | None = None
    tokens_share = 0.0
    tokens_values: tuple[bytes, bytes, bytes] | None = None
    for dimension, state in by_dimension.items():
        triple = _RAW_TRIPLES_BY_DIMENSION.get(dimension)
        values = None
        if triple is not None:
            values = _header_values(state)
            fields += _paired(triple, values)
        if dimension in _TOKEN_DIMENSIONS:
            share = shares[dimension]
            if tokens is None or share < tokens_share:
                # The tokens family usually repeats a dimension's row: formatted once.
                tokens, tokens_share, tokens_values = state, share, values
    if tokens is not None:
        fields += _paired(_RAW_TRIPLES["tokens"], tokens_values or _header_values(tokens))
    return fields


def _paired(
    names: tuple[bytes, ...], values: tuple[bytes, bytes, bytes]
) -> tuple[tuple[bytes, bytes], ...]:
    return (names[0], values[0]), (names[1], values[1]), (names[2], values[2])


def _header_values(state: RowState) -> tuple[bytes, bytes, bytes]:
    limit = state.row.limit
    left = limit - state.used
    reset = openai_duration(state.reset_after).encode("ascii")
    return b"%d" % limit, b"%d" % left if left > 0 else b"0", reset


def retry_headers(seconds: float) -> dict[str, str]:
    """``retry-after`` (whole seconds, rounded up) and ``retry-after-ms``."""
    ms = max(1, math.ceil(round(seconds * 1000, 6)))
    return {"retry-after": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}


def _seconds_text(seconds: float) -> str:
    return f"{math.ceil(seconds * 1000) / 1000:g}s"


def _shown(row: Row, amount: int) -> str:
    """An amount of ``row`` as a client reads it: a count, or money in currency units."""
    return money_text(amount) if row.dimension == SPEND else str(amount)


def rate_limit_error(decision: Decision, conventions: Conventions) -> APIError:
    """The 429 of a refused admission, with ``conventions``' rate-limit headers: names
    whose limit (key or team, per-model rule), dimension and window, limit, used, asked
    and the wait (``retry-after``); a request that can never fit says so, with no wait;
    a full ``max_concurrent`` is type ``concurrency`` (no header says it); a spent
    budget (a spend row) is OpenAI's ``insufficient_quota``, in currency units."""
    state = decision.refusal
    assert state is not None
    kind = "requests" if state.row.dimension == "requests" else "tokens"
    words = describe_limit(state.row)
    who = describe_scope(state.row, decision.key.name)
    asked = state.row.amount
    headers = conventions.ratelimit_headers(decision.admission.states)
    if state.row.is_lease and not state.never_fits:
        # When a slot frees is unknown (a request ends): retry after a second or so.
        wait = max(decision.admission.retry_after or 0.0, LEASE_RETRY_SECONDS)
        message = (
            f"Concurrency limit reached for {who} on {words}: Limit {state.limit}, "
            f"In flight {state.used}. Please try again in {_seconds_text(wait)}."
        )
        headers.update(retry_headers(wait))
        return APIError(429, message, "concurrency", None, "rate_limit_exceeded", headers)
    if state.never_fits:
        message = (
            f"Request too large for {who} on {words}: Limit {_shown(state.row, state.limit)}, "
            f"Requested {_shown(state.row, asked)}. This request can never fit within the limit; "
            f"reduce the prompt or max_tokens."
        )
        return APIError(429, message, kind, None, "rate_limit_exceeded", headers)
    wait = decision.admission.retry_after or 0.0
    headers.update(retry_headers(wait))
    if state.row.dimension == SPEND:
        # OpenAI's own answer to a spent budget: the SDKs raise RateLimitError with
        # code insufficient_quota. (Anthropic's dialect answers it in its own shape.)
        message = (
            f"You exceeded the budget of {who} on {words}: Limit {_shown(state.row, state.limit)}, "
            f"Spent {_shown(state.row, state.used)}, "
            f"Requested {_shown(state.row, asked)} (at most). "
            f"The budget frees up in {_seconds_text(wait)}."
        )
        return APIError(429, message, "insufficient_quota", None, "insufficient_quota", headers)
    message = (
        f"Rate limit reached for {who} on {words}: Limit {state.limit}, "
        f"Used {state.used}, Requested {asked}. Please try again in {_seconds_text(wait)}."
    )
    return APIError(429, message, kind, None, "rate_limit_exceeded", headers)

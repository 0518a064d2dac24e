"""Rate-limit answers: the ``x-ratelimit-*`` headers (and Anthropic's), ``retry-after``, the 429.

Every answer to an admitted request carries the rate-limit headers of the tightest row
of each dimension (:func:`openai_header_fields`), formatted straight to ASGI bytes: on
every response, through werkzeug's ``Headers``, they cost about as much as the
admission. A refused admission is a 429 (:func:`rate_limit_error`) that names whose
limit (key or team, per-model rule), dimension and window, limit, used, asked and the
wait, in the dialect's own headers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tokenguard.config.prices import money_text
from tokenguard.errors import APIError
from tokenguard.limiting.limiter import Decision, tightest_with_shares
from tokenguard.limiting.rules import describe_limit, describe_scope
from tokenguard.model import SPEND
from tokenguard.store.rows import LEASE_RETRY_SECONDS, Row, RowState

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
# The dimensions whose tightest row the ``*-tokens`` headers report.
_TOKEN_DIMENSIONS = frozenset(("input_tokens", "output_tokens", "total_tokens"))

# One API family's header names, as ASGI names (bytes): per dimension (and "tokens", the
# tightest token dimension), the (limit, remaining, reset) triple.
Triples = dict[str, tuple[bytes, bytes, bytes]]


def _triples(name_of: Callable[[str, str], str]) -> Triples:
    """Every family's triple, ``name_of(family, part)`` naming one header, formatted once."""
    return {
        family: tuple(  # type: ignore[misc]
            name_of(family, part).encode("ascii") for part in ("limit", "remaining", "reset")
        )
        for family in (*_HEADER_NAMES.values(), "tokens")
    }


_OPENAI_TRIPLES = _triples(lambda family, part: f"x-ratelimit-{part}-{family}")
_ANTHROPIC_TRIPLES = _triples(lambda family, part: f"anthropic-ratelimit-{family}-{part}")


def _header_fields(
    states: tuple[RowState, ...], triples: Triples, reset_of: Callable[[float], bytes]
) -> list[tuple[bytes, bytes]]:
    """A family's rate-limit headers for a request's rows, as ASGI header pairs.

    Each header reports the tightest enforced row of its dimension over every scope and
    window (the smallest share of its limit remaining): ``requests`` of the request
    rows, ``input-tokens`` and ``output-tokens`` of theirs, and ``tokens`` of the input,
    output and total-tokens rows together. Shadow rows are never reported; unlimited
    dimensions have no headers. ``reset_of`` formats a row's seconds until reset.
    """
    fields: list[tuple[bytes, bytes]] = []
    by_dimension, shares = tightest_with_shares(states)
    tokens: RowState | None = None
    tokens_share = 0.0
    tokens_values: tuple[bytes, bytes, bytes] | None = None
    for dimension, state in by_dimension.items():
        name = _HEADER_NAMES.get(dimension)
        values = None
        if name is not None:
            values = _header_values(state, reset_of)
            fields += _paired(triples[name], values)
        if dimension in _TOKEN_DIMENSIONS:
            share = shares[dimension]
            if tokens is None or share < tokens_share:
                # The tokens family usually repeats a dimension's row: formatted once.
                tokens, tokens_share, tokens_values = state, share, values
    if tokens is not None:
        fields += _paired(triples["tokens"], tokens_values or _header_values(tokens, reset_of))
    return fields


def _openai_reset(seconds: float) -> bytes:
    return openai_duration(seconds).encode("ascii")


def openai_header_fields(states: tuple[RowState, ...]) -> list[tuple[bytes, bytes]]:
    """OpenAI's ``x-ratelimit-{limit,remaining,reset}-*`` headers for a request's rows
    (:func:`_header_fields`; the reset as a duration, ``6m0s``): what every admitted
    request's response carries, built without a str-to-bytes step per header."""
    return _header_fields(states, _OPENAI_TRIPLES, _openai_reset)


def rfc3339_after(seconds: float) -> str:
    """The UTC time ``seconds`` from now in RFC 3339, to the second, rounded up (a client
    that waits until then is never early): ``2026-12-07T06:30:01Z``."""
    moment = math.ceil(time.time() + max(0.0, seconds))
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


def _anthropic_reset(seconds: float) -> bytes:
    return rfc3339_after(seconds).encode("ascii")


def anthropic_header_fields(states: tuple[RowState, ...]) -> list[tuple[bytes, bytes]]:
    """Anthropic's ``anthropic-ratelimit-*-{limit,remaining,reset}`` headers for a
    request's rows (:func:`_header_fields`; the reset as an RFC 3339 time, as Anthropic
    sends it)."""
    return _header_fields(states, _ANTHROPIC_TRIPLES, _anthropic_reset)


def _paired(
    names: tuple[bytes, ...], values: tuple[bytes, bytes, bytes]
) -> tuple[tuple[bytes, bytes], ...]:
    return (names[0], values[0]), (names[1], values[1]), (names[2], values[2])


def _header_values(
    state: RowState, reset_of: Callable[[float], bytes]
) -> tuple[bytes, bytes, bytes]:
    limit = state.row.limit
    left = limit - state.used
    return b"%d" % limit, b"%d" % left if left > 0 else b"0", reset_of(state.reset_after)


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
        # code insufficient_quota. (Anthropic's conventions answer every 429 as their
        # rate_limit_error, this message included: their API has no quota code.)
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

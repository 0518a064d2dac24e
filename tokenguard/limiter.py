"""The limiter: turns a key's limits and a request's cost into store rows, and back.

Admission reserves, for one request, 1 request, its counted input tokens and its
worst-case output tokens (``max_tokens`` x ``n``), all or nothing. Settlement later
refunds the output tokens the reply did not use, into the very bucket that was charged.
The limiter knows nothing of HTTP or of any driver: it talks to a
:class:`~tokenguard.windows.WindowStore`.
"""

from __future__ import annotations

import math

import attrs

from tokenguard.settings import DIMENSIONS, ApiKey
from tokenguard.windows import Admission, Reservation, Row, RowState, WindowStore


@attrs.frozen
class Cost:
    """What one request asks for in each dimension."""

    requests: int = 1
    input_tokens: int = 0
    output_tokens: int = 0

    def amount(self, dimension: str) -> int:
        return getattr(self, dimension)


@attrs.frozen
class Decision:
    """A request's admission, by dimension; the refusal (if any) and how to settle it."""

    key: ApiKey
    cost: Cost
    admission: Admission

    @property
    def admitted(self) -> bool:
        return self.admission.admitted

    @property
    def reservation(self) -> Reservation | None:
        return self.admission.reservation

    def state(self, dimension: str) -> RowState | None:
        for s in self.admission.states:
            if s.row.dimension == dimension:
                return s
        return None

    @property
    def refusal(self) -> RowState | None:
        """The refusing row that waits longest (a never-fitting one first)."""
        refusing = self.admission.refusing
        if not refusing:
            return None
        never = [s for s in refusing if s.never_fits]
        if never:
            return never[0]
        return max(refusing, key=lambda s: s.retry_after or 0.0)


class Limiter:
    """Admission and settlement of requests against one window store."""

    def __init__(self, store: WindowStore, *, window_seconds: int, bucket_seconds: int) -> None:
        self.store = store
        self.window_seconds = window_seconds
        self.bucket_seconds = bucket_seconds

    def rows(self, key: ApiKey, cost: Cost | None = None) -> list[Row]:
        """One row per limited dimension of the key; unlimited dimensions have none."""
        rows = []
        for dimension in DIMENSIONS:
            limit = key.limits.limit(dimension)
            if limit is None:
                continue
            rows.append(
                Row(
                    scope=f"key:{key.key_id}",
                    dimension=dimension,
                    window_ms=self.window_seconds * 1000,
                    bucket_ms=self.bucket_seconds * 1000,
                    limit=limit,
                    amount=cost.amount(dimension) if cost else 0,
                )
            )
        return rows

    async def admit(self, key: ApiKey, cost: Cost) -> Decision:
        admission = await self.store.admit(key.key_id, self.rows(key, cost))
        return Decision(key=key, cost=cost, admission=admission)

    async def settle(
        self, decision: Decision, *, output_tokens: int, input_tokens: int | None = None
    ) -> None:
        """Correct the reservation to what the request really used.

        ``output_tokens`` replaces the reserved worst case (usually a refund);
        ``input_tokens``, when given, replaces the counted prompt size. Nothing happens
        for an unlimited dimension or a refused request.
        """
        reservation = decision.reservation
        if reservation is None:
            return
        actual = {"output_tokens": output_tokens}
        if input_tokens is not None:
            actual["input_tokens"] = input_tokens
        deltas = [
            actual[row.dimension] - row.amount if row.dimension in actual else 0
            for row in reservation.rows
        ]
        if any(deltas):
            await self.store.settle(reservation, deltas)

    async def usage(self, key: ApiKey) -> tuple[RowState, ...]:
        return await self.store.usage(key.key_id, self.rows(key))


# --- OpenAI's rate-limit headers ----------------------------------------------------------


def openai_duration(seconds: float) -> str:
    """Format a duration as OpenAI does in ``x-ratelimit-reset-*``: ``6m0s``, ``1s``, ``250ms``.

    Rounded up to the millisecond, so a client that waits this long is never early.
    """
    ms = math.ceil(round(seconds * 1000, 6))
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = rest / 1000
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
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


def _header_triple(name: str, state: RowState) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{name}": str(state.limit),
        f"x-ratelimit-remaining-{name}": str(state.remaining),
        f"x-ratelimit-reset-{name}": openai_duration(state.reset_after),
    }


def ratelimit_headers(states: tuple[RowState, ...]) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for a key's current rows.

    ``*-tokens`` reports the tighter of input and output tokens: the one with the
    smaller share of its limit remaining. Unlimited dimensions have no headers.
    """
    headers: dict[str, str] = {}
    by_dimension = {s.row.dimension: s for s in states}
    for dimension, name in _HEADER_NAMES.items():
        state = by_dimension.get(dimension)
        if state is not None:
            headers.update(_header_triple(name, state))
    token_states = [by_dimension[d] for d in ("input_tokens", "output_tokens") if d in by_dimension]
    if token_states:
        tightest = min(token_states, key=lambda s: s.remaining / s.limit)
        headers.update(_header_triple("tokens", tightest))
    return headers


def retry_headers(seconds: float) -> dict[str, str]:
    """``retry-after`` (whole seconds, rounded up) and ``retry-after-ms``."""
    ms = max(1, math.ceil(round(seconds * 1000, 6)))
    return {"retry-after": str(math.ceil(ms / 1000)), "retry-after-ms": str(ms)}

"""What the audit reads: one answered request as the client saw it (:class:`Observation`),
and the refusal a 429 body names (:func:`parse_refusal`)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

HEADER_NAMES = {
    "requests": "requests",
    "input_tokens": "input-tokens",
    "output_tokens": "output-tokens",
}
DIMENSION_LABELS = {
    "requests": "requests",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
}
MAX_PROBLEM_EXAMPLES = 20


@attrs.frozen
class Refusal:
    """What a 429 body says: the refusing dimension, its limit, used and requested amounts.

    ``used`` is ``None`` when the request can never fit (it asked more than the limit).
    """

    dimension: str
    limit: int
    requested: int
    used: int | None = None

    @property
    def never_fits(self) -> bool:
        return self.used is None


_DIMENSION_PATTERNS = (
    ("requests", re.compile(r"\bon requests per\b")),
    ("input_tokens", re.compile(r"\bon input tokens per\b")),
    ("output_tokens", re.compile(r"\bon output tokens per\b")),
)
_NUMBERS = re.compile(r"Limit (\d+)(?:, Used (\d+))?, Requested (\d+)")


def parse_refusal(message: str) -> Refusal | None:
    """Read a tokenguard 429 message; ``None`` if it is not one (or names no dimension)."""
    dimension = next((d for d, p in _DIMENSION_PATTERNS if p.search(message)), None)
    numbers = _NUMBERS.search(message)
    if dimension is None or numbers is None:
        return None
    limit, used, requested = numbers.groups()
    return Refusal(
        dimension=dimension,
        limit=int(limit),
        requested=int(requested),
        used=None if used is None else int(used),
    )


def not_before_start(instance: Observation, attribute: attrs.Attribute, value: float) -> None:
    if value < instance.start:
        raise ValueError(f"request {instance.id}: end {value} is before start {instance.start}")


@attrs.frozen
class Observation:
    """One request as the client saw it; the audit's only input about traffic.

    ``reserved_output`` is the output reservation the server made for it, if the client
    knows it (``max_tokens``, or the key's default).

    ``start``/``end``: when it was sent and when its answer's headers arrived (or it
    failed), on one monotonic clock. ``status`` is ``None`` for a transport error.
    ``headers`` holds the answer's ``x-ratelimit-*`` headers as received (lower-case
    names). ``refusal`` is the parsed 429 body, if any.
    """

    id: int
    key: str
    start: float
    end: float = attrs.field(validator=not_before_start)
    status: int | None
    input_tokens: int | None = None
    output_tokens: int | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)
    refusal: Refusal | None = None
    reserved_output: int | None = None

    @property
    def admitted(self) -> bool:
        return self.status == 200

    @property
    def outcome_unknown(self) -> bool:
        return self.status is None or self.status >= 500

    def amount(self, dimension: str) -> int:
        """What this request was charged in ``dimension`` if admitted (a lower bound)."""
        if dimension == "requests":
            return 1
        value = self.input_tokens if dimension == "input_tokens" else self.output_tokens
        return value or 0

    def held(self, dimension: str) -> int:
        """The most the server may hold for this request in ``dimension`` (an upper bound
        when the reservation is known): output tokens stay reserved until settled."""
        if dimension == "output_tokens" and self.reserved_output is not None:
            return max(self.reserved_output, self.amount(dimension))
        return self.amount(dimension)

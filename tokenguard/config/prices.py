"""Model prices, and what a request costs in money, in exact integers.

Spend limits (``spend_per_hour``, ``spend_per_day``, ``spend_per_month``) count money as
integers of :data:`MICRO` (a millionth of the operator's currency unit), so that every
driver sums them exactly. A :class:`Price` holds, per million tokens, the price of
input, cached input and output in micro-units (an integer: ``2.50`` per million is
2,500,000); a request's cost is rounded UP to the micro-unit, so tokenguard never counts
less than was spent.

The prices come from the default table shipped with tokenguard (``prices.toml`` next to
this module, with its date and sources) under the config's ``[prices."MODEL-OR-GLOB"]``
tables (:class:`PriceTable`): an exact model name wins, then the first glob that
matches, the config's before the defaults.
"""

from __future__ import annotations

import tomllib
from fnmatch import fnmatchcase
from importlib import resources
from typing import Any

import attrs

MICRO = 1_000_000
"""Micro-units per currency unit: the integer unit of every spend row."""
PRICE_FIELDS = ("input", "cached_input", "output")
TOKENS_PER_PRICE = 1_000_000  # prices are per million tokens


def to_micro(amount: float) -> int:
    """A currency amount (from a config) in micro-units, to the nearest one."""
    return round(amount * MICRO)


def from_micro(micro: int) -> float:
    """Micro-units as a currency amount (for JSON and messages)."""
    return micro / MICRO


def money_text(micro: int) -> str:
    """Micro-units as an exact currency amount for people: ``1500`` is ``0.0015``,
    ``2_000_000`` is ``2`` (no trailing zeros, no symbol: the currency is the
    prices')."""
    return f"{from_micro(micro):.6f}".rstrip("0").rstrip(".")


@attrs.frozen
class Price:
    """One model's prices, in micro-units per million tokens."""

    input: int
    cached_input: int
    output: int

    def reservation(self, input_tokens: int, output_tokens: int) -> int:
        """A request's worst case: every input token at the input price (a cache hit
        is never dearer) and its whole output reservation; micro-units, rounded up."""
        return _ceil(input_tokens * self.input + output_tokens * self.output)

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> int:
        """What a request really cost, ``cached_input_tokens`` of its input at the
        cached price (at most the input); micro-units, rounded up."""
        cached = min(max(0, cached_input_tokens), input_tokens)
        return _ceil(
            (input_tokens - cached) * self.input
            + cached * self.cached_input
            + output_tokens * self.output
        )


def _ceil(micro_per_million: int) -> int:
    return -(-micro_per_million // TOKENS_PER_PRICE)


@attrs.frozen
class PriceTable:
    """Prices by model name or fnmatch glob, in lookup order (see the module docstring)."""

    entries: tuple[tuple[str, Price], ...] = ()

    def price(self, model: str) -> Price | None:
        """The price of ``model``: its exact entry, else the first glob matching it;
        ``None`` when none does."""
        for pattern, price in self.entries:
            if pattern == model:
                return price
        for pattern, price in self.entries:
            if fnmatchcase(model, pattern):
                return price
        return None

    def over(self, base: PriceTable) -> PriceTable:
        """This table's entries first, then ``base``'s that it does not name."""
        own = {pattern for pattern, _ in self.entries}
        return PriceTable(self.entries + tuple(e for e in base.entries if e[0] not in own))


def price_from_table(table: dict[str, Any], base: Price | None, fail: Any) -> Price:
    """A price from a TOML table of :data:`PRICE_FIELDS` (currency per million tokens,
    numbers at least 0) over ``base`` field by field; ``cached_input`` defaults to
    ``input``. ``fail(problem, field)`` raises for a bad or unknown field."""
    values: dict[str, int] = {}
    for field in PRICE_FIELDS:
        value = table.pop(field, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            fail(f"must be a price, a number at least 0, got {value!r}", field)
        values[field] = to_micro(value)
    for field in table:
        fail(f"unknown key (give {', '.join(PRICE_FIELDS)})", field)
    if base is not None:
        values = attrs.asdict(base) | values
    for field in ("input", "output"):
        if field not in values:
            fail("must be set (a price per million tokens)", field)
    values.setdefault("cached_input", values["input"])
    return Price(**values)


def default_prices() -> PriceTable:
    """The table shipped with tokenguard (``prices.toml``); read once per call."""
    text = (resources.files("tokenguard.config") / "prices.toml").read_text()

    def fail(problem: str, field: str) -> None:
        raise ValueError(f"tokenguard/config/prices.toml: {field}: {problem}")

    return PriceTable(
        tuple(
            (pattern, price_from_table(dict(table), None, fail))
            for pattern, table in tomllib.loads(text).items()
        )
    )

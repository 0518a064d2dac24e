"""Prices and what a request costs: exact integers, rounded up, and the price table's
lookup order; the shipped table states its date and sources."""

from __future__ import annotations

from importlib import resources

import pytest

from tokenguard.config.loading import parse_settings
from tokenguard.config.prices import Price, PriceTable, default_prices, to_micro
from tokenguard.config.settings import ConfigError


def test_a_reservation_prices_every_input_token_at_the_input_price_rounded_up() -> None:
    price = Price(input=to_micro(2.5), cached_input=to_micro(1.25), output=to_micro(10))
    # 1000 x 2.5 + 100 x 10 = 3500 micro-units per million tokens... per token: exact.
    assert price.reservation(1000, 100) == 3_500
    assert price.reservation(1, 0) == 3  # 2.5 micro-units, rounded up
    assert price.cost(1000, 50, cached_input_tokens=400) == 600 * 2.5 + 400 * 1.25 + 500


def test_cached_input_is_capped_at_the_input_and_never_negative() -> None:
    price = Price(input=2_000_000, cached_input=500_000, output=8_000_000)
    assert price.cost(10, 0, cached_input_tokens=99) == price.cost(10, 0, cached_input_tokens=10)
    assert price.cost(10, 0, cached_input_tokens=-5) == price.cost(10, 0) == 20


def test_an_exact_model_name_wins_over_a_glob_then_globs_in_order() -> None:
    a, b, c = (Price(n, n, n) for n in (1, 2, 3))
    table = PriceTable((("gpt-4o*", a), ("gpt-*", b), ("gpt-4o-mini", c)))
    assert table.price("gpt-4o-mini") == c
    assert table.price("gpt-4o") == a
    assert table.price("gpt-5") == b
    assert table.price("claude") is None


def test_the_config_overrides_the_shipped_table_field_by_field_and_extends_it() -> None:
    shipped = default_prices().price("gpt-4o")
    assert shipped is not None
    settings = parse_settings(
        {"prices": {"gpt-4o": {"output": 12.0}, "my-model-*": {"input": 1, "output": 2}}}, "c"
    )
    assert settings.prices.price("gpt-4o") == Price(shipped.input, shipped.cached_input, 12_000_000)
    assert settings.prices.price("my-model-7") == Price(1_000_000, 1_000_000, 2_000_000)
    assert settings.prices.price("claude-opus-4-5-20251101") is not None


@pytest.mark.parametrize(
    ("prices", "message"),
    [
        ({"m": {"input": 1}}, "c: prices.m.output: must be set"),
        ({"m": {"input": -1, "output": 1}}, "prices.m.input: must be a price"),
        ({"m": {"input": "1", "output": 1}}, "prices.m.input: must be a price"),
        ({"m": {"input": 1, "output": 1, "cache": 1}}, "prices.m.cache: unknown key"),
        ({"m": 3}, "prices.m: must be a table"),
    ],
)
def test_bad_prices_name_the_field(prices: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({"prices": prices}, "c")
    assert message in str(info.value)


def test_the_shipped_table_states_its_date_and_sources_and_is_sane() -> None:
    text = (resources.files("tokenguard.config") / "prices.toml").read_text()
    assert "Table date: " in text and "Sources" in text and "NOT CHECKED" in text
    entries = default_prices().entries
    assert {"gpt-4o", "gpt-4o-mini*", "claude-opus-4-5*"} <= {p for p, _ in entries}
    for _, price in entries:
        assert 0 <= price.cached_input <= price.input


def test_spend_limits_are_read_in_currency_and_held_in_micro_units() -> None:
    settings = parse_settings(
        {"keys": [{"key": "k", "name": "a", "spend_per_day": 5.5, "spend_per_hour": 0.000001}]},
        "c",
    )
    limits = settings.keys[0].limits
    assert (limits.spend_per_day, limits.spend_per_hour) == (5_500_000, 1)
    assert limits.rules() == [("spend", "hour", 1), ("spend", "day", 5_500_000)]
    for bad in (0, -1, "5"):
        with pytest.raises(ConfigError, match="keys\\[0\\].spend_per_day"):
            parse_settings({"keys": [{"key": "k", "name": "a", "spend_per_day": bad}]}, "c")

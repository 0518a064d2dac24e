"""Config validation of the richer limits: windows, total tokens, teams, per-model rules,
modes. Every error names the file and the dotted key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tokenguard.config.limits_table import limits_from_table
from tokenguard.config.loading import load_settings, parse_settings
from tokenguard.config.settings import ConfigError
from tokenguard.limiting.registry import table_of
from tokenguard.model import RULE_FIELDS, Limits, ModelRule

EXAMPLE = """\
[limits]
mode = "enforce"            # the default of every tier, team and key

[tiers.pro]
rpm = 60
rpd = 5000
tpm = 90000
[tiers.pro.models."gpt-4o*"]
rpm = 20

[teams.research]
rph = 600
output_tpd = 2000000
mode = "shadow"             # try the team's limits on live traffic first
[teams.research.models."gpt-4.1*"]
tpd = 500000
mode = "enforce"

[[keys]]
key = "sk-alice"
name = "alice"
tier = "pro"
team = "research"
input_tph = 400000
models = { "gpt-4o*" = { tpm = 30000 }, "o3*" = { rpd = 50 } }
"""


def parse(doc: dict[str, Any]) -> Any:
    return parse_settings(doc, "cfg.toml")


def error_of(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    return str(info.value)


def test_the_documented_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "example.toml"
    path.write_text(EXAMPLE)
    settings = load_settings(path)
    (alice,) = settings.keys
    assert alice.team is not None and alice.team.name == "research"
    assert alice.team.limits.mode == "shadow"
    assert alice.team.limits.rules() == [
        ("requests", "hour", 600),
        ("output_tokens", "day", 2_000_000),
    ]
    assert alice.team.limits.models == (ModelRule("gpt-4.1*", Limits(tpd=500_000), mode="enforce"),)
    limits = alice.limits
    assert (limits.rpm, limits.rpd, limits.tpm, limits.input_tph) == (60, 5000, 90000, 400000)
    assert limits.mode == "enforce"
    # The tier's rule for gpt-4o* and the key's are merged field by field.
    assert limits.models == (
        ModelRule("gpt-4o*", Limits(rpm=20, tpm=30000)),
        ModelRule("o3*", Limits(rpd=50)),
    )


def test_the_readme_example_is_the_same() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert EXAMPLE in readme


def test_every_window_field_is_accepted_and_validated() -> None:
    assert len(RULE_FIELDS) == 13  # 4 dimensions x 3 windows, and max_concurrent
    key = parse({"keys": [{"key": "k", "name": "a", **{f: 7 for f in RULE_FIELDS}}]}).keys[0]
    assert len(key.limits.rules()) == 13
    for field in ("rph", "output_tpd", "tpm", "max_concurrent"):
        message = error_of({"keys": [{"key": "k", "name": "a", field: 0}]})
        assert message == f"cfg.toml: keys[0].{field}: must be at least 1, got 0"
        message = error_of({"tiers": {"x": {field: "10"}}})
        assert message == f"cfg.toml: tiers.x.{field}: must be an integer, got '10'"
    assert "keys[0].rpw: unknown key" in error_of({"keys": [{"key": "k", "name": "a", "rpw": 1}]})


def test_modes() -> None:
    settings = parse(
        {
            "limits": {"mode": "shadow"},
            "tiers": {"t": {"rpm": 1}, "e": {"rpm": 1, "mode": "enforce"}},
            "keys": [
                {"key": "k1", "name": "a"},
                {"key": "k2", "name": "b", "tier": "t"},
                {"key": "k3", "name": "c", "tier": "e"},
                {"key": "k4", "name": "d", "tier": "e", "mode": "shadow"},
            ],
        }
    )
    assert settings.mode == "shadow"
    assert [k.limits.mode for k in settings.keys] == ["shadow", "shadow", "enforce", "shadow"]
    assert error_of({"limits": {"mode": "dry-run"}}) == (
        "cfg.toml: limits.mode: must be one of enforce, shadow, got 'dry-run'"
    )
    assert error_of({"teams": {"t": {"mode": "off"}}}).startswith("cfg.toml: teams.t.mode:")
    assert "keys[0].models.gpt-4o.mode: must be one of" in error_of(
        {"keys": [{"key": "k", "name": "a", "models": {"gpt-4o": {"rpm": 1, "mode": "x"}}}]}
    )
    assert "limits.rpm: unknown key" in error_of({"limits": {"rpm": 3}})


def test_teams() -> None:
    assert error_of({"keys": [{"key": "k", "name": "a", "team": "nope"}]}) == (
        "cfg.toml: keys[0].team: unknown team 'nope' (known: [])"
    )
    assert "teams.a{b}: a team name may only use" in error_of({"teams": {"a{b}": {"rpm": 1}}})
    assert "teams.a:b: a team name may only use" in error_of({"teams": {"a:b": {"rpm": 1}}})
    # A team has no output reservation of its own: that is a key's (or tier's).
    assert "teams.t.default_max_tokens: unknown key" in error_of(
        {"teams": {"t": {"default_max_tokens": 10}}}
    )
    assert "teams.t.tier: unknown key" in error_of({"teams": {"t": {"tier": "x"}}})
    team = parse({"teams": {"t.1_x-y": {}}}).teams["t.1_x-y"]
    assert team.limits.rules() == []


def test_model_rules() -> None:
    def rules(models: Any) -> str:
        return error_of({"keys": [{"key": "k", "name": "a", "models": models}]})

    assert rules({"gpt-4o": {}}) == (
        "cfg.toml: keys[0].models.gpt-4o: sets no limit (give one of "
        + ", ".join(RULE_FIELDS)
        + ")"
    )
    assert rules({"gpt-4o": 5}) == "cfg.toml: keys[0].models.gpt-4o: must be a table, got int"
    assert rules([]) == "cfg.toml: keys[0].models: must be a table, got list"
    assert "models.gpt-4o.default_max_tokens: unknown key" in rules(
        {"gpt-4o": {"rpm": 1, "default_max_tokens": 5}}
    )
    assert "models.gpt-4o.models: unknown key" in rules({"gpt-4o": {"rpm": 1, "models": {}}})
    assert "models.'': a model pattern must not be empty" in rules({"": {"rpm": 1}})
    assert "models.gpt-4o.rpd: must be at least 1" in rules({"gpt-4o": {"rpd": -1}})


def test_toml_table_and_inline_forms_are_the_same() -> None:
    tables = tomllib.loads(
        '[[keys]]\nkey = "k"\nname = "a"\n[keys.models."gpt-4o*"]\nrpm = 5\n'
        '[keys.models."o1"]\ntpd = 9\n'
    )
    inline = tomllib.loads(
        '[[keys]]\nkey = "k"\nname = "a"\nmodels = {"gpt-4o*" = {rpm = 5}, "o1" = {tpd = 9}}\n'
    )
    assert parse(tables).keys == parse(inline).keys


def test_existing_configs_are_unchanged() -> None:
    key = parse({"keys": [{"key": "k", "name": "a", "rpm": 3, "output_tpm": 9}]}).keys[0]
    assert key.limits == Limits(rpm=3, output_tpm=9)
    assert key.team is None and key.limits.models == ()


def test_per_user_limits_are_read_over_the_tier_field_by_field() -> None:
    settings = parse(
        {
            "tiers": {"app": {"rpm": 100, "per_user": {"rpm": 20, "tpd": 100_000}}},
            "teams": {"t": {"per_user": {"rph": 5}}},
            "keys": [
                {"key": "k1", "name": "a", "tier": "app"},
                {"key": "k2", "name": "b", "tier": "app", "per_user": {"rpm": 10}},
                {"key": "k3", "name": "c", "team": "t"},
            ],
        }
    )
    a, b, c = settings.keys
    assert a.limits.per_user == Limits(rpm=20, tpd=100_000)
    assert b.limits.per_user == Limits(rpm=10, tpd=100_000)
    assert c.limits.per_user is None
    assert c.team is not None and c.team.limits.per_user == Limits(rph=5)


def test_per_user_limits_survive_the_registry_round_trip() -> None:
    limits = parse({"tiers": {"app": {"rpm": 3, "per_user": {"rpm": 2, "max_concurrent": 1}}}})
    tier = limits.tiers["app"]
    assert limits_from_table(table_of(tier), "<round trip>") == tier


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"tiers": {"x": {"per_user": {}}}}, "tiers.x.per_user: sets no limit"),
        ({"tiers": {"x": {"per_user": 5}}}, "tiers.x.per_user: must be a table, got int"),
        ({"tiers": {"x": {"per_user": {"rpm": 0}}}}, "tiers.x.per_user.rpm: must be at least 1"),
        (
            {"tiers": {"x": {"per_user": {"rpm": 1, "models": {}}}}},
            "tiers.x.per_user.models: unknown key",
        ),
        (
            {"tiers": {"x": {"per_user": {"rpm": 1, "mode": "shadow"}}}},
            "tiers.x.per_user.mode: unknown key",
        ),
        ({"limits": {"missing_user": "drop"}}, "limits.missing_user: must be one of shared"),
        ({"limits": {"user_header": "X End User"}}, "limits.user_header: must be an HTTP header"),
        ({"limits": {"user_header": ""}}, "limits.user_header: must be a non-empty string"),
    ],
)
def test_per_user_config_errors_name_the_key(doc: dict[str, Any], message: str) -> None:
    assert message in error_of(doc)


def test_the_user_header_is_kept_lower_case_and_missing_user_defaults_to_shared() -> None:
    settings = parse({"limits": {"user_header": "X-End-User"}})
    assert (settings.user_header, settings.missing_user) == ("x-end-user", "shared")
    assert parse({}).user_header is None


def test_the_saas_example_in_the_readme_and_design_doc_means_what_it_says() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    design = (Path(__file__).parents[2] / "docs" / "design.md").read_text()
    start = readme.index("[limits]\ntimezone")
    example = readme[start : readme.index("```", start)]
    assert example in design
    settings = parse(tomllib.loads(example))
    (key,) = settings.keys
    assert key.team is not None and key.team.limits.spend_per_month == 200_000_000
    assert key.limits.per_user == Limits(
        rpm=20, tpd=100_000, spend_per_day=1_000_000, max_concurrent=2
    )
    assert (settings.timezone, settings.user_header, settings.missing_user) == (
        "Europe/Paris",
        "x-end-user",
        "reject",
    )
    price = settings.prices.price("acme-finetune-7")
    assert price is not None and (price.input, price.output) == (3_000_000, 12_000_000)


QUEUE_ERRORS = [
    ({"max_wait_seconds": -1}, "max_wait_seconds: must be at least 0, got -1"),
    ({"max_wait_seconds": "5"}, "max_wait_seconds: must be a number, got '5'"),
    ({"max_wait_seconds": 3601}, "max_wait_seconds: must be at most 3600 seconds, got 3601.0"),
    ({"max_wait_seconds": float("inf")}, "max_wait_seconds: must be at most 3600 seconds"),
    ({"max_waiting": 0}, "max_waiting: must be at least 1, got 0"),
    ({"priority": "urgent"}, "priority: must be one of interactive, batch, got 'urgent'"),
]


@pytest.mark.parametrize(("fields", "problem"), QUEUE_ERRORS, ids=[p for _, p in QUEUE_ERRORS])
def test_queue_fields_are_validated_where_they_are_written(
    fields: dict[str, Any], problem: str
) -> None:
    assert problem in error_of({"keys": [{"key": "k", "name": "a", **fields}]})
    assert problem in error_of({"teams": {"t": fields}})
    assert problem in error_of({"tiers": {"x": {"models": {"gpt*": {"rpm": 1, **fields}}}}})


def test_queue_fields_inherit_from_the_tier_and_survive_the_registry() -> None:
    settings = parse(
        {
            "limits": {"batch_share": 0.25},
            "tiers": {"t": {"rpm": 1, "max_wait_seconds": 15, "priority": "batch"}},
            "keys": [{"key": "k", "name": "a", "tier": "t", "max_waiting": 7}],
        }
    )
    (key,) = settings.keys
    assert (key.limits.max_wait_seconds, key.limits.max_waiting) == (15.0, 7)
    assert key.limits.priority == "batch"
    assert settings.batch_share == 0.25
    assert parse({}).batch_share == 0.1 and parse({}).keys == ()
    assert "batch_share: must be a share" in error_of({"limits": {"batch_share": 2}})
    # The keyring reads every key back from the registry's record of its limits.
    assert limits_from_table(table_of(key.limits), "record") == key.limits

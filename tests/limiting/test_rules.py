"""Richer limits on the memory store with a fake clock: several windows per dimension,
total tokens, teams, per-model rules and shadow mode (tokenguard/rules.py)."""

from __future__ import annotations

from typing import Any

import pytest

from drivers.memory import MemoryStore
from tokenguard.api.app import create_app
from tokenguard.api.dialect import OPENAI
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import Settings
from tokenguard.limiting.limiter import Cost, Limiter
from tokenguard.limiting.rules import DAY, HOUR
from tokenguard.model import ApiKey, partition_of
from tokenguard.store.rows import NOT_RESERVED

# 1_000_800 s is a whole number of hours (278 h) plus 0: every bucket boundary at once.
START = 3600.0 * 278


class FakeClock:
    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def settings_of(config: dict[str, Any]) -> Settings:
    return parse_settings(config, "<test>")


def limiter_of(clock: FakeClock) -> Limiter:
    return Limiter(MemoryStore(clock=clock), window_seconds=60, bucket_seconds=5)


def key_of(settings: Settings, name: str) -> ApiKey:
    return next(k for k in settings.keys if k.name == name)


def one_key(**limits: Any) -> ApiKey:
    return key_of(settings_of({"keys": [{"key": "sk-a", "name": "a", **limits}]}), "a")


# --- several windows per dimension -------------------------------------------------------


async def test_rules_on_one_counter_are_one_row_with_the_smaller_limit(clock: FakeClock) -> None:
    # A [window] as long as an hour, in the hour's buckets, makes `rpm` and `rph` the
    # same counter: one row, else each would be checked against the count before the
    # admission and both consumed (4 requests would pass a limit of 3).
    limiter = Limiter(MemoryStore(clock=clock), window_seconds=3600, bucket_seconds=60)
    key = one_key(rpm=5, rph=3, input_tpm=100, input_tph=400)
    rows = limiter.rows(key, Cost(input_tokens=7, output_tokens=3))
    assert [(r.dimension, r.window_ms, r.bucket_ms, r.limit) for r in rows] == [
        ("requests", 3_600_000, 60_000, 3),
        ("input_tokens", 3_600_000, 60_000, 100),
    ]
    admitted = [(await limiter.admit(key, Cost(1, 7, 3))).admitted for _ in range(4)]
    assert admitted == [True, True, True, False]


async def test_rows_per_window_in_order_with_derived_buckets(clock: FakeClock) -> None:
    limiter = limiter_of(clock)
    key = one_key(rpm=10, rph=100, rpd=1000, tpm=500, output_tpd=9000, input_tph=700)
    rows = limiter.rows(key, Cost(input_tokens=7, output_tokens=3))
    assert [(r.dimension, r.window_ms, r.bucket_ms, r.amount) for r in rows] == [
        ("requests", 60_000, 5_000, 1),
        ("total_tokens", 60_000, 5_000, 10),
        ("requests", *HOUR, 1),
        ("input_tokens", *HOUR, 7),
        ("requests", *DAY, 1),
        ("output_tokens", *DAY, 3),
    ]
    assert {r.scope for r in rows} == {f"key:{key.key_id}"}
    assert [r.span for r in rows] == [12, 12, 60, 60, 24, 24]


async def test_a_spent_day_quota_refuses_until_its_hour_bucket_leaves(clock: FakeClock) -> None:
    limiter = limiter_of(clock)
    key = one_key(rpm=100, rpd=3)
    clock.advance(600)  # 10 min into the hour: bucket h0
    for _ in range(3):
        assert (await limiter.admit(key, Cost())).admitted
        clock.advance(120)
    refused = await limiter.admit(key, Cost())
    assert not refused.admitted
    state = refused.refusal
    assert state is not None and (state.row.window_ms, state.used, state.limit) == (
        86_400_000,
        3,
        3,
    )
    # All three sit in the hour bucket h0, which leaves at h0 + 25 h.
    leaves = START + 25 * 3600
    assert refused.admission.retry_after == pytest.approx(leaves - clock.now)
    # Nothing was consumed by the refusal: not even the per-minute row.
    states = await limiter.usage(key)
    assert [s.used for s in states] == [0, 3]  # the minute row has forgotten by now
    clock.now = leaves - 0.001
    assert not (await limiter.admit(key, Cost())).admitted
    clock.now = leaves
    assert (await limiter.admit(key, Cost())).admitted


async def test_never_more_than_the_hour_limit_in_any_hour(clock: FakeClock) -> None:
    limiter = limiter_of(clock)
    key = one_key(rph=20)
    admitted: list[float] = []
    for _ in range(3 * 60 * 4):  # three hours, every 15 s
        if (await limiter.admit(key, Cost())).admitted:
            admitted.append(clock.now)
        clock.advance(15)
    assert len(admitted) >= 40
    for i, start in enumerate(admitted):
        assert len([t for t in admitted[i:] if t < start + 3600]) <= 20


async def test_settlement_corrects_every_output_and_total_row(clock: FakeClock) -> None:
    limiter = limiter_of(clock)
    key = one_key(output_tpm=1000, output_tpd=5000, tpm=2000, tph=3000, input_tpd=800)
    decision = await limiter.admit(key, Cost(input_tokens=100, output_tokens=500))
    assert decision.admitted
    await limiter.settle(decision, output_tokens=120, input_tokens=90)
    used = {(s.row.dimension, s.row.window_ms): s.used for s in await limiter.usage(key)}
    assert used == {
        ("output_tokens", 60_000): 120,
        ("total_tokens", 60_000): 210,
        ("total_tokens", 3_600_000): 210,
        ("input_tokens", 86_400_000): 90,
        ("output_tokens", 86_400_000): 120,
    }


async def test_total_tokens_count_input_and_output_together(clock: FakeClock) -> None:
    limiter = limiter_of(clock)
    key = one_key(tpm=100, input_tpm=1000, output_tpm=1000)
    assert (await limiter.admit(key, Cost(input_tokens=60, output_tokens=30))).admitted
    refused = await limiter.admit(key, Cost(input_tokens=5, output_tokens=10))
    assert not refused.admitted
    assert refused.refusal is not None and refused.refusal.row.dimension == "total_tokens"
    assert (await limiter.admit(key, Cost(input_tokens=5, output_tokens=5))).admitted
    # The headers' "tokens" now report the total (0% left), not input/output (>90%).
    headers = OPENAI.ratelimit_headers(refused.admission.states)
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "10"


# --- teams -------------------------------------------------------------------------------

TEAM_CONFIG = {
    "teams": {"research": {"rpm": 3, "output_tpd": 10_000}},
    "keys": [
        {"key": "sk-a", "name": "a", "team": "research", "rpm": 2},
        {"key": "sk-b", "name": "b", "team": "research", "rpm": 10},
        {"key": "sk-c", "name": "c", "rpm": 10},
    ],
}


async def test_two_keys_of_a_team_share_its_limit(clock: FakeClock) -> None:
    settings = settings_of(TEAM_CONFIG)
    limiter = limiter_of(clock)
    a, b, c = (key_of(settings, n) for n in "abc")
    assert partition_of(a) == partition_of(b) == "team:research"
    assert partition_of(c) == c.key_id
    assert (await limiter.admit(a, Cost())).admitted
    assert (await limiter.admit(b, Cost())).admitted
    assert (await limiter.admit(a, Cost())).admitted
    # a's own rpm (2) is spent, and the team's (3): b is refused by the team.
    refused = await limiter.admit(b, Cost())
    assert not refused.admitted
    assert refused.refusal is not None and refused.refusal.row.scope == "team:research"
    # A key outside the team is not affected; the refusal consumed nothing for b.
    assert (await limiter.admit(c, Cost())).admitted
    b_used = {s.row.scope: s.used for s in await limiter.usage(b) if s.row.window_ms == 60_000}
    assert b_used == {f"key:{b.key_id}": 1, "team:research": 3}


async def test_a_team_refusal_consumes_nothing_in_the_key(clock: FakeClock) -> None:
    settings = settings_of(
        {
            "teams": {"t": {"input_tpm": 100}},
            "keys": [{"key": "sk-a", "name": "a", "team": "t", "rpm": 5, "input_tpm": 1000}],
        }
    )
    limiter = limiter_of(clock)
    a = key_of(settings, "a")
    assert not (await limiter.admit(a, Cost(input_tokens=150))).admitted
    assert [s.used for s in await limiter.usage(a)] == [0, 0, 0]


async def test_headers_report_the_tightest_scope(clock: FakeClock) -> None:
    settings = settings_of(TEAM_CONFIG)
    limiter = limiter_of(clock)
    b = key_of(settings, "b")
    decision = await limiter.admit(b, Cost(output_tokens=100))
    headers = OPENAI.ratelimit_headers(decision.admission.states)
    # b: 9 of 10 left (90%); the team: 2 of 3 (67%).
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "2"
    # The team's day quota on output is the only output row.
    assert headers["x-ratelimit-limit-output-tokens"] == "10000"
    assert headers["x-ratelimit-remaining-output-tokens"] == "9900"


# --- per-model rules ---------------------------------------------------------------------

MODEL_CONFIG = {
    "tiers": {"pro": {"rpm": 100, "models": {"gpt-4o*": {"rpm": 2}}}},
    "teams": {"t": {"models": {"gpt-4.1": {"rpd": 1}}}},
    "keys": [
        {"key": "sk-a", "name": "a", "tier": "pro", "team": "t"},
        {"key": "sk-b", "name": "b", "tier": "pro", "models": {"gpt-4o*": {"rpm": 3}}},
    ],
}


async def test_a_model_glob_limits_every_model_it_matches_together(clock: FakeClock) -> None:
    settings = settings_of(MODEL_CONFIG)
    limiter = limiter_of(clock)
    a = key_of(settings, "a")
    assert (await limiter.admit(a, Cost(), "gpt-4o")).admitted
    assert (await limiter.admit(a, Cost(), "gpt-4o-mini")).admitted
    refused = await limiter.admit(a, Cost(), "gpt-4o")
    assert not refused.admitted
    assert refused.refusal is not None
    assert refused.refusal.row.scope == f"key:{a.key_id}:model:gpt-4o*"
    # Other models only meet the key's own limits (and the team's rule for gpt-4.1).
    assert (await limiter.admit(a, Cost(), "gpt-4")).admitted
    assert (await limiter.admit(a, Cost(), "gpt-4.1")).admitted
    refused = await limiter.admit(a, Cost(), "gpt-4.1")
    assert refused.refusal is not None and refused.refusal.row.scope == "team:t:model:gpt-4.1"
    assert (await limiter.admit(a, Cost(), "gpt-4.1-mini")).admitted  # no glob: exact


async def test_a_key_overrides_its_tiers_model_rule(clock: FakeClock) -> None:
    settings = settings_of(MODEL_CONFIG)
    limiter = limiter_of(clock)
    b = key_of(settings, "b")
    assert [(await limiter.admit(b, Cost(), "gpt-4o")).admitted for _ in range(4)] == [
        True,
        True,
        True,
        False,
    ]


# --- shadow mode -------------------------------------------------------------------------


async def run_traffic(limiter: Limiter, key: ApiKey, clock: FakeClock) -> list[bool]:
    """The same traffic every time: varied sizes, every 2 s for 5 minutes; returns, per
    request, whether enforcing would have refused it."""
    refused = []
    for i in range(150):
        cost = Cost(input_tokens=10 + (i * 37) % 90, output_tokens=20)
        decision = await limiter.admit(key, cost, "gpt-4o")
        refused.append(not decision.admitted or decision.would_refuse)
        if decision.admitted:
            await limiter.settle(decision, output_tokens=(i * 13) % 20)
        clock.advance(2)
    return refused


@pytest.mark.parametrize("where", ["key", "tier", "global", "team"])
async def test_shadow_counts_exactly_what_enforce_does(where: str) -> None:
    def config(mode: str) -> dict[str, Any]:
        limits = {"rpm": 12, "input_tpm": 900, "tph": 3000, "models": {"gpt-4o": {"rpm": 10}}}
        key: dict[str, Any] = {"key": "sk-a", "name": "a"}
        doc: dict[str, Any] = {"keys": [key]}
        if where == "team":
            doc["teams"] = {"t": {**limits, "mode": mode}}
            key["team"] = "t"
        elif where == "tier":
            doc["tiers"] = {"x": {**limits, "mode": mode}}
            key["tier"] = "x"
        elif where == "global":
            doc["limits"] = {"mode": mode}
            key.update(limits)
        else:
            key.update(limits, mode=mode)
        return doc

    outcomes = {}
    usage = {}
    for mode in ("enforce", "shadow"):
        clock = FakeClock()
        limiter = limiter_of(clock)
        key = key_of(settings_of(config(mode)), "a")
        outcomes[mode] = await run_traffic(limiter, key, clock)
        usage[mode] = [s.used for s in await limiter.usage(key, "gpt-4o")]
        if mode == "shadow":
            assert limiter.shadow_refusals == sum(outcomes[mode])
    assert 20 < sum(outcomes["enforce"]) < 140  # the traffic does meet the limits
    assert outcomes["shadow"] == outcomes["enforce"]
    assert usage["shadow"] == usage["enforce"]


async def test_a_shadow_refusal_is_admitted_and_reported(clock: FakeClock) -> None:
    limiter = limiter_of(clock)
    key = one_key(rpm=5, rpd=1, mode="shadow")
    assert (await limiter.admit(key, Cost())).admitted
    decision = await limiter.admit(key, Cost())
    assert decision.admitted and decision.would_refuse
    assert decision.refusal is None
    shadow = decision.shadow_refusal
    assert shadow is not None and shadow.row.window_ms == 86_400_000
    assert decision.admission.retry_after == 0.0
    # Not consumed in any shadow row, as enforcing would not have; nothing to settle.
    assert decision.reservation is not None
    assert set(decision.reservation.buckets) == {NOT_RESERVED}
    assert [s.used for s in await limiter.usage(key)] == [1, 1]
    # Shadow rows are not reported to the client.
    assert OPENAI.ratelimit_headers(decision.admission.states) == {}


async def test_enforced_key_with_a_shadow_team(clock: FakeClock) -> None:
    """The key's rows are enforced and consumed; the team's (shadow) only when every
    row fits, as enforcing would have."""
    settings = settings_of(
        {
            "teams": {"t": {"rpm": 1, "mode": "shadow"}},
            "keys": [{"key": "sk-a", "name": "a", "team": "t", "rpm": 3}],
        }
    )
    limiter = limiter_of(clock)
    a = key_of(settings, "a")
    outcomes = [await limiter.admit(a, Cost()) for _ in range(4)]
    assert [d.admitted for d in outcomes] == [True, True, True, False]
    assert [d.would_refuse for d in outcomes] == [False, True, True, False]
    assert [s.used for s in await limiter.usage(a)] == [3, 1]
    refused = outcomes[3]
    assert refused.refusal is not None and refused.refusal.row.scope == f"key:{a.key_id}"


# --- through the app ---------------------------------------------------------------------


async def test_429_names_the_window_and_scope_with_retry_after(clock: FakeClock) -> None:
    settings = settings_of(
        {
            "teams": {"research": {"rpd": 2, "models": {"gpt-4o*": {"tph": 10_000}}}},
            "keys": [{"key": "sk-a", "name": "a", "team": "research", "rpm": 100}],
        }
    )
    client = create_app(settings, MemoryStore(clock=clock)).test_client()
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    headers = {"Authorization": "Bearer sk-a"}
    for _ in range(2):
        response = await client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200
    clock.advance(1800)
    response = await client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 429
    error = (await response.get_json())["error"]
    assert error["type"] == "requests"
    assert "team 'research'" in error["message"]
    assert "requests per day (RPD)" in error["message"]
    # Both in hour bucket 0, which leaves 25 h after it began: 24.5 h from now.
    assert response.headers["retry-after"] == str(int(24.5 * 3600))
    assert response.headers["x-ratelimit-limit-requests"] == "2"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    usage = await (await client.get("/v1/usage", headers=headers)).get_json()
    assert usage["dimensions"]["requests"]["limit"] == 2
    assert {(e["scope"], e["window_seconds"]) for e in usage["limits"]} == {
        ("key", 60),
        ("team", 86400),
    }


async def test_default_reservation_is_clamped_to_the_tightest_output_rule(
    clock: FakeClock,
) -> None:
    settings = settings_of(
        {"keys": [{"key": "sk-a", "name": "a", "models": {"gpt-4o": {"tpm": 300}}}]}
    )
    client = create_app(settings, MemoryStore(clock=clock)).test_client()
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    response = await client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-a"}
    )
    # default_max_tokens is 1024, more than tpm = 300 allows: clamped, so admitted.
    assert response.status_code == 200

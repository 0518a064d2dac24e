"""Tests for bench.audit: hand-made timelines with known answers, and brute-force checks.

Times are seconds on one clock; a request "at t" is sent at t and answered 1 ms later
unless a test says otherwise. Limits: a window of 60 s in 5 s buckets.
"""

from __future__ import annotations

import itertools

import attrs
from hypothesis import given
from hypothesis import strategies as st

from bench.audit.billing import Billing, audit_billing
from bench.audit.observations import Observation, Refusal, parse_refusal
from bench.audit.report import audit_dict, format_audit
from bench.audit.sweep import Span, definite_peak, dominance_sums, possible_peak
from bench.audit.verdict import audit
from tokenguard.api.dialect import OPENAI
from tokenguard.api.ratelimit import rate_limit_error
from tokenguard.limiting.limiter import Cost, Decision
from tokenguard.model import ApiKey, Limits
from tokenguard.store.rows import Admission, Row, RowState

WINDOW, BUCKET = 60.0, 5.0
LATENCY = 0.001


def admitted(
    id: int,
    t: float,
    *,
    key: str = "k",
    latency: float = LATENCY,
    input_tokens: int = 10,
    output_tokens: int = 10,
    headers: dict[str, str] | None = None,
) -> Observation:
    return Observation(
        id=id,
        key=key,
        start=t,
        end=t + latency,
        status=200,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        headers=headers or {},
    )


def refused(
    id: int,
    t: float,
    refusal: Refusal,
    *,
    key: str = "k",
    latency: float = LATENCY,
    headers: dict[str, str] | None = None,
) -> Observation:
    return Observation(
        id=id,
        key=key,
        start=t,
        end=t + latency,
        status=429,
        headers=headers or {},
        refusal=refusal,
    )


def over_for(report, key: str, dimension: str):
    (entry,) = [o for o in report.over if o.key == key and o.dimension == dimension]
    return entry


def under_for(report, key: str, dimension: str):
    (entry,) = [u for u in report.under if u.key == key and u.dimension == dimension]
    return entry


RPM5 = {"k": Limits(rpm=5)}


# --- over-admission ---------------------------------------------------------------------


def test_timeline_within_the_limit_has_no_over_admission() -> None:
    # 5 per window, twice: the second five start just over a window after the first.
    times = [0, 10, 20, 30, 40, 60.5, 70.5, 80.5, 90.5, 100.5]
    report = audit([admitted(i, t) for i, t in enumerate(times)], RPM5, WINDOW, BUCKET)
    requests = over_for(report, "k", "requests")
    assert requests.admitted_total == 10
    assert requests.definite.amount == 5
    assert requests.definite_excess == 0
    assert requests.possible_excess == 0
    assert report.definite_over_admissions == 0
    assert report.ok
    assert "definite over-admission: none (ok)" in format_audit(report)


def test_planted_over_admission_is_caught_with_key_dimension_and_count() -> None:
    observations = [admitted(i, t, key="other") for i, t in enumerate([0, 1, 2])]
    observations += [admitted(10 + i, t) for i, t in enumerate([5, 15, 25, 35, 45, 55])]
    limits = {"k": Limits(rpm=5), "other": Limits(rpm=5)}
    report = audit(observations, limits, WINDOW, BUCKET)
    bad = [o for o in report.over if o.definite_excess]
    assert [(o.key, o.dimension) for o in bad] == [("k", "requests")]
    (o,) = bad
    assert o.definite.amount == 6
    assert o.definite_excess == 1
    assert o.definite.members == (10, 11, 12, 13, 14, 15)
    assert o.definite.anchor == 5
    assert o.definite.windows_over == 1
    assert report.definite_over_admissions == 1
    assert not report.ok
    text = format_audit(report)
    assert "FAIL definite over-admission: key k requests: 6 > limit 5 (+1, 20.0%)" in text
    assert audit_dict(report)["definite_over_admissions"] == 1


def test_six_admissions_spread_just_over_a_window_are_not_over_admitted() -> None:
    times = [0, 10, 20, 30, 40, 60.01]
    report = audit([admitted(i, t) for i, t in enumerate(times)], RPM5, WINDOW, BUCKET)
    requests = over_for(report, "k", "requests")
    assert requests.definite.amount == 5
    # 60.01 - 0.001 > 60: they cannot have been in one window either.
    assert requests.possible.amount == 5
    assert report.ok


def test_a_window_is_closed_admissions_exactly_one_window_apart_share_it() -> None:
    # The server still counts an amount admitted at t at t + window (windows.py).
    times = [0, 10, 20, 30, 40, 60]
    observations = [admitted(i, t, latency=0.0) for i, t in enumerate(times)]
    report = audit(observations, RPM5, WINDOW, BUCKET)
    assert over_for(report, "k", "requests").definite_excess == 1


def test_uncertainty_windows_definite_versus_possible() -> None:
    # The sixth request is sent 60 s after the first; with 5 ms latency, their admission
    # moments may be 60 s apart (one window) or up to 60.005 s apart (not).
    times = [0, 10, 20, 30, 40, 60]
    observations = [admitted(i, t, latency=0.005) for i, t in enumerate(times)]
    report = audit(observations, RPM5, WINDOW, BUCKET)
    requests = over_for(report, "k", "requests")
    assert requests.definite_excess == 0
    assert requests.possible_excess == 1
    assert requests.possible.members == (0, 1, 2, 3, 4, 5)
    assert report.ok  # possible over-admission is reported, not failed
    assert "possible over-admission" in format_audit(report)


def test_long_latency_makes_a_window_only_possible() -> None:
    # Six requests sent within 30 s, but one took 40 s to answer: its admission may have
    # been 40 s after the first's start, still one window; definite needs the span 0..70.
    observations = [admitted(i, t) for i, t in enumerate([0, 5, 10, 15, 20])]
    observations.append(admitted(5, 30, latency=40))
    report = audit(observations, RPM5, WINDOW, BUCKET)
    requests = over_for(report, "k", "requests")
    assert requests.definite_excess == 0
    assert requests.possible_excess == 1


def test_token_dimensions_use_the_usage_the_server_reported() -> None:
    limits = {"k": Limits(rpm=100, input_tpm=1000, output_tpm=100)}
    observations = [
        admitted(0, 0, input_tokens=400, output_tokens=30),
        admitted(1, 10, input_tokens=400, output_tokens=30),
        admitted(2, 20, input_tokens=199, output_tokens=30),
        admitted(3, 61, input_tokens=1, output_tokens=60),
    ]
    report = audit(observations, limits, WINDOW, BUCKET)
    assert over_for(report, "k", "input_tokens").definite.amount == 999
    assert over_for(report, "k", "output_tokens").definite.amount == 120  # 30 + 30 + 60
    assert report.definite_over_admissions == 20
    (bad,) = [o for o in report.over if o.definite_excess]
    assert (bad.dimension, bad.definite_excess, bad.definite.members) == (
        "output_tokens",
        20,
        (1, 2, 3),
    )
    assert over_for(report, "k", "requests").definite_excess == 0


def test_unknown_outcomes_count_only_as_possible_requests() -> None:
    observations = [admitted(i, t) for i, t in enumerate([0, 1, 2, 3, 4])]
    observations.append(Observation(id=9, key="k", start=5, end=35, status=None))
    observations.append(Observation(id=10, key="k", start=6, end=6.1, status=400))
    report = audit(observations, RPM5, WINDOW, BUCKET)
    requests = over_for(report, "k", "requests")
    assert requests.definite.amount == 5
    assert requests.possible.amount == 6  # the transport error may have been admitted
    assert report.unknown_outcomes == 1
    assert report.ok


def test_keys_without_limits_are_listed_as_unaudited() -> None:
    report = audit([admitted(0, 0, key="mystery")], RPM5, WINDOW, BUCKET)
    assert report.unaudited_keys == ("mystery",)
    assert report.over == ()


# --- under-admission --------------------------------------------------------------------


def test_under_admission_for_a_refusal_that_would_have_fit() -> None:
    # Three admitted in the window; a refusal of 1 request under a limit of 5: 1 unused.
    observations = [admitted(i, t) for i, t in enumerate([0, 1, 2])]
    observations.append(refused(3, 10, Refusal("requests", limit=5, used=5, requested=1)))
    # After two more admissions, a refusal was right: nothing unused.
    observations += [admitted(4, 11), admitted(5, 12)]
    observations.append(refused(6, 20, Refusal("requests", limit=5, used=5, requested=1)))
    report = audit(observations, RPM5, WINDOW, BUCKET)
    requests = under_for(report, "k", "requests")
    assert requests.refusals == 2
    assert requests.refusal_ids == (3, 6)
    assert requests.unused_at_least == (1, 0)
    assert requests.would_fit == 1
    assert requests.max_unused == 1
    assert requests.bucket_share == 5 * BUCKET / WINDOW
    assert "20.0%" in format_audit(report)  # 1 of a limit of 5


def test_under_admission_in_tokens_subtracts_the_requested_amount() -> None:
    limits = {"k": Limits(output_tpm=100)}
    observations = [admitted(0, 0, output_tokens=20), admitted(1, 1, output_tokens=10)]
    observations.append(refused(2, 5, Refusal("output_tokens", limit=100, used=90, requested=50)))
    observations.append(refused(3, 6, Refusal("output_tokens", limit=200, requested=500)))
    report = audit(observations, limits, WINDOW, BUCKET)
    output = under_for(report, "k", "output_tokens")
    assert output.unused_at_least == (20,)  # 100 - 50 - (20 + 10)
    assert output.never_fits == 1


def test_under_admission_bounds_follow_the_uncertainty() -> None:
    # An admission answered 2 s after the refusal was sent may have come before or after
    # it: the lower bound counts it, the upper bound does not.
    observations = [admitted(0, 0), admitted(1, 9, latency=3)]
    observations.append(refused(2, 10, Refusal("requests", limit=5, used=2, requested=1)))
    # An admission sent 60.5 s before the refusal and answered 1 s later: maybe in window.
    observations = [admitted(7, -50.5, latency=1.0), *observations]
    report = audit(observations, RPM5, WINDOW, BUCKET)
    requests = under_for(report, "k", "requests")
    assert requests.unused_at_least == (5 - 1 - 3,)
    assert requests.unused_at_most == (5 - 1 - 1,)


def test_unexplained_under_admission_allows_for_the_bucket_slack() -> None:
    # Five admitted at 0..4 s; refusals at 62 s (the server may hold the first ones for
    # up to 65 s: explained) and at 70 s (it may not: 4 of 5 unused, unexplained).
    observations = [admitted(i, t) for i, t in enumerate([0, 1, 2, 3, 4])]
    full = Refusal("requests", limit=5, used=5, requested=1)
    observations += [refused(10, 62, full), refused(11, 70, full)]
    report = audit(observations, RPM5, WINDOW, BUCKET)
    requests = under_for(report, "k", "requests")
    assert requests.unused_at_least == (1, 4)  # at 62 s, 0 and 1 left the window
    assert requests.unexplained == (0, 4)
    assert requests.max_unexplained == 4


def test_unexplained_output_under_admission_allows_for_reservations() -> None:
    # A request reserved 80 output tokens and produced 10; a refusal asking 30 while
    # it was in flight was right to refuse (80 + 30 > 100), though 10 + 30 would fit.
    limits = {"k": Limits(output_tpm=100)}
    long_one = admitted(0, 0, latency=5, output_tokens=10)
    observations = [attrs.evolve(long_one, reserved_output=80)]
    observations.append(refused(1, 2, Refusal("output_tokens", 100, 30, used=80)))
    report = audit(observations, limits, WINDOW, BUCKET)
    output = under_for(report, "k", "output_tokens")
    assert output.unused_at_least == (60,)
    assert output.unexplained == (0,)


def test_refusals_are_excluded_from_other_dimensions() -> None:
    limits = {"k": Limits(rpm=5, input_tpm=100)}
    observations = [refused(0, 0, Refusal("input_tokens", limit=100, used=90, requested=20))]
    report = audit(observations, limits, WINDOW, BUCKET)
    assert under_for(report, "k", "requests").refusals == 0
    assert under_for(report, "k", "input_tokens").unused_at_least == (80,)


# --- the server's messages and headers --------------------------------------------------


def _message(dimension: str, limit: int, used: int, amount: int, window: int = 60) -> str:
    """The 429 message tokenguard's app really writes, so parsing follows its format."""
    row = Row("key:x", dimension, window * 1000, 5000, limit, amount)
    never = amount > limit
    state = RowState(row, used, 10.0, fits=False, retry_after=None if never else 3.5)
    key = ApiKey(name="k", digest="0" * 64, limits=Limits())
    decision = Decision(key, Cost(), Admission(admitted=False, states=(state,)))
    return rate_limit_error(decision, OPENAI).message


def test_parse_refusal_reads_the_apps_own_messages() -> None:
    assert parse_refusal(_message("requests", 40, 40, 1)) == Refusal("requests", 40, 1, used=40)
    assert parse_refusal(_message("input_tokens", 3000, 2990, 30)) == Refusal(
        "input_tokens", 3000, 30, used=2990
    )
    assert parse_refusal(_message("output_tokens", 100, 60, 64, window=10)) == Refusal(
        "output_tokens", 100, 64, used=60
    )
    never = parse_refusal(_message("output_tokens", 100, 0, 500))
    assert never == Refusal("output_tokens", 100, 500) and never.never_fits
    assert parse_refusal("Incorrect API key provided.") is None


def _headers(limit: int, remaining: int, name: str = "requests") -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{name}": str(limit),
        f"x-ratelimit-remaining-{name}": str(remaining),
    }


def test_consistent_headers_pass() -> None:
    observations = [admitted(i, i, headers=_headers(5, 4 - i)) for i in range(5)]
    refusal = Refusal("requests", limit=5, used=5, requested=1)
    observations.append(refused(5, 5, refusal, headers=_headers(5, 0)))
    report = audit(observations, RPM5, WINDOW, BUCKET)
    assert report.headers.checked == 6
    assert report.headers.problems == ()
    assert all(f.excess == 0 for f in report.foreign)


def test_header_problems_are_found() -> None:
    observations = [
        admitted(0, 0, headers=_headers(5, 4)),
        admitted(1, 1, headers=_headers(5, 4)),  # two admitted before it; server says 1 used
        admitted(2, 2, headers=_headers(5, 5)),  # its own request not counted
        admitted(3, 3, headers=_headers(6, 1)),  # wrong limit
        admitted(4, 4, headers=_headers(5, -1)),  # negative
        refused(5, 5, Refusal("requests", 5, 1, used=4), headers=_headers(5, 1)),  # it fits
    ]
    report = audit(observations, RPM5, WINDOW, BUCKET)
    kinds = report.headers.counts()
    assert kinds["store under-counts"] >= 2
    assert kinds["own amount not counted"] == 1
    assert kinds["limit mismatch"] == 1
    assert kinds["negative"] == 1
    assert kinds["refused though it fits"] == 1
    assert not report.ok
    assert "FAIL header consistency" in format_audit(report)


def test_foreign_usage_is_noted() -> None:
    # The server says 3 were used before the first request this client ever sent.
    observations = [admitted(0, 0, headers=_headers(5, 1))]
    report = audit(observations, RPM5, WINDOW, BUCKET)
    (requests,) = [f for f in report.foreign if f.dimension == "requests"]
    assert (requests.excess, requests.answers) == (3, 1)
    assert report.ok
    assert "more than this client could have caused" in format_audit(report)


# --- the sweeps against brute force -----------------------------------------------------

spans_strategy = st.lists(
    st.tuples(st.integers(0, 40), st.integers(0, 12), st.integers(1, 5)),  # start, latency, amount
    max_size=7,
).map(lambda raw: [Span(s, s + lat, a, i) for i, (s, lat, a) in enumerate(raw)])


def _brute(spans: list[Span], window: float, definite: bool) -> int:
    best = 0
    for n in range(1, len(spans) + 1):
        for subset in itertools.combinations(spans, n):
            if definite:
                fits = max(s.end for s in subset) - min(s.start for s in subset) <= window
            else:
                fits = max(s.start for s in subset) - min(s.end for s in subset) <= window
            if fits:
                best = max(best, sum(s.amount for s in subset))
    return best


@given(spans_strategy, st.integers(1, 30))
def test_peaks_match_brute_force(spans: list[Span], window: int) -> None:
    assert definite_peak(spans, window, limit=10**9).amount == _brute(spans, window, True)
    assert possible_peak(spans, window, limit=10**9).amount == _brute(spans, window, False)


@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(0, 9)), max_size=15),
    st.lists(st.tuples(st.integers(-1, 21), st.integers(-1, 21)), max_size=10),
)
def test_dominance_sums_match_brute_force(items, queries) -> None:
    expected = [sum(a for x, y, a in items if x <= qx and y >= qy) for qx, qy in queries]
    assert dominance_sums(items, queries) == expected


# --- upstream billing (the proxy audit) ----------------------------------------------------


def billed(id: int, t: float, *, output: int, key: str = "k", received: float = 0.01) -> Billing:
    """A request sent at ``t`` that the upstream received ``received`` s later."""
    return Billing(id=id, key=key, start=t, end=t + received, input_tokens=10, output_tokens=output)


def test_billing_over_the_limit_within_one_window_is_definite_over_spend() -> None:
    bills = [billed(0, 0, output=600), billed(1, 30, output=600), billed(2, 59, output=600)]
    (requests, input_tokens, output) = audit_billing(
        bills, {"k": Limits(rpm=10, input_tpm=100, output_tpm=1000)}, WINDOW
    )
    assert (requests.definite.amount, input_tokens.definite.amount) == (3, 30)
    assert output.admitted_total == 1800
    assert (output.definite.amount, output.definite_excess) == (1800, 800)
    assert output.definite.members == (0, 1, 2)


def test_billing_spread_over_two_windows_is_no_over_spend_and_only_possibly_near() -> None:
    # Sent 61 s apart and received at once: never within one window, not even possibly.
    bills = [billed(0, 0, output=600), billed(1, 61, output=600)]
    (output,) = audit_billing(bills, {"k": Limits(output_tpm=1000)}, WINDOW)
    assert (output.definite.amount, output.definite_excess) == (600, 0)
    assert output.possible.amount == 600
    # The first received 2 s after it was sent: admitted as late as t=2, it may have
    # been within 60 s of the second.
    late = [billed(0, 0, output=600, received=2), billed(1, 61, output=600)]
    (output,) = audit_billing(late, {"k": Limits(output_tpm=1000)}, WINDOW)
    assert (output.definite_excess, output.possible_excess) == (0, 200)


def test_billing_is_audited_per_key_and_other_keys_are_left_out() -> None:
    bills = [billed(0, 0, output=900, key="a"), billed(1, 1, output=900, key="b")]
    bills.append(billed(2, 2, output=900, key="stranger"))
    found = audit_billing(bills, {"a": Limits(output_tpm=1000), "b": Limits(output_tpm=1000)}, 60)
    assert [(o.key, o.definite.amount, o.definite_excess) for o in found] == [
        ("a", 900, 0),
        ("b", 900, 0),
    ]

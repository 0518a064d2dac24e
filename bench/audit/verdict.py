"""The audit of a load run: observations in, an :class:`~bench.audit.findings.AuditReport`
out (see the package docstring for what each figure means)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from bench.audit.findings import (
    AuditReport,
    ForeignUsage,
    HeaderCheck,
    HeaderProblem,
    OverAdmission,
    UnderAdmission,
)
from bench.audit.headers import check_headers
from bench.audit.observations import HEADER_NAMES, Observation
from bench.audit.sweep import Span, definite_peak, dominance_sums, possible_peak
from tokenguard.model import DIMENSIONS, Limits


def _server_used(o: Observation, dimension: str, limit: int) -> int | None:
    """The server's used amount at this answer, when the answer pins it down exactly.

    An admitted answer's headers count its own amount; a refusal's do not. A remaining of
    0 only says "at least the limit", so it pins nothing.
    """
    refusal = o.refusal
    if o.status == 429 and refusal is not None and refusal.dimension == dimension:
        if refusal.used is not None:
            return refusal.used
    text = o.headers.get(f"x-ratelimit-remaining-{HEADER_NAMES[dimension]}")
    try:
        remaining = int(text) if text is not None else None
    except ValueError:
        return None
    if remaining is None or not 0 < remaining <= limit:
        return None
    return limit - remaining


def _foreign_usage(
    key: str, key_obs: Sequence[Observation], limits: Limits, window: float, bucket: float
) -> list[ForeignUsage]:
    mine = [o for o in key_obs if o.admitted or o.outcome_unknown]
    found = []
    for dimension in ("requests", "input_tokens"):
        limit = limits.limit(dimension)
        if limit is None:
            continue
        if dimension == "input_tokens" and any(o.input_tokens is None for o in mine):
            continue  # some amount unknown: no upper bound on what this client caused
        answers = [
            (o, used)
            for o in key_obs
            if o.status in (200, 429) and (used := _server_used(o, dimension, limit)) is not None
        ]
        # The server holds an amount at most window + bucket after admitting it.
        caused = dominance_sums(
            [(o.start, o.end, o.amount(dimension)) for o in mine],
            [(o.end, o.start - window - bucket) for o, _ in answers],
        )
        surplus = [used - most for (_, used), most in zip(answers, caused, strict=True)]
        positive = [x for x in surplus if x > 0]
        found.append(
            ForeignUsage(
                key=key,
                dimension=dimension,
                limit=limit,
                excess=max(positive, default=0),
                answers=len(positive),
            )
        )
    return found


def over_admission(
    key: str,
    dimension: str,
    limit: int,
    spans: Sequence[Span],
    maybe: Sequence[Span],
    window: float,
) -> OverAdmission:
    """The peaks of ``spans`` (certainly admitted) and ``maybe`` (possibly admitted)."""
    return OverAdmission(
        key=key,
        dimension=dimension,
        limit=limit,
        admitted_total=sum(s.amount for s in spans),
        definite=definite_peak(spans, window, limit),
        possible=possible_peak(maybe, window, limit),
    )


def _spans(
    admitted: Sequence[Observation], unknown: Sequence[Observation], dimension: str
) -> tuple[list[Span], list[Span]]:
    """The amounts of ``dimension`` certainly admitted (``admitted``), and possibly
    admitted: those, plus the requests whose outcome is unknown (only their request
    counts: their tokens are not known). Zero amounts are left out of both."""
    spans = [Span(o.start, o.end, o.amount(dimension), o.id) for o in admitted]
    spans = [s for s in spans if s.amount > 0]
    maybe = spans + [
        Span(o.start, o.end, o.amount(dimension) if dimension == "requests" else 0, o.id)
        for o in unknown
    ]
    return spans, [s for s in maybe if s.amount > 0]


def under_admission(
    key: str,
    dimension: str,
    limit: int,
    key_obs: Sequence[Observation],
    spans: Sequence[Span],
    maybe: Sequence[Span],
    window: float,
    bucket: float,
) -> UnderAdmission:
    """The refusals of ``key`` naming ``dimension`` set against what was certainly
    (``spans``) and possibly (``maybe``) admitted and held around each: the bounds of
    the package docstring's under-admission, per refusal that could ever fit."""
    admitted = [o for o in key_obs if o.admitted]
    unknown = [o for o in key_obs if o.outcome_unknown]
    refusals = [
        o
        for o in key_obs
        if o.status == 429 and o.refusal is not None and o.refusal.dimension == dimension
    ]
    fitting = [o for o in refusals if o.refusal is not None and not o.refusal.never_fits]
    # Possibly in the window ending at the refusal: meets [start_r - window, end_r].
    possible = dominance_sums(
        [(s.start, s.end, s.amount) for s in maybe],
        [(o.end, o.start - window) for o in fitting],
    )
    # Definitely in it: within [end_r - window, start_r].
    definite = dominance_sums(
        [(s.end, s.start, s.amount) for s in spans],
        [(o.start, o.end - window) for o in fitting],
    )
    # Possibly still held by the server: meets [start_r - window - bucket, end_r].
    held = dominance_sums(
        [(o.start, o.end, o.held(dimension)) for o in admitted]
        + [(o.start, o.end, 1) for o in unknown if dimension == "requests"],
        [(o.end, o.start - window - bucket) for o in fitting],
    )
    at_least, at_most, unexplained = [], [], []
    for o, most, least, kept in zip(fitting, possible, definite, held, strict=True):
        assert o.refusal is not None
        at_least.append(max(0, limit - o.refusal.requested - most))
        at_most.append(max(0, limit - o.refusal.requested - least))
        unexplained.append(max(0, limit - o.refusal.requested - kept))
    return UnderAdmission(
        key=key,
        dimension=dimension,
        limit=limit,
        bucket_share=limit * bucket / window,
        refusal_ids=tuple(o.id for o in fitting),
        unused_at_least=tuple(at_least),
        unused_at_most=tuple(at_most),
        unexplained=tuple(unexplained),
        never_fits=len(refusals) - len(fitting),
    )


def _audit_key(
    key: str, key_obs: Sequence[Observation], limits: Limits, window: float, bucket: float
) -> tuple[list[OverAdmission], list[UnderAdmission]]:
    admitted = [o for o in key_obs if o.admitted]
    unknown = [o for o in key_obs if o.outcome_unknown]
    over: list[OverAdmission] = []
    under: list[UnderAdmission] = []
    for dimension in DIMENSIONS:
        limit = limits.limit(dimension)
        if limit is None:
            continue
        spans, maybe = _spans(admitted, unknown, dimension)
        over.append(over_admission(key, dimension, limit, spans, maybe, window))
        under.append(under_admission(key, dimension, limit, key_obs, spans, maybe, window, bucket))
    return over, under


def audit(
    observations: Iterable[Observation],
    limits: Mapping[str, Limits],
    window: float,
    bucket: float,
) -> AuditReport:
    """Audit a run: over-admission, under-admission and header consistency, per key.

    ``limits`` maps key names to their configured limits; keys not in it are listed as
    unaudited. ``window`` and ``bucket`` are the server's, in seconds.
    """
    by_key: dict[str, list[Observation]] = {}
    for o in observations:
        by_key.setdefault(o.key, []).append(o)
    over: list[OverAdmission] = []
    under: list[UnderAdmission] = []
    problems: list[HeaderProblem] = []
    foreign: list[ForeignUsage] = []
    checked = 0
    unaudited = []
    for key in sorted(by_key):
        key_obs = by_key[key]
        if key not in limits:
            unaudited.append(key)
            continue
        key_over, key_under = _audit_key(key, key_obs, limits[key], window, bucket)
        over += key_over
        under += key_under
        n, key_problems = check_headers(key_obs, limits[key], window)
        checked += n
        problems += key_problems
        foreign += _foreign_usage(key, key_obs, limits[key], window, bucket)
    all_obs = [o for group in by_key.values() for o in group]
    return AuditReport(
        window=window,
        bucket=bucket,
        over=tuple(over),
        under=tuple(under),
        headers=HeaderCheck(checked=checked, problems=tuple(problems)),
        foreign=tuple(foreign),
        unknown_outcomes=sum(1 for o in all_obs if o.outcome_unknown),
        unattributed_refusals=sum(1 for o in all_obs if o.status == 429 and o.refusal is None),
        unaudited_keys=tuple(unaudited),
    )

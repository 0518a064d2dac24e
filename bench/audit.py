"""The accuracy audit of a load run: pure functions from observed requests to a verdict.

The server's guarantee (:mod:`tokenguard.store.window_store`): for each key and each limited
dimension, within ANY interval of ``window`` seconds (closed: an amount admitted at
``t`` is still counted at ``t + window``), the admitted amounts add up to at most the
limit. This module checks that guarantee from the outside, from what a client saw, and
also measures the opposite error: refusals of requests that would have fit.

**Timing.** The client cannot see when the server admitted a request, only that it
happened after the request was sent (``start``) and before its answer's headers arrived
(``end``): admission moment ``t_i`` lies in ``[start_i, end_i]``. All times are one
client clock (monotonic seconds); the store's clock (Redis ``TIME``) runs at the same
rate, which is all the audit needs, since it compares only durations.

**Amounts.** requests: 1 per admitted request (status 200). input tokens:
``usage.prompt_tokens`` of an admitted request (the server's own count, which is what
it charged). output tokens: ``usage.completion_tokens`` (what the reservation was
settled to; the settled amount stays in the bucket the reservation was charged to).
An admitted request whose usage is unknown (a broken stream) counts 0 tokens: a lower
bound, so it cannot cause a false alarm.

**Outcomes.** 200 is admitted; 429 is refused; other 4xx come before the limiter and
are not admitted. A transport error or 5xx leaves the outcome unknown: the server may
have admitted it. Unknown outcomes are left out of the *definite* checks (no false
alarm) and counted as possibly admitted (1 request, tokens unknown) in the *possible*
ones; the report says how many there were, because then "possible" is a lower bound.

**Over-admission.** A set S of admitted requests (one key, one dimension)

* is *definitely* within one window iff ``max(end_i) - min(start_i) <= window``:
  whatever the true moments, they all lie in ``[min start, max end]``;
* is *possibly* within one window iff ``max(start_i) - min(end_i) <= window``: the
  moments can then be placed, each within its interval, in one window
  ``[min end, min end + window]``.

*Definite over-admission* is a definitely-within-one-window set whose amounts exceed
the limit: proof that the server broke its guarantee, whatever other traffic the key
had (other traffic only adds to the true amounts). It must be zero.
*Possible over-admission* is a possibly-within-one-window set over the limit: not a
proof of anything, since the server keeps amounts for between ``window`` and
``window + bucket`` seconds and the client's uncertainty (latency) can exceed that
slack; it is reported so a reader sees how close the run came. Both are found by a
sweep: every maximal definite set is ``{i : start_i >= L, end_i <= L + window}`` for
``L`` the start of one of its members (likewise for possible sets with ends), so one
pass over the anchors, with one pointer adding requests in order of end and one
removing them in order of start, finds the peak in ``O(n log n)``.

**Under-admission.** For a 429 that names dimension D with its requested amount ``q``
(the 429 body says "Rate limit reached ... on requests per min ... Limit L, Used U,
Requested q"), exact accounting would have admitted it iff the amount admitted in the
window ending at the refusal, plus ``q``, fit under ``L``. The refusal moment is
uncertain too, so two bounds are given per refusal:

* *unused, at least* = ``L - q - (amounts possibly in that window)``, counting every
  admission whose interval meets ``[start_r - window, end_r]``;
* *unused, at most* = ``L - q - (amounts definitely in that window)``, counting only
  admissions that certainly fell in ``[end_r - window, start_r]``.

A positive lower bound means the server refused something that would have fit. That is
expected, by design, in two cases: the server remembers an amount for up to one bucket
longer than the window (so whatever was admitted in the bucket just before the window
still counts), and it holds output tokens at their reservation (``max_tokens``) until
the request settles. So each refusal also gets

* *unexplained* = ``L - q - (amounts possibly still held)``, counting every admission
  whose interval meets ``[start_r - window - bucket, end_r]``, output tokens at their
  reservation when the client knows it: what even the bucket slack and the reservations
  cannot explain. It should be 0; more means the store counted more than this client
  caused (other traffic on the key, or an over-counting store).

**Headers.** Every answer's ``x-ratelimit-*`` headers are cross-checked: they parse as
non-negative integers; ``limit`` equals the configured limit; on an admitted answer the
request's own amount is already counted (``remaining <= limit - amount``); on a 429 the
named dimension has ``remaining < requested`` and agrees with the body's "Used"; the
``-tokens`` triple is one of the input or output triples; and the store never counts
less than the client knows it admitted: ``limit - remaining`` (the server's used, when
``remaining > 0``) is at least the amounts of admissions definitely before this answer
and definitely still in its window (``end_j <= start_i`` and ``start_j >= end_i -
window``). A shortfall there means a lost update in the store.

**Other traffic.** Under-admission figures assume this client was the key's only user
in the window. Each answer's server-side used amount is therefore compared with all
this client possibly had held (see :class:`ForeignUsage`); a surplus is reported as a
note, since it inflates "unused" and "unexplained".

**Verdict.** :attr:`AuditReport.ok` is false on any definite over-admission or header
inconsistency; possible over-admission, under-admission and foreign usage are figures.

**Upstream billing (proxy mode).** :func:`audit_billing` checks the same guarantee
against what an upstream really billed (``bench/proxy_audit.py``): each billed request is
a :class:`Billing` whose amounts are the upstream's, and whose admission lies between
its client's send (``start``) and the upstream's receipt of it (``end``): tokenguard
forwards a request only once admitted. Definite and possible sets are as above; a
definite set billed more than a limit is spending the limiter let through.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from tokenguard.model import DIMENSIONS, Limits

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


# --- inputs -----------------------------------------------------------------------------


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


def _not_before_start(instance: Observation, attribute: attrs.Attribute, value: float) -> None:
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
    end: float = attrs.field(validator=_not_before_start)
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


# --- results ----------------------------------------------------------------------------


@attrs.frozen
class Peak:
    """The largest amount found in one window-long span, and where.

    ``anchor`` is the span's start (client clock); ``members`` the request ids in it;
    ``windows_over`` how many anchored spans exceeded the limit it was compared with.
    """

    amount: int = 0
    anchor: float | None = None
    members: tuple[int, ...] = ()
    windows_over: int = 0


@attrs.frozen
class OverAdmission:
    """Over-admission of one key in one dimension, definite and possible."""

    key: str
    dimension: str
    limit: int
    admitted_total: int
    definite: Peak
    possible: Peak

    @property
    def definite_excess(self) -> int:
        return max(0, self.definite.amount - self.limit)

    @property
    def possible_excess(self) -> int:
        return max(0, self.possible.amount - self.limit)


@attrs.frozen
class UnderAdmission:
    """Refusals on one key's dimension that exact accounting would have admitted.

    ``unused_at_least``/``unused_at_most`` are per-refusal bounds (see module docs),
    clamped at 0, in refusal order. ``never_fits`` counts refusals of requests larger
    than the limit itself, which are left out.
    """

    key: str
    dimension: str
    limit: int
    bucket_share: float
    refusal_ids: tuple[int, ...] = ()
    unused_at_least: tuple[int, ...] = ()
    unused_at_most: tuple[int, ...] = ()
    unexplained: tuple[int, ...] = ()
    never_fits: int = 0

    @property
    def refusals(self) -> int:
        return len(self.unused_at_least)

    @property
    def would_fit(self) -> int:
        """Refusals that certainly would have fit by exact accounting."""
        return sum(1 for u in self.unused_at_least if u > 0)

    @property
    def max_unused(self) -> int:
        return max(self.unused_at_least, default=0)

    @property
    def mean_unused(self) -> float:
        n = len(self.unused_at_least)
        return sum(self.unused_at_least) / n if n else 0.0

    @property
    def max_unused_upper(self) -> int:
        return max(self.unused_at_most, default=0)

    @property
    def max_unexplained(self) -> int:
        return max(self.unexplained, default=0)


@attrs.frozen
class ForeignUsage:
    """Usage the server reported beyond anything this client could have caused.

    For each answer, the server's used amount (from its headers or 429 body) is compared
    with everything this client possibly had admitted and not yet forgotten (sent before
    the answer, answered after ``start - window - bucket``). ``excess`` is the largest
    surplus, ``answers`` how many answers showed one. A surplus means other traffic on
    the key (another client, or an earlier run still in the window), or a store that
    over-counts; either way the under-admission figures overstate. Checked for requests
    and input tokens only: output tokens are held at their reservation while in flight.
    """

    key: str
    dimension: str
    limit: int
    excess: int
    answers: int


@attrs.frozen
class HeaderProblem:
    kind: str
    request_id: int
    detail: str


@attrs.frozen
class HeaderCheck:
    """The headers' cross-check: answers checked, and every problem found."""

    checked: int = 0
    problems: tuple[HeaderProblem, ...] = ()

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for p in self.problems:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        return counts


@attrs.frozen
class AuditReport:
    window: float
    bucket: float
    over: tuple[OverAdmission, ...]
    under: tuple[UnderAdmission, ...]
    headers: HeaderCheck
    foreign: tuple[ForeignUsage, ...]
    unknown_outcomes: int
    unattributed_refusals: int
    unaudited_keys: tuple[str, ...]

    @property
    def definite_over_admissions(self) -> int:
        """Total excess over the limits in the worst definite windows (must be 0)."""
        return sum(o.definite_excess for o in self.over)

    @property
    def ok(self) -> bool:
        """No definite over-admission and no header inconsistency."""
        return self.definite_over_admissions == 0 and not self.headers.problems


# --- the sweeps -------------------------------------------------------------------------


@attrs.frozen
class Span:
    """One admission for the sweeps: moment within ``[start, end]``, ``amount``, ``id``."""

    start: float
    end: float
    amount: int
    id: int


def _sweep(spans: Sequence[Span], window: float, limit: int, *, definite: bool) -> Peak:
    """The largest total of a definite (or possible) within-one-window set of spans.

    Definite sets anchored at L (a member's start) are ``{start >= L, end <= L + window}``;
    possible sets anchored at L (a member's end) are ``{end >= L, start <= L + window}``.
    Both are "``a >= L`` and ``b <= L + window``" with (a, b) = (start, end) or (end,
    start), so one sweep serves both.
    """

    def first(s: Span) -> float:
        return s.start if definite else s.end

    def second(s: Span) -> float:
        return s.end if definite else s.start

    by_first = sorted(range(len(spans)), key=lambda i: first(spans[i]))
    by_second = sorted(range(len(spans)), key=lambda i: second(spans[i]))
    inside = [False] * len(spans)
    gone = [False] * len(spans)
    total = 0
    best = Peak()
    best_anchor: float | None = None
    over = 0
    drop = add = 0
    for k in by_first:
        low = first(spans[k])
        high = low + window
        # Anchors only move forward: a span whose `first` fell below L never returns.
        while first(spans[by_first[drop]]) < low:
            i = by_first[drop]
            gone[i] = True
            if inside[i]:
                inside[i] = False
                total -= spans[i].amount
            drop += 1
        while add < len(spans) and second(spans[by_second[add]]) <= high:
            i = by_second[add]
            if not gone[i]:
                inside[i] = True
                total += spans[i].amount
            add += 1
        if total > limit:
            over += 1
        if total > best.amount:
            best = Peak(amount=total)
            best_anchor = low
    if best_anchor is None:
        return Peak(windows_over=over)
    members = tuple(
        s.id for s in spans if first(s) >= best_anchor and second(s) <= best_anchor + window
    )
    return Peak(amount=best.amount, anchor=best_anchor, members=members, windows_over=over)


def definite_peak(spans: Sequence[Span], window: float, limit: int) -> Peak:
    """Most admitted in a set of spans that certainly fell within one window."""
    return _sweep(spans, window, limit, definite=True)


def possible_peak(spans: Sequence[Span], window: float, limit: int) -> Peak:
    """Most admitted in a set of spans that could have fallen within one window."""
    return _sweep(spans, window, limit, definite=False)


def dominance_sums(
    items: Sequence[tuple[float, float, int]], queries: Sequence[tuple[float, float]]
) -> list[int]:
    """For each query ``(X, Y)``: the sum of ``a`` over items ``(x, y, a)`` with
    ``x <= X`` and ``y >= Y``.

    Offline, with a Fenwick tree over the ranks of ``y``: ``O((n + q) log n)``, because
    a run may hold a hundred thousand refusals, each asking about a window's worth of
    admissions.
    """
    ys = sorted({y for _, y, _ in items})
    tree = [0] * (len(ys) + 1)

    def add(rank: int, amount: int) -> None:
        rank += 1
        while rank <= len(ys):
            tree[rank] += amount
            rank += rank & -rank

    def prefix(count: int) -> int:  # sum over the `count` smallest ys
        total = 0
        while count > 0:
            total += tree[count]
            count -= count & -count
        return total

    order = sorted(range(len(items)), key=lambda i: items[i][0])
    answers = [0] * len(queries)
    inserted = next_item = 0
    for q in sorted(range(len(queries)), key=lambda q: queries[q][0]):
        big_x, big_y = queries[q]
        while next_item < len(order) and items[order[next_item]][0] <= big_x:
            x, y, a = items[order[next_item]]
            add(bisect.bisect_left(ys, y), a)
            inserted += a
            next_item += 1
        answers[q] = inserted - prefix(bisect.bisect_left(ys, big_y))
    return answers


# --- the audit --------------------------------------------------------------------------


def _parse_headers(
    obs: Observation, problems: list[HeaderProblem]
) -> dict[str, tuple[int | None, int | None]]:
    """``{header dimension name: (limit, remaining)}`` for every triple present."""
    found: dict[str, tuple[int | None, int | None]] = {}
    for name in (*HEADER_NAMES.values(), "tokens"):
        values: list[int | None] = []
        for part in ("limit", "remaining"):
            text = obs.headers.get(f"x-ratelimit-{part}-{name}")
            if text is None:
                values.append(None)
                continue
            try:
                value = int(text)
            except ValueError:
                problems.append(
                    HeaderProblem("unparsable", obs.id, f"x-ratelimit-{part}-{name}: {text!r}")
                )
                values.append(None)
                continue
            if value < 0:
                problems.append(
                    HeaderProblem("negative", obs.id, f"x-ratelimit-{part}-{name}: {value}")
                )
            values.append(value)
        if values != [None, None]:
            found[name] = (values[0], values[1])
    return found


def _check_headers(
    key_obs: Sequence[Observation], limits: Limits, window: float
) -> tuple[int, list[HeaderProblem]]:
    problems: list[HeaderProblem] = []
    answered = [o for o in key_obs if o.headers]
    parsed = {o.id: _parse_headers(o, problems) for o in answered}
    admitted = [o for o in key_obs if o.admitted]
    for o in answered:
        triples = parsed[o.id]
        for dimension, name in HEADER_NAMES.items():
            limit = limits.limit(dimension)
            got_limit, remaining = triples.get(name, (None, None))
            if limit is None:
                continue
            if got_limit is None and remaining is None:
                if o.admitted or o.status == 429:
                    problems.append(HeaderProblem("missing", o.id, f"no {name} headers"))
                continue
            if got_limit is not None and got_limit != limit:
                problems.append(
                    HeaderProblem(
                        "limit mismatch",
                        o.id,
                        f"x-ratelimit-limit-{name} is {got_limit}, configured {limit}",
                    )
                )
            if remaining is None:
                continue
            if remaining > limit:
                problems.append(
                    HeaderProblem("above limit", o.id, f"remaining {name} {remaining} > {limit}")
                )
            if o.admitted and remaining > limit - o.amount(dimension):
                problems.append(
                    HeaderProblem(
                        "own amount not counted",
                        o.id,
                        f"admitted {o.amount(dimension)} {name} but remaining is {remaining} "
                        f"of {limit}",
                    )
                )
            refusal = o.refusal
            if o.status == 429 and refusal is not None and refusal.dimension == dimension:
                if not refusal.never_fits and remaining >= refusal.requested:
                    problems.append(
                        HeaderProblem(
                            "refused though it fits",
                            o.id,
                            f"refused on {name} asking {refusal.requested}, remaining {remaining}",
                        )
                    )
                if refusal.used is not None and remaining != max(0, limit - refusal.used):
                    problems.append(
                        HeaderProblem(
                            "body disagrees",
                            o.id,
                            f"body says used {refusal.used} of {limit}, header remaining "
                            f"{remaining}",
                        )
                    )
        tokens = triples.get("tokens")
        if tokens is not None:
            candidates = [triples.get(n) for n in ("input-tokens", "output-tokens")]
            if tokens not in candidates:
                problems.append(
                    HeaderProblem(
                        "tokens triple", o.id, f"-tokens {tokens} is neither input nor output"
                    )
                )

    # The store never counts less than what the client knows it admitted and kept.
    for dimension, name in HEADER_NAMES.items():
        limit = limits.limit(dimension)
        if limit is None:
            continue
        items = [(a.end, a.start, a.amount(dimension)) for a in admitted]
        checked = [
            (o, parsed[o.id][name][1])
            for o in answered
            if (o.admitted or o.status == 429)
            and name in parsed[o.id]
            and parsed[o.id][name][1] is not None
            and 0 < parsed[o.id][name][1] <= limit  # remaining 0 only bounds used from below
        ]
        sums = dominance_sums(items, [(o.start, o.end - window) for o, _ in checked])
        for (o, remaining), before in zip(checked, sums, strict=True):
            known = before
            if o.admitted and o.end > o.start:  # itself, unless the sum already counted it
                known += o.amount(dimension)
            used = limit - remaining
            if used < known:
                problems.append(
                    HeaderProblem(
                        "store under-counts",
                        o.id,
                        f"server's used {name} is {used} but at least {known} were admitted "
                        f"in its window",
                    )
                )
    return len(answered), problems


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


def _over_admission(
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
        spans = [Span(o.start, o.end, o.amount(dimension), o.id) for o in admitted]
        spans = [s for s in spans if s.amount > 0]
        maybe = spans + [
            Span(o.start, o.end, o.amount(dimension) if dimension == "requests" else 0, o.id)
            for o in unknown
        ]
        maybe = [s for s in maybe if s.amount > 0]
        over.append(_over_admission(key, dimension, limit, spans, maybe, window))

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
        under.append(
            UnderAdmission(
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
        )
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
        n, key_problems = _check_headers(key_obs, limits[key], window)
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


def audit_dict(report: AuditReport) -> dict[str, Any]:
    """The report as JSON-able data, derived figures included, for ``--json``."""
    data = attrs.asdict(report)
    data["ok"] = report.ok
    data["definite_over_admissions"] = report.definite_over_admissions
    for entry, o in zip(data["over"], report.over, strict=True):
        entry["definite_excess"] = o.definite_excess
        entry["possible_excess"] = o.possible_excess
    for entry, u in zip(data["under"], report.under, strict=True):
        entry.update(
            refusals=u.refusals,
            would_fit=u.would_fit,
            max_unused=u.max_unused,
            mean_unused=u.mean_unused,
            max_unused_upper=u.max_unused_upper,
            max_unexplained=u.max_unexplained,
        )
    data["headers"]["counts"] = report.headers.counts()
    return data


# --- upstream billing (the proxy audit) -----------------------------------------------


@attrs.frozen
class Billing:
    """One request an upstream billed: for key ``key``, admitted at some moment within
    ``[start, end]`` (its client sent it; the upstream received it), billed
    ``input_tokens`` and ``output_tokens``."""

    id: int
    key: str
    start: float
    end: float = attrs.field(validator=_not_before_start)
    input_tokens: int = 0
    output_tokens: int = 0

    def amount(self, dimension: str) -> int:
        if dimension == "requests":
            return 1
        return self.input_tokens if dimension == "input_tokens" else self.output_tokens


def audit_billing(
    bills: Iterable[Billing], limits: Mapping[str, Limits], window: float
) -> tuple[OverAdmission, ...]:
    """Per key in ``limits`` and limited dimension: the most the upstream billed within
    one window, definitely and possibly (``admitted_total`` is all it billed)."""
    by_key: dict[str, list[Billing]] = {key: [] for key in limits}
    for bill in bills:
        if bill.key in by_key:
            by_key[bill.key].append(bill)
    found = []
    for key, key_bills in by_key.items():
        for dimension in DIMENSIONS:
            limit = limits[key].limit(dimension)
            if limit is None:
                continue
            spans = [Span(b.start, b.end, b.amount(dimension), b.id) for b in key_bills]
            found.append(_over_admission(key, dimension, limit, spans, spans, window))
    return tuple(found)


# --- the report -------------------------------------------------------------------------


def _pct(amount: float, limit: int) -> str:
    return f"{100 * amount / limit:.1f}%" if limit else "-"


def format_audit(report: AuditReport) -> str:
    """The audit as plain text for the load report (counts and percentages of limits)."""
    lines = [
        f"Accuracy audit (window {report.window:g} s, bucket {report.bucket:g} s; each "
        "admission lies between its send and its answer)",
        "  over-admission: most admitted within one window, definite / possible",
        f"  {'key':<16} {'dimension':<14} {'limit':>9} {'admitted':>10} "
        f"{'definite':>10} {'over':>8} {'possible':>10} {'over':>8}",
    ]
    for o in report.over:
        lines.append(
            f"  {o.key:<16} {DIMENSION_LABELS[o.dimension]:<14} {o.limit:>9} "
            f"{o.admitted_total:>10} {o.definite.amount:>10} {o.definite_excess:>8} "
            f"{o.possible.amount:>10} {o.possible_excess:>8}"
        )
    bad = [o for o in report.over if o.definite_excess]
    if bad:
        for o in bad:
            lines.append(
                f"  FAIL definite over-admission: key {o.key} {DIMENSION_LABELS[o.dimension]}: "
                f"{o.definite.amount} > limit {o.limit} (+{o.definite_excess}, "
                f"{_pct(o.definite_excess, o.limit)}) in the window from t={o.definite.anchor:.3f}"
                f"; {o.definite.windows_over} window(s) over; requests "
                f"{list(o.definite.members[:12])}{' ...' if len(o.definite.members) > 12 else ''}"
            )
    else:
        lines.append("  definite over-admission: none (ok)")
    maybe = [o for o in report.over if o.possible_excess]
    if maybe:
        worst = max(maybe, key=lambda o: o.possible_excess / o.limit)
        lines.append(
            f"  possible over-admission (not a proof; latency exceeds the server's slack): "
            f"{len(maybe)} key-dimension(s), worst +{worst.possible_excess} "
            f"({_pct(worst.possible_excess, worst.limit)}) on {worst.key} "
            f"{DIMENSION_LABELS[worst.dimension]}"
        )
    if report.unknown_outcomes:
        lines.append(
            f"  {report.unknown_outcomes} request(s) with unknown outcome (transport error or "
            "5xx): left out of definite checks; possible counts are lower bounds"
        )

    lines += [
        "  under-admission: refusals that exact accounting would have admitted;",
        "    unused = limit - requested - admitted in the window ending at the refusal;",
        "    'would fit' counts refusals with unused > 0 for certain. Expected by design:",
        "    the server holds amounts up to one bucket past the window, and output tokens",
        "    at their reservation until settled; 'unexplained' is unused beyond both (0)",
        f"  {'key':<16} {'dimension':<14} {'refusals':>9} {'would fit':>10} {'(%)':>7} "
        f"{'unused max':>11} {'(% limit)':>9} {'mean':>8} {'at most':>8} "
        f"{'unexplained':>11}",
    ]
    for u in report.under:
        if not u.refusals and not u.never_fits:
            continue
        share = f"({_pct(u.would_fit, u.refusals)})" if u.refusals else "-"
        lines.append(
            f"  {u.key:<16} {DIMENSION_LABELS[u.dimension]:<14} {u.refusals:>9} "
            f"{u.would_fit:>10} {share:>7} {u.max_unused:>11} "
            f"{'(' + _pct(u.max_unused, u.limit) + ')':>9} {u.mean_unused:>8.1f} "
            f"{u.max_unused_upper:>8} {u.max_unexplained:>11}"
            + (f"  (+{u.never_fits} never fit)" if u.never_fits else "")
        )
    if not any(u.refusals or u.never_fits for u in report.under):
        lines.append("  (no refusals)")
    for f in report.foreign:
        if f.excess:
            lines.append(
                f"  note: key {f.key}: the server counted up to {f.excess} "
                f"{DIMENSION_LABELS[f.dimension]} ({_pct(f.excess, f.limit)}) more than this "
                f"client could have caused, in {f.answers} answer(s): other traffic on the key "
                "(or an earlier run still in the window); under-admission figures overstate"
            )
    if report.unattributed_refusals:
        lines.append(f"  {report.unattributed_refusals} 429(s) naming no dimension: not audited")

    h = report.headers
    if h.problems:
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(h.counts().items()))
        lines.append(f"  FAIL header consistency: {len(h.problems)} problem(s) ({counts})")
        for p in h.problems[:MAX_PROBLEM_EXAMPLES]:
            lines.append(f"    request {p.request_id}: {p.kind}: {p.detail}")
    else:
        lines.append(f"  header consistency: {h.checked} answers checked, no problems (ok)")
    if report.unaudited_keys:
        lines.append(f"  keys with unknown limits, not audited: {', '.join(report.unaudited_keys)}")
    return "\n".join(lines)

"""What the audit finds, per key and dimension, and its verdict (:class:`AuditReport`)."""

from __future__ import annotations

import attrs


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

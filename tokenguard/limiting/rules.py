"""The rule model: which rows one request produces, and what each row means.

A request is checked against every limit that applies to it, as rows of ONE atomic
admission (:meth:`~tokenguard.store.window_store.WindowStore.admit`), whatever their number:

* its **key**'s limits (the key's own, over its tier's): one row per limit set;
* its key's **per-model rules** whose glob matches the request's model;
* its key's **team**'s limits, and the team's per-model rules that match;
* the **per-user** limits of the key and of its team (``per_user``), for the request's
  end user (see below).

A limit is a dimension (``requests``, ``input_tokens``, ``output_tokens``,
``total_tokens`` = input + output, or ``spend``: money in micro-units, see
:mod:`tokenguard.config.prices`) over a window (``spend_per_hour`` and
``spend_per_day`` slide in the hour's and the day's buckets, like ``tph`` and ``tpd``;
``spend_per_month`` is a calendar month, see :mod:`tokenguard.limiting.calendar`):

========  ==========================  =============  =====================================
window    fields                      buckets        an amount counts for
========  ==========================  =============  =====================================
minute    rpm input_tpm output_tpm    [window]       ``[window] seconds`` (60 s by default)
          tpm                         bucket_seconds to that + one bucket
hour      rph input_tph output_tph    1 minute       1 h to 1 h 1 min
          tph                         (60 buckets)
day       rpd input_tpd output_tpd    1 hour         24 h to 25 h
          tpd                         (24 buckets)
========  ==========================  =============  =====================================

The same guarantee holds for every row: never more than its limit within ANY interval
of its window's length (docs/design.md, "The sliding window, exactly"); coarser buckets
only make the under-admission (at most one bucket's worth, held back one bucket longer)
coarser. The Redis driver's cost per row does not grow with the number of buckets.

Scopes (the ``scope`` of a row; part of its counter's name):

* ``key:<key id>`` and ``key:<key id>:model:<pattern>``;
* ``team:<team name>`` and ``team:<team name>:model:<pattern>``;
* a calendar month's row (``spend_per_month``) ends with ``:month:<YYYY-MM>``: each
  month is a counter of its own (:mod:`tokenguard.limiting.calendar`).

A per-model rule's counter is shared by every model its glob matches (``gpt-4o*``
counts ``gpt-4o`` and ``gpt-4o-mini`` together); a request matching several globs is
checked against each.

**Per-end-user rows**: ``per_user`` limits (on a key, its tier or its team) become rows
whose scope names the end user by digest: ``key:<key id>:user:<digest>`` and
``team:<team name>:user:<digest>`` (:func:`~tokenguard.model.user_digest`; a request
naming no end user counts in ``...:user:-``, see :mod:`tokenguard.api.end_user`). They
are rows like any other, of the same admission, in the same partition: a bucket exists
from a user's first request until its window leaves it, so there is nothing to register
and an idle user costs nothing once their windows have passed. Their template is
cached per key and model like the others (``RowTemplate.per_user``); the user's digest
is added when the row is built.

The **partition** (the Redis hash tag) is the team's for a key in a team, otherwise the
key's: all rows of one admission, key and team alike, live in one Redis Cluster slot,
so one Lua call sees them all.

**Mode**: a row of a scope in ``shadow`` mode is built with ``enforce=False``: checked
and counted exactly as an enforced row, never refusing (see
:class:`~tokenguard.store.rows.Row`).

**Concurrency**: ``max_concurrent`` is a lease row (dimension ``concurrent``, window =
the lease time, ``[limits] lease_seconds``) of the same atomic admission: the request
takes a lease in it if every row fits, renewed while the request lives and released
when it is settled (see :mod:`tokenguard.store.leases`). Its scope's counter is
``<scope>:concurrent``.

**Near-limit**: every enforced windowed row carries ``alert_at = ceil(limit x
[limits] near_limit_ratio)``; the store reports the first admission of a window that
brings the row's usage there (:attr:`~tokenguard.store.rows.RowState.near_limit`).
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import attrs

from tokenguard.limiting.calendar import MONTH_COUNTER
from tokenguard.model import SPEND, ApiKey, Limits, ModelRule
from tokenguard.store.rows import CONCURRENT, Row

# (window_ms, bucket_ms) of the fixed windows; "minute" is the configured [window],
# "lease" the lease time of max_concurrent ([limits] lease_seconds).
HOUR = (3_600_000, 60_000)
DAY = (86_400_000, 3_600_000)
WINDOW_ORDER = ("minute", "hour", "day", "month", "lease")
# Every dimension a row may count, in the order rows are built.
ALL_DIMENSIONS = ("requests", "input_tokens", "output_tokens", "total_tokens", CONCURRENT, SPEND)


@attrs.frozen
class RowTemplate:
    """A row without its amount: what a rule contributes to every matching request."""

    scope: str
    dimension: str
    window_ms: int
    bucket_ms: int
    limit: int
    enforce: bool
    alert_at: int = 0
    per_user: bool = False  # scope is "<scope>:user": the row's is "<scope>:user:<digest>"
    calendar: bool = False  # a calendar month's row: its scope ends ":month:<label>"

    def row(self, amount: int, user: str | None = None, month: str | None = None) -> Row:
        """This row asking ``amount``; for a per-user template, of end user ``user``
        (a digest); for a calendar template, in ``month`` (its label)."""
        scope = self.scope if user is None else f"{self.scope}:{user}"
        return Row(
            scope if month is None else f"{scope}:month:{month}",
            self.dimension,
            self.window_ms,
            self.bucket_ms,
            self.limit,
            amount,
            self.enforce,
            self.alert_at,
        )


def alert_at(limit: int, ratio: float) -> int:
    """The usage at which a row of ``limit`` is near it: ``ceil(limit x ratio)``, at
    least 1 (0: no alert, for ``ratio`` 0)."""
    if ratio <= 0:
        return 0
    return max(1, math.ceil(round(limit * ratio, 9)))  # (5 x 0.8 is 4.000000000000001)


def _limit_templates(
    scope: str,
    limits: Limits,
    mode: str,
    window_ms: int,
    bucket_ms: int,
    lease_ms: int,
    near_limit_ratio: float,
) -> list[RowTemplate]:
    windows = {
        "minute": (window_ms, bucket_ms),
        "hour": HOUR,
        "day": DAY,
        "month": MONTH_COUNTER,
        "lease": (lease_ms, lease_ms),
    }
    enforce = mode != "shadow"
    ordered = sorted(
        limits.rules(),
        key=lambda r: (WINDOW_ORDER.index(r[1]), ALL_DIMENSIONS.index(r[0])),
    )
    # Two rules of one dimension whose windows are the same (a [window] of 3600 s in
    # 60 s buckets, and an hourly rule) are one counter: one row, with the smaller
    # limit. Two rows would each be checked against the count before the admission,
    # then both consumed: together they could pass the limit.
    merged: dict[tuple[str, int, int], int] = {}
    for dimension, window, limit in ordered:
        counter = (dimension, *windows[window])
        merged[counter] = min(limit, merged.get(counter, limit))
    # Near-limit signals for enforced windowed rows only: a lease row has no window,
    # and a shadow row's usage is reported by its would_reject events.
    return [
        RowTemplate(
            scope,
            dimension,
            window_ms,
            bucket_ms,
            limit,
            enforce,
            alert_at(limit, near_limit_ratio) if enforce and dimension != CONCURRENT else 0,
            calendar=(window_ms, bucket_ms) == MONTH_COUNTER,
        )
        for (dimension, window_ms, bucket_ms), limit in merged.items()
    ]


def _matching(rules: tuple[ModelRule, ...], model: str | None) -> list[ModelRule]:
    if model is None:
        return []
    return [rule for rule in rules if fnmatchcase(model, rule.pattern)]


def templates(
    key: ApiKey,
    model: str | None,
    *,
    window_ms: int,
    bucket_ms: int,
    lease_ms: int = 30_000,
    near_limit_ratio: float = 0.0,
) -> tuple[RowTemplate, ...]:
    """Every row a request of ``key`` for ``model`` is checked against, in order: the
    key's (minute, hour, day, then max_concurrent; per dimension), its matching model
    rules', then its team's and the team's matching model rules'. ``model=None``: no
    model rules; each scope's per-user templates (``per_user=True``) last. Enforced
    windowed rows alert at ``near_limit_ratio`` of their limit (see :func:`alert_at`)."""
    out: list[RowTemplate] = []
    scopes: list[tuple[str, Limits]] = [(f"key:{key.key_id}", key.limits)]
    if key.team is not None:
        scopes.append((f"team:{key.team.name}", key.team.limits))
    for scope, limits in scopes:
        out += _limit_templates(
            scope, limits, limits.mode, window_ms, bucket_ms, lease_ms, near_limit_ratio
        )
        for rule in _matching(limits.models, model):
            out += _limit_templates(
                f"{scope}:model:{rule.pattern}",
                rule.limits,
                rule.mode or limits.mode,
                window_ms,
                bucket_ms,
                lease_ms,
                near_limit_ratio,
            )
    for scope, limits in scopes:
        if limits.per_user is not None:
            out += [
                attrs.evolve(template, per_user=True)
                for template in _limit_templates(
                    f"{scope}:user",
                    limits.per_user,
                    limits.mode,
                    window_ms,
                    bucket_ms,
                    lease_ms,
                    near_limit_ratio,
                )
            ]
    return tuple(out)


# --- words for a row, in 429 messages ----------------------------------------------------

_WORDS = {
    "requests": ("requests", "R{}"),
    "input_tokens": ("input tokens", "input T{}"),
    "output_tokens": ("output tokens", "output T{}"),
    "total_tokens": ("tokens", "T{}"),
    SPEND: ("spend", ""),
}
_WINDOW_WORDS = {
    60_000: ("min", "PM"),
    3_600_000: ("hour", "PH"),
    86_400_000: ("day", "PD"),
    MONTH_COUNTER[0]: ("calendar month", "PMo"),
}


def describe_limit(row: Row) -> str:
    """``requests per day (RPD)``, ``output tokens per min (output TPM)``, ``tokens
    per hour (TPH)``; a minute window of another length: ``requests per 30s window``;
    a lease row: ``requests in flight (max_concurrent)``."""
    if row.is_lease:
        return "requests in flight (max_concurrent)"
    noun, abbreviation = _WORDS.get(row.dimension, (row.dimension, ""))
    window = _WINDOW_WORDS.get(row.window_ms)
    if row.dimension == SPEND and window is not None:
        return f"spend per {window[0]}"
    if window is None or not abbreviation:
        return f"{noun} per {row.window_ms / 1000:g}s window"
    return f"{noun} per {window[0]} ({abbreviation.format(window[1])})"


def describe_scope(row: Row, key_name: str) -> str:
    """Whose limit a row is: ``key 'k'``, ``team 'research'``, with ``, model 'gpt-4o*'``
    for a per-model rule; ``end user of key 'k'`` (``of team 'research'``) for a
    per-user row (the user's id is not known here, only its digest)."""
    scope = row.scope.partition(":month:")[0]
    scope, _, pattern = scope.partition(":model:")
    scope, per_user, _ = scope.partition(":user:")
    kind, _, name = scope.partition(":")
    who = f"team '{name}'" if kind == "team" else f"key '{key_name}'"
    if per_user:
        who = f"end user of {who}"
    return f"{who}, model '{pattern}'" if pattern else who

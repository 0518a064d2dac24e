"""The sweeps that find the most admitted within one window, definitely or possibly
(see the package docstring, "Over-admission"), and the dominance sums the
under-admission bounds are built from."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import attrs

from bench.audit.findings import Peak


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

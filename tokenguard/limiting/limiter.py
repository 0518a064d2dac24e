"""The limiter: turns a key's rules and a request's cost into store rows, and back.

Admission reserves, for one request, 1 request, its counted input tokens and its
worst-case output tokens (``max_tokens`` x ``n``) in every row that applies to it (the
key's limits over every window, its team's, the per-model rules that match: see
:mod:`tokenguard.limiting.rules`), all or nothing, in one store call. Settlement later refunds
the output tokens the reply did not use, into the very buckets that were charged, in
every output and total-tokens row. The limiter knows nothing of HTTP or of any driver:
it talks to a :class:`~tokenguard.store.window_store.WindowStore`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from zoneinfo import ZoneInfo

import attrs

from tokenguard.config.prices import Price
from tokenguard.config.settings import DEFAULT_LEASE_SECONDS
from tokenguard.limiting.calendar import MONTH_COUNTER, MonthClock
from tokenguard.limiting.rules import RowTemplate, templates
from tokenguard.model import SPEND, ApiKey, partition_of
from tokenguard.store.rows import NOT_RESERVED, Admission, Reservation, Row, RowState
from tokenguard.store.window_store import WindowStore

# (key, model) -> row templates; cleared when it grows past this (models are client input).
TEMPLATE_CACHE = 4096
CACHED_INPUT = "cached_input_tokens"
"""The tally (not a limit) of a key's prompt-cache hits: see :meth:`Limiter.cached_input_row`."""
TALLY_LIMIT = 10**15
"""A tally row's limit: never reached (below 2**53, exact in Lua's numbers)."""


@attrs.frozen
class Cost:
    """What one request asks for in each dimension. ``price``: its model's price, for
    spend rows (``None``: it costs no money, as an unpriced model under
    ``unpriced = "free"``)."""

    requests: int = 1
    input_tokens: int = 0
    output_tokens: int = 0
    price: Price | None = None

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def spend(self) -> int:
        """The money reserved, in micro-units: :meth:`Price.reservation`."""
        if self.price is None:
            return 0
        return self.price.reservation(self.input_tokens, self.output_tokens)

    def spent(
        self,
        output_tokens: int,
        input_tokens: int | None = None,
        cached_input_tokens: int = 0,
        cache_reads: int = 0,
    ) -> int:
        """What the request really cost, in micro-units (:meth:`Price.cost`), when it
        used ``output_tokens`` and ``input_tokens`` (``None``: as counted), of which
        ``cached_input_tokens`` were prompt-cache hits, plus ``cache_reads`` cache hits
        outside ``input_tokens`` (Anthropic's ``cache_read_input_tokens``, priced as
        cached input); 0 unpriced."""
        if self.price is None:
            return 0
        real_input = self.input_tokens if input_tokens is None else input_tokens
        return self.price.cost(
            real_input + cache_reads, output_tokens, cached_input_tokens + cache_reads
        )

    @property
    def concurrent(self) -> int:
        """A request takes one lease in each ``max_concurrent`` row."""
        return 1

    def amount(self, dimension: str) -> int:
        return getattr(self, dimension)


@attrs.frozen
class Decision:
    """A request's admission, by row; the refusal (if any) and how to settle it.

    In shadow mode (rows with ``enforce=False``) a request may be admitted although
    enforcing would have refused it: :attr:`would_refuse`, with the row that would have
    refused in :attr:`shadow_refusal` (for the feed's ``would_reject`` events, metrics
    and logs).
    """

    key: ApiKey
    cost: Cost
    admission: Admission
    model: str | None = None
    user: str | None = None  # the end user's digest, for per-user rows (None: none)
    # The end user's id as the request sent it, for feed events only (never stored).
    end_user: str | None = None

    @property
    def admitted(self) -> bool:
        return self.admission.admitted

    @property
    def reservation(self) -> Reservation | None:
        return self.admission.reservation

    def state(self, dimension: str) -> RowState | None:
        """The first row of ``dimension``: the key's own, per [window], when it has one."""
        for s in self.admission.states:
            if s.row.dimension == dimension:
                return s
        return None

    @property
    def refusal(self) -> RowState | None:
        """The refusing (enforced) row that waits longest (a never-fitting one first)."""
        return _longest_wait(self.admission.refusing)

    @property
    def would_refuse(self) -> bool:
        """Admitted only because the rows that refused are in shadow mode."""
        return self.admission.would_refuse

    @property
    def shadow_refusal(self) -> RowState | None:
        """The shadow row that would have refused, waiting longest; ``None`` if none."""
        return _longest_wait(self.admission.shadow_refusing)

    @property
    def near_limits(self) -> tuple[RowState, ...]:
        """The rows whose near-limit mark this admission crossed first in their window
        (cluster-wide: the store tells one admission per window and counter)."""
        return tuple(s for s in self.admission.states if s.near_limit)


def _longest_wait(refusing: tuple[RowState, ...]) -> RowState | None:
    if not refusing:
        return None
    never = [s for s in refusing if s.never_fits]
    if never:
        return never[0]
    return max(refusing, key=lambda s: s.retry_after or 0.0)


class Limiter:
    """Admission and settlement of requests against one window store.

    ``window_seconds``/``bucket_seconds`` are the per-minute ([window]) rules' window;
    hour and day rules have fixed windows (:mod:`tokenguard.limiting.rules`); ``lease_seconds``
    is the lease time of ``max_concurrent``; ``near_limit_ratio`` where enforced rows
    signal that they are nearly used up (0: never). ``shadow_refusals`` counts
    admissions that shadow mode let through; ``near_limit_crossings`` counts, per
    dimension, the near-limit marks this node's admissions crossed first. ``timezone``
    (UTC by default) is where calendar months (``spend_per_month``) begin, by the
    store's :meth:`~tokenguard.store.window_store.WindowStore.wall_time` (or
    ``wall_clock``, POSIX seconds: tests move it across a month's end).
    """

    def __init__(
        self,
        store: WindowStore,
        *,
        window_seconds: int,
        bucket_seconds: int,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        near_limit_ratio: float = 0.0,
        timezone: ZoneInfo | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.store = store
        self.months = MonthClock(timezone or ZoneInfo("UTC"), wall_clock or store.wall_time)
        self.window_seconds = window_seconds
        self.bucket_seconds = bucket_seconds
        self.lease_seconds = lease_seconds
        self.near_limit_ratio = near_limit_ratio
        self.shadow_refusals = 0
        self.near_limit_crossings: dict[str, int] = {}
        # (key, model) -> (key, its templates, whether any is a calendar month's)
        self._templates: dict[
            tuple[int, str | None], tuple[ApiKey, tuple[RowTemplate, ...], bool]
        ] = {}

    def templates(self, key: ApiKey, model: str | None = None) -> tuple[RowTemplate, ...]:
        """The rows (without amounts) a request of ``key`` for ``model`` is checked
        against; cached per key object and model."""
        return self._cached(key, model)[1]

    def _cached(
        self, key: ApiKey, model: str | None
    ) -> tuple[ApiKey, tuple[RowTemplate, ...], bool]:
        cache_key = (id(key), model)
        cached = self._templates.get(cache_key)
        if cached is not None and cached[0] is key:
            return cached
        if len(self._templates) >= TEMPLATE_CACHE:
            self._templates.clear()
        found = templates(
            key,
            model,
            window_ms=self.window_seconds * 1000,
            bucket_ms=self.bucket_seconds * 1000,
            lease_ms=max(1, round(self.lease_seconds * 1000)),
            near_limit_ratio=self.near_limit_ratio,
        )
        entry = self._templates[cache_key] = (key, found, any(t.calendar for t in found))
        return entry

    def rows(
        self,
        key: ApiKey,
        cost: Cost | None = None,
        model: str | None = None,
        user: str | None = None,
        month: str | None = None,
    ) -> list[Row]:
        """One row per limit that applies (unlimited dimensions have none); per-user
        rows for end user ``user`` (a digest, see :mod:`tokenguard.api.end_user`), none
        when ``user`` is ``None``; calendar rows in ``month`` (a label; ``None``: the
        current month)."""
        out = []
        for t in self.templates(key, model):
            amount = cost.amount(t.dimension) if cost else 0
            if t.per_user and user is None:
                continue
            if t.calendar:
                month = month or self.months.current()[0].label
                out.append(t.row(amount, user if t.per_user else None, month))
            elif t.per_user:
                out.append(t.row(amount, user))
            else:
                out.append(t.row(amount))
        return out

    def _in_month(self, key: ApiKey, model: str | None) -> tuple[str | None, float]:
        """The current month's label and the seconds left in it when ``key`` has
        calendar rows for ``model``; ``(None, 0.0)`` otherwise."""
        if not self._cached(key, model)[2]:
            return None, 0.0
        month, left = self.months.current()
        return month.label, left

    def has_spend(self, key: ApiKey, model: str | None = None) -> bool:
        """Whether a request of ``key`` for ``model`` has spend rows (its model must
        then have a price, unless ``[limits] unpriced = "free"``)."""
        return any(t.dimension == SPEND for t in self.templates(key, model))

    def has_per_user(self, key: ApiKey, model: str | None = None) -> bool:
        """Whether a request of ``key`` for ``model`` has per-user rows (it must then
        name an end user, or be counted in the shared bucket)."""
        return any(t.per_user for t in self.templates(key, model))

    def output_cap(
        self, key: ApiKey, model: str | None = None, input_tokens: int = 0
    ) -> int | None:
        """The most output tokens any request of ``key`` for ``model`` could ever be
        admitted with: the smallest enforced output limit, or total-tokens limit less
        the input. ``None``: no enforced limit on output."""
        caps = [
            t.limit if t.dimension == "output_tokens" else t.limit - input_tokens
            for t in self.templates(key, model)
            if t.enforce and t.dimension in ("output_tokens", "total_tokens")
        ]
        return min(caps, default=None)

    async def precheck(
        self,
        key: ApiKey,
        model: str | None = None,
        user: str | None = None,
        end_user: str | None = None,
    ) -> Decision | None:
        """The refusal an admission of ``key`` for ``model`` is certain to get, whatever
        its tokens, or ``None`` when it may fit; nothing is consumed. One
        :meth:`~tokenguard.store.window_store.WindowStore.usage` read of the key's rows, asking 1
        request and 1 lease (``max_concurrent``) and 0 tokens: it refuses a key with no
        room for one more request, or already above a token limit (its ``retry_after``
        is then when the key is back at the limit: the admission itself may have to
        wait longer). Worth a store call only for a request whose tokens are costly to
        count."""
        cost = Cost(requests=1)
        states, _ = await self._read(key, cost, model, user)
        admission = Admission(admitted=False, states=states)
        if not admission.refusing:
            return None
        return Decision(key, cost, admission, model, user, end_user)

    async def admit(
        self,
        key: ApiKey,
        cost: Cost,
        model: str | None = None,
        user: str | None = None,
        end_user: str | None = None,
        behind: int | None = None,
    ) -> Decision:
        """Admit ``cost`` in every row of ``key`` for ``model`` (and end user ``user``,
        a digest: its per-user rows), all or none, in ONE store call. ``end_user``, the
        id as sent, is only carried to the decision (for feed events). ``behind`` (a
        priority rank; ``None``: no queue) makes it
        :meth:`~tokenguard.store.window_store.WindowStore.admit_in_turn`: refused while
        a waiter of that priority or a higher one holds a ticket in the store line of
        one of its rows (the line of the row's counter)."""
        month, left = self._in_month(key, model)
        rows = self.rows(key, cost, model, user, month)
        if behind is None:
            admission = await self.store.admit(partition_of(key), rows)
        else:
            ahead = [(i, row.counter) for i, row in enumerate(rows)]
            admission = await self.store.admit_in_turn(partition_of(key), rows, ahead, behind)
        if month is not None:
            admission = attrs.evolve(admission, states=calendar_states(admission.states, left))
        if admission.would_refuse:
            self.shadow_refusals += 1
        if admission.admitted:
            for state in admission.states:
                if state.near_limit:
                    dimension = state.row.dimension
                    self.near_limit_crossings[dimension] = (
                        self.near_limit_crossings.get(dimension, 0) + 1
                    )
        return Decision(key, cost, admission, model, user, end_user)

    async def settle(
        self,
        decision: Decision,
        *,
        output_tokens: int,
        input_tokens: int | None = None,
        cached_input_tokens: int = 0,
        cache_reads: int = 0,
    ) -> None:
        """Correct the reservation to what the request really used, and release its
        lease (``max_concurrent``): call it once the request has ended, stream included.

        ``output_tokens`` replaces the reserved worst case (usually a refund) in every
        output and total-tokens row; ``input_tokens``, when given, replaces the counted
        prompt size in every input and total-tokens row; every spend row is set to the
        real cost (:meth:`Price.cost`, ``cached_input_tokens`` of the input at the
        cached price, and ``cache_reads`` outside the input: :meth:`Cost.spent`); both
        kinds of cache hits are added to the key's tally (:meth:`cached_input_row`, a
        second store call, made only when there are hits; best effort:
        :meth:`~tokenguard.store.window_store.WindowStore.tally`). Nothing happens for a refused
        request, nor for rows that were not consumed (shadow rows that did not fit).
        """
        reservation = decision.reservation
        if reservation is None:
            return
        cost = decision.cost
        output_delta = output_tokens - cost.output_tokens
        input_delta = 0 if input_tokens is None else input_tokens - cost.input_tokens
        by_dimension = {
            "output_tokens": output_delta,
            "input_tokens": input_delta,
            "total_tokens": output_delta + input_delta,
        }
        if cost.price is not None:
            spent = cost.spent(output_tokens, input_tokens, cached_input_tokens, cache_reads)
            by_dimension[SPEND] = spent - cost.spend
        deltas = [
            by_dimension.get(row.dimension, 0) if bucket != NOT_RESERVED else 0
            for row, bucket in zip(reservation.rows, reservation.buckets, strict=True)
        ]
        if any(deltas) or reservation.lease is not None:
            await self.store.settle(reservation, deltas)
        cached = cached_input_tokens + cache_reads
        if cached > 0:
            key = decision.key
            await self.store.tally(partition_of(key), self.cached_input_row(key, cached))

    def cached_input_row(self, key: ApiKey, amount: int = 0) -> Row:
        """``key``'s tally of prompt-cache hits (OpenAI's ``cached_tokens`` and
        Anthropic's ``cache_read_input_tokens``) over the ``[window]``: a shadow row with a
        limit never reached, so adding to it always succeeds and never refuses anything.
        It is written only by a settlement that reports cache hits (one store call more
        for those, none for any other request) and read by ``/v1/usage``."""
        return Row(
            f"key:{key.key_id}",
            CACHED_INPUT,
            self.window_seconds * 1000,
            self.bucket_seconds * 1000,
            TALLY_LIMIT,
            amount,
            enforce=False,
        )

    async def usage(
        self, key: ApiKey, model: str | None = None, user: str | None = None
    ) -> tuple[RowState, ...]:
        """The state of ``key``'s rows for ``model``, with end user ``user``'s (a
        digest) per-user rows when given; nothing consumed."""
        return (await self._read(key, None, model, user))[0]

    async def usage_and_cached_input(
        self, key: ApiKey, user: str | None = None
    ) -> tuple[tuple[RowState, ...], int]:
        """:meth:`usage` of ``key`` (and end user ``user``) and its prompt-cache hits over
        the ``[window]`` (:meth:`cached_input_row`), in one store read."""
        states, (tally,) = await self._read(key, None, None, user, (self.cached_input_row(key),))
        return states, tally.used

    async def _read(
        self,
        key: ApiKey,
        cost: Cost | None,
        model: str | None,
        user: str | None,
        extra: tuple[Row, ...] = (),
    ) -> tuple[tuple[RowState, ...], tuple[RowState, ...]]:
        """The states of ``key``'s rows for ``model`` and ``user`` asking ``cost`` (calendar
        rows' resets made the month's end), then those of ``extra`` rows, in ONE store
        read; nothing is consumed."""
        month, left = self._in_month(key, model)
        rows = self.rows(key, cost, model, user, month)
        states = await self.store.usage(partition_of(key), [*rows, *extra])
        mine, theirs = states[: len(rows)], states[len(rows) :]
        return (mine if month is None else calendar_states(mine, left)), theirs

    async def month_spend(self, key: ApiKey) -> tuple[RowState, ...]:
        """The state of ``key``'s calendar-month spend rows (its own, its tier's, its
        team's; not per-user or per-model ones) this month: what ``tokenguard keys
        list`` shows. Empty, without a store call, when no monthly budget applies."""
        if not any(t.calendar and t.dimension == SPEND for t in self.templates(key)):
            return ()
        states = await self.usage(key)
        month_rows = (SPEND, *MONTH_COUNTER)
        return tuple(
            s for s in states if (s.row.dimension, s.row.window_ms, s.row.bucket_ms) == month_rows
        )


def calendar_states(states: tuple[RowState, ...], left: float) -> tuple[RowState, ...]:
    """``states`` with every calendar month row's reset and wait made the ``left``
    seconds to the month's end, when its counter starts afresh (the store knows only
    its sliding counter, which outlives the month)."""
    out = []
    for s in states:
        row = s.row
        if (row.window_ms, row.bucket_ms) == MONTH_COUNTER:
            retry = s.retry_after if s.retry_after is None else left
            s = RowState(row, s.used, left if s.used else 0.0, s.fits, retry, s.near_limit)
        out.append(s)
    return tuple(out)


def tightest_by_dimension(states: Iterable[RowState]) -> dict[str, RowState]:
    """Per dimension, the tightest enforced row (over every scope and window): what a
    client is told about that dimension. Dimensions without a row are absent."""
    return tightest_with_shares(states)[0]


def tightest_with_shares(
    states: Iterable[RowState],
) -> tuple[dict[str, RowState], dict[str, float]]:
    # On every response: the share of its limit each row has left, computed once per
    # row without the properties (on a tie, the first row in order wins).
    out: dict[str, RowState] = {}
    shares: dict[str, float] = {}
    for s in states:
        row = s.row
        if not row.enforce:
            continue
        limit = row.limit
        left = limit - s.used
        share = left / limit if left > 0 else 0.0
        dimension = row.dimension
        best = shares.get(dimension)
        if best is None or share < best:
            out[dimension] = s
            shares[dimension] = share
    return out, shares

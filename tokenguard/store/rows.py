"""The values of one admission: the rows a store checks and consumes together, what each
looks like afterwards, and where the amounts went.

A :class:`Row` is one limit: *scope* (whose counter, e.g. one API key), *dimension*
(requests, input tokens, output tokens), a sliding window of ``window_ms`` counted in
buckets of ``bucket_ms``, a ``limit`` and the ``amount`` a request asks for.
``WindowStore`` below is :class:`tokenguard.store.window_store.WindowStore`: its
:meth:`WindowStore.admit` takes rows and answers an :class:`Admission` (one
:class:`RowState` per row, and a :class:`Reservation` when admitted), which its
:meth:`WindowStore.settle` later corrects. What those calls guarantee is the window
store's; these are plain values, built per request, that raise nothing but the
``ValueError`` of :meth:`Reservation.check_deltas`.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

NOT_RESERVED = -1
"""The bucket of a reservation's row that was not consumed (see :class:`Reservation`)."""

CONCURRENT = "concurrent"
"""The dimension of a lease row: requests in flight (see :class:`Row`)."""
LEASE_RETRY_SECONDS = 1.0
"""``retry_after`` of a lease row that is full: a slot frees when some request ends,
which nobody can foresee, so clients are told to try again soon."""


@attrs.frozen(slots=False, init=False)
class Row:
    """One limit to check and consume within an admission.

    ``limit`` is never ``None`` here: an unlimited dimension simply has no row.
    ``window_ms`` and ``bucket_ms`` are whole milliseconds (settings speak seconds; tests
    use sub-second windows against a real Redis clock); ``amount`` may be 0 (a row that
    is checked but not consumed, e.g. to read it).

    ``enforce=False`` makes a *shadow* row: checked exactly like the others, in the same
    atomic call, but its not fitting does not refuse the admission. It is consumed only
    when every row of the admission fits (as it would be if it were enforced: a request
    it would refuse counts nothing in it), so a shadow counter counts exactly what an
    enforcing one would. See :attr:`Admission.would_refuse`.

    A row of dimension :data:`CONCURRENT` is a *lease* row: ``limit`` requests in flight
    at once in its scope, counted as leases (see :class:`Lease`) that expire
    ``window_ms`` after they were taken or last renewed; ``amount`` is 1 (take a lease)
    or 0 (read); ``bucket_ms`` is not used.

    ``alert_at`` (0: never) asks the store to report, in :attr:`RowState.near_limit`,
    the first admission that brings the row's usage to ``alert_at`` or more within a
    window (the store remembers it for every node: once per window per counter).
    """

    scope: str
    dimension: str
    window_ms: int
    bucket_ms: int
    limit: int
    amount: int = 0
    enforce: bool = True
    alert_at: int = 0
    # Derived once, here: the drivers read them for every row of every call.
    counter: str = attrs.field(init=False, eq=False, repr=False)
    """A name unique to this counter: same scope, dimension and window share it (a
    lease row: same scope; its lease time may change between requests)."""
    span: int = attrs.field(init=False, eq=False, repr=False)
    """Buckets before the current one that the row sums over: see :func:`bucket_count`."""
    is_lease: bool = attrs.field(init=False, eq=False, repr=False)

    def __init__(
        self,
        scope: str,
        dimension: str,
        window_ms: int,
        bucket_ms: int,
        limit: int,
        amount: int = 0,
        enforce: bool = True,
        alert_at: int = 0,
    ) -> None:
        # Written straight into the instance dict: a Row is built per rule per request
        # (and read per row by the drivers), and attrs' frozen __init__ (one
        # object.__setattr__ per field) cost twice as much. Same fields, same checks
        # (none), same result as the generated one.
        d = self.__dict__
        d["scope"] = scope
        d["dimension"] = dimension
        d["window_ms"] = window_ms
        d["bucket_ms"] = bucket_ms
        d["limit"] = limit
        d["amount"] = amount
        d["enforce"] = enforce
        d["alert_at"] = alert_at
        if dimension == CONCURRENT:
            d["counter"] = f"{scope}:{CONCURRENT}"
            d["is_lease"] = True
        else:
            d["counter"] = f"{scope}:{dimension}:{window_ms}:{bucket_ms}"
            d["is_lease"] = False
        d["span"] = -(-window_ms // bucket_ms)  # bucket_count(), inlined


@attrs.frozen(slots=False, init=False)
class RowState:
    """What one row looks like after an admission (or in a usage snapshot).

    ``used`` counts the amount just admitted when the admission succeeded.
    ``reset_after`` is the number of seconds until ``used`` falls back to 0 if no
    other traffic comes. ``retry_after`` is set only for a row that did not fit: the
    seconds until its amount would fit if no other traffic came, or ``None`` when it can
    never fit because the amount exceeds the limit itself. (A lease row: ``used`` is
    the leases held, ``reset_after`` when the last of them expires unless renewed, and
    ``retry_after`` :data:`LEASE_RETRY_SECONDS`: nobody knows when a request ends.)
    ``near_limit``: this admission is the first to bring ``used`` to the row's
    ``alert_at`` in its window (see :class:`Row`).
    """

    row: Row
    used: int
    reset_after: float
    fits: bool = True
    retry_after: float | None = None
    near_limit: bool = False

    def __init__(
        self,
        row: Row,
        used: int,
        reset_after: float,
        fits: bool = True,
        retry_after: float | None = None,
        near_limit: bool = False,
    ) -> None:
        # One per row per admission: straight into the instance dict, as Row does.
        d = self.__dict__
        d["row"] = row
        d["used"] = used
        d["reset_after"] = reset_after
        d["fits"] = fits
        d["retry_after"] = retry_after
        d["near_limit"] = near_limit

    @property
    def limit(self) -> int:
        return self.row.limit

    @property
    def remaining(self) -> int:
        return max(0, self.row.limit - self.used)

    @property
    def never_fits(self) -> bool:
        return not self.fits and self.retry_after is None


@attrs.frozen
class Reservation:
    """Where an admission put its amounts: one absolute bucket index per row.

    Settlement adds a delta to exactly these buckets, so a refund lands in the bucket
    that was charged and leaves the window when that bucket does. A row that was not
    consumed (a shadow row that did not fit) has bucket :data:`NOT_RESERVED`: a bucket
    older than any window, so every driver's settlement leaves it alone.

    ``lease`` is the lease taken in the admission's lease rows (their bucket is 0), if
    any: settlement releases it, :meth:`WindowStore.renew` extends it.
    """

    partition: str
    rows: tuple[Row, ...]
    buckets: tuple[int, ...]
    lease: Lease | None = None

    def check_deltas(self, deltas: Sequence[int]) -> None:
        """Raise ``ValueError`` unless ``deltas`` holds one delta per row (what
        :meth:`WindowStore.settle` takes)."""
        if not len(self.rows) == len(self.buckets) == len(deltas):
            raise ValueError(f"{len(deltas)} deltas for a reservation of {len(self.rows)} rows")


@attrs.frozen(eq=False)
class Lease:
    """One admitted request's place in its lease rows (``max_concurrent``).

    It is held in every lease row of ``rows`` under ``id`` until it is released (by
    :meth:`WindowStore.settle` of its reservation) or expires: ``row.window_ms`` after
    it was taken or last renewed (:meth:`WindowStore.renew`), on the store's clock. So
    a node that dies, or a request that is never settled, holds a slot for at most one
    lease time. Compared by identity (drivers keep the leases they renew weakly, see
    :class:`tokenguard.store.leases.HeldLeases`).
    """

    partition: str
    id: str
    rows: tuple[Row, ...]


@attrs.frozen
class Admission:
    """The outcome of :meth:`WindowStore.admit`.

    ``states`` has one entry per requested row, in order. ``reservation`` is set if and
    only if ``admitted``. ``admitted`` depends on the enforcing rows only; shadow rows
    that did not fit are in :attr:`shadow_refusing`.
    """

    admitted: bool
    states: tuple[RowState, ...]
    reservation: Reservation | None = None

    @property
    def refusing(self) -> tuple[RowState, ...]:
        """The enforcing rows that did not fit (empty when admitted)."""
        return tuple(s for s in self.states if not s.fits and s.row.enforce)

    @property
    def shadow_refusing(self) -> tuple[RowState, ...]:
        """The shadow rows that did not fit: what enforcing them would have refused."""
        return tuple(s for s in self.states if not s.fits and not s.row.enforce)

    @property
    def would_refuse(self) -> bool:
        """Admitted, but enforcing every row (shadow ones too) would have refused it."""
        return self.admitted and any(not s.fits for s in self.states)

    @property
    def retry_after(self) -> float | None:
        """Seconds until every row would fit, or ``None`` if some row never can.

        Each row's own wait only shrinks as time passes, so the request fits once the
        longest of them has passed. 0.0 for an admitted request.
        """
        waits = [s.retry_after for s in self.refusing]
        if any(w is None for w in waits):
            return None
        return max(waits, default=0.0)


def bucket_count(window_ms: int, bucket_ms: int) -> int:
    """How many buckets before the current one a row sums over (``ceil(window/bucket)``).

    With the current bucket ``c`` (``now_ms // bucket_ms``), usage is the sum of buckets
    ``c-n .. c``. An amount admitted in bucket ``c-n`` at time ``s`` is forgotten only
    once the clock enters bucket ``c+1``, at least ``n * bucket_ms >= window_ms`` after
    ``s``; and at most ``window_ms + bucket_ms`` after it.
    """
    return -(-window_ms // bucket_ms)

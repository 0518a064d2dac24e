"""The window-store interface: sliding-window counters, admitted all-or-nothing.

Every limit tokenguard enforces is a :class:`Row`: *scope* (whose counter, e.g. one
API key), *dimension* (requests, input tokens, output tokens), a sliding window of
``window`` seconds counted in buckets of ``bucket`` seconds, a ``limit`` and the
``amount`` a request asks for. An admission is a list of rows that a store checks and
consumes together, atomically: either every row fits and every amount is added, or
nothing is added at all. Richer limits (daily quotas, team scopes, per-model rules)
are more rows of the same call, not a new interface.

The guarantee every driver gives, for each row: within ANY interval of ``window``
seconds, the amounts admitted never add up to more than ``limit``. An amount is
remembered from the moment it is admitted until the end of the bucket ``n`` buckets
later, where ``n = ceil(window / bucket)``; that is between ``window`` and
``window + bucket``, never less. See :func:`tokenguard.store.rows.bucket_count`.

Times are the store's own clock, in milliseconds internally (the Redis driver uses the
Redis server's ``TIME`` so that nodes with skewed clocks agree); the values returned
here are seconds as floats.

Drivers live outside the core, in the ``drivers`` package or any third-party
distribution, and are found through the ``tokenguard.drivers`` entry-point group by
the store URL's scheme (see :func:`store_from_url`). The core never imports a driver
by name.
"""

from __future__ import annotations

import abc
import enum
import math
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib.metadata import entry_points
from typing import Literal, Self
from urllib.parse import urlsplit

import attrs
import trio

from tokenguard.store.rows import Admission, Lease, Reservation, Row, RowState

ENTRY_POINT_GROUP = "tokenguard.drivers"


class StoreError(Exception):
    """The store could not answer (connection lost, timeout, server error).

    Raised by drivers instead of their client library's own exceptions, so the app can
    answer 503 rather than fail with a 500.
    """


class UnknownStoreScheme(ValueError):
    """No installed driver handles the store URL's scheme."""


Ahead = Sequence[tuple[int, str]]
"""What :meth:`WindowStore.admit_in_turn` defers to: pairs of a row's index and the
ticket line of ``partition`` (see :meth:`WindowStore.tickets`) it waits behind."""
TicketOp = Literal["take", "check", "drop", "admitted"]
"""A step of :meth:`WindowStore.tickets`."""


@attrs.frozen
class TicketHolder:
    """Whose ticket a step of :meth:`WindowStore.tickets` is about, the same at every
    step of the ticket: held ``ttl_ms`` from each take or check; ``name`` (a key id;
    ``""``: none) and, when taking, ``most`` live tickets of that name in the lines of
    the partition at the most (0: no bound); its ``rank`` (0 interactive, 1 batch) and
    its line's ``share`` (rank 0 admissions in a row after which rank 1 has the turn;
    -1: never)."""

    ttl_ms: int = 0
    name: str = ""
    most: int = 0
    rank: int = 0
    share: int = -1


NOBODY = TicketHolder()
"""A ticket of no name, rank 0, held for no time: for steps that take or hold none."""
WAITERS_RETRY_SECONDS = 1.0
"""``retry_after`` of a row that :meth:`WindowStore.admit_in_turn` found behind waiters:
room is theirs first, and nobody can foresee when they are done, so soon."""
TICKET_SEQUENCE_MS = 86_400_000
"""How long a line's ticket sequence outlives its last ticket (see ``tickets``)."""


class _Anything(enum.Enum):
    ANYTHING = "anything"


ANYTHING = _Anything.ANYTHING
"""``registry_put(..., expect=ANYTHING)``: write whatever the record is now."""
RegistryExpect = str | None | Literal[_Anything.ANYTHING]
Registry = dict[tuple[str, str], str]
"""The registry's records: ``(kind, name) -> record`` (JSON text, see tokenguard/keyring.py)."""

EVICTS_NOTHING: tuple[str, ...] = ()
EVICTABLE = {"allkeys": ("registry", "windows"), "volatile": ("windows",)}
"""What a server's memory policy (Redis's ``maxmemory-policy``, by its prefix) may evict
of what a store keeps: every driver gives each window counter and lease set a TTL (it
leaves when its newest bucket does) and the registry none, so ``volatile-*`` evicts
counters only and ``allkeys-*`` both; ``noeviction`` refuses writes instead."""


def evictable(policy: str | None) -> tuple[str, ...] | None:
    """What ``policy`` may evict: some of ``("registry", "windows")``; ``()`` for a
    policy that evicts nothing (``noeviction``, or no server at all: ``None``); ``None``
    when the policy is not known (``"unknown"``: the server refused to say)."""
    if policy is None or policy == "noeviction":
        return EVICTS_NOTHING
    return EVICTABLE.get(policy.partition("-")[0])


def behind_waiters(admission: Admission, index: int) -> Admission:
    """A refusal of :meth:`WindowStore.admit_in_turn` whose row ``index`` has waiters
    ahead: that row is reported full (retry after :data:`WAITERS_RETRY_SECONDS`) unless
    it does not fit anyway; every other state as checked. Raises ``IndexError`` for a
    row the admission does not have."""
    states = list(admission.states)
    state = states[index]
    if state.fits:
        states[index] = RowState(
            state.row, state.used, state.reset_after, False, WAITERS_RETRY_SECONDS
        )
    return Admission(admitted=False, states=tuple(states))


def redact_url(url: str) -> str:
    """The store URL with every password in it (``user:PASSWORD@``, a
    ``...password=`` query option) replaced by ``***``: what any log line, printed
    line, error message or ``store.url`` shows of a store URL. Never raises.

    Query passwords run to the next ``&``; then the user information ends at the last
    ``@``. So a password holding ``@``, ``/`` or ``?`` (which should be
    percent-encoded) is hidden whole too: at worst more is hidden, never less.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest = re.sub(r"([?&][A-Za-z_]*password=)[^&]*", r"\1***", rest)
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        rest = rest[:at].split(":", 1)[0] + ":***" + rest[at:]
    return f"{scheme}://{rest}"


class WindowStore(abc.ABC):
    """Sliding-window counters shared by every node that uses the same store.

    Every method is safe to call from many trio tasks at once. Drivers raise
    :class:`StoreError` when the backing service fails; they never consume anything
    when they raise before the admission was applied.

    Lifecycle: a store is used inside :meth:`run` (or :func:`open_store`), which sets up
    connections and background tasks and calls ``task_status.started()`` once ready.
    """

    url: str
    never_waits: bool = False
    """True for a store whose :meth:`admit` and :meth:`settle` never wait (no trio
    checkpoint: an in-process store). Such a call cannot be cancelled halfway nor slow
    a request, so callers may skip what guards against that (a shielded scope, moving
    a settlement off the request path)."""
    eviction_policy: str | None = None
    """What the store's server does when its memory is full (Redis's
    ``maxmemory-policy``), as last read: ``"unknown"`` when the server refused to say,
    ``None`` for a store with no server. See :func:`evictable`."""
    last_sent: float = -math.inf
    """When this store last finished writing calls to its server
    (``trio.current_time()``); stays ``-inf`` for a store with no server. A caller
    judging the server by how long it takes to answer counts from here too: a call that
    waited for its turn to be sent (an event loop stalled by a GC pass or a starved
    CPU) was not the server's delay."""
    last_heard: float = -math.inf
    """When this store last read anything its server answered (a reply, or part of
    one), the moment it was read, before any caller was woken with it; ``-inf`` for a
    store with no server. A caller judging the server sees from here that the server
    is answering even while the replies still wait for their callers' tasks to run."""

    def wall_time(self) -> float:
        """POSIX seconds by the clock this store's windows run on, as near as this
        process can tell: what calendar windows (months) are named by. The default,
        for a store on a server, is this machine's clock (see
        :mod:`tokenguard.limiting.calendar` for what a skew between them means)."""
        return time.time()

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str) -> Self:
        """Build a store from its URL; raise ``ValueError`` naming what is wrong."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the store until cancelled. The default needs no background work."""
        task_status.started()
        await trio.sleep_forever()

    @abc.abstractmethod
    async def admit(self, partition: str, rows: Sequence[Row]) -> Admission:
        """Check every row and, only if all fit, add every amount; atomically.

        ``partition`` groups counters that must live together (the Redis driver uses it
        as the hash tag, so one admission touches one cluster slot): all rows of an
        admission are stored under it.
        """

    @abc.abstractmethod
    async def settle(self, reservation: Reservation, deltas: Sequence[int]) -> None:
        """Add ``deltas[i]`` (possibly negative) to the bucket where row *i* was reserved,
        and release the reservation's lease (if any), in one call.

        A refund (a negative delta) to a bucket that has already left its window is a
        no-op: it would credit a window it was never in. A charge (a positive delta: an
        upstream that used more than was reserved) to such a bucket is added to the
        current bucket instead, so what was really used always counts, for a whole
        window from now; a request that outlived its window is never free. A row whose
        bucket is :data:`~tokenguard.store.rows.NOT_RESERVED` is never touched. A count
        never goes below zero. Releasing a lease that expired or was released already is a no-op.
        Raises ``ValueError`` when ``deltas`` is not one per row
        (:meth:`Reservation.check_deltas`).
        """

    async def renew(self, leases: Sequence[Lease]) -> None:
        """Extend each lease still held to its lease time from now (the store's clock).

        A lease that expired or was released stays gone (it is never taken again here).
        Drivers with leases renew the leases of their own admissions by themselves, in
        :meth:`run`, while the requests holding them are alive (see
        :class:`tokenguard.store.leases.HeldLeases`). Raises :class:`StoreError`; the default,
        for a driver without leases, always does.
        """
        raise StoreError(f"store {self.url} keeps no leases")

    @abc.abstractmethod
    async def usage(self, partition: str, rows: Sequence[Row]) -> tuple[RowState, ...]:
        """Read the rows' current state without consuming anything.

        Each row's amount is checked as :meth:`admit` checks it, never added: ``fits``
        says whether it would fit now, and ``retry_after`` (for a row that does not)
        when it would, exactly as an admission would report them. So a caller can tell
        that a request is already out before doing the work its full cost needs (a row
        of amount 0 fits unless its usage is above its limit).
        """

    async def tally(self, partition: str, row: Row) -> None:
        """Add ``row.amount`` to a counter that limits nothing: ``row`` is a shadow row
        whose limit is never reached (such as a key's prompt-cache hits). Not an
        admission, and best effort: a store that cannot take it now may drop it (the
        guarded store does while its store is down, rather than count it under its
        failure policy). By default, the :meth:`admit` of that one row.

        Raises :class:`StoreError` when the store fails (a store that drops instead
        does not)."""
        await self.admit(partition, [row])

    async def admit_in_turn(
        self, partition: str, rows: Sequence[Row], ahead: Ahead, rank: int = 0
    ) -> Admission:
        """:meth:`admit`, for a request that may wait and holds no ticket: refused,
        consuming nothing, when a ticket line of ``ahead`` (pairs of a row's index and a
        line of ``partition``, see :meth:`tickets`) holds a live ticket of ``rank`` or a
        lower one (one that goes first); checked and admitted in the same atomic step,
        so no request that holds no ticket takes room from a waiter that arrived before
        it. Such a refusal reports the row of the first line found holding one as full
        (:func:`behind_waiters`), so the request waits in that row's line like any
        other; a row that does not fit anyway keeps its own state. The default, for a
        driver that keeps no lines, is :meth:`admit` (there are no tickets to defer
        to)."""
        return await self.admit(partition, rows)

    # -- publish/subscribe: messages between the nodes that share this store

    @abc.abstractmethod
    async def publish(self, channel: str, messages: Sequence[bytes]) -> None:
        """Send ``messages``, in order, to every current subscriber of ``channel``, on
        every node that uses this store (this one included).

        Delivery is at most once: a subscriber that does not keep up, or whose
        connection is being re-established, loses messages; a publisher is never
        blocked by a subscriber. Messages of one publisher arrive in the order it
        published them. Raises :class:`StoreError` when the store cannot take them.
        """

    @abc.abstractmethod
    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """``async with store.subscribe(channel) as messages: async for m in messages``.

        Once the ``async with`` is entered, every message published to ``channel``
        afterwards is delivered (at most once, see :meth:`publish`) until it is left.
        A driver re-establishes a lost subscription by itself. Raises
        :class:`StoreError` on entering when the store cannot be reached.
        """

    # -- lines of waiting tickets: the admission queue's order across nodes

    async def tickets(
        self, partition: str, line: str, op: TicketOp, ticket: int = 0, by: TicketHolder = NOBODY
    ) -> tuple[int, int]:
        """One step on the line ``line`` of ``partition`` (stored with the partition's
        rows: one Redis Cluster slot), atomically; returns ``(ticket, first)``, where
        ``first`` is the ticket whose turn it is after the step (0: none held): the
        lowest ticket of rank 0 (interactive), unless the line holds tickets of rank 1
        (batch) and either none of rank 0 or ``by.share`` (0 or more) admissions of rank
        0 in a row since the last of rank 1: then the lowest of rank 1 (``share`` -1:
        rank 0 always first). So priorities, and batch's share of the turns, hold across nodes.

        * ``"take"``: a new ticket of ``by.rank``, one more than any the line gave
          before (the line's sequence outlives its tickets by a day), held
          ``by.ttl_ms``; none (ticket 0, nothing changed) when ``by.name`` already
          holds ``by.most`` live tickets (0: no bound) in the lines of ``partition``:
          a key's waiters, counted across every node.
        * ``"check"``: hold ``ticket`` ``by.ttl_ms`` more from now (put back under its own
          number if it had expired: a waiter keeps its place);
        * ``"drop"``: take ``ticket`` out (a no-op for one not held);
        * ``"admitted"``: drop it, as its waiter was admitted: one more admission of rank
          0 in a row, or (rank 1) none.

        ``by`` is whose ticket it is (:class:`TicketHolder`): the same at every step of
        a ticket. Tickets that were not checked within their ``ttl_ms`` are dropped
        first (a node that died with waiters holds up a line, and counts against
        ``most``, for at most that long). Times are the
        store's clock. Raises :class:`StoreError`; the default, for a driver that keeps
        no lines, always does (the queue then orders waiters per node only).
        """
        raise StoreError(f"store {self.url} keeps no ticket lines")

    # -- the registry: small versioned records (API keys, tiers) every node reads

    async def registry_version(self) -> int:
        """The registry's version: 0 while it was never written, and one more after
        every write that changed it. Cheap: nodes poll it to notice changes.

        Raises :class:`StoreError` when the store cannot answer, or keeps no registry
        (the default for a driver without one).
        """
        raise StoreError(f"store {self.url} keeps no registry")

    async def registry_load(self) -> tuple[int, Registry]:
        """Every record and the version they are at, read atomically."""
        raise StoreError(f"store {self.url} keeps no registry")

    async def registry_get(self, kind: str, name: str) -> str | None:
        """One record (``None``: there is none). Cheap in drivers that override it;
        this default reads every record."""
        _, records = await self.registry_load()
        return records.get((kind, name))

    async def registry_put(
        self, kind: str, name: str, record: str | None, *, expect: RegistryExpect = ANYTHING
    ) -> int | None:
        """Set the record ``(kind, name)`` (``None`` deletes it) and bump the version,
        atomically, if the record now is ``expect`` (``None``: absent; the default:
        anything). Returns the version after the call, or ``None`` when ``expect`` did
        not match and nothing was written.

        Idempotent: when the record already is ``record`` the call succeeds without a
        write (the version is unchanged), so a call resent after a lost reply is never
        reported as a conflict. (So two writers of the same record both succeed: a
        record is a whole state, not an increment.) ``kind`` never contains ``/``.
        """
        raise StoreError(f"store {self.url} keeps no registry")

    # -- records: small values under a name, kept for a while, that every node reads

    async def record_put(self, name: str, value: str, ttl_seconds: float) -> None:
        """Keep ``value`` under ``name`` for ``ttl_seconds`` (replacing what was there),
        for every node that uses this store. For facts about earlier answers that a later
        request refers to (a Responses API response's token totals, by its id).

        Bounded: ``name`` at most :data:`MAX_RECORD_NAME` characters, ``value`` at most
        :data:`MAX_RECORD_VALUE` (``ValueError`` otherwise, checked by
        :func:`check_record`), every record expires, and an in-process driver keeps at
        most a fixed number (the oldest go first). Raises :class:`StoreError` when the
        store cannot take it, or keeps no records (the default).
        """
        raise StoreError(f"store {self.url} keeps no records")

    async def record_get(self, name: str) -> str | None:
        """The value :meth:`record_put` kept under ``name``, ``None`` when there is none
        (never put, or expired). Raises :class:`StoreError` as :meth:`record_put`."""
        raise StoreError(f"store {self.url} keeps no records")

    # -- what an in-process store holds (the local windows of tokenguard/store/local_windows.py)

    def held_buckets(self) -> Iterator[tuple[str, Row, int, int]]:
        """``(partition, row, bucket, amount)`` for every bucket with a positive amount
        still in its window (lease rows not included), so that they can be added,
        settle-style, into another store. Only a store in this process can say; the
        default holds nothing."""
        return iter(())


MAX_RECORD_NAME = 256
MAX_RECORD_VALUE = 4096


def check_record(name: str, value: str, ttl_seconds: float) -> None:
    """What every driver's :meth:`WindowStore.record_put` checks first: a non-empty
    ``name`` of at most :data:`MAX_RECORD_NAME` characters, a ``value`` of at most
    :data:`MAX_RECORD_VALUE`, a positive finite ``ttl_seconds``; ``ValueError`` otherwise."""
    if not name or len(name) > MAX_RECORD_NAME:
        raise ValueError(f"a record name is 1..{MAX_RECORD_NAME} characters, got {len(name)}")
    if len(value) > MAX_RECORD_VALUE:
        raise ValueError(f"a record value is at most {MAX_RECORD_VALUE} characters")
    if not (0 < ttl_seconds < math.inf):
        raise ValueError(f"a record's ttl must be positive and finite, got {ttl_seconds!r}")


def store_from_url(url: str) -> WindowStore:
    """Find the driver registered for the URL's scheme and build a store from the URL.

    Raises :class:`UnknownStoreScheme` naming the installed schemes when none matches,
    and ``ValueError`` from the driver for a malformed URL.
    """
    scheme = urlsplit(url).scheme
    drivers = entry_points(group=ENTRY_POINT_GROUP)
    for ep in drivers:
        if ep.name == scheme:
            return ep.load().from_url(url)
    known = ", ".join(sorted(f"{ep.name}://" for ep in drivers)) or "none installed"
    raise UnknownStoreScheme(
        f"no window-store driver for {redact_url(url)!r}; known schemes: {known}"
    )


@asynccontextmanager
async def open_store(store: WindowStore | str) -> AsyncIterator[WindowStore]:
    """Run a store (or the store for a URL) for the duration of the ``async with``."""
    if isinstance(store, str):
        store = store_from_url(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        try:
            yield store
        finally:
            nursery.cancel_scope.cancel()

"""Prometheus metrics of a node (``GET /metrics``); the supervisor's (``--metrics-port``)
are :mod:`tokenguard.cluster.metrics_server`'s.

Every metric is documented in ``docs/metrics.md``. There are no module globals: each app
owns a :class:`Metrics` with its own ``CollectorRegistry``.

Two kinds of metrics, by cost:

* **Counted per request** (a few microseconds each, on the request path): requests by
  path, status and key name, their duration, admissions, refusals and shadow-mode
  would-refusals by dimension, tokens reserved and settled, store call latency, upstream
  latency and errors. The app calls :meth:`Metrics.admitted`, :meth:`Metrics.rejected`,
  :meth:`Metrics.settled`, :meth:`Metrics.request_finished`, ... where it already makes
  those decisions. Admissions and tokens, counted on every admitted request, are plain
  integers per key (:class:`_KeySeries`) that :class:`NodeCollector` reads.
* **Read at scrape time** (nothing on the request path): the store's breaker and
  failure counters (:class:`~tokenguard.store.guard_stats.GuardStats`, including admissions
  made under ``on_store_error = "open"``), the usage feed's subscribers and dropped
  events, the limiter's near-limit crossings. :class:`NodeCollector` reads them from
  the objects that already keep them (:mod:`tokenguard.observe.node_collector`).

Label values are bounded: key *names* from the config (never keys or digests),
dimensions, status codes, the app's own paths (any other path is ``other``) and model
names only where the set is bounded (:class:`BoundedLabel`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from tokenguard.bearer import bearer_matches
from tokenguard.observe.node_collector import NodeCollector

if TYPE_CHECKING:
    from tokenguard.limiting.limiter import Decision, Limiter
    from tokenguard.observe.feed import Feed
    from tokenguard.observe.logs import RequestRecord
    from tokenguard.store.window_store import WindowStore

# Request and upstream latencies: from a fast mock answer to a long generation.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MAX_MODEL_LABELS = 50
# Time a request waited in the admission queue: from a moment to its longest bound.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 120, 300, 600, 3600)
# Upstream outcomes that are not the upstream's failure (a key past its share of the
# pool waited for its own requests).
NOT_ERRORS = frozenset({"ok", "client_closed", "key_share"})
OTHER = "other"


class BoundedLabel:
    """Label values from client input, bounded: the first ``limit`` distinct values are
    kept as they are, any later one becomes ``other``. A series, once exported, keeps
    its name."""

    def __init__(self, limit: int = MAX_MODEL_LABELS) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(value)
        return value


class _KeySeries:
    """One key's admission and token counters: plain integers, added to on every
    admitted request and read at scrape time (:meth:`NodeCollector.collect`). A
    prometheus-client child's ``inc()`` (a lock, checks) cost several times more,
    three or four times per request."""

    __slots__ = (
        "admitted",
        "input_reserved",
        "output_reserved",
        "input_settled",
        "output_settled",
    )

    def __init__(self) -> None:
        self.admitted = 0
        self.input_reserved = 0
        self.output_reserved = 0
        self.input_settled = 0
        self.output_settled = 0


class _InputCount:
    """One model's prompt counts against its upstream's: answers that reported a
    ``prompt_tokens``, how many of them differed from tokenguard's count, and both
    sums (read at scrape time, like :class:`_KeySeries`)."""

    __slots__ = ("answers", "differed", "counted", "reported")

    def __init__(self) -> None:
        self.answers = 0
        self.differed = 0
        self.counted = 0
        self.reported = 0


class Metrics:
    """One node's metrics, in their own :attr:`registry`; :meth:`exposition` is what
    ``GET /metrics`` answers.

    ``store``, ``feed`` and ``limiter`` are read at scrape time (see
    :class:`NodeCollector`). ``paths`` are the app's routes: those without a variable
    part are the ``path`` label's values, and any other path is ``other``.
    """

    def __init__(
        self,
        *,
        node_id: int,
        store: WindowStore,
        feed: Feed | None = None,
        limiter: Limiter | None = None,
        paths: Iterable[str] = (),
    ) -> None:
        """Declare the metrics the request path updates, one statement each: over 60
        lines because the list reads best whole. The rest are read at scrape time."""
        self.node_id = node_id
        self._paths = frozenset(p for p in paths if "<" not in p)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tokenguard_requests",
            "HTTP requests answered, by path, status code and key name ('' before a key "
            "was recognised).",
            ["path", "status", "key"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "tokenguard_request_duration_seconds",
            "Time from a request's arrival to the end of its response (a stream's last chunk).",
            ["path"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.surface_requests = Counter(
            "tokenguard_surface_requests",
            "Requests to an API surface's route (chat, completions, embeddings, responses), "
            "by surface and status code.",
            ["surface", "status"],
            registry=r,
        )
        self.rejected_total = Counter(
            "tokenguard_rejected",
            "Completions refused with 429, by key name and the refusing dimension.",
            ["key", "dimension"],
            registry=r,
        )
        self.shadow_refusals = Counter(
            "tokenguard_shadow_refusals",
            "Completions admitted only because the refusing limits are in shadow mode, by "
            "key name and the dimension that would have refused.",
            ["key", "dimension"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "tokenguard_upstream_request_seconds",
            "Duration of requests to the upstream API, by model (bounded) and outcome.",
            ["model", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "tokenguard_upstream_errors",
            "Upstream requests that did not succeed, by model (bounded) and outcome.",
            ["model", "outcome"],
            registry=r,
        )
        self.client_stalls = Counter(
            "tokenguard_client_stalls",
            "Streamed answers cut because their client took no bytes for the route's "
            "client_idle_timeout.",
            registry=r,
        )
        self.queue_waiting = Gauge(
            "tokenguard_queue_waiting",
            "Requests waiting in this node's admission queue now, by key name.",
            ["key"],
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "tokenguard_queue_wait_seconds",
            "Time requests waited in the admission queue, by key name and outcome "
            "(admitted, rejected, gone, closed).",
            ["key", "outcome"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self._keys: dict[str, _KeySeries] = {}
        self._models = BoundedLabel()
        self._input_counts: dict[str, _InputCount] = {}
        self._spend: dict[tuple[str, str], int] = {}  # (key name, model) -> micro-units
        self.registry.register(NodeCollector(self, store=store, feed=feed, limiter=limiter))

    @property
    def keys_seen(self) -> Mapping[str, _KeySeries]:
        """The counters of every key name admitted so far (read at scrape time)."""
        return self._keys

    @property
    def spend(self) -> Mapping[tuple[str, str], int]:
        """Money spent, micro-units, by (key name, model) (read at scrape time)."""
        return self._spend

    @property
    def input_counts(self) -> Mapping[str, _InputCount]:
        """Per model (bounded), prompt counts against the upstream's (scrape time)."""
        return self._input_counts

    def _key(self, name: str) -> _KeySeries:
        series = self._keys.get(name)
        if series is None:
            series = self._keys[name] = _KeySeries()
        return series

    # -- on the request path

    def request_finished(self, record: RequestRecord) -> None:
        """One HTTP request ended (``RequestLog``'s ``on_finish``)."""
        path = record.path if record.path in self._paths else OTHER
        status = "none" if record.status is None else str(record.status)
        self.requests.labels(path, status, record.key or "").inc()
        if record.surface is not None:  # (a dialect's name: bounded)
            self.surface_requests.labels(record.surface, status).inc()
        if record.latency_ms is not None:
            self.request_seconds.labels(path).observe(record.latency_ms / 1000)

    def admitted(self, decision: Decision) -> None:
        """An admission: its reservation, and a shadow-mode would-refusal if any."""
        series = self._key(decision.key.name)
        series.admitted += 1
        cost = decision.cost
        series.input_reserved += cost.input_tokens
        series.output_reserved += cost.output_tokens
        if decision.would_refuse:
            state = decision.shadow_refusal
            dimension = state.row.dimension if state is not None else "unknown"
            self.shadow_refusals.labels(decision.key.name, dimension).inc()

    def queued(self, key_name: str) -> None:
        """A request of ``key_name`` started to wait in the admission queue."""
        self.queue_waiting.labels(key_name).inc()

    def dequeued(self, key_name: str, outcome: str, seconds: float) -> None:
        """A request of ``key_name`` left the queue after ``seconds``, with ``outcome``."""
        self.queue_waiting.labels(key_name).dec()
        self.queue_wait_seconds.labels(key_name, outcome).observe(seconds)

    def rejected(self, decision: Decision) -> None:
        """A 429, by the refusing row's dimension."""
        state = decision.refusal
        dimension = state.row.dimension if state is not None else "unknown"
        self.rejected_total.labels(decision.key.name, dimension).inc()

    def settled(
        self,
        decision: Decision,
        output_tokens: int,
        input_tokens: int | None = None,
        spent: int = 0,
    ) -> None:
        """A settlement the store took: the tokens really used, and the money spent
        (micro-units) by key name and model (bounded; never by end user)."""
        series = self._key(decision.key.name)
        series.output_settled += output_tokens
        if input_tokens is not None:
            series.input_settled += input_tokens
        if spent:
            label = (decision.key.name, self._models(decision.model or ""))
            self._spend[label] = self._spend.get(label, 0) + spent

    def input_counted(self, model: str, counted: int, reported: int) -> None:
        """An upstream reported ``reported`` prompt tokens for a prompt tokenguard
        counted as ``counted`` (proxy mode): the counting error, per model (bounded)."""
        label = self._models(model)
        series = self._input_counts.get(label)
        if series is None:
            series = self._input_counts[label] = _InputCount()
        series.answers += 1
        series.differed += counted != reported
        series.counted += counted
        series.reported += reported

    def client_stalled(self, scope: object) -> None:
        """A stream's client took no bytes for its deadline: the node cut it."""
        self.client_stalls.inc()

    def upstream_result(self, model: str, seconds: float, outcome: str) -> None:
        """One upstream request ended (``Upstream.on_result``): ``outcome`` is ``ok``,
        ``client_closed`` (the client left mid-stream, or was cut for stalling) or what
        went wrong (``http_<status>``, ``timeout``, ``connect_error``, ``pool_timeout``,
        ``key_share``, ``dropped``); model names are bounded."""
        model = self._models(model)
        self.upstream_seconds.labels(model, outcome).observe(seconds)
        if outcome not in NOT_ERRORS:
            self.upstream_errors.labels(model, outcome).inc()

    # -- scraping

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


CONTENT_TYPE = CONTENT_TYPE_LATEST


__all__ = [
    "CONTENT_TYPE",
    "BoundedLabel",
    "Metrics",
    # Re-exported for tokenguard/api/app.py, which still imports it from here; its home
    # is tokenguard.bearer.
    "bearer_matches",
]

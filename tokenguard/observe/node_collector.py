"""What a node's ``GET /metrics`` reads at scrape time: nothing on the request path.

:class:`NodeCollector` reads the per-key admission and token counters that
:class:`~tokenguard.observe.metrics.Metrics` keeps as plain integers, the process's
token-count cache, and what the store (:class:`~tokenguard.store.guard_stats.GuardStats`,
the breaker, the eviction policy), the usage feed (subscribers, dropped events) and
the limiter (near-limit crossings) already keep. Every metric is documented in
``docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tokenguard.counting import COUNT_CACHE
from tokenguard.store.guarded import GuardedStore
from tokenguard.store.window_store import evictable

if TYPE_CHECKING:
    from tokenguard.limiting.limiter import Limiter
    from tokenguard.observe.feed import Feed
    from tokenguard.observe.metrics import Metrics
    from tokenguard.store.window_store import WindowStore

NAMESPACE = "tokenguard"


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class NodeCollector(Collector):
    """The node's state, read when scraped: the per-key admission and token counters
    (plain integers), and what the store, feed and limiter already keep."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        store: WindowStore,
        feed: Feed | None,
        limiter: Limiter | None,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.feed = feed
        self.limiter = limiter

    def describe(self) -> Iterable[Metric]:
        return ()  # (names are not registered ahead: collect() reads live objects)

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "tokenguard_node_info", "This node's id (always 1).", labels=["node"]
        )
        info.add_metric([str(self.metrics.node_id)], 1)
        yield info
        yield from self._per_key()
        yield from self._input_counts()
        yield from self._count_cache()
        if isinstance(self.store, GuardedStore):
            yield from self._store(self.store)
        if self.feed is not None:
            yield from self._feed(self.feed)
        if self.limiter is not None:
            yield from self._limiter(self.limiter)

    def _input_counts(self) -> Iterator[Metric]:
        """Proxy mode: per model, the prompt tokens tokenguard counted against what the
        upstream reported for the same prompts (their ratio is the counting error)."""
        families = (
            CounterMetricFamily(
                "tokenguard_upstream_prompt_reports",
                "Upstream answers that reported prompt_tokens, by model (bounded).",
                labels=["model"],
            ),
            CounterMetricFamily(
                "tokenguard_upstream_prompt_miscounts",
                "Upstream answers whose prompt_tokens differed from tokenguard's count (the "
                "request was settled to the upstream's), by model (bounded).",
                labels=["model"],
            ),
            CounterMetricFamily(
                "tokenguard_upstream_prompt_tokens",
                "Prompt tokens of the answers that reported them: as tokenguard counted them "
                "(source counted) and as the upstream reported them (source upstream), by "
                "model (bounded).",
                labels=["model", "source"],
            ),
        )
        reports, miscounts, tokens = families
        for model, series in list(self.metrics.input_counts.items()):
            reports.add_metric([model], series.answers)
            miscounts.add_metric([model], series.differed)
            tokens.add_metric([model, "counted"], series.counted)
            tokens.add_metric([model, "upstream"], series.reported)
        yield from families

    def _count_cache(self) -> Iterator[Metric]:
        """The process's remembered prompt counts (tokenguard.counting.COUNT_CACHE)."""
        yield _counter(
            "tokenguard_token_count_cache_hits",
            "Texts whose token count was remembered (not counted again).",
            COUNT_CACHE.hits,
        )
        yield _counter(
            "tokenguard_token_count_cache_misses",
            "Texts long enough to remember whose count was not known: counted, then kept.",
            COUNT_CACHE.misses,
        )
        yield _gauge(
            "tokenguard_token_count_cache_entries",
            "Token counts remembered now.",
            len(COUNT_CACHE),
        )

    def _store(self, store: GuardedStore) -> Iterator[Metric]:
        yield from self._store_state(store)
        yield from self._store_counters(store)

    def _store_state(self, store: GuardedStore) -> Iterator[Metric]:
        """How long the store's calls take, the breaker, the policy, the eviction policy."""
        stats = store.stats
        durations = HistogramMetricFamily(
            "tokenguard_store_call_seconds",
            "Duration of the calls to the shared window store that it answered, by "
            "operation (admit, settle, usage).",
            labels=["operation"],
        )
        for operation, seconds in stats.call_seconds.sums.items():
            buckets = stats.call_seconds.cumulative(operation)
            durations.add_metric([operation], buckets, sum_value=seconds)
        yield durations
        yield _gauge(
            "tokenguard_store_breaker_open",
            "1 while the circuit breaker in front of the shared store is open (requests "
            "then follow on_store_error), else 0.",
            1 if store.breaker.is_open else 0,
        )
        policy = GaugeMetricFamily(
            "tokenguard_store_policy_info",
            "The on_store_error policy (always 1).",
            labels=["policy"],
        )
        policy.add_metric([store.policy], 1)
        yield policy
        if store.eviction_policy is not None:
            evicts = evictable(store.eviction_policy)
            eviction = GaugeMetricFamily(
                "tokenguard_store_eviction_policy_info",
                "The store server's maxmemory-policy, and what of the store's data it may "
                "evict: none, windows, registry,windows or unknown (always 1).",
                labels=["policy", "evicts"],
            )
            what = "unknown" if evicts is None else ",".join(evicts) or "none"
            eviction.add_metric([store.eviction_policy, what], 1)
            yield eviction

    def _store_counters(self, store: GuardedStore) -> Iterator[Metric]:
        """The guarded store's failure counters
        (:class:`~tokenguard.store.guard_stats.GuardStats`) and its node's stall time."""
        stats = store.stats
        for name, doc, value in (
            ("store_failures", "Store calls that failed or missed their deadline.", stats.failures),
            ("store_timeouts", "Store calls that missed their deadline.", stats.timeouts),
            (
                "store_stalled_out",
                "Store calls cut at the hard cap while this node itself was stalled "
                "(answered by on_store_error, not counted as failures).",
                stats.stalled_out,
            ),
            (
                "store_node_stalled_seconds",
                "Seconds this node's event loop was stalled (GC passes, a starved CPU, "
                "its own busy tasks): left out of every store deadline.",
                store.stalls.total,
            ),
            ("store_breaker_openings", "Times the breaker opened.", stats.breaker_opened),
            (
                "store_fail_open_admissions",
                'Admissions granted unchecked while the store was down (on_store_error = "open").',
                stats.fail_open_admissions,
            ),
            (
                "store_local_admissions",
                'Admissions by this node\'s local windows (on_store_error = "local").',
                stats.local_admissions,
            ),
            (
                "store_local_refusals",
                'Refusals by this node\'s local windows (on_store_error = "local").',
                stats.local_refusals,
            ),
            (
                "store_unavailable_refusals",
                'Calls answered 503 while the store was down (on_store_error = "closed").',
                stats.refused_unavailable,
            ),
            (
                "store_settlements_dropped",
                "Settlements not sent while the breaker was open (reservations kept whole).",
                stats.settlements_dropped,
            ),
            (
                "store_written_back",
                "Counter buckets written back to the store after an outage.",
                stats.written_back,
            ),
        ):
            yield _counter(f"{NAMESPACE}_{name}", doc, value)

    def _per_key(self) -> Iterator[Metric]:
        admitted = CounterMetricFamily(
            "tokenguard_admitted",
            "Completions admitted by the limiter (shadow-mode and store-outage admissions "
            "included), by key name.",
            labels=["key"],
        )
        reserved = CounterMetricFamily(
            "tokenguard_tokens_reserved",
            "Tokens reserved at admission: input (counted prompt) and output (max_tokens "
            "x n, or the default), by key name.",
            labels=["key", "direction"],
        )
        settled = CounterMetricFamily(
            "tokenguard_tokens_settled",
            "Tokens settled after the reply: what was really used (output; input when an "
            "upstream reports another prompt size), by key name.",
            labels=["key", "direction"],
        )
        for name, series in list(self.metrics.keys_seen.items()):
            admitted.add_metric([name], series.admitted)
            reserved.add_metric([name, "input"], series.input_reserved)
            reserved.add_metric([name, "output"], series.output_reserved)
            if series.input_settled:  # (only an upstream's other prompt size)
                settled.add_metric([name, "input"], series.input_settled)
            settled.add_metric([name, "output"], series.output_settled)
        spend = CounterMetricFamily(
            "tokenguard_spend_micro",
            "Money spent by settled requests under a spend limit, in micro-units of the "
            "operator's currency, by key name and model (bounded). Never by end user.",
            labels=["key", "model"],
        )
        for (name, model), micro in list(self.metrics.spend.items()):
            spend.add_metric([name, model], micro)
        yield from (admitted, reserved, settled, spend)

    def _feed(self, feed: Feed) -> Iterator[Metric]:
        yield _gauge(
            "tokenguard_feed_subscribers",
            "Websocket subscribers of the usage feed on this node.",
            len(feed.subscribers),
        )
        yield _gauge(
            "tokenguard_feed_queued_events", "Events waiting to be published.", feed.queued
        )
        dropped = CounterMetricFamily(
            "tokenguard_feed_dropped_events",
            "Usage-feed events dropped: before publishing (store down: queue full), or "
            "for a subscriber that fell behind its backlog.",
            labels=["stage"],
        )
        dropped.add_metric(["publish"], feed.dropped_outgoing)
        live = sum(s.dropped_total for s in feed.subscribers)
        dropped.add_metric(["subscriber"], feed.dropped_by_departed + live)
        yield dropped
        yield _counter(
            "tokenguard_feed_publish_failures",
            "Batches of usage-feed events the store did not take.",
            feed.publish_failures,
        )

    def _limiter(self, limiter: Limiter) -> Iterator[Metric]:
        # Near-limit crossings (the limiter counts them, by dimension, once a key's use
        # crosses the near-limit ratio of a limit; see docs/metrics.md). Read only if
        # this limiter keeps them.
        crossings: Mapping[Any, int] | None = getattr(limiter, "near_limit_crossings", None)
        if isinstance(crossings, Mapping):
            family = CounterMetricFamily(
                "tokenguard_near_limit_crossings",
                "Times a key's use crossed the near-limit ratio of a limit, by dimension.",
                labels=["dimension"],
            )
            by_dimension: dict[str, int] = {}
            for label, count in crossings.items():
                dimension = label[-1] if isinstance(label, tuple) else str(label)
                by_dimension[dimension] = by_dimension.get(dimension, 0) + count
            for dimension, count in sorted(by_dimension.items()):
                family.add_metric([dimension], count)
            yield family

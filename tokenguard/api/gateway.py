"""The objects one node serves requests with, built once, each given its collaborators.

:meth:`Gateway.build` is the one place they are wired: the live keys (the store's
registry), the limiter, the usage feed, the metrics and the request log, admission and
settlement, the mock and the upstream servers (proxy mode), the request pipeline and its
dialects. Nothing is attached to an object after it is built. The app factory
(:func:`tokenguard.api.app.create_app`) serves a :class:`Gateway` over HTTP; the
simulation (bench/simulate) drives one without HTTP.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

import attrs
import trio

from tokenguard.api.admission import Admissions
from tokenguard.api.dialect import Dialect
from tokenguard.api.dialects.anthropic import MessagesDialect
from tokenguard.api.dialects.chat import ChatDialect
from tokenguard.api.dialects.completions import CompletionsDialect
from tokenguard.api.dialects.embeddings import EmbeddingsDialect
from tokenguard.api.dialects.responses import ResponsesDialect
from tokenguard.api.info import Info
from tokenguard.api.mock_answers import MockAnswers
from tokenguard.api.pipeline import Pipeline
from tokenguard.api.proxy_answers import ProxyAnswers
from tokenguard.api.response_routes import ResponseRoutes
from tokenguard.api.send_deadline import SendDeadlines
from tokenguard.config.settings import Settings
from tokenguard.limiting.admission_queue import AdmissionQueue
from tokenguard.limiting.keyring import Keyring
from tokenguard.limiting.limiter import Limiter
from tokenguard.limiting.settler import Settler
from tokenguard.observe.feed import Feed
from tokenguard.observe.logs import RequestLog
from tokenguard.observe.metrics import Metrics
from tokenguard.store.window_store import WindowStore
from tokenguard.upstreams.proxy import Upstream

DIALECTS: tuple[type[Dialect], ...] = (
    ChatDialect,
    CompletionsDialect,
    EmbeddingsDialect,
    MessagesDialect,
    ResponsesDialect,
)
"""Every API surface a node serves, one dialect each."""

FIXED_PATHS = (
    "/v1/usage",
    "/v1/models",
    "/v1/models/<model_id>",
    "/v1/responses/<response_id>",
    "/v1/responses/<response_id>/input_items",
    "/v1/usage/stream",
    "/dashboard",
    "/dashboard/<name>",
    "/healthz",
    "/readyz",
    "/metrics",
)
"""The node's other routes (the metrics' ``path`` label knows these and the dialects')."""


@attrs.frozen
class Gateway:
    """One node's request-serving objects (see the module docstring)."""

    settings: Settings
    store: WindowStore
    keyring: Keyring
    limiter: Limiter
    feed: Feed
    metrics: Metrics
    request_log: RequestLog
    send_deadlines: SendDeadlines
    admissions: Admissions
    upstream: Upstream | None
    pipeline: Pipeline
    info: Info
    dialects: tuple[Dialect, ...]
    response_routes: ResponseRoutes

    @property
    def settler(self) -> Settler:
        return self.admissions.settler

    @classmethod
    def build(
        cls,
        settings: Settings,
        store: WindowStore,
        *,
        closing: trio.Event | None = None,
        keyring: Keyring | None = None,
    ) -> Gateway:
        """Wire a node's objects over ``store``. ``closing`` (the node's shutdown) ends
        the usage feed's websockets; ``keyring``, when given, is the caller's (a node
        shares it with its admin API), else one is made here.

        One function on purpose, however long: every object of a node is built here,
        in the order of its collaborators, and nowhere else (nothing is patched on
        afterwards)."""
        keyring = keyring if keyring is not None else Keyring(settings, store)
        limiter = Limiter(
            store,
            window_seconds=settings.window_seconds,
            bucket_seconds=settings.bucket_seconds,
            lease_seconds=settings.lease_seconds,
            near_limit_ratio=settings.near_limit_ratio,
            timezone=ZoneInfo(settings.timezone),
        )
        dialects = tuple(dialect.build(store, settings) for dialect in DIALECTS)
        feed = Feed(settings, store, limiter, closing=closing, keyring=keyring)
        metrics = Metrics(
            node_id=settings.node_id,
            store=store,
            feed=feed,
            limiter=limiter,
            paths=(
                *(d.path for d in dialects),
                *(d.count_path for d in dialects if d.count_path),
                *FIXED_PATHS,
            ),
        )
        request_log = RequestLog(on_finish=metrics.request_finished)
        admissions = Admissions(
            store,
            limiter,
            feed=feed,
            metrics=metrics,
            request_log=request_log,
            queue=AdmissionQueue(batch_share=settings.batch_share, closing=closing, store=store),
        )
        upstream = None
        proxy = None
        if settings.upstream.enabled:
            upstream = Upstream(settings.upstream, on_result=metrics.upstream_result)
            proxy = ProxyAnswers(admissions, upstream, metrics)
        mock = MockAnswers(admissions, settings.mock.token_delay_ms / 1000)
        pipeline = Pipeline(
            settings,
            keyring=keyring,
            limiter=limiter,
            admissions=admissions,
            request_log=request_log,
            mock=mock,
            proxy=proxy,
        )
        return cls(
            settings=settings,
            store=store,
            keyring=keyring,
            limiter=limiter,
            feed=feed,
            metrics=metrics,
            request_log=request_log,
            send_deadlines=SendDeadlines(on_stall=metrics.client_stalled),
            admissions=admissions,
            upstream=upstream,
            pipeline=pipeline,
            info=Info(settings, pipeline),
            dialects=dialects,
            response_routes=ResponseRoutes(
                pipeline,
                next(d for d in dialects if isinstance(d, ResponsesDialect)),
                upstream,
            ),
        )

"""Settings: one immutable object, read from ``tokenguard.toml`` and passed down.

This module holds the objects (:class:`Settings` and its sections) and their defaults;
:mod:`tokenguard.config.loading` reads a file into them. Every problem in a config file
is a :class:`ConfigError` whose message names the file, the key (as a dotted TOML path)
and what is wrong; unknown keys are errors too, so a typo never silently leaves a limit
off. API keys are hashed on load: only their SHA-256 digests are kept in memory. The
keys, limits and teams themselves are the domain model's (:mod:`tokenguard.model`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from typing import Any

import attrs

from tokenguard.config.prices import PriceTable, default_prices
from tokenguard.model import ApiKey, Limits, Team

# Re-exported for tokenguard/api/, which still imports them from here; their home is
# tokenguard.model.
from tokenguard.model import KEY_IDENTITY_FIELDS, digest_of  # noqa: F401  isort: skip

DEFAULT_LEASE_SECONDS = 30.0
MIN_LEASE_SECONDS = 0.1
DEFAULT_NEAR_LIMIT_RATIO = 0.8
STORE_ERROR_POLICIES = ("local", "closed", "open")
# [limits] missing_user: a request naming no end user, under a per-user limit, counts in
# one bucket shared by all such requests ("shared") or is a 400 ("reject").
MISSING_USER_POLICIES = ("shared", "reject")
# [limits] unpriced: a request for a model without a price, under a spend limit, is a 400
# naming the model ("reject") or costs nothing ("free").
UNPRICED_POLICIES = ("reject", "free")


# [limits] batch_share's default: one turn in ten for batch on a shared line.
DEFAULT_BATCH_SHARE = 0.1


class ConfigError(ValueError):
    """A config file (or an override) is invalid; the message says where and why."""


@attrs.frozen
class MockSettings:
    """The built-in mock upstream. ``token_delay_ms`` paces streamed tokens. ``models``:
    the models it serves (``GET /v1/models`` lists them, any other is a 404
    ``model_not_found``); ``None``, the default, answers every model."""

    token_delay_ms: float = 0.0
    models: tuple[str, ...] | None = None


DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 600.0
DEFAULT_CLIENT_IDLE_TIMEOUT = 30.0
DEFAULT_UPSTREAM_CONNECTIONS = 100
# No key holds more than this share of a node's upstream connections at once.
DEFAULT_KEY_SHARE = 0.25
OUTPUT_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")
# What a stream whose client left (or stalled past client_idle_timeout) costs its key:
# "cancel": the upstream request is closed at once and the whole output reservation is
# kept; "drain": the upstream is read on (nothing relayed) to its usage, at most
# read_timeout, and the key pays what the upstream reports.
CLIENT_GONE_POLICIES = ("cancel", "drain")
# What a 502/504 costs once the request reached the upstream (a timeout or a broken
# connection after it was sent; the upstream may bill it): "keep" the whole output
# reservation, or "refund" it (to what was relayed, for a stream).
UPSTREAM_ERROR_POLICIES = ("keep", "refund")
# The API an upstream route speaks: a request reaches it only through a surface of that
# family (OpenAI's chat, completions and embeddings; Anthropic's messages).
ROUTE_DIALECTS = ("openai", "anthropic")
# Where POST /v1/messages/count_tokens gets its figure on an Anthropic route: tokenguard's
# own estimate (what admission uses), or the upstream's count_tokens (exact).
COUNT_TOKENS_SOURCES = ("estimate", "upstream")


@attrs.frozen
class UpstreamRoute:
    """Where requests for the models matching ``pattern`` are forwarded (proxy mode).

    ``pattern`` is an fnmatch glob on the request's model (``None``: the default route,
    ``[upstream]`` itself). ``api_key`` is read from the environment variable
    ``api_key_env`` when the config is loaded; it is never in a repr, a log or a file.
    ``client_idle_timeout``: a relayed stream whose client takes no bytes for that long
    is cut; ``on_client_gone`` and ``on_upstream_error`` (see
    :data:`CLIENT_GONE_POLICIES`, :data:`UPSTREAM_ERROR_POLICIES`) say what such ends
    cost the key.
    """

    pattern: str | None
    base_url: str  # e.g. https://api.openai.com/v1, without a trailing slash
    api_key_env: str | None = None
    api_key: str | None = attrs.field(default=None, repr=False)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    # The chat field through which tokenguard caps the reply at the reservation when the
    # client named none: OpenAI's reasoning models (o1, o3...) refuse ``max_tokens``.
    output_limit_field: str = "max_tokens"
    # The only body fields forwarded (besides those tokenguard needs and sets: see
    # tokenguard/upstreams/forwarding.py); ``None``: every field.
    forward_fields: frozenset[str] | None = None
    client_idle_timeout: float = DEFAULT_CLIENT_IDLE_TIMEOUT
    on_client_gone: str = "cancel"
    on_upstream_error: str = "keep"
    # ROUTE_DIALECTS; the credential is sent as the family sends it (Dialect.upstream_headers).
    dialect: str = "openai"
    # Whether prompt-cache reads count against input limits (Anthropic counts only
    # uncached input and cache writes: false). See ReportedUsage.limited_input.
    cached_input_counts: bool = False
    # The estimate's factor for this route's Anthropic models (None: the built-in one,
    # tokenguard/api/dialects/anthropic_count.py).
    input_factor: float | None = None
    count_tokens: str = "estimate"  # COUNT_TOKENS_SOURCES


@attrs.frozen
class UpstreamSettings:
    """``[upstream]``: proxy mode when any route is set; the built-in mock otherwise.

    ``routes``: the per-model routes in file order, then the default (if any).
    ``key_share``: the share of ``max_connections`` one key may hold at once (at least
    one connection), so that no key's requests can take the whole pool.
    """

    routes: tuple[UpstreamRoute, ...] = ()
    max_connections: int = DEFAULT_UPSTREAM_CONNECTIONS
    key_share: float = DEFAULT_KEY_SHARE

    @property
    def enabled(self) -> bool:
        return bool(self.routes)

    @property
    def connections_per_key(self) -> int:
        """The upstream connections one key may hold at once."""
        return max(1, math.floor(self.max_connections * self.key_share))

    def route(self, model: str) -> UpstreamRoute | None:
        """The route for ``model``: an exact name first, then the first matching glob
        in file order, then the default; ``None`` when nothing matches."""
        for route in self.routes:
            if route.pattern == model:
                return route
        for route in self.routes:
            if route.pattern is None or fnmatch.fnmatchcase(model, route.pattern):
                return route
        return None

    def model_ids(self) -> tuple[str, ...]:
        """The exact model names of ``[upstream.models]`` (globs are not model ids)."""
        return tuple(
            r.pattern for r in self.routes if r.pattern is not None and not _is_glob(r.pattern)
        )


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


ADMIN_TOKEN_ENV = "TOKENGUARD_ADMIN_TOKEN"
MIN_ADMIN_TOKEN_LENGTH = 16
DEFAULT_FEED_BACKLOG = 1000


@attrs.frozen
class FeedSettings:
    """The live usage feed (``docs/usage-feed.md``).

    ``admin_digest`` is the SHA-256 digest of the admin token (``[feed] admin_token``,
    or ``$TOKENGUARD_ADMIN_TOKEN``, which takes precedence); ``None`` means there is no
    admin view at all. ``backlog`` is how many events a subscriber may fall behind
    before its oldest ones are dropped.
    """

    admin_digest: str | None = attrs.field(default=None, repr=False)
    backlog: int = DEFAULT_FEED_BACKLOG
    # Browser origins (``scheme://host[:port]``, lower-case) whose pages may open the
    # feed's websocket besides the node's own origin (``[feed] allowed_origins``).
    allowed_origins: frozenset[str] = frozenset()
    # The admin token's length in bytes (0: none): the admin API refuses a
    # non-loopback bind unless it is long enough (tokenguard/api/admin.py).
    admin_token_bytes: int = 0


METRICS_TOKEN_ENV = "TOKENGUARD_METRICS_TOKEN"


@attrs.frozen
class MetricsSettings:
    """``GET /metrics`` (``docs/metrics.md``). ``token_digest``: the SHA-256 digest of
    the bearer token a scrape must send (``[metrics] token``, or
    ``$TOKENGUARD_METRICS_TOKEN``, which takes precedence); ``None``: no token needed."""

    token_digest: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class Settings:
    source: str = "<defaults>"
    store_url: str = "memory://"
    # What a node does when the shared store fails (docs/reliability.md).
    on_store_error: str = "local"
    store_timeout_ms: int = 100
    cluster_size: int | None = None  # [store] cluster_size: nodes over all machines
    supervised_nodes: int = 1  # nodes run by this node's supervisor (--cluster-size)
    window_seconds: int = 60
    bucket_seconds: int = 5
    max_body_bytes: int = 1024 * 1024
    limiting: bool = True
    node_id: int = 0
    tiers: Mapping[str, Limits] = attrs.field(factory=dict)
    teams: Mapping[str, Team] = attrs.field(factory=dict)
    mode: str = "enforce"  # [limits] mode: the default of every tier, key and team
    # [limits] lease_seconds: a max_concurrent lease expires this long after it was
    # taken or last renewed (a crashed node's requests free their slots then).
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    # [limits] near_limit_ratio: a near_limit event when a row's usage reaches this
    # share of its limit, once per window (0: never).
    near_limit_ratio: float = DEFAULT_NEAR_LIMIT_RATIO
    # [limits] user_header: the request header naming the end user when the body names
    # none (None: only the body); [limits] missing_user: see MISSING_USER_POLICIES.
    user_header: str | None = None
    missing_user: str = "shared"
    # [prices."MODEL-OR-GLOB"] over the shipped table; [limits] unpriced (see above).
    prices: PriceTable = attrs.field(factory=default_prices)
    unpriced: str = "reject"
    # [limits] timezone: where a calendar month (spend_per_month) begins, an IANA name.
    timezone: str = "UTC"
    # [limits] batch_share: on a line where interactive and batch requests both wait
    # for room, the share of its turns batch gets (tokenguard/limiting/wait_lines.py).
    batch_share: float = DEFAULT_BATCH_SHARE
    keys: tuple[ApiKey, ...] = ()
    # Each [[keys]] entry's own limit fields as written (by key name), so that the
    # keyring (tokenguard/limiting/keyring.py) can resolve them against a tier changed later.
    key_tables: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    mock: MockSettings = MockSettings()
    feed: FeedSettings = FeedSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    metrics: MetricsSettings = MetricsSettings()

    def key_by_digest(self) -> dict[str, ApiKey]:
        return {k.digest: k for k in self.keys}

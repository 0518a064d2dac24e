"""Settings: one immutable object, read from ``tokenguard.toml`` and passed down.

Every problem in a config file is a :class:`ConfigError` whose message names the file,
the key (as a dotted TOML path) and what is wrong; unknown keys are errors too, so a
typo never silently leaves a limit off. API keys are hashed on load: only their SHA-256
digests are kept in memory.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

DIMENSIONS = ("requests", "input_tokens", "output_tokens")
LIMIT_FIELDS = {"rpm": "requests", "input_tpm": "input_tokens", "output_tpm": "output_tokens"}
# Every limit a key, tier, team or per-model rule may set: field -> (dimension, window).
# "minute" is the configured [window] (60 s by default); see tokenguard/rules.py.
# max_concurrent: requests in flight, counted with leases of [limits] lease_seconds.
RULE_FIELDS = {
    f"{prefix}{suffix}": (dimension, window)
    for prefix, dimension, p in (
        ("r", "requests", "p"),
        ("input_t", "input_tokens", "p"),
        ("output_t", "output_tokens", "p"),
        ("t", "total_tokens", "p"),
    )
    for suffix, window in ((f"{p}m", "minute"), (f"{p}h", "hour"), (f"{p}d", "day"))
} | {"max_concurrent": ("concurrent", "lease")}
DEFAULT_LEASE_SECONDS = 30.0
MIN_LEASE_SECONDS = 0.1
DEFAULT_NEAR_LIMIT_RATIO = 0.8
MODES = ("enforce", "shadow")
# Team names end up in store key names, as the hash tag: no braces, no colons.
TEAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
DEFAULT_MAX_TOKENS = 1024
STORE_ERROR_POLICIES = ("local", "closed", "open")
# The fields of a [[keys]] entry that say which key it is, not what its limits are.
KEY_IDENTITY_FIELDS = ("name", "key", "sha256", "tier", "team")


class ConfigError(ValueError):
    """A config file (or an override) is invalid; the message says where and why."""


@attrs.frozen
class Limits:
    """The limits of one key, tier, team or per-model rule; ``None`` means unlimited.

    ``*pm`` fields are per [window] (a minute by default), ``*ph`` per hour, ``*pd`` per
    day (see :data:`RULE_FIELDS`); ``tp*`` count input + output tokens together.
    ``default_max_tokens`` is the output reservation for a request that names neither
    ``max_tokens`` nor ``max_completion_tokens``. ``mode`` is ``"enforce"`` or
    ``"shadow"`` (checked and counted, never refused). ``models``: per-model rules,
    each checked on top of these limits when its glob matches the request's model.
    """

    rpm: int | None = None
    input_tpm: int | None = None
    output_tpm: int | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    rph: int | None = None
    rpd: int | None = None
    input_tph: int | None = None
    input_tpd: int | None = None
    output_tph: int | None = None
    output_tpd: int | None = None
    tpm: int | None = None
    tph: int | None = None
    tpd: int | None = None
    mode: str = "enforce"
    models: tuple[ModelRule, ...] = ()
    max_concurrent: int | None = None  # requests in flight at once (leases)

    def rules(self) -> list[tuple[str, str, int]]:
        """``(dimension, window, limit)`` for every limit set, in RULE_FIELDS order."""
        return [
            (dimension, window, value)
            for field, (dimension, window) in RULE_FIELDS.items()
            if (value := getattr(self, field)) is not None
        ]

    def limit(self, dimension: str) -> int | None:
        return {
            "requests": self.rpm,
            "input_tokens": self.input_tpm,
            "output_tokens": self.output_tpm,
        }[dimension]


@attrs.frozen
class ApiKey:
    """A key as the limiter knows it: a name, the key's SHA-256 digest, its limits."""

    name: str
    digest: str
    limits: Limits
    tier: str | None = None
    team: Team | None = None

    @property
    def key_id(self) -> str:
        """The id used in store key names: never the key itself (a digest prefix)."""
        return self.digest[:16]


@attrs.frozen
class ModelRule:
    """Limits that apply only to requests whose model matches ``pattern`` (an fnmatch
    glob, case-sensitive: ``gpt-4o*``). Its ``limits.models`` is always empty."""

    pattern: str
    limits: Limits
    mode: str | None = None  # None: the mode of the key, tier or team it belongs to


@attrs.frozen
class Team:
    """``[teams.NAME]``: limits shared by every key with ``team = "NAME"``."""

    name: str
    limits: Limits


@attrs.frozen
class MockSettings:
    """The built-in mock upstream. ``token_delay_ms`` paces streamed tokens."""

    token_delay_ms: float = 0.0


DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 600.0
DEFAULT_CLIENT_IDLE_TIMEOUT = 30.0
DEFAULT_UPSTREAM_CONNECTIONS = 100
# No key holds more than this share of a node's upstream connections at once.
DEFAULT_KEY_SHARE = 0.25
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
    # tokenguard/forwarding.py); ``None``: every field.
    forward_fields: frozenset[str] | None = None
    client_idle_timeout: float = DEFAULT_CLIENT_IDLE_TIMEOUT
    on_client_gone: str = "cancel"
    on_upstream_error: str = "keep"


# A route's fields read the same way, inherited from the default route when left out.
ROUTE_SECONDS = ("connect_timeout", "read_timeout", "client_idle_timeout")
ROUTE_CHOICES = {
    "output_limit_field": OUTPUT_LIMIT_FIELDS,
    "on_client_gone": CLIENT_GONE_POLICIES,
    "on_upstream_error": UPSTREAM_ERROR_POLICIES,
}


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
    # non-loopback bind unless it is long enough (tokenguard/admin.py).
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
    keys: tuple[ApiKey, ...] = ()
    # Each [[keys]] entry's own limit fields as written (by key name), so that the
    # keyring (tokenguard/keyring.py) can resolve them against a tier changed later.
    key_tables: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    mock: MockSettings = MockSettings()
    feed: FeedSettings = FeedSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    metrics: MetricsSettings = MetricsSettings()

    def key_by_digest(self) -> dict[str, ApiKey]:
        return {k.digest: k for k in self.keys}


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --- validation -------------------------------------------------------------------------


class _Reader:
    """Walks one TOML table, taking known keys and refusing the rest."""

    def __init__(self, source: str, path: str, table: Any) -> None:
        self.source, self.path = source, path
        if not isinstance(table, dict):
            self.fail(f"must be a table, got {type(table).__name__}")
        self.table = dict(table)

    def where(self, key: str | None = None) -> str:
        if key is None:
            return self.path or "top level"
        return f"{self.path}.{key}" if self.path else key

    def fail(self, problem: str, key: str | None = None) -> None:
        raise ConfigError(f"{self.source}: {self.where(key)}: {problem}")

    def int(self, key: str, default: Any, *, minimum: int = 1) -> Any:
        value = self.table.pop(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"must be an integer, got {value!r}", key)
        if value < minimum:
            self.fail(f"must be at least {minimum}, got {value}", key)
        return value

    def number(self, key: str, default: float, *, minimum: float = 0) -> float:
        value = self.table.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"must be a number, got {value!r}", key)
        if value < minimum:
            self.fail(f"must be at least {minimum}, got {value}", key)
        return float(value)

    def str(self, key: str, default: Any) -> Any:
        value = self.table.pop(key, default)
        if value is not default and (not isinstance(value, str) or not value):
            self.fail(f"must be a non-empty string, got {value!r}", key)
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.table.pop(key, default)
        if not isinstance(value, bool):
            self.fail(f"must be true or false, got {value!r}", key)
        return value

    def sub(self, key: str) -> _Reader:
        return _Reader(self.source, self.where(key), self.table.pop(key, {}))

    def done(self) -> None:
        for key in self.table:
            self.fail("unknown key (check its spelling)", key)


def _origins(reader: _Reader, key: str) -> frozenset[str]:
    """A list of web origins, each ``http(s)://host[:port]`` (no path), lower-cased."""
    values = reader.table.pop(key, [])
    if not isinstance(values, list):
        reader.fail(f"must be a list of origins like 'https://host', got {values!r}", key)
    origins = set()
    for value in values:
        parts = urlsplit(value) if isinstance(value, str) else None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username is not None
        ):
            reader.fail(f"not an origin like 'https://host[:port]': {value!r}", key)
        try:
            parts.port  # noqa: B018  (raises for a malformed port)
        except ValueError:
            reader.fail(f"not an origin like 'https://host[:port]': {value!r}", key)
        origins.add(f"{parts.scheme}://{parts.netloc}".lower())
    return frozenset(origins)


def _mode(reader: _Reader, default: str) -> str:
    mode = reader.str("mode", default)
    if mode not in MODES:
        reader.fail(f"must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    return mode


def _limits(
    reader: _Reader,
    base: Limits | None = None,
    *,
    mode: str = "enforce",
    default_max_tokens: bool = True,
) -> Limits:
    """The limits of a tier, key or team: ``base`` (a key's tier) field by field, unless
    the table sets the field. ``mode`` is the default mode (the global one) when there
    is no base. Per-model rules for a pattern the base also has override it field by
    field too. ``default_max_tokens=False`` (teams) refuses that field."""
    base = base or Limits(mode=mode)
    values = {field: reader.int(field, getattr(base, field)) for field in RULE_FIELDS}
    own_mode = _mode(reader, base.mode)
    reserve = base.default_max_tokens
    if default_max_tokens:
        reserve = reader.int("default_max_tokens", base.default_max_tokens)
    models = _model_rules(reader.sub("models"), base.models)
    return Limits(**values, default_max_tokens=reserve, mode=own_mode, models=models)


def limits_from_table(
    table: Any,
    where: str,
    base: Limits | None = None,
    *,
    mode: str = "enforce",
    default_max_tokens: bool = True,
) -> Limits:
    """The limits a table of limit fields gives (the TOML of a tier or a key's own
    fields, parsed), over ``base`` as for a config key; ConfigError naming ``where``
    and the field. For limits stored outside the config file (the admin API's)."""
    reader = _Reader(where, "", table)
    limits = _limits(reader, base, mode=mode, default_max_tokens=default_max_tokens)
    reader.done()
    return limits


def _model_rules(reader: _Reader, base: tuple[ModelRule, ...]) -> tuple[ModelRule, ...]:
    """``models = {"gpt-4o*" = {rpm = 5}}`` (or ``[....models."gpt-4o*"]`` tables)."""
    inherited = {rule.pattern: rule for rule in base}
    rules = dict(inherited)
    for pattern in list(reader.table):
        if not pattern.strip():
            reader.fail("a model pattern must not be empty", repr(pattern))
        table = reader.sub(pattern)
        parent = inherited.get(pattern)
        parent_limits = parent.limits if parent else Limits()
        values = {field: table.int(field, getattr(parent_limits, field)) for field in RULE_FIELDS}
        mode = table.str("mode", parent.mode if parent else None)
        if mode is not None and mode not in MODES:
            table.fail(f"must be one of {', '.join(MODES)}, got {mode!r}", "mode")
        table.done()
        limits = Limits(**values)
        if not limits.rules():
            table.fail(f"sets no limit (give one of {', '.join(RULE_FIELDS)})")
        rules[pattern] = ModelRule(pattern=pattern, limits=limits, mode=mode)
    reader.done()
    return tuple(rules.values())


def _base_url(reader: _Reader, default: str | None) -> str | None:
    url = reader.str("base_url", default)
    if url is None or url is default:
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        reader.fail(f"must be an http:// or https:// URL, got {url!r}", "base_url")
    if parts.username is not None or parts.password is not None:
        # A credential in the file is what api_key_env exists to avoid.
        reader.fail("must not contain a user or password (use api_key_env)", "base_url")
    if parts.query or parts.fragment:
        reader.fail(f"must not have a query or fragment, got {url!r}", "base_url")
    return url.rstrip("/")


def _upstream_route(
    reader: _Reader,
    pattern: str | None,
    parent: UpstreamRoute | None,
    environ: Mapping[str, str],
) -> UpstreamRoute | None:
    """One route; a per-model route inherits the default's fields it does not set, but
    its credential only when it also keeps the default's ``base_url``: a key for one
    server is never sent to another."""
    own_url = _base_url(reader, None)
    base_url = own_url or (parent.base_url if parent else None)
    inherit_key = parent is not None and own_url is None
    api_key_env = reader.str("api_key_env", parent.api_key_env if inherit_key else None)
    inherited = parent if parent is not None else UpstreamRoute(pattern=None, base_url="")
    seconds = {key: reader.number(key, getattr(inherited, key)) for key in ROUTE_SECONDS}
    choices = {}
    for key, allowed in ROUTE_CHOICES.items():
        choices[key] = reader.str(key, getattr(inherited, key))
        if choices[key] not in allowed:
            reader.fail(f"must be one of {', '.join(allowed)}, got {choices[key]!r}", key)
    forward_fields = _forward_fields(reader, parent.forward_fields if parent else None)
    for key, value in seconds.items():
        if value <= 0:
            reader.fail(f"must be more than 0 seconds, got {value:g}", key)
    if base_url is None:
        if pattern is None:
            if api_key_env is not None:
                reader.fail("api_key_env needs a base_url to send it to", "api_key_env")
            return None
        reader.fail("needs a base_url (there is no default one in [upstream])")
    api_key = None
    if api_key_env is not None:
        if not ENV_NAME.fullmatch(api_key_env):
            reader.fail(f"must be an environment variable name, got {api_key_env!r}", "api_key_env")
        api_key = environ.get(api_key_env, "").strip()
        if not api_key:
            reader.fail(f"the environment variable ${api_key_env} is not set", "api_key_env")
    return UpstreamRoute(
        pattern=pattern,
        base_url=base_url,
        api_key_env=api_key_env,
        api_key=api_key,
        **seconds,
        **choices,
        forward_fields=forward_fields,
    )


# A body field name: what JSON keys of the OpenAI-compatible APIs look like.
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def _forward_fields(reader: _Reader, default: frozenset[str] | None) -> frozenset[str] | None:
    """``forward_fields``: a list of distinct body field names (may be empty)."""
    if "forward_fields" not in reader.table:
        return default
    values = reader.table.pop("forward_fields")
    example = 'a list of body field names, e.g. ["temperature", "top_p", "stop"]'
    if not isinstance(values, list):
        reader.fail(f"must be {example}, got {values!r}", "forward_fields")
    for value in values:
        if not isinstance(value, str) or not FIELD_NAME.fullmatch(value):
            reader.fail(f"must be {example}; {value!r} is not a field name", "forward_fields")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        reader.fail(f"names {', '.join(repeated)} more than once", "forward_fields")
    return frozenset(values)


def _upstream(reader: _Reader, environ: Mapping[str, str]) -> UpstreamSettings:
    """``[upstream]`` (the default route) and ``[upstream.models."<glob>"]`` routes."""
    max_connections = reader.int("max_connections", DEFAULT_UPSTREAM_CONNECTIONS)
    key_share = reader.number("key_share", DEFAULT_KEY_SHARE)
    if not 0 < key_share <= 1:
        reader.fail(f"must be more than 0 and at most 1, got {key_share:g}", "key_share")
    models = reader.sub("models")
    default = _upstream_route(reader, None, None, environ)
    routes: list[UpstreamRoute] = []
    for pattern in list(models.table):
        if not pattern.strip():
            models.fail("a model pattern must not be empty", repr(pattern))
        table = models.sub(pattern)
        route = _upstream_route(table, pattern, default, environ)
        table.done()
        assert route is not None
        routes.append(route)
    models.done()
    reader.done()
    if default is not None:
        routes.append(default)
    return UpstreamSettings(
        routes=tuple(routes), max_connections=max_connections, key_share=key_share
    )


def _bearer_token(
    configured: str | None,
    where: str,
    env_name: str,
    environ: Mapping[str, str] | None,
    what: str,
) -> tuple[str | None, str]:
    """A token and where it was set: the environment variable ``env_name`` when it is
    set and not blank (``os.environ`` unless ``environ``), else ``configured`` (from
    ``where``). One shorter than ``MIN_ADMIN_TOKEN_LENGTH`` is a ConfigError naming
    where it was set and ``what`` token it is."""
    from_env = (os.environ if environ is None else environ).get(env_name, "").strip()
    if from_env:
        configured, where = from_env, f"${env_name} (environment)"
    if configured is not None and len(configured) < MIN_ADMIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{where}: the {what} token must be at least {MIN_ADMIN_TOKEN_LENGTH} characters"
        )
    return configured, where


def parse_settings(
    data: Mapping[str, Any], source: str, environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate a parsed TOML document into :class:`Settings`; raise ConfigError.

    ``environ`` (``os.environ`` by default) may set the feed's admin token, and holds
    the upstream credentials named by ``api_key_env``.
    """
    top = _Reader(source, "", data)

    store = top.sub("store")
    store_url = store.str("url", "memory://")
    on_store_error = store.str("on_store_error", "local")
    if on_store_error not in STORE_ERROR_POLICIES:
        store.fail(
            f"must be one of {', '.join(STORE_ERROR_POLICIES)}, got {on_store_error!r}",
            "on_store_error",
        )
    store_timeout_ms = store.int("timeout_ms", 100)
    cluster_size = store.int("cluster_size", None)
    store.done()

    window = top.sub("window")
    window_seconds = window.int("seconds", 60)
    bucket_seconds = window.int("bucket_seconds", 5)
    window.done()
    if window_seconds % bucket_seconds:
        window.fail(
            f"must divide window.seconds ({window_seconds}) evenly, got {bucket_seconds}",
            "bucket_seconds",
        )

    server = top.sub("server")
    max_body_bytes = server.int("max_body_bytes", 1024 * 1024, minimum=1024)
    server.done()

    mock = top.sub("mock")
    mock_settings = MockSettings(token_delay_ms=mock.number("token_delay_ms", 0.0))
    mock.done()

    upstream_settings = _upstream(top.sub("upstream"), os.environ if environ is None else environ)

    feed = top.sub("feed")
    admin_token = feed.str("admin_token", None)
    feed_backlog = feed.int("backlog", DEFAULT_FEED_BACKLOG)
    allowed_origins = _origins(feed, "allowed_origins")
    feed.done()
    admin_token, admin_where = _bearer_token(
        admin_token, f"{source}: feed.admin_token", ADMIN_TOKEN_ENV, environ, "admin"
    )

    metrics = top.sub("metrics")
    metrics_token = metrics.str("token", None)
    metrics.done()
    metrics_token, _ = _bearer_token(
        metrics_token, f"{source}: metrics.token", METRICS_TOKEN_ENV, environ, "metrics"
    )

    limits_section = top.sub("limits")
    mode = _mode(limits_section, "enforce")  # the global default mode
    lease_seconds = limits_section.number(
        "lease_seconds", DEFAULT_LEASE_SECONDS, minimum=MIN_LEASE_SECONDS
    )
    if not math.isfinite(lease_seconds):
        limits_section.fail(f"must be a finite number, got {lease_seconds}", "lease_seconds")
    near_limit_ratio = limits_section.number("near_limit_ratio", DEFAULT_NEAR_LIMIT_RATIO)
    if not 0 <= near_limit_ratio <= 1:
        limits_section.fail(
            f"must be a share of the limit, 0 to 1, got {near_limit_ratio}", "near_limit_ratio"
        )
    limits_section.done()

    tiers_reader = top.sub("tiers")
    tiers: dict[str, Limits] = {}
    for name in list(tiers_reader.table):
        tier = tiers_reader.sub(name)
        tiers[name] = _limits(tier, mode=mode)
        tier.done()

    teams_reader = top.sub("teams")
    teams: dict[str, Team] = {}
    for name in list(teams_reader.table):
        if not TEAM_NAME.fullmatch(name):
            teams_reader.fail("a team name may only use letters, digits and _ . -", name)
        team = teams_reader.sub(name)
        teams[name] = Team(name=name, limits=_limits(team, mode=mode, default_max_tokens=False))
        team.done()

    raw_keys = top.table.pop("keys", [])
    if not isinstance(raw_keys, list):
        top.fail("must be an array of tables ([[keys]])", "keys")
    keys: list[ApiKey] = []
    key_tables: dict[str, dict[str, Any]] = {}
    names: set[str] = set()
    digests: set[str] = set()
    for i, raw in enumerate(raw_keys):
        entry = _Reader(source, f"keys[{i}]", raw)
        name = entry.str("name", None)
        if name is None:
            entry.fail("is required", "name")
        if name in names:
            entry.fail(f"duplicate key name {name!r}", "name")
        plaintext = entry.str("key", None)
        digest = entry.str("sha256", None)
        if (plaintext is None) == (digest is None):
            entry.fail("give exactly one of `key` (plaintext) or `sha256` (hex digest)")
        if digest is not None:
            digest = digest.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                entry.fail("must be 64 hex characters (a SHA-256 digest)", "sha256")
        else:
            digest = digest_of(plaintext)
        if digest in digests:
            entry.fail("the same API key is listed twice")
        tier_name = entry.str("tier", None)
        base = None
        if tier_name is not None:
            if tier_name not in tiers:
                entry.fail(f"unknown tier {tier_name!r} (known: {sorted(tiers)})", "tier")
            base = tiers[tier_name]
        team_name = entry.str("team", None)
        if team_name is not None and team_name not in teams:
            entry.fail(f"unknown team {team_name!r} (known: {sorted(teams)})", "team")
        limits = _limits(entry, base, mode=mode)
        entry.done()
        key_tables[name] = {k: v for k, v in raw.items() if k not in KEY_IDENTITY_FIELDS}
        names.add(name)
        digests.add(digest)
        keys.append(
            ApiKey(
                name=name,
                digest=digest,
                limits=limits,
                tier=tier_name,
                team=None if team_name is None else teams[team_name],
            )
        )
    top.done()
    admin_digest = None if admin_token is None else digest_of(admin_token)
    if admin_digest in digests:
        # Which view would that token get? Refuse rather than guess.
        raise ConfigError(f"{admin_where}: the admin token is also an API key in [[keys]]")

    return Settings(
        source=source,
        store_url=store_url,
        on_store_error=on_store_error,
        store_timeout_ms=store_timeout_ms,
        cluster_size=cluster_size,
        window_seconds=window_seconds,
        bucket_seconds=bucket_seconds,
        max_body_bytes=max_body_bytes,
        tiers=tiers,
        teams=teams,
        mode=mode,
        lease_seconds=lease_seconds,
        near_limit_ratio=near_limit_ratio,
        keys=tuple(keys),
        key_tables=key_tables,
        mock=mock_settings,
        feed=FeedSettings(
            admin_digest=admin_digest,
            backlog=feed_backlog,
            allowed_origins=allowed_origins,
            admin_token_bytes=0 if admin_token is None else len(admin_token.encode()),
        ),
        upstream=upstream_settings,
        metrics=MetricsSettings(
            token_digest=None if metrics_token is None else digest_of(metrics_token)
        ),
    )


def load_settings(path: str | Path) -> Settings:
    """Read and validate a TOML config file; raise ConfigError naming file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_settings(data, str(path))


DEMO_CONFIG = """\
# The built-in demo config: `tokenguard serve` with no --config runs this.
[store]
url = "memory://"

[window]
seconds = 60
bucket_seconds = 5

[tiers.free]
rpm = 3
input_tpm = 1000
output_tpm = 300
default_max_tokens = 64

[tiers.pro]
rpm = 60
input_tpm = 20000
output_tpm = 10000
default_max_tokens = 256

[[keys]]
key = "sk-demo-free"
name = "demo-free"
tier = "free"

[[keys]]
key = "sk-demo-pro"
name = "demo-pro"
tier = "pro"
"""


def demo_settings() -> Settings:
    return parse_settings(tomllib.loads(DEMO_CONFIG), "<built-in demo config>")

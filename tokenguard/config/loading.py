"""Loading a config: a TOML file (or the built-in demo config) into :class:`Settings`.

:func:`parse_settings` reads one section at a time, in the file's documented order
(``[store]``, ``[window]``, ``[server]``, ``[mock]``, ``[upstream]``, ``[feed]``,
``[metrics]``, ``[limits]``, ``[prices]``, ``[tiers]``, ``[teams]``, ``[[keys]]``), each with a
function of its own; the first problem found is raised as a
:class:`~tokenguard.config.settings.ConfigError` naming the file and the dotted key.
Tokens and API keys given in plaintext are kept only as their SHA-256 digests.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tokenguard.config.limits_table import read_limits, read_mode
from tokenguard.config.prices import PriceTable, default_prices, price_from_table
from tokenguard.config.reader import TableReader
from tokenguard.config.settings import (
    ADMIN_TOKEN_ENV,
    DEFAULT_BATCH_SHARE,
    DEFAULT_FEED_BACKLOG,
    DEFAULT_LEASE_SECONDS,
    DEFAULT_NEAR_LIMIT_RATIO,
    METRICS_TOKEN_ENV,
    MIN_ADMIN_TOKEN_LENGTH,
    MIN_LEASE_SECONDS,
    MISSING_USER_POLICIES,
    STORE_ERROR_POLICIES,
    UNPRICED_POLICIES,
    ConfigError,
    FeedSettings,
    MetricsSettings,
    MockSettings,
    Settings,
)
from tokenguard.config.upstream_table import read_upstream
from tokenguard.model import KEY_IDENTITY_FIELDS, TEAM_NAME, ApiKey, Limits, Team, digest_of

# An HTTP header name (RFC 9110 token characters).
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_settings(
    data: Mapping[str, Any], source: str, environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate a parsed TOML document into :class:`Settings`; raise ConfigError.

    ``environ`` (``os.environ`` by default) may set the feed's admin token and the
    metrics token, and holds the upstream credentials named by ``api_key_env``.
    """
    environ = os.environ if environ is None else environ
    top = TableReader(source, "", data)
    store = _store(top.sub("store"))
    window = _window(top.sub("window"))
    server = _server(top.sub("server"))
    mock = _mock(top.sub("mock"))
    upstream = read_upstream(top.sub("upstream"), environ)
    feed, admin_where = _feed(top.sub("feed"), source, environ)
    metrics = _metrics(top.sub("metrics"), source, environ)
    limits = _limits_section(top.sub("limits"))
    prices = _prices(top.sub("prices"))
    mode = limits["mode"]
    tiers = _tiers(top.sub("tiers"), mode)
    teams = _teams(top.sub("teams"), mode)
    keys, key_tables = _keys(top, tiers, teams, mode)
    top.done()
    if feed.admin_digest in {key.digest for key in keys}:
        # Which view would that token get? Refuse rather than guess.
        raise ConfigError(f"{admin_where}: the admin token is also an API key in [[keys]]")
    return Settings(
        source=source,
        **store,
        **window,
        **server,
        **limits,
        tiers=tiers,
        teams=teams,
        keys=keys,
        key_tables=key_tables,
        mock=mock,
        feed=feed,
        upstream=upstream,
        metrics=metrics,
        prices=prices,
    )


def _store(reader: TableReader) -> dict[str, Any]:
    """``[store]``: the store URL, the failure policy, the call deadline, the cluster size."""
    store_url = reader.str("url", "memory://")
    on_store_error = reader.str("on_store_error", "local")
    if on_store_error not in STORE_ERROR_POLICIES:
        reader.fail(
            f"must be one of {', '.join(STORE_ERROR_POLICIES)}, got {on_store_error!r}",
            "on_store_error",
        )
    store_timeout_ms = reader.int("timeout_ms", 100)
    cluster_size = reader.int("cluster_size", None)
    reader.done()
    return {
        "store_url": store_url,
        "on_store_error": on_store_error,
        "store_timeout_ms": store_timeout_ms,
        "cluster_size": cluster_size,
    }


def _window(reader: TableReader) -> dict[str, Any]:
    """``[window]``: its length and its buckets', which must divide it."""
    window_seconds = reader.int("seconds", 60)
    bucket_seconds = reader.int("bucket_seconds", 5)
    reader.done()
    if window_seconds % bucket_seconds:
        reader.fail(
            f"must divide window.seconds ({window_seconds}) evenly, got {bucket_seconds}",
            "bucket_seconds",
        )
    return {"window_seconds": window_seconds, "bucket_seconds": bucket_seconds}


def _server(reader: TableReader) -> dict[str, Any]:
    """``[server]``: the largest request body."""
    max_body_bytes = reader.int("max_body_bytes", 1024 * 1024, minimum=1024)
    reader.done()
    return {"max_body_bytes": max_body_bytes}


def _mock(reader: TableReader) -> MockSettings:
    """``[mock]``: the built-in mock upstream's pace, and the models it serves (a list
    of distinct non-empty names; absent: every model)."""
    token_delay_ms = reader.number("token_delay_ms", 0.0)
    models = reader.table.pop("models", None)
    if models is not None and (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
        or len(set(models)) != len(models)
    ):
        reader.fail(
            f'must be a list of distinct model names, e.g. ["gpt-4o"], got {models!r}', "models"
        )
    reader.done()
    return MockSettings(token_delay_ms=token_delay_ms, models=tuple(models) if models else None)


def _feed(reader: TableReader, source: str, environ: Mapping[str, str]) -> tuple[FeedSettings, str]:
    """``[feed]``, and where its admin token was set (for a later error about it)."""
    admin_token = reader.str("admin_token", None)
    backlog = reader.int("backlog", DEFAULT_FEED_BACKLOG)
    allowed_origins = _origins(reader, "allowed_origins")
    reader.done()
    admin_token, where = _bearer_token(
        admin_token, f"{source}: feed.admin_token", ADMIN_TOKEN_ENV, environ, "admin"
    )
    feed = FeedSettings(
        admin_digest=None if admin_token is None else digest_of(admin_token),
        backlog=backlog,
        allowed_origins=allowed_origins,
        admin_token_bytes=0 if admin_token is None else len(admin_token.encode()),
    )
    return feed, where


def _metrics(reader: TableReader, source: str, environ: Mapping[str, str]) -> MetricsSettings:
    """``[metrics]``: the token a scrape must send, if any."""
    token = reader.str("token", None)
    reader.done()
    token, _ = _bearer_token(
        token, f"{source}: metrics.token", METRICS_TOKEN_ENV, environ, "metrics"
    )
    return MetricsSettings(token_digest=None if token is None else digest_of(token))


def _limits_section(reader: TableReader) -> dict[str, Any]:
    """``[limits]``: the default mode, the lease time, the near-limit ratio, where the
    end user's id is read and what a request without one does, the batch share of the
    admission queue."""
    mode = read_mode(reader, "enforce")  # the global default mode
    lease_seconds = reader.number("lease_seconds", DEFAULT_LEASE_SECONDS, minimum=MIN_LEASE_SECONDS)
    if not math.isfinite(lease_seconds):
        reader.fail(f"must be a finite number, got {lease_seconds}", "lease_seconds")
    near_limit_ratio = reader.number("near_limit_ratio", DEFAULT_NEAR_LIMIT_RATIO)
    if not 0 <= near_limit_ratio <= 1:
        reader.fail(
            f"must be a share of the limit, 0 to 1, got {near_limit_ratio}", "near_limit_ratio"
        )
    user_header = reader.str("user_header", None)
    if user_header is not None and not HEADER_NAME.fullmatch(user_header):
        reader.fail(f"must be an HTTP header name, got {user_header!r}", "user_header")
    timezone = reader.str("timezone", "UTC")
    try:
        ZoneInfo(timezone)
    except (ValueError, ZoneInfoNotFoundError):
        reader.fail(f"must be an IANA time zone such as Europe/Paris, got {timezone!r}", "timezone")
    unpriced = reader.str("unpriced", "reject")
    if unpriced not in UNPRICED_POLICIES:
        reader.fail(f"must be one of {', '.join(UNPRICED_POLICIES)}, got {unpriced!r}", "unpriced")
    missing_user = reader.str("missing_user", "shared")
    if missing_user not in MISSING_USER_POLICIES:
        reader.fail(
            f"must be one of {', '.join(MISSING_USER_POLICIES)}, got {missing_user!r}",
            "missing_user",
        )
    batch_share = reader.number("batch_share", DEFAULT_BATCH_SHARE)
    if not 0 <= batch_share <= 1:
        reader.fail(f"must be a share of the turns, 0 to 1, got {batch_share}", "batch_share")
    reader.done()
    return {
        "mode": mode,
        "lease_seconds": lease_seconds,
        "near_limit_ratio": near_limit_ratio,
        "user_header": None if user_header is None else user_header.lower(),
        "missing_user": missing_user,
        "unpriced": unpriced,
        "timezone": timezone,
        "batch_share": batch_share,
    }


def _prices(reader: TableReader) -> PriceTable:
    """``[prices."MODEL-OR-GLOB"]``: ``input``, ``cached_input``, ``output`` per million
    tokens, over the shipped table's entry of the same pattern field by field."""
    defaults = default_prices()
    inherited = dict(defaults.entries)
    entries = []
    for pattern in list(reader.table):
        if not pattern.strip():
            reader.fail("a model pattern must not be empty", repr(pattern))
        table = reader.sub(pattern)
        price = price_from_table(table.table, inherited.get(pattern), table.fail)
        entries.append((pattern, price))
    reader.done()
    return PriceTable(tuple(entries)).over(defaults)


def _tiers(reader: TableReader, mode: str) -> dict[str, Limits]:
    """``[tiers.NAME]``: each tier's limits."""
    tiers: dict[str, Limits] = {}
    for name in list(reader.table):
        tier = reader.sub(name)
        tiers[name] = read_limits(tier, mode=mode)
        tier.done()
    return tiers


def _teams(reader: TableReader, mode: str) -> dict[str, Team]:
    """``[teams.NAME]``: each team's limits (no ``default_max_tokens``: a key's)."""
    teams: dict[str, Team] = {}
    for name in list(reader.table):
        if not TEAM_NAME.fullmatch(name):
            reader.fail("a team name may only use letters, digits and _ . -", name)
        team = reader.sub(name)
        teams[name] = Team(name=name, limits=read_limits(team, mode=mode, default_max_tokens=False))
        team.done()
    return teams


def _keys(
    top: TableReader, tiers: Mapping[str, Limits], teams: Mapping[str, Team], mode: str
) -> tuple[tuple[ApiKey, ...], dict[str, dict[str, Any]]]:
    """``[[keys]]``: the keys, and each entry's own limit fields as written (by name),
    so that the keyring can resolve them against a tier changed later."""
    raw_keys = top.table.pop("keys", [])
    if not isinstance(raw_keys, list):
        top.fail("must be an array of tables ([[keys]])", "keys")
    keys: list[ApiKey] = []
    key_tables: dict[str, dict[str, Any]] = {}
    names: set[str] = set()
    digests: set[str] = set()
    for i, raw in enumerate(raw_keys):
        entry = TableReader(top.source, f"keys[{i}]", raw)
        key = _key(entry, names, digests, tiers, teams, mode)
        key_tables[key.name] = {k: v for k, v in raw.items() if k not in KEY_IDENTITY_FIELDS}
        names.add(key.name)
        digests.add(key.digest)
        keys.append(key)
    return tuple(keys), key_tables


def _key(
    entry: TableReader,
    names: set[str],
    digests: set[str],
    tiers: Mapping[str, Limits],
    teams: Mapping[str, Team],
    mode: str,
) -> ApiKey:
    """One ``[[keys]]`` entry: a name and a key (plaintext or digest) that no earlier
    entry has (``names``, ``digests``), its tier's limits under its own, its team."""
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
    limits = read_limits(entry, base, mode=mode)
    entry.done()
    team = None if team_name is None else teams[team_name]
    return ApiKey(name=name, digest=digest, limits=limits, tier=tier_name, team=team)


def _origins(reader: TableReader, key: str) -> frozenset[str]:
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


def _bearer_token(
    configured: str | None,
    where: str,
    env_name: str,
    environ: Mapping[str, str],
    what: str,
) -> tuple[str | None, str]:
    """A token and where it was set: the environment variable ``env_name`` when it is
    set and not blank, else ``configured`` (from ``where``). One shorter than
    ``MIN_ADMIN_TOKEN_LENGTH`` is a ConfigError naming where it was set and ``what``
    token it is."""
    from_env = environ.get(env_name, "").strip()
    if from_env:
        configured, where = from_env, f"${env_name} (environment)"
    if configured is not None and len(configured) < MIN_ADMIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{where}: the {what} token must be at least {MIN_ADMIN_TOKEN_LENGTH} characters"
        )
    return configured, where


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
    """The settings of :data:`DEMO_CONFIG`: ``tokenguard serve`` with no ``--config``."""
    return parse_settings(tomllib.loads(DEMO_CONFIG), "<built-in demo config>")

"""``[upstream]`` and its per-model routes ``[upstream.models."<glob>"]`` (proxy mode).

A per-model route inherits what it leaves out from the default route, except the
credential when its ``base_url`` differs: a key for one server is never sent to
another. Credentials are read from the environment variable a route names
(``api_key_env``), never from the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from tokenguard.config.reader import TableReader
from tokenguard.config.settings import (
    CLIENT_GONE_POLICIES,
    COUNT_TOKENS_SOURCES,
    DEFAULT_KEY_SHARE,
    DEFAULT_UPSTREAM_CONNECTIONS,
    OUTPUT_LIMIT_FIELDS,
    ROUTE_DIALECTS,
    UPSTREAM_ERROR_POLICIES,
    UpstreamRoute,
    UpstreamSettings,
)

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A route's fields read the same way, inherited from the default route when left out.
ROUTE_SECONDS = ("connect_timeout", "read_timeout", "client_idle_timeout")
ROUTE_CHOICES = {
    "output_limit_field": OUTPUT_LIMIT_FIELDS,
    "on_client_gone": CLIENT_GONE_POLICIES,
    "on_upstream_error": UPSTREAM_ERROR_POLICIES,
    "dialect": ROUTE_DIALECTS,
    "count_tokens": COUNT_TOKENS_SOURCES,
}


def _base_url(reader: TableReader, default: str | None) -> str | None:
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
    reader: TableReader,
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
    cached_input_counts = reader.bool("cached_input_counts", inherited.cached_input_counts)
    input_factor = inherited.input_factor
    if "input_factor" in reader.table:
        input_factor = reader.number("input_factor", 1.0)
        if not 0 < input_factor <= 10:
            reader.fail(f"must be more than 0 and at most 10, got {input_factor:g}", "input_factor")
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
        cached_input_counts=cached_input_counts,
        input_factor=input_factor,
    )


# A body field name: what JSON keys of the OpenAI-compatible APIs look like.
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


def _forward_fields(reader: TableReader, default: frozenset[str] | None) -> frozenset[str] | None:
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


def read_upstream(reader: TableReader, environ: Mapping[str, str]) -> UpstreamSettings:
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

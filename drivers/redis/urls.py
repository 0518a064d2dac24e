"""Redis store URLs: parsed into a :class:`RedisTarget` (where the server is and how
to reach it), with a ``ValueError`` that never shows the password."""

from __future__ import annotations

import math
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

import attrs
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from tokenguard.store.window_store import redact_url

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_TIMEOUT = 1.0
# Two pipelines in flight let Redis run one batch while Python encodes/decodes the other.
DEFAULT_PIPELINES = 2
MAX_PIPELINES = 16


@attrs.frozen
class RedisTarget:
    """Where the store's Redis is and how to reach it; built by :func:`parse_redis_url`."""

    kind: Literal["standalone", "sentinel", "cluster"]
    hosts: tuple[tuple[str, int], ...] = ()
    unix_socket: str | None = None
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    sentinel_password: str | None = attrs.field(default=None, repr=False)
    ssl: bool = False
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: str = "required"
    timeout: float = DEFAULT_TIMEOUT
    pipelines: int = DEFAULT_PIPELINES

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for redis-py's connections to a data node."""
        kwargs: dict[str, Any] = {
            "username": self.username,
            "password": self.password,
            "socket_timeout": self.timeout,
            "socket_connect_timeout": self.timeout,
        }
        if self.ssl:
            # Checking the host name needs a verified certificate.
            kwargs.update(
                ssl=True,
                ssl_cert_reqs=self.ssl_cert_reqs,
                ssl_check_hostname=self.ssl_cert_reqs == "required",
            )
            if self.ssl_ca_certs is not None:
                kwargs["ssl_ca_certs"] = self.ssl_ca_certs
        return kwargs

    def connect(self) -> redis.Redis | RedisCluster:
        """Build the redis-py client. Blocking (a cluster client reads the slot table
        here): call it from a worker thread."""
        kwargs = self.connection_kwargs()
        if self.kind == "cluster":
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self.hosts],
                # No retries of a command that may have run (a timeout, a dropped
                # connection): a settlement must never count twice. Redirects are
                # still followed. A limiter answers quickly; an outage is a StoreError.
                retry=Retry(NoBackoff(), 0),
                **kwargs,
            )
        # Retry once, only on a dropped connection (a stale pooled socket after a
        # restart), never on a timeout: the command may have run.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))
        if self.kind == "sentinel":
            sentinel_kwargs = {
                "socket_timeout": self.timeout,
                "socket_connect_timeout": self.timeout,
                "password": self.sentinel_password,
            }
            sentinel = Sentinel(list(self.hosts), sentinel_kwargs=sentinel_kwargs)
            return sentinel.master_for(self.service_name, db=self.db, retry=retry, **kwargs)
        if self.unix_socket is not None:
            return redis.Redis(
                unix_socket_path=self.unix_socket,
                db=self.db,
                retry=retry,
                username=self.username,
                password=self.password,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
            )
        ((host, port),) = self.hosts
        return redis.Redis(host=host, port=port, db=self.db, retry=retry, **kwargs)


def _bad(url: str, why: str) -> ValueError:
    return ValueError(f"bad Redis store URL {redact_url(url)!r}: {why}")


def _split_url(rest: str) -> tuple[str | None, str, str, str]:
    """``[userinfo@]hostlist[/path][?query]`` (what follows ``scheme://``) into its
    parts; userinfo is ``None`` when absent.

    By hand: urlsplit refuses ``h1:1,h2:2``, and a password may hold ``@`` or ``/``
    (it should be percent-encoded, but it must never end up in an error message).
    """
    before_query, _, query = rest.partition("?")
    at = before_query.rfind("@")
    userinfo = before_query[:at] if at >= 0 else None
    hostlist, slash, path = before_query[at + 1 :].partition("/")
    return userinfo, hostlist, slash + path, query


def _parse_hosts(url: str, hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            raise _bad(url, "empty host in the host list")
        if item.startswith("["):  # [IPv6]:port
            host, bracket, port_text = item[1:].partition("]")
            if not bracket or (port_text and not port_text.startswith(":")):
                raise _bad(url, f"malformed IPv6 address {item!r}")
            port_text = port_text[1:]
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise _bad(url, f"no host name in {item!r}")
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise _bad(url, f"port must be a number from 1 to 65535, got {port_text!r}")
            port = int(port_text)
        else:
            port = default_port
        hosts.append((unquote(host), port))
    return tuple(hosts)


def _parse_db(url: str, text: str) -> int:
    if not text.isdigit():
        raise _bad(url, f"the database must be a number >= 0, got {text!r}")
    return int(text)


def parse_redis_url(url: str) -> RedisTarget:
    """Parse a store URL (see the package docstring); ``ValueError`` saying what is wrong.

    Query options: ``timeout`` (seconds, > 0: socket connect and read timeout),
    ``pipelines`` (1-16: round trips in flight at once), ``db`` (``unix://`` only),
    ``sentinel_password`` (``redis+sentinel://``), ``ssl_ca_certs`` and
    ``ssl_cert_reqs`` (``rediss://``). Unknown options are errors.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise _bad(url, f"the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    userinfo, hostlist, path, query_text = _split_url(rest)
    if "#" in hostlist or "#" in path or "#" in query_text:
        raise _bad(url, "a fragment (#...) means nothing here")
    try:
        query = dict(parse_qsl(query_text, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise _bad(url, f"malformed query string {query_text!r}") from None
    options = _common_options(url, userinfo, query)
    if scheme == "unix":
        target = _unix_target(url, hostlist, path, query, options)
    elif scheme in ("redis", "rediss"):
        target = _standalone_target(url, scheme, hostlist, path, query, options)
    elif scheme == "redis+sentinel":
        target = _sentinel_target(url, hostlist, path, query, options)
    else:  # redis+cluster
        if not hostlist:
            raise _bad(url, "no host: redis+cluster://host:port[,host:port...]")
        hosts = _parse_hosts(url, hostlist, DEFAULT_PORT)
        if path.strip("/") not in ("", "0"):
            raise _bad(url, "Redis Cluster has database 0 only; drop the path")
        target = RedisTarget(kind="cluster", hosts=hosts, **options)
    if query:
        raise _bad(url, f"unknown option(s) {', '.join(sorted(query))}")
    return target


def _common_options(url: str, userinfo: str | None, query: dict[str, str]) -> dict[str, Any]:
    """The credentials and the options every scheme takes (``timeout``, ``pipelines``),
    taken out of ``query``."""
    username = password = None
    if userinfo is not None:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None

    options: dict[str, Any] = {"username": username, "password": password}
    if "timeout" in query:
        text = query.pop("timeout")
        try:
            timeout = float(text)
        except ValueError:
            raise _bad(url, f"timeout must be seconds, got {text!r}") from None
        if not (timeout > 0 and math.isfinite(timeout)):
            raise _bad(url, f"timeout must be > 0 seconds, got {text!r}")
        options["timeout"] = timeout
    if "pipelines" in query:
        text = query.pop("pipelines")
        if not text.isdigit() or not 1 <= int(text) <= MAX_PIPELINES:
            raise _bad(url, f"pipelines must be 1 to {MAX_PIPELINES}, got {text!r}")
        options["pipelines"] = int(text)
    return options


def _unix_target(
    url: str, hostlist: str, path: str, query: dict[str, str], options: dict[str, Any]
) -> RedisTarget:
    if hostlist:
        raise _bad(url, "unix:// takes a socket path, no host: unix:///path/to.sock")
    if not path or path == "/":
        raise _bad(url, "no socket path: unix:///path/to.sock")
    if "db" in query:
        options["db"] = _parse_db(url, query.pop("db"))
    return RedisTarget(kind="standalone", unix_socket=unquote(path), **options)


def _standalone_target(
    url: str,
    scheme: str,
    hostlist: str,
    path: str,
    query: dict[str, str],
    options: dict[str, Any],
) -> RedisTarget:
    if not hostlist:
        raise _bad(url, f"no host: {scheme}://host:port/db")
    hosts = _parse_hosts(url, hostlist, DEFAULT_PORT)
    if len(hosts) != 1:
        raise _bad(url, f"{scheme}:// takes one host; use redis+cluster:// for several")
    db_text = path.strip("/")
    db = _parse_db(url, db_text) if db_text else 0
    if scheme == "rediss":
        if "ssl_ca_certs" in query:
            options["ssl_ca_certs"] = query.pop("ssl_ca_certs")
        if "ssl_cert_reqs" in query:
            reqs = query.pop("ssl_cert_reqs")
            if reqs not in ("required", "optional", "none"):
                raise _bad(url, f"ssl_cert_reqs must be required|optional|none, not {reqs!r}")
            options["ssl_cert_reqs"] = reqs
    return RedisTarget(kind="standalone", hosts=hosts, db=db, ssl=scheme == "rediss", **options)


def _sentinel_target(
    url: str, hostlist: str, path: str, query: dict[str, str], options: dict[str, Any]
) -> RedisTarget:
    if not hostlist:
        raise _bad(url, "no sentinel host: redis+sentinel://host:port/service_name/db")
    hosts = _parse_hosts(url, hostlist, DEFAULT_SENTINEL_PORT)
    segments = [unquote(s) for s in path.strip("/").split("/")] if path.strip("/") else []
    if not segments or not segments[0]:
        raise _bad(url, "no service name: redis+sentinel://host:port/service_name/db")
    if len(segments) > 2:
        raise _bad(url, "the path must be /service_name or /service_name/db")
    db = _parse_db(url, segments[1]) if len(segments) == 2 else 0
    if "sentinel_password" in query:
        options["sentinel_password"] = query.pop("sentinel_password")
    return RedisTarget(kind="sentinel", hosts=hosts, service_name=segments[0], db=db, **options)

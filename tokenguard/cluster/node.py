"""One node: the app, its window store and hypercorn's trio worker, in one trio run.

:func:`serve_node` is a long-running entry point in trio's style: it calls
``task_status.started(url)`` only once the socket is bound (so ``nursery.start``
returns the URL, with the real port when asked for port 0) and stops gracefully when
``shutdown`` is set: no new connections, in-flight requests (streams included) finish
within ``grace`` seconds, then the rest are cancelled.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from tokenguard.api.admin import check_admin_bind, create_admin_app
from tokenguard.api.app import create_app
from tokenguard.api.hardening import (
    KEEP_ALIVE_TIMEOUT,
    MAX_HEADER_BYTES,
    install_protocol_errors,
    install_shielded_recycle,
)
from tokenguard.cluster.open_files import LISTEN_BACKLOG, raise_open_files_limit
from tokenguard.config.settings import Settings
from tokenguard.counting import preload
from tokenguard.limiting.keyring import Keyring
from tokenguard.loopback import is_loopback
from tokenguard.observe.feed_session import WEBSOCKET_MESSAGE_BYTES
from tokenguard.store.guarded import GuardedStore, guarded_store
from tokenguard.store.window_store import open_store

log = logging.getLogger("tokenguard.cluster.node")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket bound with SO_REUSEPORT, so several nodes share one port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def hypercorn_config(
    host: str,
    port: int,
    *,
    grace: float,
    reuse_port: bool = False,
    unix_socket: str | None = None,
) -> Config:
    config = Config()
    if reuse_port:
        # hypercorn has no SO_REUSEPORT option, but serves a socket we bound ourselves.
        config.bind = [f"fd://{reuse_port_socket(host, port).detach()}"]
    else:
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if unix_socket is not None:
        config.bind.append(f"unix:{unix_socket}")
    config.graceful_timeout = grace
    config.backlog = LISTEN_BACKLOG  # a burst of clients connecting at once is queued, not reset
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT  # also bounds a trickled request head
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    # The only websocket (the usage feed) reads one small message: none is held whole
    # past this (hypercorn closes a larger one with 1009).
    config.websocket_max_message_size = WEBSOCKET_MESSAGE_BYTES
    install_protocol_errors()  # hypercorn's own 400/431 answers get OpenAI's body too
    install_shielded_recycle()  # an early answer must not leave a keep-alive socket deaf
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_node(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    grace: float = 10.0,
    reuse_port: bool = False,
    unix_socket: str | None = None,
    shutdown: trio.Event | None = None,
    admin_port: int | None = None,
    admin_host: str = "127.0.0.1",
    registry_snapshot: Path | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve one node until cancelled or until ``shutdown`` is set (then drain and return).

    ``unix_socket``, if given, is served too (after the TCP address, which stays the URL
    passed to ``task_status.started``): with ``reuse_port`` several nodes share the TCP
    port, and a supervisor probes each node's health on its own socket instead.
    ``admin_port``, if given, serves the admin API (tokenguard/api/admin.py) on
    ``admin_host:admin_port``; ConfigError (before anything starts) for a non-loopback
    ``admin_host`` without a long enough admin token. ``registry_snapshot``, if given,
    is the file the node keeps its view of the key registry in (tokenguard/limiting/snapshot.py)
    and starts from when the store cannot be reached.

    One straight sequence, over 60 lines on purpose: its nested blocks are the node's
    lifetimes (the store outlives the keyring, which outlives both servers), read in
    the order they start and end.
    """
    if admin_port is not None:
        check_admin_bind(admin_host, settings)
    if shutdown is None:
        shutdown = trio.Event()
    # Two sockets per relayed stream: the soft limit most processes start with is too few.
    raise_open_files_limit()
    # Load the default encoding before taking traffic, so no request pays ~0.4 s for it.
    await trio.to_thread.run_sync(preload, ("o200k_base",))
    # Behind deadlines, a breaker and the failure policy (tokenguard/store/guarded.py): a
    # node starts, and keeps serving, while its store is down.
    async with open_store(guarded_store(settings)) as store:
        # The live keys and tiers, shared by the API and the admin API. When the store
        # lost its data, the keyring writes the registry back and has the guarded store
        # write this node's windows back.
        keyring = Keyring(
            settings,
            store,
            snapshot=registry_snapshot,
            on_store_loss=store.restore_windows if isinstance(store, GuardedStore) else None,
        )
        app = create_app(settings, store, shutdown=shutdown, keyring=keyring)
        config = hypercorn_config(
            host, port, grace=grace, reuse_port=reuse_port, unix_socket=unix_socket
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(keyring.run)
            async with trio.open_nursery() as servers:
                binds = await servers.start(_serve, app, config, shutdown)
                url = binds[0]
                log.info("node %d listening on %s (store %s)", settings.node_id, url, store.url)
                _warn_if_metrics_open(settings, host, url)
                if admin_port is not None:
                    admin_app = create_admin_app(
                        settings, store, keyring, app.extensions["tokenguard"].limiter
                    )
                    admin_config = hypercorn_config(admin_host, admin_port, grace=grace)
                    await _serve_admin(servers, admin_app, admin_config, shutdown, settings)
                task_status.started(url)
            keyring.stop()  # both servers have drained


def _warn_if_metrics_open(settings: Settings, host: str, url: str) -> None:
    """Warn when ``GET /metrics`` needs no token on an address other machines reach."""
    if settings.metrics.token_digest is None and not is_loopback(host):
        log.warning(
            "GET /metrics (key names, usage) is open to anyone who can reach "
            "%s: set [metrics] token to require one (docs/metrics.md)",
            url,
        )


async def _serve_admin(
    servers: trio.Nursery,
    admin_app: object,
    admin_config: Config,
    shutdown: trio.Event,
    settings: Settings,
) -> None:
    """Start the admin API's server in ``servers``; log where, and whether it is on."""
    admin_binds = await servers.start(_serve, admin_app, admin_config, shutdown)
    state = "on" if settings.feed.admin_digest else "OFF (no admin token)"
    log.info("node %d admin API on %s: %s", settings.node_id, admin_binds[0], state)


async def _serve(
    app: object,
    config: Config,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]

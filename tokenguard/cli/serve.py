"""``tokenguard serve``: one node in this process, or a supervised cluster of them.

``tokenguard serve`` runs one node in this process; with ``--nodes N`` (N > 1) it runs
the supervisor (:mod:`tokenguard.cluster.supervisor`), which starts N node processes and, unless
a store is given (``--store`` or a config ``[store] url`` other than ``memory://``), a
private Redis for them to share. It prints a table of URLs once every node is healthy.

Exit status: 0 after a clean stop (Ctrl-C or SIGTERM); 1 when a node cannot listen or
reach its store, or the cluster could not be started (the message names the child and
quotes its log); 2 for a usage or config error (bad config, ``--store memory://`` with
several nodes, a state dir held by another supervisor, another user's or writable by
others, an unknown store scheme). Errors are one line each, never a traceback.

The store URL comes from ``--store``, else ``$TOKENGUARD_STORE_URL``, else the config's
``[store] url``; a password in it is shown as ``***`` in every line printed or logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
import trio

from tokenguard.api.admin import check_admin_bind
from tokenguard.cluster.children import HealthPolicy
from tokenguard.cluster.errors import StateDirBusy, StateDirUnsafe, SupervisorError
from tokenguard.cluster.metrics_server import serve_metrics, supervisor_registry
from tokenguard.cluster.redis_server import RedisBinaryNotFound
from tokenguard.cluster.state_dir import default_state_dir
from tokenguard.cluster.supervisor import STORE_URL_ENV, Supervisor, check_driver, cluster_store_url
from tokenguard.config.loading import demo_settings, load_settings
from tokenguard.config.settings import STORE_ERROR_POLICIES, ConfigError, Settings
from tokenguard.observe.logs import LOG_FORMATS, configure_logging
from tokenguard.store.window_store import StoreError, UnknownStoreScheme, redact_url, store_from_url

log = logging.getLogger("tokenguard.cli.serve")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """The ``serve`` subcommand and its arguments."""
    serve = sub.add_parser("serve", help="run one node, or a supervised cluster of nodes")
    _address_arguments(serve)
    _cluster_arguments(serve)
    _limiting_arguments(serve)
    _admin_and_observing_arguments(serve)
    _supervisor_arguments(serve)


def run_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``tokenguard serve``: a node in this process, or the supervisor of ``--nodes``."""
    in_supervisor = args.nodes > 1
    if args.metrics_port is not None and not in_supervisor:
        parser.error("--metrics-port needs --nodes > 1 (a node serves /metrics on its own port)")
    who = f"node-{args.node_id} " if args.supervised else ""
    configure_logging(args.log_format, node=None if in_supervisor else args.node_id, prefix=who)
    if in_supervisor:
        return _serve_cluster(args)
    return _serve_node(args)


def _address_arguments(serve: argparse.ArgumentParser) -> None:
    """The config, where node 0 listens, and the store."""
    serve.add_argument("--config", help="TOML config file (default: a built-in demo config)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=_port,
        default=8000,
        help="port of node 0; node i gets port + i (default 8000)",
    )
    serve.add_argument(
        "--store",
        help=f"window-store URL, overriding ${STORE_URL_ENV} and the config's [store] url "
        "(with --nodes > 1 and none given, an embedded redis-server is started); a URL with "
        f"a password is better given in ${STORE_URL_ENV}: a command line is visible to all",
    )


def _cluster_arguments(serve: argparse.ArgumentParser) -> None:
    """How ``--nodes`` run: state dir, snapshot, shared port, logs."""
    serve.add_argument("--nodes", type=_positive, default=1, help="node processes (default 1)")
    serve.add_argument(
        "--state-dir",
        help="with --nodes > 1: the embedded Redis's socket and append-only file, the lock, "
        "the logs and the registry snapshot (default: the user cache dir, e.g. "
        "~/.cache/tokenguard); yours, and writable by you only",
    )
    serve.add_argument(
        "--registry-snapshot",
        type=Path,
        help="keep this node's view of the key registry in this file (0600), and start "
        "from it when the store cannot be reached, so that keys revoked through the admin "
        "API stay refused (with --nodes > 1: STATE_DIR/registry.json by default)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="all nodes listen on --port itself, sharing it through SO_REUSEPORT",
    )
    serve.add_argument(
        "--log-to-stdout",
        action="store_true",
        help="with --nodes > 1: children log to this terminal instead of files in the state dir",
    )
    serve.add_argument(
        "--start-timeout",
        type=_seconds,
        default=HealthPolicy().start_timeout,
        help="with --nodes > 1: seconds a node (and the embedded Redis) may take to first "
        "answer its health probe before the cluster gives up (default 30; raise it on a "
        "machine busy with other work)",
    )


def _limiting_arguments(serve: argparse.ArgumentParser) -> None:
    """Draining on stop, limits off, the store-failure policy."""
    serve.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on stop (default 10)",
    )
    serve.add_argument(
        "--no-limits",
        action="store_true",
        help="admit everything without counting (for benchmarking the limiter's cost)",
    )
    serve.add_argument(
        "--on-store-error",
        choices=STORE_ERROR_POLICIES,
        help="when the shared store fails: local (default: each node limits alone, at 1/N "
        "of every limit), closed (503) or open (admit, counted); overrides the config's "
        "[store] on_store_error",
    )


def _admin_and_observing_arguments(serve: argparse.ArgumentParser) -> None:
    """The admin API, the log format, the supervisor's metrics."""
    serve.add_argument(
        "--admin-port",
        type=_port,
        help="serve the admin API (keys, tiers; docs/operations.md) on this port; node i "
        "of --nodes gets admin-port + i. Needs an admin token ([feed] admin_token or "
        "$TOKENGUARD_ADMIN_TOKEN): without one, its routes answer 403",
    )
    serve.add_argument(
        "--admin-host",
        default="127.0.0.1",
        help="address of the admin API (default 127.0.0.1; any other needs an admin token "
        "of 32+ bytes)",
    )
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="log lines as text (default) or one JSON object each; every request is one "
        "line (docs/operations.md)",
    )
    serve.add_argument(
        "--metrics-port",
        type=_port,
        help="with --nodes > 1: serve the supervisor's metrics (node restarts, up/down) "
        "at /metrics on this port of --host; each node serves its own /metrics "
        "(docs/metrics.md)",
    )


def _supervisor_arguments(serve: argparse.ArgumentParser) -> None:
    """Set by the supervisor on the node processes it runs (hidden)."""
    serve.add_argument("--node-id", type=int, default=0, help=argparse.SUPPRESS)
    # Set by the supervisor: how many nodes it runs (each node's share of a limit when
    # the store is down, policy local).
    serve.add_argument("--cluster-size", type=_positive, default=1, help=argparse.SUPPRESS)
    # Set by the supervisor on the node processes it runs.
    serve.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--health-socket", help=argparse.SUPPRESS)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config) if args.config else demo_settings()
    changes: dict[str, object] = {
        "node_id": args.node_id,
        "supervised_nodes": args.cluster_size,
    }
    if args.on_store_error:
        changes["on_store_error"] = args.on_store_error
    store_url = _store_url(args)
    if store_url:
        changes["store_url"] = store_url
    if args.no_limits:
        changes["limiting"] = False
    return attrs.evolve(settings, **changes)


def _store_url(args: argparse.Namespace) -> str | None:
    """``--store``, else ``$TOKENGUARD_STORE_URL`` (how the supervisor passes it: a
    password in it then shows on no command line), else ``None`` (the config's)."""
    return args.store or os.environ.get(STORE_URL_ENV, "").strip() or None


CLOCK_OFFSET_ENV = "TOKENGUARD_CLOCK_OFFSET_SECONDS"


def apply_clock_offset(environ: Mapping[str, str] = os.environ) -> float:
    """TEST ONLY: shift this process's wall clock by ``$TOKENGUARD_CLOCK_OFFSET_SECONDS``.

    Patches ``time.time`` and ``time.time_ns`` (code that bound them earlier with ``from
    time import time`` keeps the real clock), so a test can run a node whose clock is
    skewed and check that windows still agree: the Redis driver reads Redis's ``TIME``.
    Returns the offset (0.0 when unset); raises ``ValueError`` for a non-number.
    """
    text = environ.get(CLOCK_OFFSET_ENV, "").strip()
    if not text:
        return 0.0
    offset = float(text)
    real_time, real_time_ns = time.time, time.time_ns
    offset_ns = round(offset * 1e9)
    time.time = lambda: real_time() + offset
    time.time_ns = lambda: real_time_ns() + offset_ns
    log.warning(
        "%s=%g: this process's clock is shifted (a test-only setting)", CLOCK_OFFSET_ENV, offset
    )
    return offset


def _print_demo_banner(url: str) -> None:
    print("tokenguard: no --config given; running the built-in demo config:")
    print("  demo keys: sk-demo-free (3 RPM, 1000 input TPM, 300 output TPM)")
    print("             sk-demo-pro  (60 RPM, 20000 input TPM, 10000 output TPM)")
    print(f"  try: curl {url}/v1/chat/completions -H 'Authorization: Bearer sk-demo-free' \\")
    print("        -H 'Content-Type: application/json' \\")
    body = '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    print(f"        -d '{body}'")
    sys.stdout.flush()


async def _run_single(args: argparse.Namespace, settings: Settings) -> None:
    from tokenguard.cluster.node import serve_node

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    shutdown.set()
                    return

        nursery.start_soon(on_signals)
        url = await nursery.start(
            lambda task_status: serve_node(
                settings,
                host=args.host,
                port=args.port,
                grace=args.grace,
                reuse_port=args.reuse_port,
                unix_socket=args.health_socket,
                shutdown=shutdown,
                admin_port=args.admin_port,
                admin_host=args.admin_host,
                registry_snapshot=args.registry_snapshot,
                task_status=task_status,
            )
        )
        store = redact_url(settings.store_url)
        print(f"tokenguard node {settings.node_id} serving on {url} (store {store})")
        if not args.config and not args.supervised:
            _print_demo_banner(url)
        sys.stdout.flush()
        await shutdown.wait()
        # serve_node drains and returns; then stop the signal watcher with the rest.
    print("tokenguard: stopped")


def _serve_node(args: argparse.Namespace) -> int:
    """One node in this process: ``serve`` without ``--nodes``, or a supervised node."""
    try:
        apply_clock_offset()
    except ValueError as exc:
        print(f"tokenguard: {CLOCK_OFFSET_ENV}: {exc}", file=sys.stderr)
        return 2
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"tokenguard: config error: {exc}", file=sys.stderr)
        return 2
    try:
        store_from_url(settings.store_url)  # (parses only): a bad URL is a usage error
    except ValueError as exc:  # (its message shows no password)
        print(f"tokenguard: {exc}", file=sys.stderr)
        return 2
    status = 0
    try:
        trio.run(_run_single, args, settings)
    except* ConfigError as group:
        # serve_node's own checks before it starts anything (an admin API bind).
        for exc in _leaves(group):
            print(f"tokenguard: config error: {exc}", file=sys.stderr)
        status = 2
    except* UnknownStoreScheme as group:
        _print_errors(group)
        status = 2
    except* StoreError as group:
        for exc in _leaves(group):
            store = redact_url(settings.store_url)
            print(f"tokenguard: store {store} unavailable: {exc}", file=sys.stderr)
        status = 1
    except* OSError as group:
        # hypercorn's bind: a port in use, an address not on this host, no permission.
        for exc in _leaves(group):
            where = f"{args.host}:{args.port}"
            print(f"tokenguard: cannot listen on {where}: {exc}", file=sys.stderr)
        status = 1
    return status


def _cluster(args: argparse.Namespace) -> Supervisor:
    """The supervisor for ``serve --nodes N``; raises ConfigError, SupervisorError or
    UnknownStoreScheme for what can be checked before any process starts."""
    # Loaded, and the admin bind checked (as each node's serve_node does), here too: a
    # broken config fails once, now, as a usage error, not as N node processes' crashes.
    configured = load_settings(args.config) if args.config else demo_settings()
    if args.admin_port is not None:
        check_admin_bind(args.admin_host, configured)
    supervisor = Supervisor(
        nodes=args.nodes,
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        store_url=cluster_store_url(_store_url(args), configured.store_url),
        host=args.host,
        port=args.port,
        config=Path(args.config) if args.config else None,
        grace=args.grace,
        reuse_port=args.reuse_port,
        log_to_stdout=args.log_to_stdout,
        admin_port=args.admin_port,
        admin_host=args.admin_host,
        registry_snapshot=args.registry_snapshot,
        policy=HealthPolicy(start_timeout=args.start_timeout),
        node_args=(
            *(("--no-limits",) if args.no_limits else ()),
            *(("--on-store-error", args.on_store_error) if args.on_store_error else ()),
            *(("--log-format", args.log_format) if args.log_format != "text" else ()),
            "--cluster-size",
            str(args.nodes),
        ),
    )
    check_driver(supervisor.shared_store_url)
    return supervisor


def _print_table(supervisor: Supervisor, urls: list[str], args: argparse.Namespace) -> None:
    n = supervisor.nodes
    print(f"tokenguard: {n} nodes healthy after {supervisor.ready_seconds:.2f} s")
    rows: list[tuple[str, str]] = []
    if supervisor.reuse_port:
        rows.append((f"nodes 0-{n - 1}", f"{urls[0]}  (one port shared through SO_REUSEPORT)"))
    else:
        rows += [(f"node {i}", url) for i, url in enumerate(urls)]
    store = redact_url(supervisor.shared_store_url)
    redis = supervisor.redis_child
    if redis is not None and redis.process is not None:
        store += f"  (embedded redis-server, pid {redis.process.pid}, append-only)"
    rows.append(("store", store))
    if supervisor.admin_port is not None:
        host = supervisor.admin_host
        first, last = supervisor.admin_port, supervisor.admin_port + n - 1
        where = f"http://{f'[{host}]' if ':' in host else host}:{first}..{last}"
        rows.append(("admin", f"{where}  (node i on port + i)"))
    if args.metrics_port is not None:
        host = f"[{supervisor.host}]" if ":" in supervisor.host else supervisor.host
        rows.append(("metrics", f"http://{host}:{args.metrics_port}/metrics  (and each node's)"))
    rows.append(("config", str(supervisor.config) if supervisor.config else "built-in demo"))
    log_dir = supervisor.log_dir
    logs = "stdout" if log_dir is None else f"{log_dir}/  (node-<i>.log, redis.log)"
    rows.append(("logs", logs))
    rows.append(("state", str(supervisor.state_dir)))
    rows.append(("stop", f"Ctrl-C or SIGTERM: in-flight requests get {supervisor.grace:g} s"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if not args.config:
        _print_demo_banner(urls[0])
    sys.stdout.flush()


async def _run_cluster(args: argparse.Namespace, supervisor: Supervisor) -> None:
    async with trio.open_nursery() as nursery:
        run_scope = trio.CancelScope()

        async def on_signals(*, task_status: trio.TaskStatus[None]) -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()
                async for signum in signals:
                    if not run_scope.cancel_called:
                        log.info(
                            "%s: stopping nodes (in-flight requests get %g s), then Redis; "
                            "signal again to kill the nodes at once",
                            signal.Signals(signum).name,
                            supervisor.grace,
                        )
                        run_scope.cancel()
                    else:
                        log.warning("second signal: killing the nodes without draining")
                        supervisor.kill_nodes()

        await nursery.start(on_signals)
        with run_scope:
            async with trio.open_nursery() as inner:
                if args.metrics_port is not None:
                    # Bound before any child starts: a taken port fails at once.
                    await inner.start(_serve_supervisor_metrics, args, supervisor)
                urls = await inner.start(supervisor.run)
                _print_table(supervisor, urls, args)
        nursery.cancel_scope.cancel()
    print("tokenguard: stopped")
    sys.stdout.flush()


async def _serve_supervisor_metrics(
    args: argparse.Namespace,
    supervisor: Supervisor,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The supervisor's /metrics on ``--host:--metrics-port``, with the nodes' token."""
    configured = load_settings(args.config) if args.config else demo_settings()
    try:
        await serve_metrics(
            supervisor_registry(supervisor),
            args.host,
            args.metrics_port,
            token_digest=configured.metrics.token_digest,
            task_status=task_status,
        )
    except OSError as exc:
        raise SupervisorError(
            f"cannot serve metrics on {args.host}:{args.metrics_port}: {exc}"
        ) from exc


def _serve_cluster(args: argparse.Namespace) -> int:
    """``serve --nodes N`` (N > 1): the supervisor in this process."""
    try:
        supervisor = _cluster(args)
    except ConfigError as exc:
        print(f"tokenguard: config error: {exc}", file=sys.stderr)
        return 2
    except (SupervisorError, UnknownStoreScheme, ValueError) as exc:
        print(f"tokenguard: {exc}", file=sys.stderr)
        return 2
    status = 0
    try:
        trio.run(_run_cluster, args, supervisor)
    except* (StateDirBusy, StateDirUnsafe) as group:
        _print_errors(group)
        status = 2
    except* (SupervisorError, RedisBinaryNotFound) as group:
        _print_errors(group)
        status = 1
    return status


def _print_errors(group: BaseExceptionGroup) -> None:
    for exc in _leaves(group):
        print(f"tokenguard: {exc}", file=sys.stderr)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found

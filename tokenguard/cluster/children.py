"""The supervisor's children: one OS process each, kept running.

* :class:`ChildProcess`: one process, started from the calling (trio) thread so that
  :func:`die_with_parent` holds, waited for without blocking trio (a pidfd where the
  kernel has one), stopped with SIGTERM, a grace period, then SIGKILL; always reaped.
* :class:`SupervisedChild`: the restart loop of one :class:`ChildSpec` (an argv and a
  health probe): a child that exits, or fails :attr:`HealthPolicy.max_failed_probes`
  probes in a row (then it is SIGKILLed), is restarted after a :class:`Backoff` delay,
  and every restart is logged with the child's name, pid, exit status and reason.

On Linux every child gets a signal if the supervisor dies without cleaning up
(``kill -9``): :func:`die_with_parent`. This module knows processes, not HTTP apps.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import attrs
import trio

from tokenguard.cluster.errors import ChildStartError

# The supervisor's logger: a child's starts, restarts and stops are what it reports.
log = logging.getLogger("tokenguard.cluster.supervisor")


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


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that gives the child ``signum`` when the thread that forks it
    dies (``PR_SET_PDEATHSIG``; Linux only, ``None`` elsewhere): fork from the thread
    whose end should end the child, never from a worker thread that may exit first.
    A child whose parent died between the fork and the ``prctl`` exits at once."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolved before the fork: dlopen/dlsym in a forked child of a threaded process can
    # deadlock on a lock another thread held at fork time.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    signal_number = int(signum)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal_number, 0, 0, 0)
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
            preexec_fn=die_with_parent(),
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

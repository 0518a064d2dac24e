"""The die-with-parent hook (tokenguard/cluster/children.py) that the supervisor's
children and the tests' redis-servers share: a child never outlives the thread that
forked it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from tokenguard.cluster.children import die_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PDEATHSIG is Linux's")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_child_gets_the_chosen_signal_when_the_thread_that_forked_it_ends(
    signum: signal.Signals,
) -> None:
    started: list[subprocess.Popen[bytes]] = []

    def fork() -> None:
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        started.append(subprocess.Popen(argv, preexec_fn=die_with_parent(signum)))

    thread = threading.Thread(target=fork)
    thread.start()
    thread.join()  # the forking thread is gone: the child gets its signal
    (child,) = started
    try:
        assert child.wait(timeout=30) == -signum
    finally:
        child.kill()
        child.wait()


def test_no_hook_where_there_is_no_pdeathsig(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert die_with_parent() is None

"""The supervisor's state directory: one supervisor per directory, and only its owner's.

It holds the embedded Redis's socket and append-only file, the children's logs, the
lock, and the nodes' registry snapshot, so whoever can write there could add keys or
replace the store's data: :func:`hold_state_dir` refuses one another user owns, or that
its group or others may write, before touching anything in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import platformdirs

from tokenguard.cluster.errors import StateDirBusy, StateDirUnsafe


def default_state_dir() -> Path:
    """The per-user default: ``platformdirs.user_cache_dir("tokenguard")``."""
    return Path(platformdirs.user_cache_dir("tokenguard"))


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

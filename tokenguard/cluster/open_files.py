"""What a node needs from the kernel to hold thousands of connections: open files and a
listen backlog.

A relayed stream holds two sockets for its whole life (the client's and the upstream's),
so a node serving ``S`` streams at once needs about ``2 S`` open files, plus its store,
its logs and its listeners. Linux starts most processes with a soft limit of 1,024 open
files (ample for a short-request server, about 500 streams here) under a hard limit that
is usually far higher; past the soft limit ``accept`` fails with ``EMFILE`` and new
clients wait or are dropped.

Guarantees:

* :func:`raise_open_files_limit` raises this process's soft ``RLIMIT_NOFILE`` to
  :data:`WANTED_OPEN_FILES`, or to the hard limit when that is lower; it never lowers
  it. When the hard limit is below :data:`WANTED_OPEN_FILES` it logs a warning that says
  so, how many streams the limit allows, and how to raise it. It raises nothing: a
  kernel that refuses is logged, and the node runs with what it has.
* :data:`LISTEN_BACKLOG` is the accept queue a node asks for. hypercorn's default (100)
  overflows when a few hundred clients connect at once: the kernel then drops their
  handshakes or answers them with SYN cookies that fail, and those clients see their
  connections reset. Linux caps the queue at ``net.core.somaxconn`` (4,096 by default
  since 5.4).
"""

from __future__ import annotations

import logging
import resource

import attrs

log = logging.getLogger("tokenguard.cluster.node")

# 8,000 relayed streams (two sockets each) and room for the rest.
WANTED_OPEN_FILES = 16384
# Files a node holds besides its relayed streams' sockets: listeners, the store's
# connections, logs, the tokenizer's files, the runtime's own.
RESERVED_OPEN_FILES = 64
LISTEN_BACKLOG = 4096


@attrs.frozen
class OpenFiles:
    """The open-files limits before and after :func:`raise_open_files_limit`."""

    before: int
    soft: int
    hard: int

    @property
    def streams(self) -> int:
        """About how many relayed streams the soft limit allows at once."""
        return max(0, (self.soft - RESERVED_OPEN_FILES) // 2)


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> OpenFiles:
    """Raise the soft open-files limit toward ``wanted`` (see the module docstring)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    target = max(soft, ceiling) if soft != resource.RLIM_INFINITY else soft
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
            target = soft
    limits = OpenFiles(before=soft, soft=target, hard=hard)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        log.warning(
            "the open-files hard limit is %d (soft %d, was %d): this node can hold about "
            "%d streams at once; raise the hard limit to %d or more (ulimit -Hn, "
            "systemd LimitNOFILE=, docker --ulimit nofile=)",
            hard,
            limits.soft,
            soft,
            limits.streams,
            wanted,
        )
    elif target != soft:
        log.info("open-files limit raised from %d to %d", soft, target)
    return limits

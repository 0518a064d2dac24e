"""The event trace of one simulation: every event hashed, the last ones kept to print.

Each event is one line: the simulated time (to the microsecond), the node (``-`` for
the cluster), what happened and its details. The SHA-256 of every line in order is the
run's *trace hash*: two runs of a seed that interleave differently anywhere (an
admission, a refusal, a settlement, a fault) hash differently. Only the last ``keep``
lines are kept in memory, for the report of a violation, which shows those of the key
involved and the cluster's own (:func:`trimmed`).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence

DEFAULT_KEEP = 500


class Trace:
    """Events of one run, hashed in order; ``clock`` gives the simulated time."""

    def __init__(self, clock: Callable[[], float], keep: int = DEFAULT_KEEP) -> None:
        self._clock = clock
        self._hash = hashlib.sha256()
        self._last: deque[str] = deque(maxlen=keep)
        self.events = 0

    def add(self, node: int | None, what: str, details: str = "") -> None:
        where = "-" if node is None else str(node)
        line = f"{self._clock():.6f} {where} {what} {details}".rstrip()
        self._hash.update(line.encode())
        self._hash.update(b"\n")
        self._last.append(line)
        self.events += 1

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()

    def last(self, count: int | None = None) -> list[str]:
        lines = list(self._last)
        return lines if count is None else lines[-count:]


# Events about the whole cluster: always part of a trimmed trace.
CLUSTER_EVENTS = frozenset(
    {"config", "fault", "fault-end", "serving", "store-lost", "revoked", "created", "admin",
     "admin-failed", "admin-timeout", "traffic-end", "VIOLATION", "EXCEPTION"}
)  # fmt: skip


def trimmed(lines: Sequence[str], key: str | None, count: int) -> list[str]:
    """The last ``count`` of ``lines`` that matter for a violation about ``key``: that
    key's events and the cluster's; every event when no key is named."""
    if key is None:
        return list(lines[-count:])
    word = f" {key} "
    kept = [line for line in lines if word in f"{line} " or line.split(" ", 3)[2] in CLUSTER_EVENTS]
    return kept[-count:]

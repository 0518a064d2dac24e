"""The oracle's invariant on the usage feed: what a watcher gets, against what was decided.

* **feed**: the usage-feed events a watcher gets (through the store's publish/subscribe,
  at most once) come from each node in the order it made them, never twice (a node's
  count starts again when it restarts), and never outnumber the admissions, refusals
  and settlements that node made for that key.

:class:`FeedInvariant` is told every decision a node made (by
:class:`bench.simulate.oracle.Oracle`) and every event a watcher took; a violation is
reported through the ``fail`` callable it is given, never raised.
"""

from __future__ import annotations

import json

import trio

from bench.simulate.counter_invariants import Fail
from bench.simulate.trace import Trace

# The event types that count decisions, and the decision each counts.
COUNTED = {"admitted": "200", "rejected": "429", "settled": "settled"}


class FeedInvariant:
    """Decisions made per (node, key, kind), events received of each, the last event's
    seq per node and when it came, and each node's last restart."""

    def __init__(self, trace: Trace, fail: Fail) -> None:
        self.trace = trace
        self.fail = fail
        self._decided: dict[tuple[int, str, str], int] = {}
        self._received: dict[tuple[int, str, str], int] = {}
        self._feed_seq: dict[int, tuple[int, float]] = {}
        self._restarted: dict[int, float] = {}

    def restarted(self, node_index: int) -> None:
        """Node ``node_index`` (re)started: its event count starts again."""
        self._restarted[node_index] = trio.current_time()

    def decided(self, node_index: int, key: str, kind: str) -> None:
        """Node ``node_index`` made a decision of ``kind`` (``200``, ``429``, another
        status, ``settled``) for ``key``."""
        decided = (node_index, key, kind)
        self._decided[decided] = self._decided.get(decided, 0) + 1

    def event(self, node_index: int, body: str) -> None:
        """A feed watcher on node ``node_index`` took this event."""
        event = json.loads(body)
        kind = event["type"]
        if kind == "snapshot":  # made by the watcher's own node, not published
            return
        source, seq, key = event["node"], event["seq"], event["key"]
        now = trio.current_time()
        self.trace.add(node_index, "feed", f"{kind} from {source} seq {seq} {key}")
        last = self._feed_seq.get(source)
        if last is not None and seq <= last[0] and self._restarted.get(source, -1) < last[1]:
            self.fail(
                "feed",
                f"node {source}'s event seq {seq} came after its seq {last[0]} (out of "
                "order, or twice)",
                key,
            )
        self._feed_seq[source] = (seq, now)
        counted = COUNTED.get(kind)
        if counted is None:
            return
        received = (source, key, counted)
        self._received[received] = self._received.get(received, 0) + 1
        if self._received[received] > self._decided.get(received, 0):
            self.fail(
                "feed",
                f"{self._received[received]} {kind} events of node {source} for {key}, "
                f"which made {self._decided.get(received, 0)} such decisions",
                key,
            )

"""Remembered token counts: chat clients resend a conversation's history, system
prompt included, on every turn, so most of a long prompt has been counted before.

Counts of texts of :data:`CACHED_MIN_CHARS` or more are kept in :data:`COUNT_CACHE`, the
process's :class:`CountCache`, used by every count of :mod:`tokenguard.counting`. The
count is the same either way; only the time differs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import tiktoken

# Texts at least this long have their counts remembered; a shorter one costs less to
# count (~50 ns per character) than to look up (its hash, a dict, a lock).
CACHED_MIN_CHARS = 256
# Counts remembered per process: a key of three and an int each, ~250 bytes with the
# dict's bookkeeping, so ~4 MB at most.
CACHED_COUNTS = 16_384


class CountCache:
    """The token counts of texts seen recently, by encoding and a fingerprint of the
    text (not the text itself: memory stays bounded whatever the texts' size): its
    length and Python's own hash of it, SipHash with a key random per process, which
    a ``str`` computes once and keeps (so no one can make two texts collide on
    purpose).

    Bounded to ``entries`` (the least recently used count goes first) and safe to use
    from several threads (large prompts are counted in worker threads). ``enabled``
    False counts every text afresh (benchmarks compare both). ``hits``/``misses``
    count lookups. Two texts of one length and one 64-bit hash would share a count:
    about one chance in 10^15 per lookup with the cache full.
    """

    def __init__(self, entries: int = CACHED_COUNTS) -> None:
        self.entries = entries
        self.enabled = True
        self.hits = 0
        self.misses = 0
        self._counts: OrderedDict[tuple[str, int, int], int] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._counts)

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
            self.hits = self.misses = 0

    def count(self, encoding: tiktoken.Encoding, text: str) -> int:
        """The number of tokens ``text`` encodes to, as ordinary text (special-token
        spellings are plain text: see :func:`tokenguard.counting.text.count_text`)."""
        if not self.enabled or len(text) < CACHED_MIN_CHARS:
            return len(encoding.encode_ordinary(text))
        key = (encoding.name, hash(text), len(text))
        with self._lock:
            found = self._counts.get(key)
            if found is not None:
                self._counts.move_to_end(key)
                self.hits += 1
                return found
        counted = len(encoding.encode_ordinary(text))
        with self._lock:
            self._counts[key] = counted
            self.misses += 1
            if len(self._counts) > self.entries:
                self._counts.popitem(last=False)
        return counted


COUNT_CACHE = CountCache()
"""The process's :class:`CountCache`, used by every count of :mod:`tokenguard.counting`."""

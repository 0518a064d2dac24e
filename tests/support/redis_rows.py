"""The row the Redis driver's tests admit, and their hang guard.

:func:`a_row` is one row of key ``key:a`` (a 60 s window of 1 s buckets);
:data:`TEST_TIMEOUT` bounds each test's waits (``trio.fail_after``), never its speed.
"""

from __future__ import annotations

from tokenguard.store.rows import Row

TEST_TIMEOUT = 15.0


def a_row(limit: int = 100, amount: int = 1, dimension: str = "requests") -> Row:
    return Row("key:a", dimension, window_ms=60_000, bucket_ms=1_000, limit=limit, amount=amount)

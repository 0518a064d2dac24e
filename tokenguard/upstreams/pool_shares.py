"""Each key's share of a node's upstream connections.

Proxy mode sends every key's requests through one pool of ``[upstream]
max_connections`` connections per node. Without a bound per key, one key's requests
(a burst of long generations, or streams whose clients stopped reading) could hold every
connection, and every other key would wait for the pool and fail. :class:`PoolShares`
lets each key hold at most ``slots`` connections at once (``[upstream] key_share`` of the
pool, at least one): a key past its share waits for one of its own requests to end, never
for another key's.

Guarantees:

* At most ``slots`` :class:`Slot` objects are held per key at once; a request waits for
  its key's slot at most ``within`` seconds (:class:`ShareTimeout` then), in arrival
  order (``trio.Semaphore`` is fair).
* :meth:`Slot.release` is idempotent: the paths that end a request (a whole answer, a
  stream's close, an error) may each call it.
* Memory is per key in use: a key's semaphore is dropped when no request holds or waits
  for one of its slots.
"""

from __future__ import annotations

import attrs
import trio


class ShareTimeout(Exception):
    """A key's share of the pool stayed full for the whole wait."""


@attrs.define(eq=False)
class _KeySlots:
    semaphore: trio.Semaphore
    users: int = 0  # requests holding or waiting for a slot


@attrs.define(eq=False)
class Slot:
    """One connection's worth of a key's share, held until :meth:`release`."""

    shares: PoolShares
    key: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.shares._release(self.key)


class PoolShares:
    """Per key, at most ``slots`` upstream requests at once (see the module docstring)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self._keys: dict[str, _KeySlots] = {}

    def held(self, key: str) -> int:
        """Slots ``key`` holds now."""
        entry = self._keys.get(key)
        return 0 if entry is None else self.slots - entry.semaphore.value

    async def acquire(self, key: str, within: float) -> Slot:
        """A slot of ``key``'s share; :class:`ShareTimeout` after ``within`` seconds."""
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _KeySlots(trio.Semaphore(self.slots))
        entry.users += 1
        acquired = False
        try:
            with trio.move_on_after(within):
                await entry.semaphore.acquire()
                acquired = True
        finally:
            if not acquired:  # timed out, or cancelled
                self._leave(key, entry)
        if not acquired:
            raise ShareTimeout(f"key {key}: no slot of {self.slots} freed within {within:g} s")
        return Slot(self, key)

    def _release(self, key: str) -> None:
        entry = self._keys[key]
        entry.semaphore.release()
        self._leave(key, entry)

    def _leave(self, key: str, entry: _KeySlots) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._keys[key]

"""What the node remembers of Responses API answers, so later requests can refer to them.

Two stores, for two needs:

* :class:`ResponseRecords`: each response's token totals (input, output) and model,
  by key and id, in the window store (:meth:`~tokenguard.store.window_store.WindowStore.record_put`)
  for :data:`RECORD_TTL_SECONDS`, so ANY node knows what a ``previous_response_id``
  brings in: a response made on node 0 is charged correctly on node 2. A key reads
  only its own records.
* :class:`StoredResponses`: the mock's own copy of each whole Response object and the
  input it answered, node-local and bounded (:data:`KEPT_PER_KEY` per key,
  :data:`KEPT_CHARS` in all; the oldest go first), which serves ``GET``/``DELETE
  /v1/responses/{id}`` and ``/input_items`` on the node that made it. Shared totals,
  local bodies: the totals are what the limiter needs everywhere; the bodies are the
  mock's demonstration, and shipping them through the store would put client data
  of unbounded size there.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict

import attrs

from tokenguard.api.dialect import AnswerTotals
from tokenguard.observe.log_throttle import LogThrottle
from tokenguard.store.window_store import StoreError, WindowStore

log = logging.getLogger("tokenguard.api.response_store")

RECORD_TTL_SECONDS = 30 * 24 * 3600.0  # as long as OpenAI keeps a stored response
MAX_RESPONSE_ID_CHARS = 128
KEPT_PER_KEY = 64
KEPT_CHARS = 32 * 1024 * 1024


@attrs.frozen
class RecordedTotals:
    """A response's totals as the store keeps them."""

    model: str
    input_tokens: int
    output_tokens: int


def _record_name(key_id: str, response_id: str) -> str:
    return f"responses/{key_id}/{response_id}"


class ResponseRecords:
    """Responses' token totals in the window store, shared by every node (see the module
    docstring)."""

    def __init__(self, store: WindowStore) -> None:
        self.store = store
        self._failures = LogThrottle()

    async def put(self, key_id: str, totals: AnswerTotals) -> None:
        """Keep ``totals`` for the key; a store failure is logged (throttled), not
        raised: the answer is made already, and a follow-up then finds no record."""
        if not totals.id or len(totals.id) > MAX_RESPONSE_ID_CHARS:
            return
        value = json.dumps(
            {"model": totals.model, "input": totals.input_tokens, "output": totals.output_tokens}
        )
        try:
            await self.store.record_put(_record_name(key_id, totals.id), value, RECORD_TTL_SECONDS)
        except (StoreError, ValueError) as exc:
            held = self._failures.ready()
            if held is not None:
                log.warning("response %s not recorded: %s (%d more since)", totals.id, exc, held)

    async def get(self, key_id: str, response_id: str) -> RecordedTotals | None:
        """The key's response ``response_id``'s totals, ``None`` when unknown (never
        made by this key, expired, or not an id). Raises :class:`StoreError`."""
        if not response_id or len(response_id) > MAX_RESPONSE_ID_CHARS:
            return None
        value = await self.store.record_get(_record_name(key_id, response_id))
        if value is None:
            return None
        try:
            record = json.loads(value)
            return RecordedTotals(str(record["model"]), int(record["input"]), int(record["output"]))
        except (ValueError, KeyError, TypeError):
            return None


class StoredResponses:
    """The mock's whole responses, per key, on this node (see the module docstring)."""

    def __init__(self, per_key: int = KEPT_PER_KEY, chars: int = KEPT_CHARS) -> None:
        self.per_key = per_key
        self.chars = chars
        # key id -> response id -> (answer, its size in characters), oldest first
        self._kept: dict[str, OrderedDict[str, tuple[AnswerTotals, int]]] = {}
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()  # every key's
        self._size = 0

    def __len__(self) -> int:
        return len(self._order)

    def put(self, key_id: str, totals: AnswerTotals) -> None:
        """Keep the answer (its ``response`` and ``items``); the oldest go past a bound."""
        if totals.response is None:
            return
        size = len(json.dumps([totals.response, totals.items], default=str))
        if size > self.chars:
            return
        self.delete(key_id, totals.id)
        kept = self._kept.setdefault(key_id, OrderedDict())
        while len(kept) >= self.per_key:
            self.delete(key_id, next(iter(kept)))
        while self._order and self._size + size > self.chars:
            self.delete(*next(iter(self._order)))
        kept = self._kept.setdefault(key_id, OrderedDict())
        kept[totals.id] = (totals, size)
        self._order[(key_id, totals.id)] = None
        self._size += size

    def get(self, key_id: str, response_id: str) -> AnswerTotals | None:
        entry = self._kept.get(key_id, {}).get(response_id)
        return None if entry is None else entry[0]

    def delete(self, key_id: str, response_id: str) -> bool:
        """Forget one; whether it was kept."""
        kept = self._kept.get(key_id)
        entry = kept.pop(response_id, None) if kept is not None else None
        if entry is None:
            return False
        self._size -= entry[1]
        self._order.pop((key_id, response_id), None)
        if not kept:
            del self._kept[key_id]
        return True

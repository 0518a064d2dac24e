"""Known bugs the simulator must find: ``--plant NAME`` switches one on for the run.

A plant is a list of attribute patches on product modules (named in
:data:`bench.simulate.product.MODULES`), applied around each simulation and undone
after it: the product has no flag for them. Adding one is one entry in :data:`PLANTS`.
Each one's description says which invariant should catch it.

"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from bench.simulate.product import MODULES, Decision


@attrs.frozen
class Patch:
    """Set ``attribute`` (``Class.name`` or ``name``) of product module ``module``."""

    module: str
    attribute: str
    value: Any


@attrs.frozen
class Plant:
    """A known bug: what it is, the patches that make it, and the invariants that
    should catch it (a violation of another one is a finding of its own)."""

    description: str
    patches: tuple[Patch, ...]
    caught_by: frozenset[str]


async def _no_watchdog(self: Any) -> None:
    await trio.sleep_forever()


def _forget_refunds(
    self: Any,
    decision: Decision,
    output_tokens: int,
    input_tokens: int | None,
    cached_input_tokens: int = 0,
) -> bool:
    # Says it took a refund, and drops it.
    return bool(MODULES["settler"].is_refund(decision, output_tokens, input_tokens))


def _whole_limit(self: Any, limit: int) -> int:
    return limit


async def _adopt_without_writing(self: Any, records: Any) -> bool:
    # Seeds and adopts as usual, but never writes the marker.
    self.marker = records.get(MODULES["keyring"].MARKER)
    return True


PLANTS: dict[str, Plant] = {
    "no-deadline": Plant(
        "store calls have no deadline (no cap, no watchdog): a hung store holds every "
        "request until it answers; caught by `deadline`",
        (
            Patch("deadlines", "MAX_WAIT_FACTOR", math.inf),
            Patch("resilience", "GuardedStore._watchdog", _no_watchdog),
        ),
        frozenset({"deadline"}),
    ),
    "no-refund": Plant(
        "the settler accepts refunds and never settles them; caught by `settled-once`",
        (Patch("settler", "Settler.defer", _forget_refunds),),
        frozenset({"settled-once"}),
    ),
    "full-fallback": Plant(
        "the local fallback admits against the whole limit instead of the node's share; "
        "caught by `local-share` / `over-admission`",
        (Patch("resilience", "GuardedStore.share", _whole_limit),),
        frozenset({"local-share", "over-admission"}),
    ),
    "no-marker": Plant(
        "the registry is seeded without its marker, so a store that lost its data is not "
        "told from one never written: config keys refused; caught by `unknown-key`",
        (Patch("keyring", "Keyring._adopt_marker", _adopt_without_writing),),
        frozenset({"unknown-key"}),
    ),
}


@contextmanager
def planted(name: str | None) -> Iterator[None]:
    """Apply the plant ``name`` (``None``: none) for the duration of the ``with``."""
    if name is None:
        yield
        return
    plant = PLANTS[name]
    undo: list[tuple[Any, str, Any]] = []
    try:
        for patch in plant.patches:
            target: Any = MODULES[patch.module]
            *path, attribute = patch.attribute.split(".")
            for part in path:
                target = getattr(target, part)
            undo.append((target, attribute, getattr(target, attribute)))
            setattr(target, attribute, patch.value)
        yield
    finally:
        for target, attribute, value in reversed(undo):
            setattr(target, attribute, value)

"""Every name the simulation takes from tokenguard and its drivers, imported here only.

The simulation runs the product's own parts (the guarded store, the keyring, the
limiter and settler of the node's :class:`Gateway`, the memory driver); the other
modules of this package import them from here, so moving a product module elsewhere
is a change to this file alone. The planted bugs (:mod:`bench.simulate.plants`) name
the modules they patch through :data:`MODULES`.
"""

from __future__ import annotations

from drivers import memory as memory_driver
from drivers.memory import MemoryStore
from tokenguard.api.dialect import OPENAI
from tokenguard.api.dialects.chat import ChatDialect
from tokenguard.api.gateway import Gateway
from tokenguard.config.loading import parse_settings
from tokenguard.config.settings import Settings
from tokenguard.errors import APIError
from tokenguard.limiting import keyring as keyring_module
from tokenguard.limiting import settler as settler_module
from tokenguard.limiting.keyring import POLL_SECONDS, Keyring
from tokenguard.limiting.limiter import TEMPLATE_CACHE, Cost, Decision
from tokenguard.limiting.registry import KEY, TIER, KeyRecord, KeyringError
from tokenguard.limiting.settler import Settler
from tokenguard.model import ApiKey, digest_of, partition_of
from tokenguard.observe.feed import OUTGOING_LIMIT
from tokenguard.observe.subscriber import Viewer
from tokenguard.store import deadlines as deadlines_module
from tokenguard.store import guarded as resilience_module
from tokenguard.store.deadlines import MAX_WAIT_FACTOR
from tokenguard.store.guarded import GuardedStore, UncheckedReservation
from tokenguard.store.leases import HeldLeases
from tokenguard.store.local_windows import SEEN_LIMIT, LocalReservation, node_share
from tokenguard.store.rows import (
    CONCURRENT,
    NOT_RESERVED,
    Admission,
    Lease,
    Reservation,
    Row,
    RowState,
)
from tokenguard.store.window_store import (
    ANYTHING,
    Registry,
    RegistryExpect,
    StoreError,
    WindowStore,
)

MODULES = {
    "resilience": resilience_module,
    "deadlines": deadlines_module,
    "settler": settler_module,
    "keyring": keyring_module,
    "memory": memory_driver,
}
"""The product modules a planted bug may patch, by a short name."""

__all__ = [
    "ANYTHING",
    "OPENAI",
    "APIError",
    "ChatDialect",
    "ApiKey",
    "Admission",
    "CONCURRENT",
    "Cost",
    "Decision",
    "Gateway",
    "GuardedStore",
    "HeldLeases",
    "KEY",
    "KeyRecord",
    "Keyring",
    "KeyringError",
    "Lease",
    "LocalReservation",
    "MAX_WAIT_FACTOR",
    "MODULES",
    "MemoryStore",
    "NOT_RESERVED",
    "OUTGOING_LIMIT",
    "POLL_SECONDS",
    "Registry",
    "RegistryExpect",
    "Reservation",
    "Row",
    "RowState",
    "SEEN_LIMIT",
    "Settings",
    "Settler",
    "StoreError",
    "TEMPLATE_CACHE",
    "TIER",
    "UncheckedReservation",
    "Viewer",
    "WindowStore",
    "digest_of",
    "node_share",
    "parse_settings",
    "partition_of",
]

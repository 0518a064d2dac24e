"""The driver's Lua scripts (package data in ``lua/``, loaded once, called by SHA), the
keys they touch, and the packing of their arguments and replies."""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence
from pathlib import Path

import attrs

from tokenguard.store.rows import Row

KEY_PREFIX = "tg"


@attrs.frozen
class LuaScript:
    """One of the driver's scripts, with the SHA1 Redis knows it by."""

    name: str
    source: str
    sha: str = attrs.field(init=False)
    sha_bytes: bytes = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        sha = hashlib.sha1(self.source.encode()).hexdigest()
        object.__setattr__(self, "sha", sha)
        object.__setattr__(self, "sha_bytes", sha.encode())

    @classmethod
    def packaged(cls, name: str) -> LuaScript:
        """``lua/counter.lua`` (the shared counter functions) then
        ``lua/<name>.lua``, as one script: package data beside this module."""
        # Beside this very file (not resources.files("drivers"): a tests/drivers
        # directory on sys.path could make "drivers" a namespace package).
        here = Path(__file__).parent / "lua"
        source = "".join((here / f"{part}.lua").read_text("utf-8") for part in ("counter", name))
        return cls(name=name, source=source)


ADMIT = LuaScript.packaged("admit")
SETTLE = LuaScript.packaged("settle")
USAGE = LuaScript.packaged("usage")
RENEW = LuaScript.packaged("renew")
SCRIPTS = (ADMIT, SETTLE, USAGE, RENEW)
# The registry (API keys, tiers): one hash and its version counter under one hash tag,
# so each script touches one slot. Rare calls, sent with EVAL off the pipelines.
REGISTRY_RECORDS = f"{KEY_PREFIX}:{{registry}}:records"
REGISTRY_VERSION = f"{KEY_PREFIX}:{{registry}}:version"
REGISTRY_PUT = (Path(__file__).parent / "lua" / "registry_put.lua").read_text("utf-8")
REGISTRY_LOAD = (Path(__file__).parent / "lua" / "registry_load.lua").read_text("utf-8")
# The admission queue's ticket lines: rare calls (a request that waits), sent like the
# registry's; a line's three keys are under its partition's hash tag.
TICKETS = (Path(__file__).parent / "lua" / "tickets.lua").read_text("utf-8")


def ticket_keys(partition: str, line: str) -> tuple[str, str, str, str, str]:
    """A ticket line's keys: ``tg:{<partition>}:line:<line>:`` then ``held``,
    ``expiry:0`` and ``expiry:1`` (its tickets' expiries by rank), ``seq`` and ``run``
    (see ``lua/tickets.lua``)."""
    prefix = f"{key_prefix(partition)}line:{line}:"
    return (
        f"{prefix}held",
        f"{prefix}expiry:0",
        f"{prefix}expiry:1",
        f"{prefix}seq",
        f"{prefix}run",
    )


def holder_key(partition: str, holder: str) -> str:
    """The tickets one holder (a key id) has in the lines of ``partition``:
    ``tg:{<partition>}:holder:<holder>`` (see ``lua/tickets.lua``)."""
    return f"{key_prefix(partition)}holder:{holder}"


def record_key(name: str) -> str:
    """The Redis key of a record (``record_put``): ``tg:record:{<name>}``. One key per
    record, each its own hash tag: records spread over a cluster's slots."""
    return f"{KEY_PREFIX}:record:{{{name}}}"


def key_name(partition: str, row: Row) -> str:
    """The Redis key of a row's counter: ``tg:{<partition>}:<scope>:<dim>:<window>:<bucket>``
    (a hash, see ``drivers/counter.lua``), or of a lease row's set of leases:
    ``tg:{<partition>}:<scope>:concurrent``.

    The partition is the hash tag, so all of a partition's keys share one cluster slot.
    """
    return key_prefix(partition) + row.counter


def key_prefix(partition: str) -> str:
    """What every key of a partition starts with, ``tg:{<partition>}:``: a row's key
    is this then its ``counter``. Raises ``ValueError`` for an empty partition."""
    if not partition:
        # "{}" is no hash tag at all: the keys of one admission would spread over slots.
        raise ValueError("the partition must not be empty")
    return f"{KEY_PREFIX}:{{{partition}}}:"


@functools.cache
def _packer(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}q")


def _pack(ints: Sequence[int]) -> bytes:
    """The scripts' arguments: little-endian 64-bit integers (Lua's struct 'i8'),
    unpacked by Redis in one call rather than parsed word by word."""
    return _packer(len(ints)).pack(*ints)


def _unpack(reply: bytes) -> tuple[int, ...]:
    """A script's packed reply (see ``drivers/counter.lua``)."""
    return _packer(len(reply) // 8).unpack(reply)

"""The live view of API keys and tiers: held in the store's registry, seeded from the
config, the same on every node within a second of any change, and never lost with the
store's data.

The records, and which version of one wins, are :mod:`tokenguard.limiting.registry`'s.

Teams stay in the config only (``[teams.NAME]``): a key may name any configured team.

**Config and store.** At start each node seeds the registry from its config: a config
tier or key absent from the store is written; one the store has *from the config*
(``source = "config"``) is overwritten by the config's version (so a config edit takes
effect on restart), and one written by the config earlier but no longer in it is
removed. A record changed through the admin API (``source = "admin"``: created,
changed, revoked) is never touched by the config again: after an admin change the
store wins. Then it adopts the store's marker, or writes one if there is none. Every
write is a compare-and-set, so nodes seeding at once, or an admin call racing a seed,
never lose a write.

**Propagation.** :meth:`Keyring.run` polls the registry's version and its marker every
``poll_seconds`` (0.25 s: a ``GET`` and an ``HGET`` on Redis) and reloads on a change,
so a change made through any node applies on every node within a second, whatever
happened to pub/sub connections meanwhile; a write through this node applies here at
once. When the store cannot be read the node keeps its last view.

**Store loss.** A registry whose marker is gone (a Redis restarted without persistence,
``FLUSHALL``, a failover to a replica that never got it, eviction) or is another one
than this node adopted (another node found it gone first and wrote its own view back; it
may be at the very version number this node last saw) is never applied as it is. The
node writes its last view back: every record the store lacks or holds an older version
of (:func:`~tokenguard.limiting.registry.newer`: an admin record over the config's, then
the later ``updated_at``; a tombstone wins a tie, so a revoked key is never brought
back), then the marker (or adopts the one another node wrote meanwhile), each a
compare-and-set, and only then reloads. It also calls ``on_store_loss`` once (the node's
guarded store then writes its local windows back: tokenguard/store/guarded.py). Config
keys are thus never refused because the store forgot them, and admin-made keys and
revocations survive as long as one node, or the snapshot, remembers them.

**Snapshot.** With ``snapshot`` (a path), the node writes every view it loads from the
store to that file (tokenguard/limiting/snapshot.py: atomic, 0600, digests only) and, at
start, builds its first view from the config and that file: the snapshot's admin records
and tombstones win over the config's, as in the store. A node that starts while the
store is down thus refuses a key revoked earlier. What can still be lost: an admin
change made while every node that saw it, and the snapshot, are gone together.

**Revocation.** A revoked key is simply absent from the view: it is refused exactly
like a key that never existed. :meth:`Keyring.watching` gives an event set when a
digest stops being valid, which the usage feed uses to close that key's websockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from tokenguard.config.settings import Settings
from tokenguard.limiting.registry import (
    KEY,
    MARKER,
    META,
    TIER,
    AlreadyExists,
    Conflict,
    KeyRecord,
    Marker,
    NotFound,
    TierRecord,
    View,
    build_view,
    check_key,
    check_name,
    check_tier,
    config_records,
    epoch_of,
    from_config,
    initial_records,
    patched,
    replaces,
)
from tokenguard.limiting.snapshot import Snapshot, SnapshotError, read_snapshot, write_snapshot
from tokenguard.model import ApiKey, Limits
from tokenguard.store.window_store import Registry, StoreError, WindowStore

# Re-exported for tokenguard/api/admin.py, which still imports them from here; their
# home is tokenguard.limiting.registry.
from tokenguard.limiting.registry import KeyringError, table_of  # noqa: F401  isort: skip

log = logging.getLogger("tokenguard.limiting.keyring")

POLL_SECONDS = 0.25
# One registry call from the poll loop or the seeding may take this long.
STORE_WAIT = 1.0
# At start, the node serves once the registry is loaded, or after this long (on the
# config's view, until the store answers).
STARTUP_WAIT = 2.0
# An admin write retries its compare-and-set this many times against fresh reads.
WRITE_ATTEMPTS = 5


class Keyring:
    """One node's live keys and tiers (see the module docstring).

    Before :meth:`run` has read the store (or with a store that keeps no registry) the
    view is the config's, with the ``snapshot``'s admin records and tombstones over it.
    Lookups never await and never fail. ``on_store_loss`` is called (no arguments, no
    await) once each time the registry is found lost or written anew by another node.
    """

    def __init__(
        self,
        settings: Settings,
        store: WindowStore,
        *,
        poll_seconds: float = POLL_SECONDS,
        snapshot: Path | None = None,
        on_store_loss: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.poll_seconds = poll_seconds
        self.snapshot = snapshot
        self.on_store_loss = on_store_loss
        saved = self._read_snapshot()
        self.view = build_view(settings, None, initial_records(settings, saved))
        self.marker: str | None = None  # the registry's marker this node adopted
        self.seeded = False
        self.reloads = 0  # views built from the store
        self.restores = 0  # registries found lost (or written anew) and written back
        self._restoring = False  # one found so, not yet written back
        self._lock = trio.Lock()  # one reconciliation with the store at a time
        self._watchers: dict[str, tuple[trio.Event, int]] = {}
        self._cancel = trio.CancelScope()
        self._failing = False
        self._snapshot_due = trio.Event()
        self._snapshot_failing = False

    def _read_snapshot(self) -> Registry:
        if self.snapshot is None:
            return {}
        try:
            saved = read_snapshot(self.snapshot)
        except (SnapshotError, OSError) as exc:
            log.error("keyring: registry snapshot not used (the config's view only): %s", exc)
            return {}
        if saved is None:
            return {}
        log.info(
            "keyring: registry snapshot %s read (%d records)", self.snapshot, len(saved.records)
        )
        return saved.records

    # -- lookups: never await

    def by_digest(self, digest: str) -> ApiKey | None:
        return self.view.keys_by_digest.get(digest)

    def by_name(self, name: str) -> ApiKey | None:
        return self.view.keys_by_name.get(name)

    @property
    def keys_by_digest(self) -> Mapping[str, ApiKey]:
        return self.view.keys_by_digest

    @property
    def keys_by_name(self) -> Mapping[str, ApiKey]:
        return self.view.keys_by_name

    @property
    def tiers(self) -> Mapping[str, Limits]:
        return self.view.tiers

    @property
    def version(self) -> int | None:
        return self.view.version

    @property
    def epoch(self) -> str | None:
        """The epoch of the registry's marker this node adopted (``None``: none yet)."""
        return epoch_of(self.marker)

    def key_record(self, name: str) -> KeyRecord | None:
        """The key's record in the view (``None``: none, or revoked)."""
        text = self.view.records.get((KEY, name))
        if text is None:
            return None
        record = KeyRecord.from_json(text)
        return None if record.revoked or name not in self.view.keys_by_name else record

    def tier_record(self, name: str) -> TierRecord | None:
        text = self.view.records.get((TIER, name))
        if text is None or name not in self.view.tiers:
            return None
        return TierRecord.from_json(text)

    @contextmanager
    def watching(self, digest: str) -> Iterator[trio.Event]:
        """An event set as soon as the view no longer has a key of this digest
        (revoked, or its record removed), for the duration of the ``with``."""
        event, count = self._watchers.get(digest, (trio.Event(), 0))
        if digest not in self.view.keys_by_digest:
            event.set()
        self._watchers[digest] = (event, count + 1)
        try:
            yield event
        finally:
            event, count = self._watchers[digest]
            if count == 1:
                del self._watchers[digest]
            else:
                self._watchers[digest] = (event, count - 1)

    # -- keeping up with the store

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Seed the registry and load it (waiting at most ``STARTUP_WAIT``), then poll
        it until cancelled or :meth:`stop`; write the snapshot whenever the view
        changes. Store failures are logged, never raised: the last view stays."""
        with self._cancel:
            async with trio.open_nursery() as nursery:
                if self.snapshot is not None:
                    nursery.start_soon(self._snapshots_forever, self.snapshot)
                with trio.move_on_after(STARTUP_WAIT):
                    await self._poll_once()
                task_status.started()
                while True:
                    await trio.sleep(self.poll_seconds)
                    await self._poll_once()

    def stop(self) -> None:
        self._cancel.cancel()

    async def _poll_once(self) -> None:
        try:
            with trio.fail_after(STORE_WAIT):
                await self.refresh()
        except (StoreError, trio.TooSlowError) as exc:
            if not self._failing:
                log.warning("keyring: cannot read the registry (keeping the last view): %s", exc)
                self._failing = True
            return
        if self._failing:
            log.warning("keyring: reading the registry again (version %s)", self.version)
            self._failing = False

    async def refresh(self, *, force: bool = False) -> bool:
        """Reload the view if the registry's version or marker changed (or ``force``);
        True if it was reloaded. Seeds the registry first if this node has not yet;
        writes the view back first into a registry found lost or written anew (see the
        module docstring). Until both succeeded the view stays as it was, and the next
        call tries again. Raises :class:`StoreError`."""
        async with self._lock:
            if not self.seeded:
                if not await self._seed():
                    return False
            elif not force:
                version = await self.store.registry_version()
                marker = await self.store.registry_get(*MARKER)
                if version == self.view.version and marker == self.marker:
                    return False
            version, records = await self.store.registry_load()
            if records.get(MARKER) != self.marker:
                if not await self._restore(records):
                    return False
                version, records = await self.store.registry_load()
                if records.get(MARKER) != self.marker:
                    return False  # lost again meanwhile: the next call writes it back
            if version == self.view.version and records == self.view.records:
                return False
            self._apply(build_view(self.settings, version, records, self.view))
            return True

    def _apply(self, view: View) -> None:
        self.view = view
        self.reloads += 1
        self._snapshot_due.set()
        for digest, (event, _) in self._watchers.items():
            if digest not in view.keys_by_digest:
                event.set()

    async def seed(self) -> None:
        """Write the config's tiers and keys (and the snapshot's admin records) into
        the registry, see the module docstring for which win; then adopt its marker,
        or write one. Raises :class:`StoreError`."""
        async with self._lock:
            await self._seed()

    async def _seed(self) -> bool:
        """:meth:`seed`; True once done (``seeded``), False to try again later."""
        _, records = await self.store.registry_load()
        wanted = {k: v for k, v in self.view.records.items() if k[0] != META}
        records, done = await self._write_back(wanted, records, seeding=True)
        config = config_records(self.settings)
        for (kind, name), current in list(records.items()):
            if (kind, name) not in config and kind in (KEY, TIER) and from_config(current):
                # Seeded by a config that had it; this one does not: remove it.
                await self.store.registry_put(kind, name, None, expect=current)
        if done and await self._adopt_marker(records):
            self.seeded = True
        return self.seeded

    async def _restore(self, records: Registry) -> bool:
        """The registry (``records``, just read) has lost its marker, or has another
        one: write this node's view back where the store lacks it or holds older, then
        adopt the marker (writing one if there is none). True once done."""
        wanted = {k: v for k, v in self.view.records.items() if k[0] != META}
        if not self._restoring:
            self._restoring = True
            self.restores += 1
            log.warning(
                "keyring: the registry %s: writing this node's view back (%d records)",
                "lost its marker (the store lost its data)"
                if MARKER not in records
                else f"was written anew by another node (epoch {epoch_of(records[MARKER])})",
                len(wanted),
            )
            if self.on_store_loss is not None:
                try:
                    self.on_store_loss()
                except Exception:
                    log.exception("keyring: on_store_loss failed")
        for _ in range(WRITE_ATTEMPTS):
            records, done = await self._write_back(wanted, records, seeding=False)
            if not done:
                return False
            if await self._adopt_marker(records):
                self._restoring = False
                log.warning("keyring: registry written back (epoch %s)", self.epoch)
                return True
            _, records = await self.store.registry_load()
        return False

    async def _write_back(
        self, wanted: Registry, records: Registry, *, seeding: bool
    ) -> tuple[Registry, bool]:
        """Write each of ``wanted`` that the store (``records``, as last read) lacks or
        holds an older version of (:func:`newer`; when ``seeding``, a config record
        also replaces the store's version from a config), each a compare-and-set,
        retried against fresh reads. Returns the store's records as last read, and
        whether every write got through."""
        records = dict(records)
        done = True
        # Tiers first: a key's tier must be there when its record appears.
        for kind, name in sorted(wanted, key=lambda kind_name: (kind_name[0] != TIER, kind_name)):
            text = wanted[(kind, name)]
            for _ in range(WRITE_ATTEMPTS):
                current = records.get((kind, name))
                if not replaces(text, current, seeding=seeding):
                    if seeding and current not in (None, text) and from_config(text):
                        log.info(
                            "keyring: %s %r was changed through the admin API: the "
                            "store's version wins over the config's",
                            kind,
                            name,
                        )
                    break
                if await self.store.registry_put(kind, name, text, expect=current) is not None:
                    records[(kind, name)] = text
                    break
                _, records = await self.store.registry_load()
            else:
                done = False
        return records, done

    async def _adopt_marker(self, records: Registry) -> bool:
        """Adopt the registry's marker, or write one (last, compare-and-set) if it has
        none. False if another writer's came first: the caller writes back against it."""
        marker = records.get(MARKER)
        if marker is None:
            marker = Marker.new(self.settings.node_id).to_json()
            if await self.store.registry_put(*MARKER, marker, expect=None) is None:
                return False
        if marker != self.marker:
            self.marker = marker
            self._snapshot_due.set()
        return True

    async def _snapshots_forever(self, path: Path) -> None:
        """Write the view to the snapshot file whenever it changed (the latest view:
        changes made while one is written are coalesced into the next)."""
        while True:
            await self._snapshot_due.wait()
            self._snapshot_due = trio.Event()
            view = self.view
            if view.version is None:
                continue  # the config's own view: nothing read from the store yet
            records = {k: v for k, v in view.records.items() if k[0] != META}
            snapshot = Snapshot(records=records, marker=self.marker, version=view.version)
            try:
                await trio.to_thread.run_sync(write_snapshot, path, snapshot)
            except OSError as exc:
                if not self._snapshot_failing:
                    log.error("keyring: cannot write the registry snapshot %s: %s", path, exc)
                    self._snapshot_failing = True
            else:
                self._snapshot_failing = False

    # -- admin changes: each a compare-and-set, then applied here at once

    async def _write(self, kind: str, name: str, change: Any) -> tuple[str | None, str]:
        """``change(current_text) -> new_text`` (raising KeyringError to refuse), written
        with compare-and-set against fresh reads; returns (old text, new text)."""
        for _ in range(WRITE_ATTEMPTS):
            await self.refresh(force=True)
            current = self.view.records.get((kind, name))
            text = change(current)
            if await self.store.registry_put(kind, name, text, expect=current) is not None:
                await self.refresh()
                return current, text
        raise Conflict(f"the {kind} {name!r} kept changing; retry")

    def _validated(self, record: KeyRecord) -> KeyRecord:
        check_key(self.settings, self.view.tiers, record)
        return record

    async def create_key(
        self,
        name: str,
        digest: str,
        *,
        tier: str | None = None,
        team: str | None = None,
        limits: Mapping[str, Any] | None = None,
    ) -> KeyRecord:
        """Add a key (the name may be that of a revoked one). Raises
        :class:`AlreadyExists`, :class:`KeyringError` for bad fields, StoreError."""
        check_name("key", name)
        record = KeyRecord(
            name=name,
            digest=digest,
            tier=tier,
            team=team,
            limits=dict(limits or {}),
            source="admin",
            updated_at=int(time.time()),
        )

        def change(current: str | None) -> str:
            if current is not None and not KeyRecord.from_json(current).revoked:
                raise AlreadyExists(f"There is already a key named {name!r}.")
            if digest in self.view.keys_by_digest:
                raise AlreadyExists("That key is already registered under another name.")
            return self._validated(record).to_json()

        await self._write(KEY, name, change)
        return record

    async def update_key(self, name: str, patch: Mapping[str, Any]) -> KeyRecord:
        """Change a key: ``tier``, ``team`` and limit fields (``None`` removes one);
        ``models`` maps patterns to a rule (replaced whole) or ``None`` (removed).
        Raises :class:`NotFound`, :class:`KeyringError`, StoreError."""
        result: list[KeyRecord] = []

        def change(current: str | None) -> str:
            old = None if current is None else KeyRecord.from_json(current)
            if old is None or old.revoked:
                raise NotFound(f"No API key named {name!r}.")
            record = patched(old, patch, updated_at=int(time.time()))
            result[:] = [self._validated(record)]
            return record.to_json()

        await self._write(KEY, name, change)
        return result[0]

    async def revoke_key(self, name: str) -> None:
        """Revoke a key: refused on every node within a second, its feed sockets
        closed. Raises :class:`NotFound`, StoreError."""

        def change(current: str | None) -> str:
            if current is None or KeyRecord.from_json(current).revoked:
                raise NotFound(f"No API key named {name!r}.")
            tombstone = KeyRecord(
                name=name, source="admin", revoked=True, updated_at=int(time.time())
            )
            return tombstone.to_json()

        await self._write(KEY, name, change)

    async def put_tier(self, name: str, limits: Mapping[str, Any]) -> bool:
        """Set a tier's limits (replacing them whole); True if the tier is new.
        Raises :class:`KeyringError` for bad fields, StoreError."""
        check_name("tier", name)
        check_tier(limits, self.settings.mode)
        record = TierRecord(limits=dict(limits), source="admin", updated_at=int(time.time()))
        old, _ = await self._write(TIER, name, lambda current: record.to_json())
        return old is None

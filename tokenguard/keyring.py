"""The live view of API keys and tiers: held in the store's registry, seeded from the
config, the same on every node within a second of any change.

Records (JSON text in :meth:`~tokenguard.windows.WindowStore.registry_put`'s registry):

* ``("tier", NAME)``: :class:`TierRecord`, the tier's limit fields as in the config.
* ``("key", NAME)``: :class:`KeyRecord`, the key's SHA-256 digest (never the key), its
  tier and team, and its *own* limit fields (resolved over its tier's, as the config
  does, so that a tier changed later changes its keys); or, once revoked, a tombstone
  (``revoked``) that keeps the name from being seeded again from the config.

Teams stay in the config only (``[teams.NAME]``): a key may name any configured team.

**Config and store.** At start each node seeds the registry from its config: a config
tier or key absent from the store is written; one the store has *from the config*
(``source = "config"``) is overwritten by the config's version (so a config edit takes
effect on restart), and one written by the config earlier but no longer in it is
removed. A record changed through the admin API (``source = "admin"``: created,
changed, revoked) is never touched by the config again: after an admin change the
store wins. Every write is a compare-and-set, so nodes seeding at once, or an admin
call racing a seed, never lose a write.

**Propagation.** :meth:`Keyring.run` polls the registry's version every
``poll_seconds`` (0.25 s: one ``GET`` on Redis) and reloads on change, so a change
made through any node applies on every node within a second, whatever happened to
pub/sub connections meanwhile; a write through this node applies here at once. When
the store cannot be read the node keeps its last view (at start: the config's).

**Revocation.** A revoked key is simply absent from the view: it is refused exactly
like a key that never existed. :meth:`Keyring.watching` gives an event set when a
digest stops being valid, which the usage feed uses to close that key's websockets.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from tokenguard.settings import (
    RULE_FIELDS,
    ApiKey,
    ConfigError,
    Limits,
    Settings,
    limits_from_table,
)
from tokenguard.windows import Registry, StoreError, WindowStore

log = logging.getLogger("tokenguard.keyring")

KEY = "key"
TIER = "tier"
POLL_SECONDS = 0.25
# One registry call from the poll loop or the seeding may take this long.
STORE_WAIT = 1.0
# At start, the node serves once the registry is loaded, or after this long (on the
# config's view, until the store answers).
STARTUP_WAIT = 2.0
# An admin write retries its compare-and-set this many times against fresh reads.
WRITE_ATTEMPTS = 5
# Key and tier names: also what may follow /admin/keys/ in a URL.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:/+-]{0,99}$")
SOURCES = ("config", "admin")


class KeyringError(Exception):
    """An admin change that cannot be made; ``status`` and ``code`` say how to answer."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _invalid(exc: ConfigError, prefix: str) -> KeyringError:
    """A config-style error (``<where>: <field>: <problem>``) as a 400 naming the field."""
    message = str(exc).removeprefix(prefix)
    field, sep, _ = message.partition(": ")
    return KeyringError(message, field if sep and " " not in field else None)


class NotFound(KeyringError):
    status = 404
    code = "key_not_found"


class AlreadyExists(KeyringError):
    status = 409
    code = "key_exists"


class Conflict(KeyringError):
    """Other writers kept changing the record: the caller may retry."""

    status = 409
    code = "concurrent_change"


def _encode(data: Mapping[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@attrs.frozen
class TierRecord:
    """A tier in the registry: its limit fields (the config's TOML table, parsed)."""

    limits: Mapping[str, Any]
    source: str = "config"
    updated_at: int | None = None  # Unix seconds of the last admin change

    def to_json(self) -> str:
        data: dict[str, Any] = {"limits": self.limits, "source": self.source}
        if self.updated_at is not None:
            data["updated_at"] = self.updated_at
        return _encode(data)

    @classmethod
    def from_json(cls, text: str) -> TierRecord:
        data = json.loads(text)
        return cls(
            limits=dict(data["limits"]),
            source=data.get("source", "admin"),
            updated_at=data.get("updated_at"),
        )


@attrs.frozen
class KeyRecord:
    """A key in the registry; ``revoked``: a tombstone (no digest, no limits)."""

    name: str
    digest: str = ""
    tier: str | None = None
    team: str | None = None
    limits: Mapping[str, Any] = attrs.field(factory=dict)  # its own fields only
    source: str = "config"
    revoked: bool = False
    updated_at: int | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {"name": self.name, "source": self.source}
        if self.revoked:
            data["revoked"] = True
        else:
            data.update(digest=self.digest, tier=self.tier, team=self.team, limits=self.limits)
        if self.updated_at is not None:
            data["updated_at"] = self.updated_at
        return _encode(data)

    @classmethod
    def from_json(cls, text: str) -> KeyRecord:
        data = json.loads(text)
        return cls(
            name=data["name"],
            digest=data.get("digest", ""),
            tier=data.get("tier"),
            team=data.get("team"),
            limits=dict(data.get("limits") or {}),
            source=data.get("source", "admin"),
            revoked=bool(data.get("revoked", False)),
            updated_at=data.get("updated_at"),
        )


def table_of(limits: Limits) -> dict[str, Any]:
    """A limits table (config field names) that :func:`limits_from_table` turns back
    into ``limits`` itself: every limit set, the reservation default, the mode, the
    per-model rules."""
    table: dict[str, Any] = {f: v for f in RULE_FIELDS if (v := getattr(limits, f)) is not None}
    table["default_max_tokens"] = limits.default_max_tokens
    table["mode"] = limits.mode
    if limits.models:
        models: dict[str, Any] = {}
        for rule in limits.models:
            entry = {f: v for f in RULE_FIELDS if (v := getattr(rule.limits, f)) is not None}
            if rule.mode is not None:
                entry["mode"] = rule.mode
            models[rule.pattern] = entry
        table["models"] = models
    return table


def config_records(settings: Settings) -> Registry:
    """The records the config seeds: its tiers, and its keys with their own fields."""
    records: Registry = {}
    for name, limits in settings.tiers.items():
        records[(TIER, name)] = TierRecord(limits=table_of(limits)).to_json()
    for key in settings.keys:
        record = KeyRecord(
            name=key.name,
            digest=key.digest,
            tier=key.tier,
            team=None if key.team is None else key.team.name,
            limits=dict(settings.key_tables.get(key.name, {})),
        )
        records[(KEY, key.name)] = record.to_json()
    return records


@attrs.frozen
class View:
    """The keys and tiers a node enforces, built from one version of the registry."""

    version: int | None  # None: the config's own view (the store not read yet)
    records: Registry
    tiers: Mapping[str, Limits]
    keys_by_digest: Mapping[str, ApiKey]
    keys_by_name: Mapping[str, ApiKey]


def build_view(
    settings: Settings, version: int | None, records: Registry, previous: View | None = None
) -> View:
    """Resolve records into keys and tiers, as settings.py resolves the config's.

    A record that does not parse, a key whose tier or team is unknown, or a second key
    with a digest already taken is left out (and logged): refused, never unlimited.
    Keys equal to ``previous``'s are kept as the same objects (the limiter caches rows
    per key object).
    """
    tiers: dict[str, Limits] = {}
    for (kind, name), text in sorted(records.items()):
        if kind != TIER:
            continue
        try:
            tier = TierRecord.from_json(text)
            tiers[name] = limits_from_table(
                tier.limits, f"registry tier {name!r}", mode=settings.mode
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.error("registry: tier %r left out: %s", name, exc)
    by_digest: dict[str, ApiKey] = {}
    by_name: dict[str, ApiKey] = {}
    old = previous.keys_by_name if previous is not None else {}
    for (kind, name), text in sorted(records.items()):
        if kind != KEY:
            continue
        try:
            record = KeyRecord.from_json(text)
            if record.revoked:
                continue
            key = resolve_key(settings, tiers, record)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("registry: key %r left out (refused): %s", name, exc)
            continue
        if key.digest in by_digest:
            log.error("registry: key %r has the digest of key %r: left out", name, key.name)
            continue
        if old.get(name) == key:
            key = old[name]
        by_digest[key.digest] = key
        by_name[name] = key
    return View(version, dict(records), tiers, by_digest, by_name)


def resolve_key(settings: Settings, tiers: Mapping[str, Limits], record: KeyRecord) -> ApiKey:
    """The key a record describes: its own fields over its tier's; ``ConfigError``
    (a ``ValueError``) naming the field for invalid ones or an unknown tier or team."""
    where = f"key {record.name!r}"
    base = None
    if record.tier is not None:
        if record.tier not in tiers:
            raise ConfigError(
                f"{where}: tier: unknown tier {record.tier!r} (known: {sorted(tiers)})"
            )
        base = tiers[record.tier]
    team = None
    if record.team is not None:
        team = settings.teams.get(record.team)
        if team is None:
            known = sorted(settings.teams)
            raise ConfigError(f"{where}: team: unknown team {record.team!r} (known: {known})")
    if len(record.digest) != 64 or any(c not in "0123456789abcdef" for c in record.digest):
        raise ConfigError(f"{where}: the digest is not 64 hex characters")
    limits = limits_from_table(record.limits, where, base, mode=settings.mode)
    return ApiKey(
        name=record.name, digest=record.digest, limits=limits, tier=record.tier, team=team
    )


class Keyring:
    """One node's live keys and tiers (see the module docstring).

    Before :meth:`run` has read the store (or with a store that keeps no registry) the
    view is the config's. Lookups never await and never fail.
    """

    def __init__(
        self, settings: Settings, store: WindowStore, *, poll_seconds: float = POLL_SECONDS
    ) -> None:
        self.settings = settings
        self.store = store
        self.poll_seconds = poll_seconds
        self.view = build_view(settings, None, config_records(settings))
        self.seeded = False
        self.reloads = 0  # views built from the store
        self._watchers: dict[str, tuple[trio.Event, int]] = {}
        self._cancel = trio.CancelScope()
        self._failing = False

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
        its version until cancelled or :meth:`stop`. Store failures are logged, never
        raised: the last view stays."""
        with self._cancel:
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
                if not self.seeded:
                    await self.seed()
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
        """Reload the view if the registry's version changed (or ``force``); True if
        it was reloaded. Raises :class:`StoreError`."""
        if not force and self.view.version is not None:
            if await self.store.registry_version() == self.view.version:
                return False
        version, records = await self.store.registry_load()
        if version == self.view.version and records == self.view.records:
            return False
        self._apply(build_view(self.settings, version, records, self.view))
        return True

    def _apply(self, view: View) -> None:
        self.view = view
        self.reloads += 1
        for digest, (event, _) in self._watchers.items():
            if digest not in view.keys_by_digest:
                event.set()

    async def seed(self) -> None:
        """Write the config's tiers and keys into the registry (see the module
        docstring for which win). Raises :class:`StoreError`."""
        wanted = config_records(self.settings)
        _, records = await self.store.registry_load()
        # Tiers first: a key's tier must be there when its record appears.
        order = sorted(wanted, key=lambda kind_name: (kind_name[0] != TIER, kind_name))
        for kind, name in order:
            text = wanted[(kind, name)]
            for _ in range(WRITE_ATTEMPTS):
                current = records.get((kind, name))
                if current is not None and current != text and not _from_config(current):
                    log.info(
                        "keyring: %s %r was changed through the admin API: the store's "
                        "version wins over the config's",
                        kind,
                        name,
                    )
                    break
                if current == text:
                    break
                if await self.store.registry_put(kind, name, text, expect=current) is not None:
                    break
                _, records = await self.store.registry_load()
        for (kind, name), current in records.items():
            if (kind, name) not in wanted and kind in (KEY, TIER) and _from_config(current):
                # Seeded by a config that had it; this one does not: remove it.
                await self.store.registry_put(kind, name, None, expect=current)
        self.seeded = True

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

    def _check_name(self, what: str, name: str) -> None:
        if not NAME_PATTERN.match(name):
            raise KeyringError(
                f"a {what} name is 1-100 characters: letters, digits and . _ @ : / + - "
                f"(starting with a letter or digit), got {name!r}"
            )

    def _validated(self, record: KeyRecord) -> KeyRecord:
        try:
            resolve_key(self.settings, self.view.tiers, record)
        except ConfigError as exc:
            raise _invalid(exc, f"key {record.name!r}: ") from None
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
        self._check_name("key", name)
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
            limits = dict(old.limits)
            fields: dict[str, Any] = {"tier": old.tier, "team": old.team}
            for field, value in patch.items():
                if field in ("tier", "team"):
                    fields[field] = value
                elif field == "models" and isinstance(value, Mapping):
                    models = dict(limits.get("models") or {})
                    for pattern, rule in value.items():
                        if rule is None:
                            models.pop(pattern, None)
                        else:
                            models[pattern] = rule
                    limits["models"] = models
                    if not models:
                        del limits["models"]
                elif value is None:
                    limits.pop(field, None)
                else:
                    limits[field] = value
            record = attrs.evolve(
                old,
                tier=fields["tier"],
                team=fields["team"],
                limits=limits,
                source="admin",
                updated_at=int(time.time()),
            )
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
        self._check_name("tier", name)
        try:
            limits_from_table(limits, "request body", mode=self.settings.mode)
        except ConfigError as exc:
            raise _invalid(exc, "request body: ") from None
        record = TierRecord(limits=dict(limits), source="admin", updated_at=int(time.time()))
        old, _ = await self._write(TIER, name, lambda current: record.to_json())
        return old is None


def _from_config(text: str) -> bool:
    try:
        return json.loads(text).get("source") == "config"
    except (ValueError, AttributeError):
        return False

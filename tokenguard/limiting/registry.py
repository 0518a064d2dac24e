"""The key registry's records, and the view a node builds from them.

Records (JSON text in :meth:`~tokenguard.store.window_store.WindowStore.registry_put`'s
registry), kept and reconciled by :class:`~tokenguard.limiting.keyring.Keyring`:

* ``("tier", NAME)``: :class:`TierRecord`, the tier's limit fields as in the config.
* ``("key", NAME)``: :class:`KeyRecord`, the key's SHA-256 digest (never the key), its
  tier and team, and its *own* limit fields (resolved over its tier's, as the config
  does, so that a tier changed later changes its keys); or, once revoked, a tombstone
  (``revoked``) that keeps the name from being seeded again from the config.
* ``("meta", "epoch")``: the **marker** (:class:`Marker`, a random epoch), written LAST
  by whoever seeds an empty registry: a registry without it has lost its data.

Each record says where it came from (``source``: ``"config"`` or ``"admin"``). Which of
two versions of a record wins (:func:`newer`, :func:`replaces`): an admin record over
the config's, then the later ``updated_at``; a tombstone wins a tie, so a revoked key
is never brought back.

:func:`build_view` resolves records into the keys and tiers a node enforces
(:class:`View`): a record that does not parse, or names an unknown tier or team, is
left out (refused), never unlimited. An admin change must pass :func:`check_name`,
:func:`check_key` or :func:`check_tier` first: each refuses with a
:class:`KeyringError` that says how the admin API answers (400 naming the field, 404,
409).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any

import attrs

from tokenguard.config.limits_table import limits_from_table, spend_fields
from tokenguard.config.settings import ConfigError, Settings
from tokenguard.model import QUEUE_FIELDS, RULE_FIELDS, ApiKey, Limits
from tokenguard.store.window_store import Registry

log = logging.getLogger("tokenguard.limiting.registry")

KEY = "key"
TIER = "tier"
META = "meta"
MARKER = (META, "epoch")
# Key and tier names: also what may follow /admin/keys/ in a URL.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:/+-]{0,99}$")
SOURCES = ("config", "admin")


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
    per-model rules, the per-user limits."""
    fields = (*RULE_FIELDS, *QUEUE_FIELDS)
    table: dict[str, Any] = {f: v for f in fields if (v := getattr(limits, f)) is not None}
    table |= spend_fields(limits)
    table["default_max_tokens"] = limits.default_max_tokens
    table["mode"] = limits.mode
    if limits.models:
        models: dict[str, Any] = {}
        for rule in limits.models:
            entry = {f: v for f in fields if (v := getattr(rule.limits, f)) is not None}
            entry |= spend_fields(rule.limits)
            if rule.mode is not None:
                entry["mode"] = rule.mode
            models[rule.pattern] = entry
        table["models"] = models
    if limits.per_user is not None:
        per_user = limits.per_user
        table["per_user"] = {
            f: v for f in RULE_FIELDS if (v := getattr(per_user, f)) is not None
        } | spend_fields(per_user)
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
class Marker:
    """The registry's marker: written last by whoever seeds an empty registry, so a
    registry without it has lost its data. Nodes compare it whole (its text): another
    marker is another epoch of the registry."""

    epoch: str
    seeded_at: int  # Unix seconds
    node: int  # the node that wrote it

    def to_json(self) -> str:
        return _encode({"epoch": self.epoch, "seeded_at": self.seeded_at, "node": self.node})

    @classmethod
    def new(cls, node: int) -> Marker:
        return cls(epoch=secrets.token_hex(8), seeded_at=int(time.time()), node=node)


def epoch_of(marker: str | None) -> str | None:
    """The epoch a marker record names, for logs (``None``: no marker)."""
    if marker is None:
        return None
    try:
        return str(json.loads(marker)["epoch"])
    except (ValueError, KeyError, TypeError):
        return marker


def rank(text: str | None) -> tuple[int, int, int]:
    """How recent a record is: an admin-made one over the config's, then the later
    ``updated_at``, then a tombstone over a live record. A record that does not parse
    (or none) ranks below every other."""
    if text is None:
        return (-1, 0, 0)
    try:
        data = json.loads(text)
        return (
            1 if data.get("source") == "admin" else 0,
            int(data.get("updated_at") or 0),
            1 if data.get("revoked") else 0,
        )
    except (ValueError, TypeError, AttributeError):
        return (-1, 0, 0)


def newer(mine: str, theirs: str | None) -> bool:
    """True if record ``mine`` should replace ``theirs`` (``None``: absent) when a
    view is written back into a registry: ``theirs`` is absent, or older (see
    :func:`rank`). A tombstone wins a tie, so a revoked key is never brought back; two
    versions from the config tie, and the store's stays."""
    return mine != theirs and rank(mine) > rank(theirs)


def initial_records(settings: Settings, saved: Registry) -> Registry:
    """A node's first view before it reads the store: the config's records, over which
    the admin-made records and tombstones of ``saved`` (a snapshot) win, as they do in
    the store (the snapshot's records from a config are left out: the config is now
    this one)."""
    records = config_records(settings)
    for (kind, name), text in saved.items():
        if kind in (KEY, TIER) and not from_config(text):
            if newer(text, records.get((kind, name))):
                records[(kind, name)] = text
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
    """Resolve records into keys and tiers, as the config's are resolved on loading.

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


def patched(record: KeyRecord, patch: Mapping[str, Any], *, updated_at: int) -> KeyRecord:
    """``record`` changed as the admin API's PATCH asks, and marked the admin's:
    ``tier``, ``team`` and limit fields (``None`` removes one); ``models`` maps
    patterns to a rule (replaced whole) or ``None`` (removed). Not validated: see
    :func:`resolve_key`."""
    limits = dict(record.limits)
    fields: dict[str, Any] = {"tier": record.tier, "team": record.team}
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
    return attrs.evolve(
        record,
        tier=fields["tier"],
        team=fields["team"],
        limits=limits,
        source="admin",
        updated_at=updated_at,
    )


# --- the rules an admin change must pass ----------------------------------------------


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


def check_name(what: str, name: str) -> None:
    """Raise :class:`KeyringError` unless ``name`` is a valid ``what`` (key or tier)
    name (:data:`NAME_PATTERN`)."""
    if not NAME_PATTERN.match(name):
        raise KeyringError(
            f"a {what} name is 1-100 characters: letters, digits and . _ @ : / + - "
            f"(starting with a letter or digit), got {name!r}"
        )


def check_key(settings: Settings, tiers: Mapping[str, Limits], record: KeyRecord) -> None:
    """Raise :class:`KeyringError` (400, naming the field) unless ``record`` resolves
    into a key over ``tiers`` (:func:`resolve_key`)."""
    try:
        resolve_key(settings, tiers, record)
    except ConfigError as exc:
        raise _invalid(exc, f"key {record.name!r}: ") from None


def check_tier(limits: Mapping[str, Any], mode: str) -> None:
    """Raise :class:`KeyringError` (400, naming the field) unless ``limits`` is a valid
    table of a tier's limit fields (``mode``: the config's default mode)."""
    try:
        limits_from_table(limits, "request body", mode=mode)
    except ConfigError as exc:
        raise _invalid(exc, "request body: ") from None


def replaces(text: str, current: str | None, *, seeding: bool) -> bool:
    """Whether a write-back puts ``text`` over the store's ``current``: when it is
    :func:`newer`, or, ``seeding``, when both come from a config (the config a node
    starts with is the config's latest word)."""
    if text == current:
        return False
    if seeding and current is not None and from_config(text) and from_config(current):
        return True
    return newer(text, current)


def from_config(text: str) -> bool:
    try:
        return json.loads(text).get("source") == "config"
    except (ValueError, AttributeError):
        return False

"""The domain model: API keys, their limits, key ids and partitions, digests.

Plain immutable values, with no I/O and no parsing: the config (:mod:`tokenguard.config`)
and the key registry (:mod:`tokenguard.limiting.registry`) build them, the limiter
(:mod:`tokenguard.limiting.rules`) turns them into rows.

A key is known by the SHA-256 digest of its plaintext (:func:`digest_of`); the
plaintext is never kept. Its *key id*, a prefix of the digest, names its counters in
the store; its *partition* (:func:`partition_of`) is where all the rows of one of its
admissions live.
"""

from __future__ import annotations

import hashlib
import re
import secrets

import attrs

DIMENSIONS = ("requests", "input_tokens", "output_tokens")
LIMIT_FIELDS = {"rpm": "requests", "input_tpm": "input_tokens", "output_tpm": "output_tokens"}
# Every limit a key, tier, team or per-model rule may set: field -> (dimension, window).
# "minute" is the configured [window] (60 s by default); see tokenguard/limiting/rules.py.
# max_concurrent: requests in flight, counted with leases of [limits] lease_seconds.
RULE_FIELDS = {
    f"{prefix}{suffix}": (dimension, window)
    for prefix, dimension, p in (
        ("r", "requests", "p"),
        ("input_t", "input_tokens", "p"),
        ("output_t", "output_tokens", "p"),
        ("t", "total_tokens", "p"),
    )
    for suffix, window in ((f"{p}m", "minute"), (f"{p}h", "hour"), (f"{p}d", "day"))
} | {"max_concurrent": ("concurrent", "lease")}
# Spend limits, in micro-units of the operator's currency (tokenguard/config/prices.py):
# field -> window. The config writes them in currency units (``spend_per_day = 5.0``).
SPEND = "spend"
# "month" is a calendar month in [limits] timezone (tokenguard/limiting/calendar.py).
SPEND_FIELDS = {"spend_per_hour": "hour", "spend_per_day": "day", "spend_per_month": "month"}
MODES = ("enforce", "shadow")
# A request's priority in the admission queue, highest first (tokenguard/limiting/wait_lines.py).
PRIORITIES = ("interactive", "batch")
# The admission-queue fields a tier, key, team or per-model rule may set (None: not set;
# see Limits). They shape how a refused request may wait, not what it may spend.
QUEUE_FIELDS = ("max_wait_seconds", "max_waiting", "priority")
# Team names end up in store key names, as the hash tag: no braces, no colons.
TEAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
DEFAULT_MAX_TOKENS = 1024
# The fields of a [[keys]] entry that say which key it is, not what its limits are.
KEY_IDENTITY_FIELDS = ("name", "key", "sha256", "tier", "team")
# A minted API key: this prefix, then 256 random bits.
KEY_PREFIX = "tg-"
KEY_BYTES = 32


@attrs.frozen
class Limits:
    """The limits of one key, tier, team or per-model rule; ``None`` means unlimited.

    ``*pm`` fields are per [window] (a minute by default), ``*ph`` per hour, ``*pd`` per
    day (see :data:`RULE_FIELDS`); ``tp*`` count input + output tokens together.
    ``default_max_tokens`` is the output reservation for a request that names neither
    ``max_tokens`` nor ``max_completion_tokens``. ``mode`` is ``"enforce"`` or
    ``"shadow"`` (checked and counted, never refused). ``models``: per-model rules,
    each checked on top of these limits when its glob matches the request's model.
    ``per_user``: limits that apply to each end user of the application separately
    (the rule fields only).
    """

    rpm: int | None = None
    input_tpm: int | None = None
    output_tpm: int | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    rph: int | None = None
    rpd: int | None = None
    input_tph: int | None = None
    input_tpd: int | None = None
    output_tph: int | None = None
    output_tpd: int | None = None
    tpm: int | None = None
    tph: int | None = None
    tpd: int | None = None
    mode: str = "enforce"
    models: tuple[ModelRule, ...] = ()
    max_concurrent: int | None = None  # requests in flight at once (leases)
    # Limits of each end user of the key, tier or team (tokenguard/limiting/rules.py,
    # "Per-end-user rows"); ``None``: no per-user limit. Its ``models`` is always empty.
    per_user: Limits | None = None
    spend_per_hour: int | None = None  # micro-units (see SPEND_FIELDS)
    spend_per_day: int | None = None
    spend_per_month: int | None = None
    # The admission queue (docs/design.md, "The admission queue"); None: not set here.
    # max_wait_seconds: how long a refused request may wait for room (0: refused at once);
    # max_waiting: requests of one key waiting at once, over all nodes; priority: PRIORITIES.
    max_wait_seconds: float | None = None
    max_waiting: int | None = None
    priority: str | None = None

    def rules(self) -> list[tuple[str, str, int]]:
        """``(dimension, window, limit)`` for every limit set, in RULE_FIELDS order, then
        the spend limits (dimension ``spend``)."""
        return [
            (dimension, window, value)
            for field, (dimension, window) in RULE_FIELDS.items()
            if (value := getattr(self, field)) is not None
        ] + [
            (SPEND, window, value)
            for field, window in SPEND_FIELDS.items()
            if (value := getattr(self, field)) is not None
        ]

    def limit(self, dimension: str) -> int | None:
        return {
            "requests": self.rpm,
            "input_tokens": self.input_tpm,
            "output_tokens": self.output_tpm,
        }[dimension]


@attrs.frozen
class ApiKey:
    """A key as the limiter knows it: a name, the key's SHA-256 digest, its limits."""

    name: str
    digest: str
    limits: Limits
    tier: str | None = None
    team: Team | None = None

    @property
    def key_id(self) -> str:
        """The id used in store key names: never the key itself (a digest prefix)."""
        return self.digest[:16]


@attrs.frozen
class ModelRule:
    """Limits that apply only to requests whose model matches ``pattern`` (an fnmatch
    glob, case-sensitive: ``gpt-4o*``). Its ``limits.models`` is always empty."""

    pattern: str
    limits: Limits
    mode: str | None = None  # None: the mode of the key, tier or team it belongs to


@attrs.frozen
class Team:
    """``[teams.NAME]``: limits shared by every key with ``team = "NAME"``."""

    name: str
    limits: Limits


def new_key() -> str:
    """A fresh API key: ``tg-`` + 256 random bits (:mod:`secrets`), URL-safe base64 (no
    padding). Minted by ``tokenguard keys new`` and by the admin API alike."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def digest_of(key: str) -> str:
    """The hex SHA-256 digest by which a key (or an admin or metrics token) is known."""
    return hashlib.sha256(key.encode()).hexdigest()


SHARED_END_USER = "-"
"""The per-user bucket of requests that name no end user (``missing_user = "shared"``);
never a digest (those are hex)."""
END_USER_DIGEST_CHARS = 32


def user_digest(end_user: str) -> str:
    """What names an end user's rows in the store: a 128-bit prefix of the SHA-256 of its
    id (the id itself is never stored). Collisions within one key are negligible."""
    return hashlib.sha256(end_user.encode("utf-8", "surrogatepass")).hexdigest()[
        :END_USER_DIGEST_CHARS
    ]


def partition_of(key: ApiKey) -> str:
    """Where all of a key's rows live: its team's partition, or its own."""
    return f"team:{key.team.name}" if key.team is not None else key.key_id

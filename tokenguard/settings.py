"""Settings: one immutable object, read from ``tokenguard.toml`` and passed down.

Every problem in a config file is a :class:`ConfigError` whose message names the file,
the key (as a dotted TOML path) and what is wrong; unknown keys are errors too, so a
typo never silently leaves a limit off. API keys are hashed on load: only their SHA-256
digests are kept in memory.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

DIMENSIONS = ("requests", "input_tokens", "output_tokens")
LIMIT_FIELDS = {"rpm": "requests", "input_tpm": "input_tokens", "output_tpm": "output_tokens"}
DEFAULT_MAX_TOKENS = 1024


class ConfigError(ValueError):
    """A config file (or an override) is invalid; the message says where and why."""


@attrs.frozen
class Limits:
    """Per-window limits of one key; ``None`` means unlimited in that dimension.

    ``default_max_tokens`` is the output reservation for a request that names neither
    ``max_tokens`` nor ``max_completion_tokens``.
    """

    rpm: int | None = None
    input_tpm: int | None = None
    output_tpm: int | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS

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

    @property
    def key_id(self) -> str:
        """The id used in store key names: never the key itself (a digest prefix)."""
        return self.digest[:16]


@attrs.frozen
class MockSettings:
    """The built-in mock upstream. ``token_delay_ms`` paces streamed tokens."""

    token_delay_ms: float = 0.0


@attrs.frozen
class Settings:
    source: str = "<defaults>"
    store_url: str = "memory://"
    window_seconds: int = 60
    bucket_seconds: int = 5
    max_body_bytes: int = 1024 * 1024
    limiting: bool = True
    node_id: int = 0
    tiers: Mapping[str, Limits] = attrs.field(factory=dict)
    keys: tuple[ApiKey, ...] = ()
    mock: MockSettings = MockSettings()

    def key_by_digest(self) -> dict[str, ApiKey]:
        return {k.digest: k for k in self.keys}


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# --- validation -------------------------------------------------------------------------


class _Reader:
    """Walks one TOML table, taking known keys and refusing the rest."""

    def __init__(self, source: str, path: str, table: Any) -> None:
        self.source, self.path = source, path
        if not isinstance(table, dict):
            self.fail(f"must be a table, got {type(table).__name__}")
        self.table = dict(table)

    def where(self, key: str | None = None) -> str:
        if key is None:
            return self.path or "top level"
        return f"{self.path}.{key}" if self.path else key

    def fail(self, problem: str, key: str | None = None) -> None:
        raise ConfigError(f"{self.source}: {self.where(key)}: {problem}")

    def int(self, key: str, default: Any, *, minimum: int = 1) -> Any:
        value = self.table.pop(key, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"must be an integer, got {value!r}", key)
        if value < minimum:
            self.fail(f"must be at least {minimum}, got {value}", key)
        return value

    def number(self, key: str, default: float, *, minimum: float = 0) -> float:
        value = self.table.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"must be a number, got {value!r}", key)
        if value < minimum:
            self.fail(f"must be at least {minimum}, got {value}", key)
        return float(value)

    def str(self, key: str, default: Any) -> Any:
        value = self.table.pop(key, default)
        if value is not default and (not isinstance(value, str) or not value):
            self.fail(f"must be a non-empty string, got {value!r}", key)
        return value

    def bool(self, key: str, default: bool) -> bool:
        value = self.table.pop(key, default)
        if not isinstance(value, bool):
            self.fail(f"must be true or false, got {value!r}", key)
        return value

    def sub(self, key: str) -> _Reader:
        return _Reader(self.source, self.where(key), self.table.pop(key, {}))

    def done(self) -> None:
        for key in self.table:
            self.fail("unknown key (check its spelling)", key)


def _limits(reader: _Reader, base: Limits | None = None) -> Limits:
    base = base or Limits()
    return Limits(
        rpm=reader.int("rpm", base.rpm),
        input_tpm=reader.int("input_tpm", base.input_tpm),
        output_tpm=reader.int("output_tpm", base.output_tpm),
        default_max_tokens=reader.int("default_max_tokens", base.default_max_tokens),
    )


def parse_settings(data: Mapping[str, Any], source: str) -> Settings:
    """Validate a parsed TOML document into :class:`Settings`; raise ConfigError."""
    top = _Reader(source, "", data)

    store = top.sub("store")
    store_url = store.str("url", "memory://")
    store.done()

    window = top.sub("window")
    window_seconds = window.int("seconds", 60)
    bucket_seconds = window.int("bucket_seconds", 5)
    window.done()
    if window_seconds % bucket_seconds:
        window.fail(
            f"must divide window.seconds ({window_seconds}) evenly, got {bucket_seconds}",
            "bucket_seconds",
        )

    server = top.sub("server")
    max_body_bytes = server.int("max_body_bytes", 1024 * 1024, minimum=1024)
    server.done()

    mock = top.sub("mock")
    mock_settings = MockSettings(token_delay_ms=mock.number("token_delay_ms", 0.0))
    mock.done()

    tiers_reader = top.sub("tiers")
    tiers: dict[str, Limits] = {}
    for name in list(tiers_reader.table):
        tier = tiers_reader.sub(name)
        tiers[name] = _limits(tier)
        tier.done()

    raw_keys = top.table.pop("keys", [])
    if not isinstance(raw_keys, list):
        top.fail("must be an array of tables ([[keys]])", "keys")
    keys: list[ApiKey] = []
    names: set[str] = set()
    digests: set[str] = set()
    for i, raw in enumerate(raw_keys):
        entry = _Reader(source, f"keys[{i}]", raw)
        name = entry.str("name", None)
        if name is None:
            entry.fail("is required", "name")
        if name in names:
            entry.fail(f"duplicate key name {name!r}", "name")
        plaintext = entry.str("key", None)
        digest = entry.str("sha256", None)
        if (plaintext is None) == (digest is None):
            entry.fail("give exactly one of `key` (plaintext) or `sha256` (hex digest)")
        if digest is not None:
            digest = digest.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                entry.fail("must be 64 hex characters (a SHA-256 digest)", "sha256")
        else:
            digest = digest_of(plaintext)
        if digest in digests:
            entry.fail("the same API key is listed twice")
        tier_name = entry.str("tier", None)
        base = None
        if tier_name is not None:
            if tier_name not in tiers:
                entry.fail(f"unknown tier {tier_name!r} (known: {sorted(tiers)})", "tier")
            base = tiers[tier_name]
        limits = _limits(entry, base)
        entry.done()
        names.add(name)
        digests.add(digest)
        keys.append(ApiKey(name=name, digest=digest, limits=limits, tier=tier_name))
    top.done()

    return Settings(
        source=source,
        store_url=store_url,
        window_seconds=window_seconds,
        bucket_seconds=bucket_seconds,
        max_body_bytes=max_body_bytes,
        tiers=tiers,
        keys=tuple(keys),
        mock=mock_settings,
    )


def load_settings(path: str | Path) -> Settings:
    """Read and validate a TOML config file; raise ConfigError naming file and key."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_settings(data, str(path))


DEMO_CONFIG = """\
# The built-in demo config: `tokenguard serve` with no --config runs this.
[store]
url = "memory://"

[window]
seconds = 60
bucket_seconds = 5

[tiers.free]
rpm = 3
input_tpm = 1000
output_tpm = 300
default_max_tokens = 64

[tiers.pro]
rpm = 60
input_tpm = 20000
output_tpm = 10000
default_max_tokens = 256

[[keys]]
key = "sk-demo-free"
name = "demo-free"
tier = "free"

[[keys]]
key = "sk-demo-pro"
name = "demo-pro"
tier = "pro"
"""


def demo_settings() -> Settings:
    return parse_settings(tomllib.loads(DEMO_CONFIG), "<built-in demo config>")

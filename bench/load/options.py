"""What a load run is told: keys (:class:`KeySpec`), token ranges, and
:class:`LoadOptions`, from the command line or a config file."""

from __future__ import annotations

import random
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from tokenguard.config.loading import load_settings
from tokenguard.model import Limits, digest_of

CLIENT_BOUND_SHARE = 0.85
PROMPT_OVERHEAD = 7  # one user message: 3 per message + the role + 3 of reply priming
KEPT_HEADERS = ("x-ratelimit-", "retry-after", "x-tokenguard-queued-ms")
DEFAULT_REQUESTS = 1000
SURFACES = {"chat": ("chat",), "responses": ("responses",), "mix": ("chat", "responses")}
SURFACE_PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}


class UsageError(ValueError):
    """A bad command-line value; the message says which and why."""


@attrs.frozen
class TokenRange:
    """A uniform integer distribution ``low..high`` (inclusive)."""

    low: int
    high: int

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return f"{self.low}:{self.high}"


def parse_range(text: str, *, allow_none: bool = False) -> TokenRange | None:
    """``"20:200"`` (uniform), ``"64"`` (fixed) or, if allowed, ``"none"``."""
    if allow_none and text.strip().lower() == "none":
        return None
    low_text, sep, high_text = text.partition(":")
    try:
        low = int(low_text)
        high = int(high_text) if sep else low
    except ValueError:
        raise UsageError(f"expected N or LOW:HIGH, got {text!r}") from None
    if low < 1 or high < low:
        raise UsageError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return TokenRange(low, high)


@attrs.frozen
class KeySpec:
    """An API key to send with: its name, its secret and (if known) its limits."""

    name: str
    secret: str = attrs.field(repr=False)
    limits: Limits | None = None


def parse_key(text: str) -> KeySpec:
    """``SECRET[,name=NAME][,rpm=N][,input_tpm=N][,output_tpm=N]``.

    Without ``name=``, the key is named by a digest prefix, never by part of the secret,
    since names go into reports and JSON files.
    """
    secret, *fields = text.split(",")
    if not secret:
        raise UsageError(f"--key needs a secret first, got {text!r}")
    name = "key-" + digest_of(secret)[:8]
    values: dict[str, int] = {}
    for field in fields:
        field_name, sep, value = field.partition("=")
        if not sep:
            raise UsageError(f"--key field {field!r} is not NAME=VALUE")
        if field_name == "name":
            name = value
        elif field_name in ("rpm", "input_tpm", "output_tpm"):
            try:
                values[field_name] = int(value)
            except ValueError:
                raise UsageError(f"--key {field_name} must be an integer, got {value!r}") from None
        else:
            raise UsageError(
                f"--key: unknown field {field_name!r} (name, rpm, input_tpm, output_tpm)"
            )
    return KeySpec(name=name, secret=secret, limits=Limits(**values) if values else None)


def keys_from_config(path: str | Path, only: Sequence[str] = ()) -> tuple[list[KeySpec], int, int]:
    """Keys with a plaintext ``key`` in a server config, their limits, window and bucket.

    Limits come from :func:`tokenguard.config.loading.load_settings` (so tiers resolve as the
    server resolves them); the plaintext is read from the same TOML, since settings keep
    only digests. Keys given only as ``sha256`` cannot be sent and are skipped.
    """
    settings = load_settings(path)
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    secrets = {k["name"]: k["key"] for k in raw.get("keys", []) if "key" in k}
    specs = [
        KeySpec(name=k.name, secret=secrets[k.name], limits=k.limits)
        for k in settings.keys
        if k.name in secrets and (not only or k.name in only)
    ]
    missing = set(only) - {s.name for s in specs}
    if missing:
        raise UsageError(f"{path}: no key with a plaintext `key` named {sorted(missing)}")
    return specs, settings.window_seconds, settings.bucket_seconds


@attrs.frozen
class LoadOptions:
    """Everything a run needs. ``requests``/``duration``: whichever ends first (but
    each of the ``concurrency`` workers sends at least one request)."""

    urls: tuple[str, ...] = attrs.field(converter=lambda urls: tuple(u.rstrip("/") for u in urls))
    keys: tuple[KeySpec, ...] = attrs.field(converter=tuple)
    requests: int | None = None
    duration: float | None = None
    concurrency: int = 16
    prompt_tokens: TokenRange = TokenRange(20, 200)
    max_tokens: TokenRange | None = TokenRange(16, 128)
    stream_share: float = 0.3
    seed: int = 0
    window_seconds: float = 60.0
    bucket_seconds: float = 5.0
    timeout: float = 30.0
    connect_timeout: float = 5.0
    model: str = "gpt-4o"
    surface: str = attrs.field(default="chat", validator=attrs.validators.in_(SURFACES))

    @property
    def total(self) -> int | None:
        """The request budget; ``None`` when only a duration bounds the run."""
        if self.requests is None and self.duration is None:
            return DEFAULT_REQUESTS
        return self.requests

    def describe(self) -> dict[str, Any]:
        """The options as JSON-able data, without the keys' secrets."""
        return {
            "urls": list(self.urls),
            "keys": [
                {"name": k.name, "limits": None if k.limits is None else attrs.asdict(k.limits)}
                for k in self.keys
            ],
            "requests": self.total,
            "duration": self.duration,
            "concurrency": self.concurrency,
            "prompt_tokens": str(self.prompt_tokens),
            "max_tokens": None if self.max_tokens is None else str(self.max_tokens),
            "stream_share": self.stream_share,
            "seed": self.seed,
            "window_seconds": self.window_seconds,
            "bucket_seconds": self.bucket_seconds,
            "timeout": self.timeout,
            "connect_timeout": self.connect_timeout,
            "model": self.model,
            "surface": self.surface,
        }

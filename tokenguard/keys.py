"""``tokenguard keys``: API keys made for the config file, never stored in plaintext.

``tokenguard keys new --name NAME`` prints a fresh key (``tg-`` and 43 characters of
URL-safe base64: 256 bits from :mod:`secrets`) once, for whoever will use it, and the
``[[keys]]`` entry to paste into ``tokenguard.toml``, which holds only the key's
SHA-256 digest. tokenguard never sees the plaintext again until a client sends it; it
keeps the digest in memory, logs and publishes the key's *name*, and names its Redis
counters by a key id (a prefix of the digest).

``tokenguard keys digest`` reads keys from standard input (one a line) and prints their
digests, for a key made elsewhere.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
from typing import TextIO

from tokenguard.settings import digest_of

PREFIX = "tg-"
KEY_BYTES = 32  # 256 bits of entropy
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:/+-]{0,99}$")


def new_key() -> str:
    """A fresh API key: ``tg-`` + 256 random bits, URL-safe base64 (no padding)."""
    return PREFIX + secrets.token_urlsafe(KEY_BYTES)


def config_entry(name: str, digest: str, tier: str | None = None) -> str:
    """The ``[[keys]]`` TOML entry for a key known by its digest."""
    lines = ["[[keys]]", f"name = {json.dumps(name)}", f'sha256 = "{digest}"']
    if tier is not None:
        lines.append(f"tier = {json.dumps(tier)}")
    return "\n".join(lines) + "\n"


def _name(text: str) -> str:
    if not NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(
            f"a key name is 1-100 characters: letters, digits and . _ @ : / + - "
            f"(starting with a letter or digit), got {text!r}"
        )
    return text


def add_keys_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="make API keys for the config file")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    new = actions.add_parser(
        "new", help="print a fresh API key and its [[keys]] config entry (with its digest)"
    )
    new.add_argument("--name", required=True, type=_name, help="the key's name in logs")
    new.add_argument("--tier", type=_name, help="a tier of the config to put the key in")
    actions.add_parser("digest", help="print the SHA-256 digest of each key read from stdin")


def run_keys_command(
    args: argparse.Namespace, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    if args.keys_command == "new":
        key = new_key()
        print(
            f"API key for {args.name!r} (shown once; tokenguard stores only its digest):", file=out
        )
        print(f"  {key}", file=out)
        print("", file=out)
        print("Add to tokenguard.toml (add the key's limits, or a tier):", file=out)
        print("", file=out)
        print(config_entry(args.name, digest_of(key), args.tier), end="", file=out)
        return 0
    for line in stdin:
        key = line.strip()
        if key:
            print(digest_of(key), file=out)
    return 0

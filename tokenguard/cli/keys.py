"""``tokenguard keys``: API keys, never stored in plaintext.

Offline, for the config file: ``tokenguard keys new --name NAME`` prints a fresh key
(``tg-`` and 43 characters of URL-safe base64: 256 bits from :mod:`secrets`) once, for
whoever will use it, and the ``[[keys]]`` entry to paste into ``tokenguard.toml``, which
holds only the key's SHA-256 digest. ``tokenguard keys digest`` reads keys from
standard input (one a line) and prints their digests, for a key made elsewhere.

Live, through a node's admin API (``--admin URL``, or ``$TOKENGUARD_ADMIN_URL``; the
admin token from ``--admin-token-file`` or ``$TOKENGUARD_ADMIN_TOKEN``)::

    tokenguard keys list   --admin URL     (with each key's spend this calendar month
                                            under a monthly budget: ``spent 2026-12
                                            (key): 0.42 of 5``)
    tokenguard keys new    --admin URL --name NAME [--tier T] [--team T] [FIELD=VALUE ...]
    tokenguard keys set    --admin URL NAME [--tier T|none] [--team T|none] [FIELD=VALUE ...]
    tokenguard keys revoke --admin URL NAME

``FIELD=VALUE`` are the config's limit fields (``rpm=10``, ``tpd=none`` to remove one,
``mode=shadow``) and per-model rules (``models.gpt-4o*.rpm=5``; ``models.gpt-4o*=none``
removes the rule; a rule given is replaced whole). The node made the key; it prints it
once. Exit status: 0 done, 1 the admin API refused or could not be reached (its message
is printed), 2 a usage error.

tokenguard never sees the plaintext again until a client sends it; it keeps the digest,
logs and publishes the key's *name*, and names its Redis counters by a key id (a prefix
of the digest).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from tokenguard.config.prices import money_text
from tokenguard.config.settings import ADMIN_TOKEN_ENV
from tokenguard.limiting.registry import NAME_PATTERN
from tokenguard.model import RULE_FIELDS, digest_of, new_key

ADMIN_URL_ENV = "TOKENGUARD_ADMIN_URL"
ADMIN_TIMEOUT = 10.0
INTEGER = re.compile(r"-?[0-9]+")


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


def _value(text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if INTEGER.fullmatch(text):
        return int(text)
    return text


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """``["rpm=10", "models.gpt-4o*.tpm=5", "tpd=none"]`` into the admin API's JSON
    fields; ``ValueError`` saying what is wrong. Several fields of one model pattern
    make one rule."""
    fields: dict[str, Any] = {}
    for assignment in assignments:
        target, sep, text = assignment.partition("=")
        if not sep or not target:
            raise ValueError(f"expected FIELD=VALUE, got {assignment!r}")
        value = _value(text)
        if target.startswith("models."):
            rest = target.removeprefix("models.")
            models = fields.setdefault("models", {})
            pattern, dot, field = rest.rpartition(".")
            if dot and field in (*RULE_FIELDS, "mode"):
                rule = models.get(pattern)
                if rule is None:
                    rule = models[pattern] = {}
                rule[field] = value
            elif value is None:
                models[rest] = None
            else:
                raise ValueError(
                    f"{target!r}: give models.PATTERN.FIELD=VALUE or models.PATTERN=none"
                )
        else:
            fields[target] = value
    return fields


def add_keys_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="make API keys; list, add, change, revoke them live")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    def admin_options(parser: argparse.ArgumentParser, required: bool) -> None:
        parser.add_argument(
            "--admin",
            metavar="URL",
            default=os.environ.get(ADMIN_URL_ENV) or None,
            help=f"a node's admin API, e.g. http://127.0.0.1:9000 (default ${ADMIN_URL_ENV})"
            + ("" if required else "; without it, `new` prints a config entry instead"),
        )
        parser.add_argument(
            "--admin-token-file",
            metavar="FILE",
            help=f"a file holding the admin token (default: ${ADMIN_TOKEN_ENV})",
        )

    new = actions.add_parser(
        "new",
        help="make a key: through the admin API (--admin), or print it with its [[keys]] "
        "config entry",
    )
    new.add_argument("--name", required=True, type=_name, help="the key's name in logs")
    new.add_argument("--tier", type=_name, help="the tier to put the key in")
    new.add_argument("--team", help="with --admin: a configured team to put the key in")
    new.add_argument("fields", nargs="*", metavar="FIELD=VALUE", help="with --admin: limits")
    admin_options(new, required=False)

    listing = actions.add_parser("list", help="list the live keys (admin API)")
    listing.add_argument("--json", action="store_true", help="print the API's JSON")
    admin_options(listing, required=True)

    change = actions.add_parser("set", help="change a key's tier, team or limits (admin API)")
    change.add_argument("name", type=_name)
    change.add_argument("--tier", help="a tier, or none")
    change.add_argument("--team", help="a configured team, or none")
    change.add_argument("fields", nargs="*", metavar="FIELD=VALUE", help="limits to set")
    admin_options(change, required=True)

    revoke = actions.add_parser("revoke", help="revoke a key on every node (admin API)")
    revoke.add_argument("name", type=_name)
    admin_options(revoke, required=True)

    actions.add_parser("digest", help="print the SHA-256 digest of each key read from stdin")


class AdminClientError(Exception):
    """The admin API could not be used; the message says why (exit status 1)."""


class UsageError(Exception):
    """The command line is wrong (exit status 2)."""


def _admin_token(args: argparse.Namespace) -> str:
    if args.admin_token_file:
        try:
            token = Path(args.admin_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"--admin-token-file: {exc}") from None
    else:
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if not token:
        raise UsageError(f"no admin token: set ${ADMIN_TOKEN_ENV} or give --admin-token-file")
    return token


def admin_call(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    """One admin API call; its JSON answer, or AdminClientError with the API's message."""
    import httpx2  # only the live commands need it

    if not args.admin:
        raise UsageError(f"give the admin API's URL: --admin URL (or ${ADMIN_URL_ENV})")
    url = args.admin.rstrip("/") + path
    headers = {"Authorization": f"Bearer {_admin_token(args)}"}
    try:
        with httpx2.Client(timeout=ADMIN_TIMEOUT) as client:
            answer = client.request(method, url, json=body, headers=headers)
    except httpx2.HTTPError as exc:
        raise AdminClientError(f"cannot reach the admin API at {args.admin}: {exc}") from None
    try:
        data = answer.json()
    except ValueError:
        data = None
    if answer.status_code >= 400:
        message = answer.text[:200]
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            message = data["error"].get("message", message)
        raise AdminClientError(f"admin API: {answer.status_code}: {message}")
    return data


def _limits_text(limits: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in limits.items() if k != "models"]
    for pattern, rule in (limits.get("models") or {}).items():
        parts += [f"models.{pattern}.{k}={v}" for k, v in rule.items()]
    return " ".join(parts) or "-"


def key_line(key: dict[str, Any]) -> str:
    """One key of the admin API as ``tokenguard keys list`` prints it: name, tier, team,
    its own limits, and its spend this calendar month under each monthly budget."""
    line = (
        f"{key['name']}  tier={key.get('tier') or '-'}  team={key.get('team') or '-'}  "
        f"{_limits_text(key.get('limits') or {})}"
    )
    for spend in key.get("month_spend") or ():
        line += (
            f"  spent {spend['month']} ({spend['scope']}): "
            f"{money_text(spend['used'])} of {money_text(spend['limit'])}"
        )
    return line


def _run_live(args: argparse.Namespace, out: TextIO) -> int:
    command = args.keys_command
    if command == "list":
        data = admin_call(args, "GET", "/admin/keys")
        if args.json:
            print(json.dumps(data, indent=2), file=out)
        else:
            for key in data["data"]:
                print(key_line(key), file=out)
        return 0
    quoted = _quote(args.name)
    if command == "revoke":
        admin_call(args, "DELETE", f"/admin/keys/{quoted}")
        print(f"revoked {args.name!r}: refused on every node within a second", file=out)
        return 0
    try:
        body = parse_assignments(args.fields)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for field in ("tier", "team"):
        value = getattr(args, field)
        if value is not None:
            body[field] = None if value.lower() in ("none", "null") else value
    if command == "new":
        key = admin_call(args, "POST", "/admin/keys", {"name": args.name, **body})
        print(
            f"API key for {args.name!r} (shown once; tokenguard stores only its digest):", file=out
        )
        print(f"  {key['key']}", file=out)
        print(key_line(key), file=out)
        return 0
    key = admin_call(args, "PATCH", f"/admin/keys/{quoted}", body)
    print(key_line(key), file=out)
    return 0


def _quote(name: str) -> str:
    return quote(name, safe="@:+/")


def run_keys_command(
    args: argparse.Namespace,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    command = args.keys_command
    if command in ("list", "set", "revoke") or (command == "new" and args.admin):
        try:
            return _run_live(args, out)
        except UsageError as exc:
            print(f"tokenguard: {exc}", file=err)
            return 2
        except AdminClientError as exc:
            print(f"tokenguard: {exc}", file=err)
            return 1
    if command == "new":
        if args.fields or args.team:
            print(
                "tokenguard: FIELD=VALUE and --team need --admin; offline, add them to the "
                "printed [[keys]] entry",
                file=err,
            )
            return 2
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

"""The admin API: create, change and revoke API keys, and set tiers, on a listener of
its own (``tokenguard serve --admin-port P``; reference in docs/operations.md).

Routes (every one needs the admin token as a Bearer token)::

    GET    /admin/keys            every live key (never the key itself), with its
                                  calendar month's spend where a monthly budget applies
    POST   /admin/keys            create one: the plaintext key is in this answer only
    GET    /admin/keys/{name}
    PATCH  /admin/keys/{name}     change its tier, team or limits (null removes one)
    DELETE /admin/keys/{name}     revoke it: refused everywhere within a second
    GET    /admin/tiers
    GET    /admin/tiers/{name}
    PUT    /admin/tiers/{name}    set a tier's limits (creating it if new)

Guarantees:

* The token is the config's admin token (``[feed] admin_token`` or
  ``$TOKENGUARD_ADMIN_TOKEN``), its digest compared with :func:`hmac.compare_digest`.
  With no admin token configured every route answers 403: the API is off, never open.
  A wrong or missing token is a 401, before any route is looked up.
* The listener binds 127.0.0.1 unless told otherwise; :func:`check_admin_bind` refuses
  (ConfigError) a non-loopback address unless the admin token has 32 bytes or more.
* Bodies are strict JSON (:func:`tokenguard.strict_json.parse_json`) of at most 64 KiB, limit
  fields exactly as in the config (same names, same checks); every error is OpenAI's
  shape: 400 for a bad field, 404 for an unknown name, 409 for a name taken, 503 when
  the store cannot be reached. Changes are compare-and-set writes to the store's
  registry (:mod:`tokenguard.limiting.keyring`), applied on this node before the answer.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from tokenguard.api.hardening import drain_request_body
from tokenguard.bearer import bearer_token
from tokenguard.config.settings import ConfigError, Settings
from tokenguard.errors import APIError, http_error, invalid
from tokenguard.limiting.keyring import (
    KeyRecord,
    Keyring,
    KeyringError,
    TierRecord,
    table_of,
)
from tokenguard.limiting.limiter import Limiter
from tokenguard.limiting.usage import scope_kind
from tokenguard.loopback import is_loopback
from tokenguard.model import KEY_IDENTITY_FIELDS, digest_of, new_key
from tokenguard.store.window_store import StoreError, WindowStore
from tokenguard.strict_json import parse_json

log = logging.getLogger("tokenguard.api.admin")

MAX_BODY_BYTES = 64 * 1024
# A token that guards an address other machines can reach must resist guessing.
MIN_REMOTE_TOKEN_BYTES = 32


def check_admin_bind(host: str, settings: Settings) -> None:
    """Refuse (ConfigError) to serve the admin API on a non-loopback ``host`` unless
    the admin token is at least ``MIN_REMOTE_TOKEN_BYTES`` bytes long."""
    if is_loopback(host) or settings.feed.admin_token_bytes >= MIN_REMOTE_TOKEN_BYTES:
        return
    have = settings.feed.admin_token_bytes
    raise ConfigError(
        f"--admin-host {host}: the admin API may listen on a non-loopback address only "
        f"with an admin token of at least {MIN_REMOTE_TOKEN_BYTES} bytes "
        f"({'none is configured' if not have else f'it has {have}'}; set [feed] admin_token "
        f"or $TOKENGUARD_ADMIN_TOKEN, e.g. from `tokenguard keys new`, or bind 127.0.0.1)"
    )


def _json(body: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        status=status,
        content_type="application/json",
    )


def _limit_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in KEY_IDENTITY_FIELDS}


def _optional_name(body: Mapping[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is not None and (not isinstance(value, str) or not value):
        raise invalid(f"{field} must be a non-empty string or null", field)
    return value


class AdminAPI:
    """The admin routes' handlers, over one node's keyring and limiter (which reads the
    month's spend of the keys under a monthly budget)."""

    def __init__(self, settings: Settings, keyring: Keyring, limiter: Limiter) -> None:
        self.settings = settings
        self.keyring = keyring
        self.limiter = limiter
        self._admin_digest = settings.feed.admin_digest

    async def authorize(self) -> None:
        """Before every route: 403 when the API is off, 401 without the admin token."""
        if self._admin_digest is None:
            raise APIError(
                403,
                "The admin API is off: no admin token is configured ([feed] admin_token "
                "or $TOKENGUARD_ADMIN_TOKEN).",
                "permission_error",
                code="admin_disabled",
            )
        values = request.headers.getlist("Authorization")
        token = (bearer_token(values[0]) if len(values) == 1 else None) or ""
        # Always compared, whatever was sent: the time taken says nothing.
        if not hmac.compare_digest(digest_of(token), self._admin_digest) or not token:
            raise APIError(
                401,
                "Incorrect or missing admin token (Authorization: Bearer ADMIN_TOKEN).",
                code="invalid_admin_token",
            )

    async def _body(self) -> dict[str, Any]:
        body = parse_json(await request.get_data(cache=False))
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        return body

    # -- views

    async def _key_view(self, record: KeyRecord) -> dict[str, Any]:
        """A key as the admin API shows it. ``month_spend``: per monthly spend budget
        that applies to it (its own, its tier's, its team's), this calendar month's
        spend and budget in micro-units; empty without one (nothing is read then)."""
        key = self.keyring.by_name(record.name)
        month_spend = [] if key is None else await self.limiter.month_spend(key)
        return {
            "object": "api_key",
            "name": record.name,
            "key_id": record.digest[:16],
            "tier": record.tier,
            "team": record.team,
            "limits": dict(record.limits),
            "effective_limits": None if key is None else table_of(key.limits),
            "source": record.source,
            "updated_at": record.updated_at,
            "month_spend": [
                {
                    "scope": scope_kind(s.row.scope),
                    "month": s.row.scope.rpartition(":month:")[2],
                    "used": s.used,
                    "limit": s.row.limit,
                    "reset_seconds": s.reset_after,
                }
                for s in month_spend
            ],
        }

    def _tier_view(self, name: str, record: TierRecord) -> dict[str, Any]:
        limits = self.keyring.tiers.get(name)
        return {
            "object": "tier",
            "name": name,
            "limits": dict(record.limits),
            "effective_limits": None if limits is None else table_of(limits),
            "source": record.source,
            "updated_at": record.updated_at,
        }

    def _key(self, name: str) -> KeyRecord:
        record = self.keyring.key_record(name)
        if record is None:
            raise APIError(404, f"No API key named {name!r}.", code="key_not_found")
        return record

    # -- keys

    async def list_keys(self) -> Response:
        await self.keyring.refresh()
        records = [self.keyring.key_record(name) for name in sorted(self.keyring.keys_by_name)]
        data = [await self._key_view(r) for r in records if r is not None]
        return _json({"object": "list", "data": data})

    async def get_key(self, name: str) -> Response:
        await self.keyring.refresh()
        return _json(await self._key_view(self._key(name)))

    async def create_key(self) -> Response:
        body = await self._body()
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise invalid("name is required: a non-empty string", "name")
        for field in ("key", "sha256"):
            if field in body:
                raise invalid(f"{field}: keys are made by tokenguard (shown once)", field)
        plaintext = new_key()
        record = await self.keyring.create_key(
            name,
            digest_of(plaintext),
            tier=_optional_name(body, "tier"),
            team=_optional_name(body, "team"),
            limits=_limit_fields(body),
        )
        log.info("admin: key %r created (tier %s)", name, record.tier)
        return _json({**(await self._key_view(record)), "key": plaintext}, 201)

    async def update_key(self, name: str) -> Response:
        body = await self._body()
        for field in ("name", "key", "sha256"):
            if field in body:
                raise invalid(f"{field} cannot be changed (revoke the key, make a new one)", field)
        for field in ("tier", "team"):
            _optional_name(body, field)
        record = await self.keyring.update_key(name, body)
        log.info("admin: key %r changed: %s", name, ", ".join(sorted(body)) or "nothing")
        return _json(await self._key_view(record))

    async def revoke_key(self, name: str) -> Response:
        await self.keyring.revoke_key(name)
        log.info("admin: key %r revoked", name)
        return _json({"object": "api_key", "name": name, "revoked": True})

    # -- tiers

    async def list_tiers(self) -> Response:
        await self.keyring.refresh()
        data = []
        for name in sorted(self.keyring.tiers):
            record = self.keyring.tier_record(name)
            if record is not None:
                data.append(self._tier_view(name, record))
        return _json({"object": "list", "data": data})

    async def get_tier(self, name: str) -> Response:
        await self.keyring.refresh()
        record = self.keyring.tier_record(name)
        if record is None:
            raise APIError(404, f"No tier named {name!r}.", code="tier_not_found")
        return _json(self._tier_view(name, record))

    async def put_tier(self, name: str) -> Response:
        body = await self._body()
        created = await self.keyring.put_tier(name, body)
        log.info("admin: tier %r %s", name, "created" if created else "set")
        record = self.keyring.tier_record(name)
        assert record is not None
        return _json(self._tier_view(name, record), 201 if created else 200)


def create_admin_app(
    settings: Settings, store: WindowStore, keyring: Keyring, limiter: Limiter
) -> QuartTrio:
    """The admin API of one node, over its ``keyring`` (run by the caller), the
    ``store`` that holds the registry, and the node's ``limiter``."""
    app = QuartTrio("tokenguard-admin", static_folder=None)  # no files to serve
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY_BYTES, BODY_TIMEOUT=30)
    app.url_map.merge_slashes = False
    admin = AdminAPI(settings, keyring, limiter)
    app.extensions["tokenguard-admin"] = admin
    app.before_request(admin.authorize)
    app.after_request(drain_request_body)  # an early 401 keeps the connection usable

    app.add_url_rule("/admin/keys", view_func=admin.list_keys, methods=["GET"])
    app.add_url_rule("/admin/keys", view_func=admin.create_key, methods=["POST"])
    app.add_url_rule("/admin/keys/<path:name>", view_func=admin.get_key, methods=["GET"])
    app.add_url_rule("/admin/keys/<path:name>", view_func=admin.update_key, methods=["PATCH"])
    app.add_url_rule("/admin/keys/<path:name>", view_func=admin.revoke_key, methods=["DELETE"])
    app.add_url_rule("/admin/tiers", view_func=admin.list_tiers, methods=["GET"])
    app.add_url_rule("/admin/tiers/<path:name>", view_func=admin.get_tier, methods=["GET"])
    app.add_url_rule("/admin/tiers/<path:name>", view_func=admin.put_tier, methods=["PUT"])

    @app.errorhandler(APIError)
    async def on_api_error(error: APIError) -> Response:
        return _json(error.body(), error.status)

    @app.errorhandler(KeyringError)
    async def on_keyring_error(error: KeyringError) -> Response:
        answer = APIError(error.status, str(error), param=error.param, code=error.code)
        return _json(answer.body(), error.status)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        unknown_url = f"Unknown admin URL: {request.method} {request.path}."
        api_error = http_error(error, unknown_url=unknown_url, max_body_bytes=MAX_BODY_BYTES)
        return _json(api_error.body(), api_error.status)

    @app.errorhandler(StoreError)
    async def on_store_error(error: StoreError) -> Response:
        log.error("admin: store unavailable: %s", error)
        body = APIError(
            503,
            "The store holding keys and tiers is unavailable; please retry shortly.",
            "server_error",
            code="store_unavailable",
        ).body()
        return Response(
            json.dumps(body),
            status=503,
            content_type="application/json",
            headers={"retry-after": "1"},
        )

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        log.exception("admin: unexpected error on %s %s", request.method, request.path)
        body = APIError(500, "The server had an error processing your request.", "server_error")
        return _json(body.body(), 500)

    return app

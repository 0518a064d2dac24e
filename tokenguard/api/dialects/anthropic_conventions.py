"""Anthropic's API conventions: the credential, the error body, the rate-limit headers.

What Anthropic's SDKs and tools expect of every answer of an Anthropic surface
(https://docs.claude.com/en/api/errors, /en/api/rate-limits, /en/api/versioning):

* the key in ``x-api-key`` (or as ``Authorization: Bearer``, which Anthropic's SDKs send
  for an ``auth_token``): exactly one credential, else a 400; none is a 401;
* an ``anthropic-version`` header (a date, ``2023-06-01``): required, a 400 without it;
  ``anthropic-beta`` (a comma-separated list of names) optional. Both are checked here
  and sent upstream as the client sent them (:func:`anthropic_upstream_headers`);
* errors as ``{"type": "error", "error": {"type", "message"}}``, the type by status
  (:data:`ERROR_TYPES`); a concurrency refusal is a 429 ``rate_limit_error`` too;
* ``anthropic-ratelimit-{requests,input-tokens,output-tokens,tokens}-{limit,remaining,
  reset}`` with ``reset`` in RFC 3339 (:func:`tokenguard.api.ratelimit.anthropic_header_fields`),
  and ``retry-after`` on a 429 (:func:`tokenguard.api.ratelimit.rate_limit_error`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tokenguard.api.auth import bearer_credential
from tokenguard.api.dialect import Conventions, Headers
from tokenguard.api.ratelimit import anthropic_header_fields
from tokenguard.config.settings import UpstreamRoute
from tokenguard.errors import APIError, invalid
from tokenguard.store.rows import RowState

# Anthropic's error type of each status it answers with; others by class (below).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# tokenguard's own 503s (the store, the upstream pool): the service is overloaded.
OVERLOADED_STATUSES = frozenset({503, 529})

VERSION = re.compile(r"\d{4}-\d{2}-\d{2}")
BETA = re.compile(r"[A-Za-z0-9._-]{1,100}(?:\s*,\s*[A-Za-z0-9._-]{1,100}){0,31}")

MISSING_KEY = "x-api-key header is required"


def error_type(status: int) -> str:
    """Anthropic's error type for an answer of ``status``."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    if status in OVERLOADED_STATUSES:
        return "overloaded_error"
    return "api_error" if status >= 500 else "invalid_request_error"


def _one_header(headers: Any, name: str) -> str | None:
    """The one value of header ``name`` (``None`` when absent; a 400 when repeated)."""
    values = headers.getlist(name)
    if len(values) > 1:
        raise invalid(f"send exactly one {name} header")
    return values[0].strip() if values else None


class AnthropicConventions(Conventions):
    """Anthropic's conventions (see the module docstring)."""

    missing_key_message = MISSING_KEY

    def credential(self, headers: Any) -> str:
        """The key in ``x-api-key`` or ``Authorization: Bearer``; a 401 without one, a
        400 for both or a repeated one. Then the version headers are checked: a 400
        without ``anthropic-version`` or with a malformed one or ``anthropic-beta``."""
        keys = headers.getlist("x-api-key")
        bearer = headers.getlist("Authorization")
        if len(keys) + len(bearer) > 1:
            raise invalid("send exactly one credential: x-api-key or Authorization: Bearer")
        if keys:
            token = keys[0].strip()
            if not token:
                raise APIError(401, "invalid x-api-key", code="invalid_api_key")
        elif bearer:
            token = bearer_credential(headers)
        else:
            raise APIError(401, MISSING_KEY, code="invalid_api_key")
        version = _one_header(headers, "anthropic-version")
        if not version:
            raise invalid("anthropic-version: header is required")
        if not VERSION.fullmatch(version):
            raise invalid(f"anthropic-version: {version!r} is not a valid version (YYYY-MM-DD)")
        beta = _one_header(headers, "anthropic-beta")
        if beta is not None and not BETA.fullmatch(beta):
            raise invalid("anthropic-beta: must be a comma-separated list of beta names")
        return token

    def error_body(self, error: APIError) -> dict[str, Any]:
        return {
            "type": "error",
            "error": {"type": error_type(error.status), "message": error.message},
        }

    def ratelimit_header_fields(self, states: tuple[RowState, ...]) -> Headers:
        return anthropic_header_fields(states)

    def has_ratelimit_headers(self, headers: Mapping[str, str]) -> bool:
        return any(name.startswith("anthropic-ratelimit-") for name in headers)


ANTHROPIC = AnthropicConventions()
"""Anthropic's conventions: stateless, shared by every Anthropic surface."""


def anthropic_upstream_headers(route: UpstreamRoute, request_headers: Any) -> dict[str, str]:
    """What an Anthropic upstream is sent: the route's key in ``x-api-key``, and the
    client's ``anthropic-version`` and ``anthropic-beta`` (checked by
    :meth:`AnthropicConventions.credential` before anything is sent)."""
    headers: dict[str, str] = {}
    if route.api_key is not None:
        headers["x-api-key"] = route.api_key
    for name in ("anthropic-version", "anthropic-beta"):
        value = request_headers.get(name)
        if value:
            headers[name] = value.strip()
    return headers

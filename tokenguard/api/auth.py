"""Which key a request is: its credential, read as its API family sends it.

Guarantees: exactly one credential header (two are a 400: tokenguard never picks one);
the key is looked up by its SHA-256 digest, never kept in plaintext; a revoked key is
not in the keyring, so it answers exactly like one that never existed (401).
"""

from __future__ import annotations

from typing import Any

from tokenguard.bearer import bearer_token
from tokenguard.errors import APIError, invalid

MISSING_BEARER = (
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def bearer_credential(headers: Any) -> str:
    """The key of a request that authenticates as OpenAI's APIs do: one
    ``Authorization: Bearer KEY`` header. A 400 for two headers, a 401
    (``invalid_api_key``) for none or a malformed one."""
    values = headers.getlist("Authorization")
    if len(values) > 1:
        raise invalid("send exactly one Authorization header", code="invalid_authorization")
    if not values or not values[0].strip():
        raise APIError(401, MISSING_BEARER, code="invalid_api_key")
    token = bearer_token(values[0])
    if token is None:
        message = "Malformed Authorization header: expected 'Bearer YOUR_KEY'."
        raise APIError(401, message, code="invalid_api_key")
    return token


def unknown_key() -> APIError:
    """The 401 of a key the keyring does not have (unknown, or revoked)."""
    return APIError(401, "Incorrect API key provided.", code="invalid_api_key")

"""Bearer tokens in an ``Authorization`` header (RFC 6750): the one reading of them.

Every credential tokenguard checks (API keys, the admin token, the metrics token) is
sent as ``Authorization: Bearer <token>`` and known only by its SHA-256 digest
(:func:`tokenguard.model.digest_of`). The scheme is case-insensitive (RFC 7235);
blanks around the value and the token are ignored. A value with another scheme, or no
token, carries no bearer token.
"""

from __future__ import annotations

import hmac

from tokenguard.model import digest_of


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization`` value ``Bearer <token>``; ``None`` when the
    value is missing, has another scheme, or names no token."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def bearer_matches(authorization: str | None, token_digest: str | None) -> bool:
    """True if no token is required (``token_digest`` is ``None``), or
    ``authorization`` is ``Bearer <the token>``, compared by digest in constant time."""
    if token_digest is None:
        return True
    token = bearer_token(authorization)
    if token is None:
        return False
    return hmac.compare_digest(digest_of(token), token_digest)

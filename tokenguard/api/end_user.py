"""Who the end user of a request is: the id an application sends for its own user.

Per-user limits (``per_user`` on a tier, key or team) count each end user of a key
separately, without registering anyone: the id comes with the request, from the body
(:func:`end_user_of`: ``user``, ``safety_identifier``, then Anthropic's
``metadata.user_id``, in that order) or, when the body names none, from the header
``[limits] user_header``. Guarantees:

* an id is never stored: its rows are named by :func:`~tokenguard.model.user_digest`;
* an id longer than :data:`MAX_END_USER_BYTES` (UTF-8) or not a string is a 400 naming
  where it was read, before anything is counted or consumed;
* a request with no id, under a per-user limit, counts in one bucket shared by all such
  requests (``missing_user = "shared"``) or is a 400 (``"reject"``).
"""

from __future__ import annotations

from typing import Any

from tokenguard.errors import APIError, invalid
from tokenguard.model import SHARED_END_USER, user_digest

MAX_END_USER_BYTES = 256
# Where a body names its end user, in the order they are read: (field, nested field).
BODY_FIELDS = (("user", None), ("safety_identifier", None), ("metadata", "user_id"))


def end_user_of(body: dict[str, Any]) -> str | None:
    """The end user a request body names (the first of :data:`BODY_FIELDS` set), or
    ``None``; a 400 naming the field for a non-string or oversized id. An empty string
    names nobody."""
    for field, nested in BODY_FIELDS:
        value = body.get(field)
        param = field
        if nested is not None:
            if not isinstance(value, dict):
                continue
            value, param = value.get(nested), f"{field}.{nested}"
        if value is None:
            continue
        return checked_end_user(value, param)
    return None


def checked_end_user(value: Any, param: str) -> str | None:
    """``value`` as an end-user id read from ``param`` (``None`` for an empty one); a
    400 when it is not a string or longer than :data:`MAX_END_USER_BYTES`."""
    if not isinstance(value, str):
        raise invalid(f"{param} must be a string naming the end user", param)
    if len(value.encode("utf-8", "surrogatepass")) > MAX_END_USER_BYTES:
        raise invalid(f"{param} must be at most {MAX_END_USER_BYTES} bytes", param)
    return value or None


def user_scope(end_user: str | None, *, missing_user: str, header: str | None) -> str:
    """The name of an end user's per-user rows: the digest of its id, or, for a request
    naming none, :data:`~tokenguard.model.SHARED_END_USER` (``missing_user="shared"``)
    or a 400 (``"reject"``) saying where an id is read."""
    if end_user is not None:
        return user_digest(end_user)
    if missing_user == "shared":
        return SHARED_END_USER
    where = "the body's `user`" + (f" or the `{header}` header" if header else "")
    raise APIError(
        400,
        f"This key has per-user limits: name the end user in {where}.",
        param="user",
        code="missing_user",
    )

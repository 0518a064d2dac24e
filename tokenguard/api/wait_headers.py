"""The request headers that ask the admission queue for less: a shorter wait, a lower
priority.

* ``x-tokenguard-max-wait: SECONDS`` (a decimal number, 0 or more): the request waits
  at most that long for room, never longer than its rules' ``max_wait_seconds``
  (asking more is asking for the rules' bound); 0 asks for the 429 at once.
* ``x-tokenguard-priority: interactive | batch``: may only lower the key's priority
  (a batch key asking ``interactive`` stays batch).

A malformed or repeated header is a 400 naming it in ``param``, before anything is
counted or consumed.
"""

from __future__ import annotations

import re

from werkzeug.datastructures import Headers

from tokenguard.errors import invalid
from tokenguard.model import PRIORITIES

MAX_WAIT_HEADER = "x-tokenguard-max-wait"
PRIORITY_HEADER = "x-tokenguard-priority"
# Digits, an optional fraction; at most 16 characters (no exponent, no sign, no nan).
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,6})?")


def _one(headers: Headers, name: str) -> str | None:
    values = headers.getlist(name)
    if len(values) > 1:
        raise invalid(f"Send the {name} header at most once.", name, "invalid_header")
    return values[0].strip() if values else None


def asked_wait(headers: Headers) -> float | None:
    """The seconds ``x-tokenguard-max-wait`` asks for (``None``: not sent); a 400
    unless it is a plain decimal number."""
    text = _one(headers, MAX_WAIT_HEADER)
    if text is None:
        return None
    if not _SECONDS.fullmatch(text):
        raise invalid(
            f"{MAX_WAIT_HEADER} must be a number of seconds, 0 or more (like 2.5).",
            MAX_WAIT_HEADER,
            "invalid_header",
        )
    return float(text)


def asked_priority(headers: Headers) -> str | None:
    """The priority ``x-tokenguard-priority`` asks for (``None``: not sent); a 400
    unless it is one of :data:`~tokenguard.model.PRIORITIES`."""
    text = _one(headers, PRIORITY_HEADER)
    if text is None:
        return None
    if text not in PRIORITIES:
        raise invalid(
            f"{PRIORITY_HEADER} must be one of {', '.join(PRIORITIES)}.",
            PRIORITY_HEADER,
            "invalid_header",
        )
    return text

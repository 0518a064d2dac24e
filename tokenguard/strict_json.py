"""The strict JSON reader of everything a client sends: request bodies, admin bodies,
the usage feed's first message.

Stricter than Python's default, because a lenient reader is a quota bypass: duplicate
keys (tokenguard and the upstream could read different ``max_tokens``),
``NaN``/``Infinity``, lone surrogates and absurd nesting are refused, each a 400
:class:`~tokenguard.errors.APIError` that says what is wrong (naming the field where
there is one), never a 500.
"""

from __future__ import annotations

import json
from typing import Any

from tokenguard.errors import invalid


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise invalid(f"duplicate key {key!r} in the JSON body", param=key)
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise invalid(f"{name} is not valid JSON: numbers must be finite")


def parse_json(data: bytes) -> Any:
    """Parse a request body as strict JSON; raise a 400 :class:`APIError` otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise invalid(
            f"We could not parse the JSON body of your request: {exc.msg} at line "
            f"{exc.lineno} column {exc.colno}."
        ) from None
    except RecursionError:
        raise invalid("the JSON body is nested too deeply") from None


def check_text(value: str, param: str) -> None:
    """Refuse (400 naming ``param``) a string that is not encodable UTF-8 (a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param} contains a lone surrogate (invalid Unicode)", param) from None

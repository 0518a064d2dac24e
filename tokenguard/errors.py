"""OpenAI's error shape, as one exception type the app turns into a JSON response.

Every error tokenguard answers, from a bad body to a refused request, has the body
``{"error": {"message", "type", "param", "code"}}`` that OpenAI's SDKs parse, never an
HTML page or a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


@attrs.define(eq=False)
class APIError(Exception):
    """An error answer: HTTP status, OpenAI error fields, and extra headers."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message}"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error`` naming the offending field in ``param``."""
    return APIError(400, message, param=param, code=code)

"""OpenAI's error shape, as one exception type the app turns into a JSON response.

Every error tokenguard answers, from a bad body to a refused request, has the body
``{"error": {"message", "type", "param", "code"}}`` that OpenAI's SDKs parse, never an
HTML page or a traceback; :func:`http_error` gives routing and size errors (404, 405,
413) that shape, for the API and the admin API alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from quart import request
from werkzeug.exceptions import HTTPException


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


def http_error(exc: HTTPException, *, unknown_url: str, max_body_bytes: int) -> APIError:
    """The OpenAI-shaped answer to a routing or size error of the request being served:
    404 with ``unknown_url`` as its message, 405 naming the method and path, 413 naming
    ``max_body_bytes``; any other status keeps its own description."""
    status = exc.code or 500
    if status == 404:
        return APIError(404, unknown_url, code="unknown_url")
    if status == 405:
        return APIError(405, f"Method {request.method} is not allowed on {request.path}.")
    if status == 413:
        return APIError(
            413,
            f"The request body is larger than the limit of {max_body_bytes} bytes.",
            code="request_too_large",
        )
    return APIError(status, exc.description or exc.name)

"""The Responses API's routes besides ``POST /v1/responses`` and its ``input_tokens`` (the
pipeline's: :meth:`~tokenguard.api.pipeline.Pipeline.count`).

* ``GET /v1/responses/{id}``, ``DELETE /v1/responses/{id}`` and
  ``GET /v1/responses/{id}/input_items``: in mock mode from the mock's responses kept on
  this node (:class:`~tokenguard.api.response_store.StoredResponses`; a 404 for an id
  made elsewhere, or forgotten); in proxy mode forwarded to the upstream route of the
  model the response was made with, for ids the upstream made for this key (the
  store's records say which; a 404 for any other id). They consume nothing.

Every answer carries the key's rate-limit headers, and errors are OpenAI's shape.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from quart import Response, request

from tokenguard.api.dialect import OPENAI, AnswerTotals
from tokenguard.api.dialects.responses import ResponsesDialect
from tokenguard.api.pipeline import Pipeline
from tokenguard.api.responses import json_response
from tokenguard.errors import APIError
from tokenguard.model import ApiKey
from tokenguard.upstreams.proxy import Upstream


def response_not_found(response_id: str) -> APIError:
    return APIError(
        404, f"No response found with id '{response_id}'.", param="response_id", code=None
    )


class ResponseRoutes:
    """The handlers (see the module docstring) of one node's Responses dialect."""

    def __init__(
        self, pipeline: Pipeline, dialect: ResponsesDialect, upstream: Upstream | None
    ) -> None:
        self.pipeline = pipeline
        self.dialect = dialect
        self.upstream = upstream

    async def retrieve(self, response_id: str) -> Response:
        key = self.pipeline.authenticate(OPENAI)
        if self.upstream is not None:
            return await self._forwarded(key, "GET", response_id, "")
        return await self._answer(key, self._kept(key, response_id).response)

    async def delete(self, response_id: str) -> Response:
        key = self.pipeline.authenticate(OPENAI)
        if self.upstream is not None:
            return await self._forwarded(key, "DELETE", response_id, "")
        if not self.dialect.kept.delete(key.key_id, response_id):
            raise response_not_found(response_id)
        return await self._answer(
            key, {"id": response_id, "object": "response.deleted", "deleted": True}
        )

    async def input_items(self, response_id: str) -> Response:
        key = self.pipeline.authenticate(OPENAI)
        if self.upstream is not None:
            return await self._forwarded(key, "GET", response_id, "/input_items")
        kept = self._kept(key, response_id)
        items = [_input_item(item, f"{response_id}_{i}") for i, item in enumerate(kept.items)]
        items.reverse()  # OpenAI lists them newest first by default
        body = {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
        return await self._answer(key, body)

    def _kept(self, key: ApiKey, response_id: str) -> AnswerTotals:
        """The mock's kept response ``response_id`` of ``key``; a 404 when there is none."""
        kept = self.dialect.kept.get(key.key_id, response_id)
        if kept is None:
            raise response_not_found(response_id)
        return kept

    async def _answer(self, key: ApiKey, body: Any) -> Response:
        states = await self.pipeline.limiter.usage(key)
        return json_response(body, headers=OPENAI.ratelimit_headers(states))

    async def _forwarded(self, key: ApiKey, method: str, response_id: str, tail: str) -> Response:
        """The upstream's answer for a response it made for ``key`` (``tail``: what
        follows the response's path), passed through."""
        assert self.upstream is not None
        record = await self.dialect.records.get(key.key_id, response_id)
        route = self.upstream.route(record.model) if record is not None else None
        if route is None:
            raise response_not_found(response_id)
        path = f"/responses/{quote(response_id, safe='')}{tail}"
        query = request.query_string.decode("ascii", "replace")
        if query:
            path += f"?{query}"
        reply = await self.upstream.fetch(
            route,
            method,
            path,
            record.model,
            key=key.key_id,
            headers=self.dialect.upstream_headers(route, request.headers),
        )
        headers = dict(reply.headers)
        content_type = headers.pop("content-type")
        states = await self.pipeline.limiter.usage(key)
        headers.update(OPENAI.ratelimit_headers(states))
        return Response(
            reply.content, status=reply.status, headers=headers, content_type=content_type
        )


def _input_item(item: Any, fallback_id: str) -> dict[str, Any]:
    """An input item as ``input_items`` lists it: with an ``id`` and, for a message, a
    ``status`` and its content as parts."""
    if not isinstance(item, dict):
        return {"id": fallback_id, "type": "message", "role": "user", "content": []}
    listed = {"id": fallback_id, **item}
    if listed.get("type", "message") == "message":
        listed["type"] = "message"
        listed.setdefault("status", "completed")
        if isinstance(listed.get("content"), str):
            listed["content"] = [{"type": "input_text", "text": listed["content"]}]
    return listed

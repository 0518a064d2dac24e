"""What a key may read about itself: ``GET /v1/usage``, ``GET /v1/models`` and
``GET /v1/models/{id}``.

Both authenticate as OpenAI's APIs do and answer with the key's rate-limit headers;
neither consumes anything. ``/v1/usage`` is tokenguard's own: per dimension the
tightest enforced row over every window and scope, and every row (shadow ones too);
``/v1/usage?user=ID`` adds end user ``ID``'s per-user rows under the calling key;
``cached_input_tokens`` is the key's prompt-cache hits the upstream reported over the
``[window]`` (counted or not as input, per route: ``cached_input_counts``).
``/v1/models`` lists, in proxy mode, the exact model names of ``[upstream.models]``,
else the mock's.
"""

from __future__ import annotations

from quart import Response, request

from tokenguard.api.dialect import OPENAI
from tokenguard.api.end_user import checked_end_user
from tokenguard.api.pipeline import Pipeline, model_not_found
from tokenguard.api.responses import json_response
from tokenguard.config.settings import Settings
from tokenguard.limiting.usage import scope_kind, usage_by_dimension, usage_entry
from tokenguard.model import user_digest

MOCK_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4", "gpt-3.5-turbo")


class Info:
    """The handlers of ``/v1/usage`` and ``/v1/models`` (see the module docstring)."""

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline

    async def usage(self) -> Response:
        key = self.pipeline.authenticate(OPENAI)
        end_user = checked_end_user(request.args.get("user", ""), "user")
        user = None if end_user is None else user_digest(end_user)
        states, cached_input = await self.pipeline.limiter.usage_and_cached_input(key, user)
        body = {
            "object": "usage",
            "key": key.name,
            **({} if end_user is None else {"user": end_user}),
            "window_seconds": self.settings.window_seconds,
            "bucket_seconds": self.settings.bucket_seconds,
            "dimensions": usage_by_dimension(states),
            "cached_input_tokens": cached_input,
            "limits": [
                {
                    "scope": scope_kind(s.row.scope),
                    "dimension": s.row.dimension,
                    "window_seconds": s.row.window_ms / 1000,
                    "mode": "enforce" if s.row.enforce else "shadow",
                    **usage_entry(s),
                }
                for s in states
            ],
        }
        return json_response(body, headers=OPENAI.ratelimit_headers(states))

    def served_models(self) -> tuple[tuple[str, ...], str]:
        """The model names listed, and their ``owned_by``: ``[upstream.models]``'s in
        proxy mode, else ``[mock] models`` (the mock's defaults when not set)."""
        if self.settings.upstream.enabled:
            return tuple(self.settings.upstream.model_ids()), "tokenguard-upstream"
        return self.settings.mock.models or MOCK_MODELS, "tokenguard-mock"

    async def models(self) -> Response:
        key = self.pipeline.authenticate(OPENAI)
        states = await self.pipeline.limiter.usage(key)
        models, owner = self.served_models()
        body = {"object": "list", "data": [_model_object(m, owner) for m in models]}
        return json_response(body, headers=OPENAI.ratelimit_headers(states))

    async def model(self, model_id: str) -> Response:
        """``GET /v1/models/{id}`` (the SDKs' ``models.retrieve``): a listed model, else
        a 404 ``model_not_found``."""
        key = self.pipeline.authenticate(OPENAI)
        models, owner = self.served_models()
        if model_id not in models:
            raise model_not_found(model_id)
        states = await self.pipeline.limiter.usage(key)
        return json_response(
            _model_object(model_id, owner), headers=OPENAI.ratelimit_headers(states)
        )


def _model_object(model: str, owner: str) -> dict[str, object]:
    return {"id": model, "object": "model", "created": 0, "owned_by": owner}

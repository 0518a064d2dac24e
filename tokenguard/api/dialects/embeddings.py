"""OpenAI's embeddings, ``POST /v1/embeddings``, as a dialect.

One request and its input tokens (the input, as OpenAI's prompt union); no output is
reserved (an embedding generates no tokens). The mock answers with deterministic unit
vectors, float or base64 (little-endian float32, as the API sends them).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from typing import Any

import attrs

from tokenguard.api.dialect import Dialect, Exchange, MockAnswer
from tokenguard.api.dialects.openai import ChoicesMeter
from tokenguard.api.dialects.prompt import Prompt, parse_prompt, prompt_tokens
from tokenguard.api.end_user import end_user_of
from tokenguard.api.request_body import positive_int, request_model
from tokenguard.errors import invalid
from tokenguard.upstreams.mock import embedding_vector
from tokenguard.upstreams.relay import StreamMeter

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's cap on an embeddings batch
ENCODING_FORMATS = ("float", "base64")
DEFAULT_EMBEDDING_DIMENSIONS = 256


@attrs.frozen
class EmbeddingRequest:
    """A validated ``POST /v1/embeddings`` body; ``body`` is the parsed JSON, untouched."""

    body: dict[str, Any]
    model: str
    input: Prompt
    dimensions: int | None
    encoding_format: str


def validate_embedding(body: Any) -> EmbeddingRequest:
    """Check a parsed ``/v1/embeddings`` body (the parts the limiter relies on)."""
    model = request_model(body)
    inputs = parse_prompt(body.get("input"), "input", max_items=MAX_EMBEDDING_INPUTS)
    for i, item in enumerate(inputs):
        if item == "":
            where = "input" if len(inputs) == 1 else f"input[{i}]"
            raise invalid(f"{where} must not be an empty string", where)
    dimensions = positive_int(body, "dimensions", 65536)
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ENCODING_FORMATS:
        raise invalid(
            f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}, got "
            f"{encoding_format!r}",
            "encoding_format",
        )
    return EmbeddingRequest(
        body=body,
        model=model,
        input=inputs,
        dimensions=dimensions,
        encoding_format=encoding_format,
    )


class EmbeddingsDialect(Dialect):
    """``POST /v1/embeddings`` (see the module docstring)."""

    surface = "embeddings"
    path = "/v1/embeddings"
    upstream_path = "/embeddings"

    def parse(self, body: Any) -> Exchange:
        req = validate_embedding(body)
        return Exchange(
            body=req.body,
            model=req.model,
            stream=False,
            per_choice=0,
            choices=0,
            request=req,
            end_user=end_user_of(req.body),
        )

    def count_input(self, exchange: Exchange) -> int:
        req: EmbeddingRequest = exchange.request
        return prompt_tokens(req.model, req.input)

    def mock_answer(self, exchange: Exchange, per_choice: int, input_tokens: int) -> MockAnswer:
        req: EmbeddingRequest = exchange.request
        body = embedding_body(
            req.model, req.input, input_tokens, req.dimensions, req.encoding_format
        )
        return MockAnswer(0, body=body)

    def meter(self, exchange: Exchange) -> StreamMeter:
        return ChoicesMeter(include_usage=False)  # (embeddings never stream)

    def reply_output(self, model: str, body: Any) -> int:
        return 0


def embedding_body(
    model: str,
    inputs: Sequence[Any],
    prompt_tokens: int,
    dimensions: int | None = None,
    encoding_format: str = "float",
) -> dict[str, Any]:
    """OpenAI's embeddings ``list``: one vector per input, float or base64."""
    size = dimensions or DEFAULT_EMBEDDING_DIMENSIONS
    data = []
    for index, item in enumerate(inputs):
        vector: Any = embedding_vector(model, item, size)
        if encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{size}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }

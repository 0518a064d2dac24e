"""OpenAI's OpenAPI spec (version 2.3.0, MIT: ``openai-openapi.LICENSE`` beside it), as
JSON-schema validators of its component schemas.

The copy here is ``../shared/spec/openai-openapi.json.gz`` as published. OpenAPI's
``nullable: true`` becomes ``anyOf [schema, {"type": "null"}]`` (JSON Schema has no
``nullable``), and each validator resolves ``$ref`` against the whole document.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema

SPEC_PATH = Path(__file__).with_name("openai-openapi.json.gz")


def without_nullable(node: Any) -> Any:
    """``node`` with every ``nullable: true`` schema turned into ``anyOf [it, null]``."""
    if isinstance(node, list):
        return [without_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {k: without_nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@functools.cache
def components() -> dict[str, Any]:
    with gzip.open(SPEC_PATH, "rt", encoding="utf-8") as spec:
        return without_nullable(json.load(spec)["components"])


@functools.cache
def validator(schema: str) -> jsonschema.Draft202012Validator:
    """A validator of ``#/components/schemas/<schema>``."""
    document = {"$ref": f"#/components/schemas/{schema}", "components": components()}
    return jsonschema.Draft202012Validator(document)


def check(schema: str, instance: Any) -> None:
    """Raise ``jsonschema.ValidationError`` (the most relevant one) unless ``instance``
    is valid against the spec's ``schema``."""
    error = jsonschema.exceptions.best_match(validator(schema).iter_errors(instance))
    if error is not None:
        raise error


def stream_event_schema(event_type: str) -> str:
    """The name of the spec's schema of a Responses stream event of ``event_type``
    (``response.output_text.delta`` -> ``ResponseTextDeltaEvent``), found through the
    ``type`` enum of every ``Response*Event`` schema."""
    return _event_schemas()[event_type]


@functools.cache
def _event_schemas() -> dict[str, str]:
    schemas = components()["schemas"]
    found = {}
    for name, schema in schemas.items():
        if not (name.startswith("Response") and name.endswith("Event")):
            continue
        kind = schema.get("properties", {}).get("type", {}).get("enum", [])
        if len(kind) == 1:
            found[kind[0]] = name
    return found

"""An estimate of a Claude prompt's input tokens: Claude's tokenizer is not public.

**The method.** The text Claude reads (the system prompt, every text, tool use, tool
result and thinking block of the messages, each tool's name, description and
``input_schema`` as compact JSON, a text document's text) is counted with ``o200k_base``
and multiplied by a per-model factor, rounded up; a fixed framing cost is added per
message and per request (:data:`MESSAGE_TOKENS`, :data:`REQUEST_TOKENS`, the chat
cookbook's 3 and 3, which a Claude prompt's role markers are at least); images and PDF
documents are costed apart and not scaled.

**The factor.** :data:`DEFAULT_INPUT_FACTOR` is 1.30: Claude 3.5 Sonnet's tokenizer
produced 16 % more tokens than GPT-4o's (``o200k_base``) on English articles, 21 % more
on mathematics and 30 % more on Python code, in the comparison of the same fixed prompts
published by Lavanya Gupta ("Hidden costs in AI deployment: why Claude models may be
20-30 % more expensive than GPT in enterprise settings", VentureBeat, May 2025). 1.30 is
the largest of the three, so the estimate is at most ~12 % high on English prose and
about exact on code, and never below the real count on those kinds of text: admission
errs on the side of the limit. An upstream route may set its own ``input_factor``
(calibrated on its ``/metrics`` counting error); in proxy mode every answer settles the
prompt to the upstream's ``usage`` anyway.

**Images** (Anthropic's "Evaluate image size", https://docs.claude.com/en/docs/vision):
an image of ``w x h`` pixels costs about ``w * h / 750`` tokens, after it is scaled down
(aspect kept) to fit 1568 px on its long edge and about 1.15 megapixels (~1,600 tokens).
The size is read from a base64 image's header (:mod:`tokenguard.counting.media`); an
image whose size is not in the request (a URL, a file id, an unreadable header) costs
the most one image can, :data:`IMAGE_MOST_TOKENS`. (Newer models read images at a
higher resolution, up to ~4,800 tokens; their estimate is low there, and settled.)

**PDF documents**: one token per decoded byte plus one worst-case image (as OpenAI's
files are costed: Claude reads each page as text and as an image); a PDF not in the
request (a URL, a file id) costs :data:`~tokenguard.counting.media.UNSEEN_PART_TOKENS`.

Counting never raises on odd input: the dialect validates the shape first, and an
unexpected value is counted as its JSON.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tokenguard.counting.encodings import get_encoding
from tokenguard.counting.media import UNSEEN_PART_TOKENS, base64_image_size, base64_size
from tokenguard.counting.text import as_text, count_value

__all__ = [
    "DEFAULT_INPUT_FACTOR",
    "IMAGE_MOST_TOKENS",
    "claude_image_tokens",
    "claude_texts",
    "estimate_claude_prompt",
    "estimate_claude_text",
]

ESTIMATE_ENCODING = "o200k_base"
DEFAULT_INPUT_FACTOR = 1.30
MESSAGE_TOKENS = 3
REQUEST_TOKENS = 3
PIXELS_PER_TOKEN = 750
LONG_EDGE_PX = 1568
MOST_PIXELS = 1_150_000
IMAGE_MOST_TOKENS = math.ceil(MOST_PIXELS / PIXELS_PER_TOKEN)  # 1,534


def claude_image_tokens(size: tuple[int, int] | None) -> int:
    """An image of ``size`` (``None``: unknown, the worst case), as Claude bills it."""
    if size is None:
        return IMAGE_MOST_TOKENS
    width, height = size
    scale = min(1.0, LONG_EDGE_PX / max(width, height), math.sqrt(MOST_PIXELS / (width * height)))
    pixels = math.floor(width * scale) * math.floor(height * scale)
    return max(1, min(IMAGE_MOST_TOKENS, math.ceil(pixels / PIXELS_PER_TOKEN)))


def _source_tokens(block: Mapping[str, Any]) -> int:
    """An ``image`` or ``document`` block's unscaled cost (see the module docstring)."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, Mapping) else None
    if block.get("type") == "image":
        data = source.get("data") if kind == "base64" and isinstance(source, Mapping) else None
        return claude_image_tokens(base64_image_size(data))
    if kind == "base64" and isinstance(source, Mapping):
        size = base64_size(source.get("data"))
        return UNSEEN_PART_TOKENS if size is None else size + IMAGE_MOST_TOKENS
    return 0 if kind in ("text", "content") else UNSEEN_PART_TOKENS


def _block_texts(block: Any, media: list[int]) -> Iterator[Any]:
    """The texts one content block shows the model; its media costs go to ``media``."""
    if isinstance(block, str):
        yield block
        return
    if not isinstance(block, Mapping):
        yield block
        return
    kind = block.get("type")
    if kind == "text":
        yield block.get("text")
    elif kind in ("image", "document"):
        media.append(_source_tokens(block))
        source = block.get("source")
        if kind == "document" and isinstance(source, Mapping):
            if source.get("type") == "text":
                yield source.get("data")
            elif source.get("type") == "content":
                yield from _content_texts(source.get("content"), media)
        yield from (block.get(name) for name in ("title", "context") if block.get(name))
    elif kind == "tool_use":
        yield block.get("name")
        yield as_text(block.get("input"))
    elif kind == "tool_result":
        yield from _content_texts(block.get("content"), media)
    elif kind == "thinking":
        yield block.get("thinking")
    elif kind == "redacted_thinking":
        yield block.get("data")
    else:
        yield as_text(block)


def _content_texts(content: Any, media: list[int]) -> Iterator[Any]:
    """The texts of a message's (or a tool result's) ``content``: a string or blocks."""
    if content is None:
        return
    if isinstance(content, list):
        for block in content:
            yield from _block_texts(block, media)
    else:
        yield from _block_texts(content, media)


def _tool_texts(tools: Iterable[Any]) -> Iterator[str]:
    for tool in tools:
        if isinstance(tool, Mapping):
            for name in ("name", "description"):
                if isinstance(tool.get(name), str):
                    yield tool[name]
            if "input_schema" in tool:
                yield as_text(tool.get("input_schema"))
        else:
            yield as_text(tool)


def claude_texts(blocks: list[Any]) -> list[str]:
    """The texts of content blocks (a reply's, a streamed block's start), as the
    estimate reads them; their media are left out."""
    return [as_text(text) for text in _content_texts(blocks, []) if text]


def estimate_claude_text(texts: Iterable[Any], factor: float = DEFAULT_INPUT_FACTOR) -> int:
    """The estimated tokens of ``texts`` (the ``o200k_base`` count times ``factor``,
    rounded up): a prompt's text, or a reply's when its upstream reported no usage."""
    encoding = get_encoding(ESTIMATE_ENCODING)
    return math.ceil(sum(count_value(encoding, text) for text in texts if text) * factor)


def estimate_claude_prompt(
    system: Any,
    messages: list[Any],
    tools: list[Any] | None,
    factor: float = DEFAULT_INPUT_FACTOR,
) -> int:
    """The estimated input tokens of a Messages API prompt (see the module docstring):
    ``system`` (a string, text blocks or ``None``), ``messages``, ``tools``."""
    media: list[int] = []
    texts: list[Any] = list(_content_texts(system, media))
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else message
        texts.extend(_content_texts(content, media))
    texts.extend(_tool_texts(tools or ()))
    framing = REQUEST_TOKENS + MESSAGE_TOKENS * len(messages)
    return estimate_claude_text(texts, factor) + framing + sum(media)

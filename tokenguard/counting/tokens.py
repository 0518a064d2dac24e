"""Offline token counting for OpenAI-compatible chat prompts.

What this module guarantees:

* **No network access, ever.** tiktoken normally downloads its BPE rank files on first
  use and caches them under ``/tmp`` (or ``TIKTOKEN_CACHE_DIR``). Here the ranks are
  read from gzip files shipped inside the package (``tokenguard/encodings/``), checked
  against the SHA-256 that tiktoken itself expects for the *uncompressed* file, and
  turned into a :class:`tiktoken.Encoding` directly. tiktoken's download and cache code
  is never called, so nothing is fetched and no cache file is read or written.
* **Corrupt or mismatched data fails loudly.** If a packaged file is missing, is not
  valid gzip, does not hash to tiktoken's expected value, or cannot be parsed,
  :class:`EncodingDataError` is raised (on first use of that encoding) instead of
  counting with a wrong vocabulary.
* **Counting never raises on odd input.** The HTTP layer validates request shape first;
  this module is nevertheless defensive: a value of an unexpected type where text was
  expected is counted as its compact JSON (or ``str()``) rather than rejected, and user
  text that spells a special token such as ``<|endoftext|>`` is counted as the ordinary
  text it is.
* **Results are deterministic** for a given tiktoken release and input, and every count
  is a non-negative ``int`` (chat prompts are always at least 3, the reply priming).

Model -> encoding: tiktoken's own model table (``tiktoken.model.encoding_name_for_model``)
decides. Only ``cl100k_base`` and ``o200k_base`` are shipped. ``o200k_harmony`` (gpt-oss)
has the same ranks as ``o200k_base`` and differs only in special tokens, which user text
never produces here, so it is counted exactly with ``o200k_base``. Every other case -- a
model tiktoken does not know (proxied/local models, new names) or one that maps to a
legacy encoding we do not ship (``r50k_base``, ``p50k_base``, ``p50k_edit``, ``gpt2``:
davinci-era completion models) -- falls back to ``o200k_base``, the encoding of all
current OpenAI chat models. For the legacy models that makes counts approximate.

Chat prompts are counted as in OpenAI's cookbook "How to count tokens with tiktoken"
(checked there against the live API): 3 tokens per message, the encoded value of every
message field (role, content, name, ...), +1 per ``name``, +3 for reply priming. Tool
and function definitions cost the larger of the cookbook's ``num_tokens_for_tools``
scheme and the tokens of their compact JSON (:func:`tool_json`): the scheme reads only
names, descriptions and flat properties, so everything else in a schema (``$defs``,
``items``, ``anyOf``, ``default``, the parameters' own description...) would cost
nothing; the JSON is never less than what reaches the model (which sees a terser
rendering), so a definition is never under-counted (the cookbook's weather tool: 101
tokens by the API, 123 here). Image, audio and file parts are priced by
:mod:`tokenguard.counting.media` (OpenAI's image formulas per model, from the image's header;
estimates from the decoded size for audio and files); assistant
``tool_calls``/``function_call`` are estimates. OpenAI may change its prompt format per
model, so treat counts for models other than the cookbook's (gpt-3.5-turbo, gpt-4,
gpt-4o, gpt-4o-mini) as close estimates.

Counts of texts of :data:`CACHED_MIN_CHARS` or more are remembered (:class:`CountCache`,
:data:`COUNT_CACHE`): chat clients resend a conversation's history, system prompt
included, on every turn, so most of a long prompt has been counted before. The count is
the same either way; only the time differs.

Loading an encoding takes a fraction of a second (o200k_base is the larger one) and
blocks; it happens once per process per encoding. Call :func:`preload` at start-up
(e.g. via ``trio.to_thread.run_sync``) to keep that off the request path.
"""

from __future__ import annotations

import base64
import ctypes
import functools
import gc
import gzip
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import tiktoken
import tiktoken.load
import tiktoken.model
import tiktoken_ext.openai_public as _openai_public

from tokenguard.counting.media import (
    UNSEEN_PART_TOKENS,
    VisionCost,
    audio_tokens,
    file_tokens,
    image_tokens,
    vision_cost,
)

__all__ = [
    "CACHED_MIN_CHARS",
    "COUNT_CACHE",
    "FALLBACK_ENCODING",
    "SHIPPED_ENCODINGS",
    "CountCache",
    "EncodingDataError",
    "count_chat_prompt",
    "count_text",
    "encoding_for_model",
    "encoding_name_for",
    "preload",
    "tool_json",
]

SHIPPED_ENCODINGS: tuple[str, ...] = ("cl100k_base", "o200k_base")
FALLBACK_ENCODING = "o200k_base"

# Encodings whose mergeable ranks (the only thing used for counting user text) are
# byte-for-byte those of a shipped encoding.
_SAME_RANKS_AS: dict[str, str] = {"o200k_harmony": "o200k_base"}

# --- chat prompt overheads (OpenAI cookbook, verified there against the API) ---------
TOKENS_PER_MESSAGE = 3  # <|start|>{role/name}\n{content}<|end|>\n
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3  # every reply is primed with <|start|>assistant<|message|>

# Tool schemas nested deeper than this are counted as their JSON text rather than
# walked, so a hostile schema cannot exhaust the stack.
_MAX_SCHEMA_DEPTH = 16


# Texts at least this long have their counts remembered; a shorter one costs less to
# count (~50 ns per character) than to look up (its hash, a dict, a lock).
CACHED_MIN_CHARS = 256
# Counts remembered per process: a key of three and an int each, ~250 bytes with the
# dict's bookkeeping, so ~4 MB at most.
CACHED_COUNTS = 16_384


class CountCache:
    """The token counts of texts seen recently, by encoding and a fingerprint of the
    text (not the text itself: memory stays bounded whatever the texts' size): its
    length and Python's own hash of it, SipHash with a key random per process, which
    a ``str`` computes once and keeps (so no one can make two texts collide on
    purpose).

    Bounded to ``entries`` (the least recently used count goes first) and safe to use
    from several threads (large prompts are counted in worker threads). ``enabled``
    False counts every text afresh (benchmarks compare both). ``hits``/``misses``
    count lookups. Two texts of one length and one 64-bit hash would share a count:
    about one chance in 10^15 per lookup with the cache full.
    """

    def __init__(self, entries: int = CACHED_COUNTS) -> None:
        self.entries = entries
        self.enabled = True
        self.hits = 0
        self.misses = 0
        self._counts: OrderedDict[tuple[str, int, int], int] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._counts)

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
            self.hits = self.misses = 0

    def count(self, encoding: tiktoken.Encoding, text: str) -> int:
        """The number of tokens ``text`` encodes to (ordinary text, see :func:`count_text`)."""
        if not self.enabled or len(text) < CACHED_MIN_CHARS:
            return len(encoding.encode_ordinary(text))
        key = (encoding.name, hash(text), len(text))
        with self._lock:
            found = self._counts.get(key)
            if found is not None:
                self._counts.move_to_end(key)
                self.hits += 1
                return found
        counted = len(encoding.encode_ordinary(text))
        with self._lock:
            self._counts[key] = counted
            self.misses += 1
            if len(self._counts) > self.entries:
                self._counts.popitem(last=False)
        return counted


COUNT_CACHE = CountCache()
"""The process's :class:`CountCache`, used by every count of this module."""


class EncodingDataError(RuntimeError):
    """Packaged BPE data is missing, corrupt, unparsable or not what tiktoken expects.

    Reinstalling tokenguard (with the tiktoken release it was built for) fixes it.
    """


# ---------------------------------------------------------------------------------
# Loading encodings from package data
# ---------------------------------------------------------------------------------


def _read_packaged(name: str) -> bytes:
    """Return the uncompressed ``<name>.tiktoken`` shipped in ``tokenguard/encodings``."""
    filename = f"{name}.tiktoken.gz"
    resource = resources.files("tokenguard") / "encodings" / filename
    try:
        compressed = resource.read_bytes()
    except OSError as exc:
        raise EncodingDataError(
            f"packaged encoding file tokenguard/encodings/{filename} cannot be read: {exc}"
        ) from exc
    try:
        return gzip.decompress(compressed)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise EncodingDataError(
            f"packaged encoding file tokenguard/encodings/{filename} is not valid gzip: {exc}"
        ) from exc


def _parse_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """Parse the ``.tiktoken`` format: one ``<base64 token> <rank>`` per line.

    Same format and result as ``tiktoken.load.load_tiktoken_bpe``.
    """
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:  # also binascii.Error and a wrong field count
            raise EncodingDataError(f"malformed line {line[:80]!r} in {source}") from exc
    return ranks


def _load_ranks(name: str, expected_hash: str) -> dict[bytes, int]:
    """Load the packaged ranks of encoding ``name``, verified against ``expected_hash``.

    ``expected_hash`` is the hex SHA-256 of the uncompressed ``.tiktoken`` file, as
    tiktoken's own constructors pass it. Raises :class:`EncodingDataError` on mismatch.
    """
    data = _read_packaged(name)
    if not tiktoken.load.check_hash(data, expected_hash):
        actual = hashlib.sha256(data).hexdigest()
        raise EncodingDataError(
            f"SHA-256 mismatch for packaged encoding {name!r}: tiktoken "
            f"{tiktoken.__version__} expects {expected_hash}, the file in "
            f"tokenguard/encodings hashes to {actual}. The package data is corrupt or "
            f"does not belong to this tiktoken release; reinstall tokenguard."
        )
    return _parse_ranks(data, f"tokenguard/encodings/{name}.tiktoken.gz")


def _offline_load_tiktoken_bpe(
    tiktoken_bpe_file: str, expected_hash: str | None = None
) -> dict[bytes, int]:
    """Stand-in for ``tiktoken.load.load_tiktoken_bpe`` that only reads package data.

    tiktoken's constructors pass a download URL; its basename names the file we ship.
    Anything we do not ship is refused rather than downloaded.
    """
    basename = tiktoken_bpe_file.rstrip("/").rsplit("/", 1)[-1]
    name = basename.removesuffix(".tiktoken")
    if name == basename or name not in SHIPPED_ENCODINGS:
        raise EncodingDataError(
            f"{tiktoken_bpe_file} is not shipped with tokenguard (shipped: "
            f"{', '.join(SHIPPED_ENCODINGS)}); refusing to download it"
        )
    if expected_hash is None:
        # We only trust data verified against tiktoken's own hash.
        raise EncodingDataError(f"tiktoken gave no expected hash for {tiktoken_bpe_file}")
    return _load_ranks(name, expected_hash)


# Guards the temporary swap of tiktoken_ext.openai_public.load_tiktoken_bpe (a module
# global shared with every thread) and makes each encoding load exactly once.
_LOAD_LOCK = threading.Lock()
_ENCODINGS: dict[str, tiktoken.Encoding] = {}


def _build_encoding(name: str) -> tiktoken.Encoding:
    """Build encoding ``name`` from package data, uncached.

    Reuses tiktoken's own constructor so that pat_str, special tokens and the expected
    hash come from tiktoken and cannot drift from it; only its file loader is swapped.
    Caller must hold ``_LOAD_LOCK``.
    """
    if name not in SHIPPED_ENCODINGS:
        raise EncodingDataError(f"encoding {name!r} is not shipped with tokenguard")
    constructor = _openai_public.ENCODING_CONSTRUCTORS[name]
    original = _openai_public.load_tiktoken_bpe
    _openai_public.load_tiktoken_bpe = _offline_load_tiktoken_bpe
    try:
        kwargs = constructor()
    finally:
        _openai_public.load_tiktoken_bpe = original
    encoding = tiktoken.Encoding(**kwargs)
    # The Rust core keeps its own copy of the ranks; tiktoken keeps the Python dict only
    # to pickle the encoding, which we never do. Dropping it saves ~28 MB per node (o200k).
    encoding._mergeable_ranks = {}
    del kwargs
    _return_freed_memory()
    return encoding


def _return_freed_memory() -> None:
    """Hand the parse's freed heap back to the OS (glibc keeps it otherwise), so a node's
    resident memory reflects what it uses. A no-op where glibc is not the allocator."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _get_encoding(name: str) -> tiktoken.Encoding:
    encoding = _ENCODINGS.get(name)
    if encoding is not None:
        return encoding
    with _LOAD_LOCK:
        # Another thread may have finished loading while we waited.
        encoding = _ENCODINGS.get(name)
        if encoding is None:
            encoding = _build_encoding(name)
            _ENCODINGS[name] = encoding
        return encoding


def preload(encodings: tuple[str, ...] = SHIPPED_ENCODINGS) -> None:
    """Load (and verify) ``encodings`` now, so the first request does not pay for it.

    Raises :class:`EncodingDataError` if the package data is bad.
    """
    for name in encodings:
        _get_encoding(name)


# ---------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------


def encoding_name_for(model: str) -> str:
    """Return the name of the shipped encoding used to count tokens for ``model``.

    Always one of :data:`SHIPPED_ENCODINGS`; never raises. See the module docstring for
    the fallback rules.
    """
    if not isinstance(model, str):
        return FALLBACK_ENCODING
    return _encoding_name_of(model)


@functools.lru_cache(maxsize=1024)
def _encoding_name_of(model: str) -> str:
    # Cached: a model tiktoken does not know is matched against all its prefixes, on
    # every request for it (microseconds each time); clients name few models.
    try:
        name = tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return FALLBACK_ENCODING
    name = _SAME_RANKS_AS.get(name, name)
    return name if name in SHIPPED_ENCODINGS else FALLBACK_ENCODING


def encoding_for_model(model: str) -> tiktoken.Encoding:
    """Return the (cached) tiktoken encoding used to count tokens for ``model``.

    Unknown models and models mapping to an encoding that is not shipped get
    ``o200k_base``. Never touches the network. Raises :class:`EncodingDataError` only if
    the packaged data is missing or corrupt.
    """
    return _get_encoding(encoding_name_for(model))


def count_text(model: str, text: str) -> int:
    """Return the number of tokens ``text`` encodes to for ``model``.

    Special-token spellings such as ``<|endoftext|>`` are counted as ordinary text (as
    the API treats user text). A non-``str`` ``text`` is counted as its JSON/``str()``
    form. Raises only :class:`EncodingDataError` (bad package data).
    """
    return _count(encoding_for_model(model), text)


def count_chat_prompt(
    model: str,
    messages: list[dict],
    tools: list[dict] | None = None,
    functions: list[dict] | None = None,
    tool_texts: Sequence[str] | None = None,
) -> int:
    """Return the prompt tokens a chat completion request will be billed for.

    ``messages`` are Chat Completions messages; ``content`` may be a string, ``None`` or
    a list of content parts. ``tools`` (``{"type": "function", "function": {...}}``) and
    the legacy ``functions`` (the function objects themselves) are counted together;
    ``tool_texts``, when the caller has them, are their :func:`tool_json` texts in that
    order (tools first), so they are not serialised again.

    Exact for the cases in OpenAI's cookbook (plain messages with ``name``); tool
    definitions at least their JSON's tokens; media parts as :mod:`tokenguard.counting.media`
    prices them. Never raises on unexpected shapes or types; raises only
    :class:`EncodingDataError` (bad package data). The result is at least
    ``REPLY_PRIMING_TOKENS``.
    """
    name = encoding_name_for(model)
    encoding = _get_encoding(name)
    vision = vision_cost(model) if isinstance(model, str) else vision_cost("")
    total = REPLY_PRIMING_TOKENS
    if isinstance(messages, list | tuple):
        for message in messages:
            total += _count_message(encoding, vision, message)
    elif messages is not None:
        total += _count_message(encoding, vision, messages)
    definitions = [*_as_list(tools), *_as_list(functions)]
    if tool_texts is None or len(tool_texts) != len(definitions):
        tool_texts = [tool_json(d) for d in definitions]
    total += _count_tool_definitions(encoding, _TOOL_COSTS[name], definitions, tool_texts)
    return total


def tool_json(definition: Any) -> str:
    """The text a tool definition is counted as, at least: the compact JSON of its
    function object (``{"type": "function", "function": {...}}``), or of the whole
    definition otherwise (a legacy function, another tool type)."""
    if isinstance(definition, Mapping) and isinstance(definition.get("function"), Mapping):
        definition = definition["function"]
    return _as_text(definition)


# ---------------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------------


def _as_text(value: Any) -> str:
    """Text the tokenizer sees for ``value``: itself if ``str``, else compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        # Circular or absurdly deep structures: still count something, never raise.
        try:
            return str(value)
        except Exception:  # a hostile __str__ must not break counting
            return type(value).__name__


def _count(encoding: tiktoken.Encoding, value: Any) -> int:
    text = _as_text(value)
    if not text:
        return 0
    # Ordinary encoding: "<|endoftext|>" in user text is plain text, not an error (and
    # not a special token); the same count as encode(disallowed_special=()), without
    # its per-call conversion of the special-token sets (most of a short text's cost).
    return COUNT_CACHE.count(encoding, text)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _count_message(encoding: tiktoken.Encoding, vision: VisionCost, message: Any) -> int:
    if not isinstance(message, Mapping):
        return TOKENS_PER_MESSAGE + _count(encoding, message)
    total = TOKENS_PER_MESSAGE
    # Like the cookbook, every field's value is counted (role, tool_call_id, refusal,
    # and anything new): over-counting an unknown field is safer for a rate limiter
    # than ignoring it.
    for key, value in message.items():
        if key == "content":
            total += _count_content(encoding, vision, value)
        elif key == "tool_calls":
            total += sum(_count_tool_call(encoding, call) for call in _as_list(value))
        elif key == "function_call":
            total += _count_tool_call(encoding, {"function": value})
        elif key == "name":
            total += _count(encoding, value) + TOKENS_PER_NAME
        else:
            total += _count(encoding, value)
    return total


def _count_content(encoding: tiktoken.Encoding, vision: VisionCost, content: Any) -> int:
    if content is None or isinstance(content, str):
        return _count(encoding, content)
    if isinstance(content, list | tuple):
        return sum(_count_part(encoding, vision, part) for part in content)
    return _count(encoding, content)


def _count_part(encoding: tiktoken.Encoding, vision: VisionCost, part: Any) -> int:
    if not isinstance(part, Mapping):
        return _count(encoding, part)
    kind = part.get("type")
    if kind == "text":
        return _count(encoding, part.get("text"))
    if kind == "refusal":
        return _count(encoding, part.get("refusal"))
    if kind == "image_url":
        return image_tokens(vision, part.get("image_url"))
    if kind == "input_audio":
        return audio_tokens(part.get("input_audio"))
    if kind == "file":
        return file_tokens(vision, part.get("file"))
    # A part type this module does not know (a remote audio or video URL...): its
    # content is not in the request, or is counted as the text it is.
    return max(UNSEEN_PART_TOKENS, _count(encoding, part))


def _count_tool_call(encoding: tiktoken.Encoding, call: Any) -> int:
    """Count an assistant tool call: its function name and argument string.

    ``{"function": {"name", "arguments"}}``, custom tools' ``{"custom": {"name",
    "input"}}``, and the legacy ``function_call`` (wrapped by the caller) alike.
    """
    if isinstance(call, Mapping):
        payload = call.get("function", call.get("custom"))
        if isinstance(payload, Mapping):
            return sum(_count(encoding, v) for v in payload.values())
    return _count(encoding, call)


@dataclass(frozen=True)
class _ToolCosts:
    func_init: int
    prop_init: int
    prop_key: int
    enum_init: int
    enum_item: int
    func_end: int


# From the cookbook's num_tokens_for_tools, verified there against the API (105 tokens
# for its weather example on gpt-3.5-turbo/gpt-4, 101 on gpt-4o/gpt-4o-mini). The
# cl100k models pay 10 tokens per function where the o200k models pay 7.
_TOOL_COSTS: dict[str, _ToolCosts] = {
    "cl100k_base": _ToolCosts(10, 3, 3, -3, 3, 12),
    "o200k_base": _ToolCosts(7, 3, 3, -3, 3, 12),
}


def _count_tool_definitions(
    encoding: tiktoken.Encoding,
    costs: _ToolCosts,
    definitions: list[Any],
    texts: Sequence[str],
) -> int:
    """Each definition: the larger of the cookbook's scheme and its JSON's tokens
    (``texts``, one per definition); then the cookbook's closing overhead once."""
    if not definitions:
        return 0
    total = 0
    for definition, text in zip(definitions, texts, strict=True):
        total += max(_cookbook_definition(encoding, costs, definition), _count(encoding, text))
    return total + costs.func_end


def _cookbook_definition(encoding: tiktoken.Encoding, costs: _ToolCosts, definition: Any) -> int:
    total = costs.func_init
    function = definition
    if isinstance(definition, Mapping) and isinstance(definition.get("function"), Mapping):
        function = definition["function"]  # tools=[{"type": "function", "function": ...}]
    if not isinstance(function, Mapping):
        return total + _count(encoding, function)
    description = _as_text(function.get("description")).removesuffix(".")
    total += _count(encoding, f"{_as_text(function.get('name'))}:{description}")
    parameters = function.get("parameters")
    if isinstance(parameters, Mapping):
        total += _count_properties(encoding, costs, parameters.get("properties"), 0)
    return total


def _count_properties(
    encoding: tiktoken.Encoding, costs: _ToolCosts, properties: Any, depth: int
) -> int:
    if not isinstance(properties, Mapping) or not properties:
        return 0
    if depth >= _MAX_SCHEMA_DEPTH:
        return _count(encoding, properties)
    total = costs.prop_init
    for key, schema in properties.items():
        total += costs.prop_key
        if not isinstance(schema, Mapping):
            total += _count(encoding, f"{_as_text(key)}:{_as_text(schema)}")
            continue
        if "enum" in schema:
            total += costs.enum_init
            for item in _as_list(schema["enum"]):
                total += costs.enum_item + _count(encoding, item)
        p_type = _as_text(schema.get("type"))
        p_desc = _as_text(schema.get("description")).removesuffix(".")
        total += _count(encoding, f"{_as_text(key)}:{p_type}:{p_desc}")
        # Beyond the cookbook, which ignores nesting and would undercount: properties of
        # nested objects (and of array items) are charged with the same scheme.
        total += _count_properties(encoding, costs, schema.get("properties"), depth + 1)
        items = schema.get("items")
        if isinstance(items, Mapping):
            total += _count_properties(encoding, costs, items.get("properties"), depth + 1)
    return total

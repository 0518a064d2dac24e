"""Input tokens of the content parts that are not text: images, audio and files.

Nothing here fetches or decodes media. An image's size is read from the first bytes of
a ``data:`` URL (PNG, GIF, WebP, JPEG headers), decoding only the few base64 characters
that hold them; a remote URL is never fetched: it is charged the model's worst case.
Every function is total: odd or hostile input gets an estimate (the worst case where
one is defined), never an exception.

**Images** follow OpenAI's "Calculating costs" rules
(https://platform.openai.com/docs/guides/images-vision#calculating-costs, and the
per-model figures of https://platform.openai.com/docs/models and its pricing page):

* *tile* models (gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, ...): ``detail: "low"`` costs
  the model's base tokens; otherwise (``"high"``, and ``"auto"``, counted as ``"high"``)
  the image is scaled to fit in 2048 x 2048, then its shortest side to 768 px (never
  up), and it costs ``base + tile x`` the 512 px tiles that cover it. At most 8 tiles
  (4 x 2) cover what is left, hence the worst case ``base + 8 x tile``;
* *patch* models (gpt-4.1-mini, gpt-4.1-nano, o4-mini, gpt-5-mini, gpt-5-nano): the
  32 px patches that cover the image, scaled down to fit 1536 patches when it needs
  more, times the model's multiplier, whatever the detail; worst case ``1536 x``
  multiplier.

A model tokenguard does not know (a local or proxied one) is charged as gpt-4o. In
proxy mode the prompt is settled to the upstream's own ``prompt_tokens`` anyway.

**Audio** (``input_audio``, base64 ``data``): ~10 tokens per second of sound (OpenAI
publishes no rate for its audio models; 10/s is what their usage reports show), the
duration taken from the decoded size at the lowest byte rate the format allows: a WAV
header's own byte rate (clamped to PCM's 8,000..384,000 bytes a second), 1,000 bytes a
second (8 kbit/s) for anything else. An upper bound for real recordings.

**Files** (``file``: ``file_data`` as base64 or a data URL): one token per byte of the
decoded data (a PDF's deflated text expands about four times, and text is about four
characters a token) plus one worst-case image (OpenAI also shows the model an image of
each page). A part whose content is not in the request (a ``file_id``, a remote audio
or video URL) gets :data:`UNSEEN_PART_TOKENS`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "UNSEEN_PART_TOKENS",
    "VisionCost",
    "audio_tokens",
    "base64_image_size",
    "base64_size",
    "file_tokens",
    "image_size",
    "image_tokens",
    "vision_cost",
]

# A part that refers to content not in the request (a file_id, a remote audio or video
# URL): its size is unknown here.
UNSEEN_PART_TOKENS = 1000

# --- images ----------------------------------------------------------------------------

TILE_PX = 512
FIT_PX = 2048
SHORT_SIDE_PX = 768
MOST_TILES = (FIT_PX // TILE_PX) * -(-SHORT_SIDE_PX // TILE_PX)  # 4 x 2
PATCH_PX = 32
MOST_PATCHES = 1536


@attrs.frozen
class VisionCost:
    """How one model bills an image: 512 px tiles (``base`` + ``tile`` each), or 32 px
    patches times ``multiplier`` (when it is not 0)."""

    base: int = 0
    tile: int = 0
    multiplier: float = 0.0

    def tokens(self, size: tuple[int, int] | None, detail: Any) -> int:
        """An image of ``size`` (``None``: unknown) at ``detail``."""
        if self.multiplier:
            return math.ceil(self.multiplier * (MOST_PATCHES if size is None else _patches(*size)))
        if detail == "low":
            return self.base
        return self.base + self.tile * (MOST_TILES if size is None else _tiles(*size))

    @property
    def worst(self) -> int:
        """The most one image can cost on this model."""
        return self.tokens(None, "high")


TILES_GPT_4O = VisionCost(base=85, tile=170)
# By model name prefix, the most specific first (a name takes the first that matches).
VISION_COSTS: tuple[tuple[str, VisionCost], ...] = (
    ("gpt-4o-mini", VisionCost(base=2833, tile=5667)),
    ("gpt-4.1-mini", VisionCost(multiplier=1.62)),
    ("gpt-4.1-nano", VisionCost(multiplier=2.46)),
    ("gpt-5-mini", VisionCost(multiplier=1.62)),
    ("gpt-5-nano", VisionCost(multiplier=2.46)),
    ("o4-mini", VisionCost(multiplier=1.72)),
    ("gpt-5", VisionCost(base=70, tile=140)),
    ("o1", VisionCost(base=75, tile=150)),
    ("o3", VisionCost(base=75, tile=150)),
    ("computer-use-preview", VisionCost(base=65, tile=129)),
)


@functools.lru_cache(maxsize=1024)
def vision_cost(model: str) -> VisionCost:
    """How ``model`` bills images: the first :data:`VISION_COSTS` prefix it starts
    with, else gpt-4o's tiles (gpt-4o, gpt-4.1, gpt-4.5, gpt-4-turbo, and models
    tokenguard does not know). Cached: clients name few models (and none longer than
    tokenguard.api.request_body.MAX_MODEL_CHARS)."""
    for prefix, cost in VISION_COSTS:
        if model.startswith(prefix):
            return cost
    return TILES_GPT_4O


def _tiles(width: int, height: int) -> int:
    """The 512 px tiles of a high-detail image, after OpenAI's two scalings."""
    if max(width, height) > FIT_PX:
        longest = max(width, height)
        width, height = width * FIT_PX // longest, height * FIT_PX // longest
    if min(width, height) > SHORT_SIDE_PX:
        shortest = min(width, height)
        width, height = width * SHORT_SIDE_PX // shortest, height * SHORT_SIDE_PX // shortest
    return max(1, -(-width // TILE_PX)) * max(1, -(-height // TILE_PX))


def _patches(width: int, height: int) -> int:
    """The 32 px patches of an image, scaled down to fit :data:`MOST_PATCHES`."""
    patches = -(-width // PATCH_PX) * -(-height // PATCH_PX)
    if patches > MOST_PATCHES:
        shrink = math.sqrt(PATCH_PX * PATCH_PX * MOST_PATCHES / (width * height))
        across, down = width * shrink / PATCH_PX, height * shrink / PATCH_PX
        shrink *= min(math.floor(across) / across, math.floor(down) / down)
        scaled_w, scaled_h = math.floor(width * shrink), math.floor(height * shrink)
        patches = -(-scaled_w // PATCH_PX) * -(-scaled_h // PATCH_PX)
    return max(1, min(patches, MOST_PATCHES))


def image_tokens(cost: VisionCost, image: Any) -> int:
    """An ``image_url`` part's ``image_url`` (``{"url", "detail"}`` or the URL alone):
    its size read from a data URL's header, the model's worst case when that is not
    possible (a remote URL included)."""
    url, detail = image, None
    if isinstance(image, Mapping):
        url, detail = image.get("url"), image.get("detail")
    return cost.tokens(image_size(url) if isinstance(url, str) else None, detail)


# --- reading a data URL's first bytes -------------------------------------------------

# JPEG markers that carry no length (TEM, RST0-7, SOI) and the frame headers (SOFn)
# that hold the image's size.
_JPEG_BARE = frozenset({0x01, *range(0xD0, 0xD9)})
# (0xC4 DHT, 0xC8 JPG and 0xCC DAC are not frames.)
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Segments walked before the frame header, at most (EXIF, ICC, thumbnails...).
_JPEG_SEGMENTS = 64
_HEAD = 32


class _Base64Bytes:
    """The bytes a base64 text encodes, decoded only where they are read: bytes
    ``offset..offset+size`` need the four-character groups that hold them, no more."""

    def __init__(self, text: str, start: int = 0) -> None:
        self.text = text
        self.start = start

    @property
    def size(self) -> int:
        """Decoded bytes (from the text's length and padding; nothing is decoded)."""
        length = len(self.text) - self.start
        padding = len(self.text) - len(self.text.rstrip("="))
        return max(0, length * 3 // 4 - min(padding, 2))

    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset`` (fewer at the end; none where the text
        is not valid base64)."""
        if offset < 0 or size <= 0:
            return b""
        first = self.start + offset // 3 * 4
        last = self.start + -(-(offset + size) // 3) * 4
        chunk = self.text[first:last]
        if len(chunk) % 4:
            return b""
        try:
            data = base64.b64decode(chunk, validate=True)
        except (binascii.Error, ValueError):
            return b""
        skip = offset % 3
        return data[skip : skip + size]


def _data_url_bytes(url: str) -> _Base64Bytes | None:
    """The payload of a base64 ``data:`` URL; ``None`` for anything else."""
    if url[:5].lower() != "data:":
        return None
    comma = url.find(",", 5)
    if comma < 0 or not url[5:comma].lower().endswith(";base64"):
        return None
    return _Base64Bytes(url, comma + 1)


def image_size(url: str) -> tuple[int, int] | None:
    """``(width, height)`` of a base64 ``data:`` URL's image, read from its header
    (PNG, GIF, WebP, JPEG); ``None`` for a remote URL, another format, or a header
    that does not say (or says 0)."""
    payload = _data_url_bytes(url)
    if payload is None:
        return None
    return _image_size(payload)


def base64_image_size(data: Any) -> tuple[int, int] | None:
    """``(width, height)`` of a base64 image (no ``data:`` prefix), as :func:`image_size`
    reads it; ``None`` when it is not text or its header does not say."""
    if not isinstance(data, str) or not data:
        return None
    return _image_size(_Base64Bytes(data))


def base64_size(data: Any) -> int | None:
    """The bytes a base64 text decodes to (nothing is decoded); ``None`` if not text."""
    payload = _b64_text(data)
    return None if payload is None else payload.size


def _image_size(payload: _Base64Bytes) -> tuple[int, int] | None:
    head = payload.read(0, _HEAD)
    size = _png(head) or _gif(head) or _webp(head)
    if size is None and head[:2] == b"\xff\xd8":
        size = _jpeg(payload)
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def _png(head: bytes) -> tuple[int, int] | None:
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR" or len(head) < 24:
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _gif(head: bytes) -> tuple[int, int] | None:
    if head[:6] not in (b"GIF87a", b"GIF89a") or len(head) < 10:
        return None
    return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")


def _webp(head: bytes) -> tuple[int, int] | None:
    if head[:4] != b"RIFF" or head[8:12] != b"WEBP" or len(head) < 30:
        return None
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy: the key frame's size
        width = int.from_bytes(head[26:28], "little") & 0x3FFF
        return width, int.from_bytes(head[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:  # lossless: 14 bits each, less one
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":  # extended: the canvas, 24 bits each, less one
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _jpeg(payload: _Base64Bytes) -> tuple[int, int] | None:
    """Walk the segments after SOI to the first frame header (SOFn), reading only each
    segment's marker and length (and the frame header's size fields)."""
    at = 2
    for _ in range(_JPEG_SEGMENTS):
        segment = payload.read(at, 9)  # marker, length, precision, height, width
        if len(segment) < 4 or segment[0] != 0xFF:
            return None
        marker = segment[1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_BARE:
            at += 2
            continue
        if marker in _JPEG_FRAMES:
            if len(segment) < 9:
                return None
            return int.from_bytes(segment[7:9], "big"), int.from_bytes(segment[5:7], "big")
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame
            return None
        length = int.from_bytes(segment[2:4], "big")
        if length < 2:
            return None
        at += 2 + length
    return None


# --- audio and files -------------------------------------------------------------------

AUDIO_TOKENS_PER_SECOND = 10
# The fewest bytes a second of sound takes, by format (fewer bytes a second: more
# seconds, more tokens): PCM in WAV from 8 kHz 8-bit mono to 48 kHz 32-bit stereo (a
# WAV header's own rate is clamped to it), 8 kbit/s for anything compressed.
WAV_BYTE_RATES = (8_000, 384_000)
COMPRESSED_BYTE_RATE = 1_000


def _b64_text(value: Any) -> _Base64Bytes | None:
    """Base64 content, or a base64 ``data:`` URL's payload; ``None`` when not text."""
    if not isinstance(value, str) or not value:
        return None
    return _data_url_bytes(value) or _Base64Bytes(value)


def audio_tokens(audio: Any) -> int:
    """An ``input_audio`` part's ``input_audio`` (``{"data", "format"}``): its duration
    from its decoded size (see the module docstring), 10 tokens a second."""
    data = _b64_text(audio.get("data")) if isinstance(audio, Mapping) else None
    if data is None:
        return UNSEEN_PART_TOKENS
    rate = COMPRESSED_BYTE_RATE
    if isinstance(audio, Mapping) and audio.get("format") == "wav":
        rate = WAV_BYTE_RATES[0]
        header = data.read(0, 32)
        if header[:4] == b"RIFF" and header[8:16] == b"WAVEfmt ":
            low, high = WAV_BYTE_RATES
            rate = min(max(int.from_bytes(header[28:32], "little"), low), high)
    return max(1, math.ceil(data.size * AUDIO_TOKENS_PER_SECOND / rate))


def file_tokens(cost: VisionCost, file: Any) -> int:
    """A ``file`` part's ``file`` (``{"file_data", "filename", "file_id"}``): one token
    per decoded byte, plus one worst-case image; :data:`UNSEEN_PART_TOKENS` when its
    data is not in the request."""
    data = _b64_text(file.get("file_data")) if isinstance(file, Mapping) else None
    if data is None:
        return UNSEEN_PART_TOKENS
    return data.size + cost.worst

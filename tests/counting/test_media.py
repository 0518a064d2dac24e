"""tokenguard.counting.media: the input tokens of images, audio and files, table by table.

Images are real files built here with the standard library (a whole PNG through zlib;
GIF, WebP and JPEG headers written byte by byte, a JPEG with a large EXIF segment
before its frame header), sent as base64 data URLs. Expected figures marked "OpenAI"
are the worked examples of OpenAI's "Calculating costs"
(platform.openai.com/docs/guides/images-vision); the others follow its formulas.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib
from collections.abc import Callable

import pytest

from tokenguard.counting.media import (
    UNSEEN_PART_TOKENS,
    audio_tokens,
    file_tokens,
    image_size,
    image_tokens,
    vision_cost,
)

# --- images, built here ------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    """A whole, valid PNG (8-bit grey, every pixel 0)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * ((width + 1) * height))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def gif(width: int, height: int) -> bytes:
    """A GIF89a: screen descriptor, a 2-colour table, one image of one LZW code run."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0x80, 0, 0)
        + b"\x00\x00\x00\xff\xff\xff"
        + b","
        + struct.pack("<HHHHB", 0, 0, width, height, 0)
        + b"\x02\x02\x44\x01\x00;"
    )


def riff(chunk: bytes, payload: bytes) -> bytes:
    body = b"WEBP" + chunk + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_lossy(width: int, height: int) -> bytes:
    frame = b"\x30\x01\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height)
    return riff(b"VP8 ", frame + b"\x00" * 8)


def webp_lossless(width: int, height: int) -> bytes:
    bits = (width - 1) | (height - 1) << 14
    return riff(b"VP8L", b"\x2f" + struct.pack("<I", bits) + b"\x00" * 8)


def webp_extended(width: int, height: int) -> bytes:
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return riff(b"VP8X", b"\x00\x00\x00\x00" + canvas)


def segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def jpeg(width: int, height: int, exif_bytes: int = 0, frame: int = 0xC0) -> bytes:
    """SOI, JFIF APP0, an APP1 of ``exif_bytes`` (the size of a camera's EXIF with its
    thumbnail), a quantisation table, fill bytes, the frame header, a scan, EOI."""
    parts = [b"\xff\xd8", segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")]
    if exif_bytes:
        parts.append(segment(0xE1, b"Exif\x00\x00" + b"\x00" * exif_bytes))
    parts.append(segment(0xDB, b"\x00" + bytes(range(64))))
    parts.append(b"\xff\xff")  # fill bytes before a marker are allowed
    parts.append(segment(frame, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"))
    parts.append(segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x00" * 16 + b"\xff\xd9")
    return b"".join(parts)


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


GPT_4O_WORST = 85 + 8 * 170
MINI_WORST = math.ceil(1536 * 1.62)


IMAGE_CASES: list[tuple[str, Callable[[], bytes], str, str | None, int]] = [
    # name, image, model, detail, tokens
    ("png 1024x1024 high (OpenAI)", lambda: png(1024, 1024), "gpt-4o", "high", 765),
    ("png 2048x4096 auto is high (OpenAI)", lambda: png(2048, 4096), "gpt-4o", "auto", 1105),
    ("png 4096x8192 low (OpenAI)", lambda: png(4096, 8192), "gpt-4o", "low", 85),
    ("png no detail is high", lambda: png(513, 500), "gpt-4.1", None, 85 + 2 * 170),
    ("gif 512x512", lambda: gif(512, 512), "gpt-4o", "auto", 85 + 170),
    ("gif 513x513", lambda: gif(513, 513), "gpt-4o-2024-08-06", "high", 765),
    ("webp lossy 513x500", lambda: webp_lossy(513, 500), "gpt-4o", "high", 85 + 2 * 170),
    ("webp lossless 500x513", lambda: webp_lossless(500, 513), "gpt-4o", "high", 85 + 2 * 170),
    ("webp extended 4096x8192", lambda: webp_extended(4096, 8192), "gpt-4o", "high", 1105),
    ("webp extended 2048x768: 8 tiles", lambda: webp_extended(2048, 768), "gpt-4o", "high", 1445),
    ("jpeg after a 60 kB EXIF", lambda: jpeg(1024, 1024, 60_000), "gpt-4o", "high", 765),
    ("jpeg progressive (SOF2)", lambda: jpeg(1024, 1024, frame=0xC2), "gpt-4o", "high", 765),
    ("gpt-4o-mini's own tiles", lambda: png(1024, 1024), "gpt-4o-mini", "high", 2833 + 4 * 5667),
    ("o3's tiles", lambda: png(1024, 1024), "o3", "high", 75 + 4 * 150),
    ("gpt-5's tiles", lambda: png(1024, 1024), "gpt-5", "high", 70 + 4 * 140),
    ("an unknown model: gpt-4o's tiles", lambda: png(1024, 1024), "llava-13b", "high", 765),
    # patches: 1024 x 1024 is 32 x 32 patches; 1800 x 2400 is 1452 after the shrink (OpenAI)
    ("patches 1024x1024", lambda: png(1024, 1024), "gpt-4.1-mini", "high", math.ceil(1024 * 1.62)),
    (
        "patches ignore detail",
        lambda: png(1024, 1024),
        "gpt-4.1-mini",
        "low",
        math.ceil(1024 * 1.62),
    ),
    ("patches 1800x2400 (OpenAI)", lambda: jpeg(1800, 2400, 30_000), "gpt-4.1-mini", None, 2353),
    ("patches nano", lambda: gif(64, 64), "gpt-4.1-nano", "high", math.ceil(4 * 2.46)),
    ("patches o4-mini", lambda: png(320, 320), "o4-mini", "high", math.ceil(100 * 1.72)),
    # what cannot be read costs the model's worst case
    ("not an image", lambda: b"hello, world, not an image at all", "gpt-4o", "high", GPT_4O_WORST),
    ("a png of 0x0", lambda: png(0, 0), "gpt-4o", "high", GPT_4O_WORST),
    ("a truncated png", lambda: png(1024, 1024)[:20], "gpt-4o", "high", GPT_4O_WORST),
    (
        "a jpeg cut before its frame",
        lambda: jpeg(10, 10, 5000)[:3000],
        "gpt-4o",
        None,
        GPT_4O_WORST,
    ),
    (
        "a jpeg segment of length 0",
        lambda: b"\xff\xd8\xff\xe0\x00\x00" + b"\x00" * 40,
        "gpt-4o",
        None,
        GPT_4O_WORST,
    ),
    (
        "a jpeg of fill bytes only",
        lambda: b"\xff\xd8" + b"\xff" * 4000,
        "gpt-4o",
        None,
        GPT_4O_WORST,
    ),
    ("a jpeg of height 0 (DNL)", lambda: jpeg(640, 0), "gpt-4o", None, GPT_4O_WORST),
    ("a worst case on a patch model", lambda: b"junk", "gpt-4.1-mini", None, MINI_WORST),
]


@pytest.mark.parametrize(
    ("image", "model", "detail", "expected"),
    [case[1:] for case in IMAGE_CASES],
    ids=[case[0] for case in IMAGE_CASES],
)
def test_an_image_costs_its_models_formula(
    image: Callable[[], bytes], model: str, detail: str | None, expected: int
) -> None:
    part = {"url": data_url(image())}
    if detail is not None:
        part["detail"] = detail
    assert image_tokens(vision_cost(model), part) == expected


@pytest.mark.parametrize(
    ("url", "model", "detail", "expected"),
    [
        ("https://example.com/cat.png", "gpt-4o", "high", GPT_4O_WORST),
        ("https://example.com/cat.png", "gpt-4o", "low", 85),
        ("https://example.com/cat.png", "gpt-4o-mini", "auto", 2833 + 8 * 5667),
        ("https://example.com/cat.png", "gpt-4.1-mini", "low", MINI_WORST),
        ("data:image/svg+xml,<svg width='10' height='10'/>", "gpt-4o", "high", GPT_4O_WORST),
        ("data:image/png;base64,!!!!not base64!!!!", "gpt-4o", "high", GPT_4O_WORST),
        ("data:image/png;base64,", "gpt-4o", "high", GPT_4O_WORST),
        ("DATA:IMAGE/PNG;BASE64," + base64.b64encode(png(512, 512)).decode(), "gpt-4o", None, 255),
    ],
)
def test_a_remote_or_unreadable_url_costs_the_worst_case(
    url: str, model: str, detail: str, expected: int
) -> None:
    assert image_tokens(vision_cost(model), {"url": url, "detail": detail}) == expected


def test_the_url_alone_and_odd_values_are_priced_never_raised() -> None:
    cost = vision_cost("gpt-4o")
    assert image_tokens(cost, data_url(png(512, 512))) == 255  # a bare URL string
    for odd in (None, 5, [], {"url": 7}, {"detail": "low"}):
        assert image_tokens(cost, odd) in (85, GPT_4O_WORST)


def test_a_header_is_read_without_decoding_the_image() -> None:
    # The base64 after each header is not base64 at all (a megabyte of it): the size
    # still comes out, so nothing past the header was decoded.
    junk = "!" * 1_000_000
    png_head = base64.b64encode(png(1024, 1024)[:33]).decode()
    assert image_size("data:image/png;base64," + png_head + junk) == (1024, 1024)
    frame_end = len(jpeg(800, 600, 60_000)) - 27  # up to the scan
    jpeg_head = base64.b64encode(jpeg(800, 600, 60_000)[: frame_end // 3 * 3]).decode()
    assert image_size("data:image/jpeg;base64," + jpeg_head + junk) == (800, 600)


# --- audio and files ----------------------------------------------------------------------


def wav(seconds: float, byte_rate: int) -> bytes:
    data = b"\x00" * int(seconds * byte_rate)
    fmt = struct.pack("<HHIIHH", 1, 1, byte_rate // 2, byte_rate, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("audio", "expected"),
    [
        # a WAV's own byte rate: 2 s at 16 kHz 16-bit mono is 20 tokens (+1 for the header)
        ({"data": b64(wav(2, 32_000)), "format": "wav"}, math.ceil((64_000 + 44) * 10 / 32_000)),
        # a rate above PCM's highest is clamped to it: never cheaper than real PCM
        ({"data": b64(wav(1, 32_000)[:28] + struct.pack("<I", 10**9)), "format": "wav"}, 1),
        # a WAV without a readable header: 8,000 bytes a second
        ({"data": b64(b"\x00" * 16_000), "format": "wav"}, 20),
        # compressed: 1,000 bytes a second (8 kbit/s)
        ({"data": b64(b"\x00" * 12_000), "format": "mp3"}, 120),
        ({"data": "data:audio/mpeg;base64," + b64(b"\x00" * 3_000), "format": "mp3"}, 30),
        ({"data": b64(b"\x00" * 3_000)}, 30),
        # nothing to measure
        ({"format": "mp3"}, UNSEEN_PART_TOKENS),
        ({"data": ""}, UNSEEN_PART_TOKENS),
        ("not an object", UNSEEN_PART_TOKENS),
    ],
)
def test_audio_costs_ten_tokens_a_second_at_the_formats_lowest_rate(
    audio: object, expected: int
) -> None:
    assert audio_tokens(audio) == expected


@pytest.mark.parametrize(
    ("model", "file", "expected"),
    [
        ("gpt-4o", {"file_data": b64(b"%PDF" + b"\x00" * 2996)}, 3000 + GPT_4O_WORST),
        (
            "gpt-4.1-mini",
            {"file_data": "data:application/pdf;base64," + b64(b"\x00" * 300), "filename": "a"},
            300 + MINI_WORST,
        ),
        ("gpt-4o", {"file_id": "file-abc"}, UNSEEN_PART_TOKENS),
        ("gpt-4o", None, UNSEEN_PART_TOKENS),
    ],
)
def test_a_file_costs_a_token_a_byte_and_a_page_image(
    model: str, file: object, expected: int
) -> None:
    assert file_tokens(vision_cost(model), file) == expected

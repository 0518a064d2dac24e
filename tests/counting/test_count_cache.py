"""The count cache: cached counts are the counts, bounded, least recently used forgotten.

Short texts and a disabled cache are counted afresh; threads share it safely.
"""

from __future__ import annotations

import threading

import pytest

from tokenguard.counting import (
    count_cache,
    count_chat_prompt,
    count_text,
    encodings,
)

# --- the count cache -----------------------------------------------------------------------


def _long_texts() -> list[str]:
    base = "The rate limiter counts every prompt exactly, whatever its size. " * 8
    return [
        base,
        base + "<|endoftext|> is plain text here " * 4,
        "naïve café 東京 🚀 " * 40,
        "\ud800 a lone surrogate " * 30,
        " ".join(str(i) for i in range(400)),
    ]


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_cached_counts_are_the_counts(model: str) -> None:
    """A remembered count is the count: each text counted with the cache (a miss, then a
    hit) equals tiktoken's own count of it, and a chat prompt counted twice too."""
    cache = count_cache.COUNT_CACHE
    cache.clear()
    encoding = encodings.encoding_for_model(model)
    for text in _long_texts():
        assert len(text) >= count_cache.CACHED_MIN_CHARS
        exact = len(encoding.encode(text, disallowed_special=()))
        assert count_text(model, text) == exact
        assert count_text(model, text) == exact
    assert (cache.hits, cache.misses) == (5, 5)
    messages = [{"role": "system", "content": t} for t in _long_texts()]
    first = count_chat_prompt(model, messages)
    cache.enabled = False
    try:
        uncached = count_chat_prompt(model, messages)
    finally:
        cache.enabled = True
    assert count_chat_prompt(model, messages) == first == uncached


def test_the_count_cache_is_bounded_and_forgets_the_least_recently_used() -> None:
    cache = count_cache.CountCache(entries=3)
    encoding = encodings.encoding_for_model("gpt-4o")
    texts = [f"{i} " + "x y " * 200 for i in range(5)]
    for text in texts[:3]:
        cache.count(encoding, text)
    cache.count(encoding, texts[0])  # used again: now the most recent
    for text in texts[3:]:
        cache.count(encoding, text)
    assert len(cache) == 3
    assert (cache.hits, cache.misses) == (1, 5)
    cache.count(encoding, texts[0])  # kept
    assert cache.hits == 2
    cache.count(encoding, texts[1])  # forgotten: counted again
    assert cache.misses == 6


def test_short_texts_and_a_disabled_cache_are_counted_afresh() -> None:
    cache = count_cache.CountCache()
    encoding = encodings.encoding_for_model("gpt-4o")
    short = "x" * (count_cache.CACHED_MIN_CHARS - 1)
    assert (
        cache.count(encoding, short)
        == cache.count(encoding, short)
        == len(encoding.encode_ordinary(short))
    )
    cache.enabled = False
    long = "y " * count_cache.CACHED_MIN_CHARS
    cache.count(encoding, long)
    cache.count(encoding, long)
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)


def test_the_count_cache_is_shared_safely_by_threads() -> None:
    """Large prompts are counted in worker threads: 8 threads counting the same texts
    at once all get the exact counts, and each text is remembered once."""
    cache = count_cache.CountCache()
    encoding = encodings.encoding_for_model("gpt-4o")
    texts = [f"thread {i} " + "words to count " * 100 for i in range(20)]
    expected = [len(encoding.encode_ordinary(t)) for t in texts]
    results: list[list[int]] = []

    def work() -> None:
        results.append([cache.count(encoding, t) for t in texts])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [expected] * 8
    assert len(cache) == 20
    assert cache.hits + cache.misses == 8 * 20

"""The tiktoken encodings: token ids, models mapped to encodings, shipped files, offline.

Known token ids and unicode counted by the tokenizer; each model's encoding; the
packaged files match their sha256sums, and a mismatch, a corrupt file or an unshipped
one raises a clear error instead of downloading; a fresh process counts without any
network.

Token ids marked "tiktoken docs" are the ones in tiktoken's documentation. Figures marked
"derived" were computed with the verified encodings and pin behaviour against
regressions.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest
import tiktoken.load
import tiktoken_ext.openai_public as openai_public

from tokenguard.counting import (
    EncodingDataError,
    count_chat_prompt,
    count_text,
    encoding_for_model,
    encoding_name_for,
    encodings,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- encodings and token ids ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "text", "ids"),
    [
        # tiktoken docs / cookbook
        ("gpt-4o", "tiktoken is great!", [83, 8251, 2488, 382, 2212, 0]),
        ("gpt-4", "tiktoken is great!", [83, 1609, 5963, 374, 2294, 0]),
        # cookbook, section 5
        ("gpt-4", "antidisestablishmentarianism", [519, 85342, 34500, 479, 8997, 2191]),
        ("gpt-4o", "antidisestablishmentarianism", [493, 129901, 376, 160388, 21203, 2367]),
        ("gpt-4", "2 + 2 = 4", [17, 489, 220, 17, 284, 220, 19]),
        ("gpt-4o", "2 + 2 = 4", [17, 659, 220, 17, 314, 220, 19]),
        (
            "gpt-4",
            "お誕生日おめでとう",
            [33334, 45918, 243, 21990, 9080, 33334, 62004, 16556, 78699],
        ),
        ("gpt-4o", "お誕生日おめでとう", [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669]),
        # derived
        ("gpt-4", "hello world", [15339, 1917]),
        ("gpt-4o", "hello world", [24912, 2375]),
    ],
)
def test_known_token_ids(model: str, text: str, ids: list[int]) -> None:
    assert encoding_for_model(model).encode(text) == ids
    assert count_text(model, text) == len(ids)


def test_count_text_tiktoken_is_great() -> None:
    assert count_text("gpt-4o", "tiktoken is great!") == 6
    assert count_text("gpt-4", "tiktoken is great!") == 6
    assert count_text("gpt-4o", "") == 0


@pytest.mark.parametrize(
    ("text", "o200k", "cl100k"),
    [
        # derived: emoji ZWJ sequence, emoji + CJK, zero-width chars, Hebrew, Arabic
        # wrapped in RTL override/pop formatting marks
        ("👨\u200d👩\u200d👧\u200d👦", 11, 18),
        ("🫡🍣顏文字", 8, 9),
        ("💩💩💩💩💩", 10, 10),
        ("zero\u200bwidth\u200cjoiner\u200dhere\ufeff", 9, 10),
        ("שלום עולם", 2, 10),
        ("\u202eمرحبا بالعالم\u202c", 6, 14),
    ],
)
def test_unicode_is_counted_by_the_tokenizer(text: str, o200k: int, cl100k: int) -> None:
    for model, expected in (("gpt-4o", o200k), ("gpt-4", cl100k)):
        n = count_text(model, text)
        assert n == expected
        assert n > 0
        assert n != len(text)  # tokens, not characters


def test_special_token_text_is_plain_text() -> None:
    # The API counts user-typed "<|endoftext|>" as text; tiktoken would raise by default.
    assert count_text("gpt-4o", "<|endoftext|>") == 7
    assert count_text("gpt-4", "a <|endoftext|> b <|endofprompt|>") > 4
    messages = [{"role": "user", "content": "<|im_start|>system<|im_end|>"}]
    assert count_chat_prompt("gpt-4o", messages) > 7


def test_lone_surrogate_does_not_raise() -> None:
    assert count_text("gpt-4o", "\ud800x") > 0
    assert count_chat_prompt("gpt-4", [{"role": "user", "content": "\udfff"}]) > 7


# --- model -> encoding ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("o3-mini-2025-01-31", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        # unknown to tiktoken -> fallback
        ("my-local-llama-3-70b", "o200k_base"),
        ("", "o200k_base"),
        # legacy encodings we do not ship -> fallback
        ("text-davinci-003", "o200k_base"),  # p50k_base
        ("davinci", "o200k_base"),  # r50k_base
        # o200k_harmony has o200k_base's ranks
        ("gpt-oss-120b", "o200k_base"),
    ],
)
def test_encoding_name_for(model: str, expected: str) -> None:
    assert encoding_name_for(model) == expected
    assert encoding_for_model(model).name == expected


# --- package data and integrity ------------------------------------------------------


def test_packaged_files_match_sha256sums() -> None:
    directory = resources.files("tokenguard") / "encodings"
    sums = {}
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, filename = line.split()
        sums[filename] = digest
    assert set(sums) == {f"{name}.tiktoken" for name in encodings.SHIPPED_ENCODINGS}
    for name in encodings.SHIPPED_ENCODINGS:
        data = encodings._read_packaged(name)
        assert hashlib.sha256(data).hexdigest() == sums[f"{name}.tiktoken"]


def test_hash_mismatch_raises_clear_error() -> None:
    with pytest.raises(EncodingDataError, match=r"SHA-256 mismatch.*o200k_base.*reinstall"):
        encodings._load_ranks("o200k_base", "0" * 64)


def test_loader_refuses_unshipped_files_instead_of_downloading() -> None:
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    with pytest.raises(EncodingDataError, match="not shipped"):
        encodings._offline_load_tiktoken_bpe(url, "0" * 64)
    with pytest.raises(EncodingDataError, match="not shipped"):
        encodings._build_encoding("p50k_base")


def test_corrupt_gzip_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeResource:
        def __truediv__(self, _: str) -> FakeResource:
            return self

        def read_bytes(self) -> bytes:
            return b"definitely not gzip"

    monkeypatch.setattr(encodings.resources, "files", lambda _: FakeResource())
    with pytest.raises(EncodingDataError, match="not valid gzip"):
        encodings._read_packaged("o200k_base")


def test_parse_ranks_rejects_malformed_lines() -> None:
    assert encodings._parse_ranks(b"IQ== 0\n\nIg== 1\n", "t") == {b"!": 0, b'"': 1}
    with pytest.raises(EncodingDataError, match="malformed line"):
        encodings._parse_ranks(b"IQ== 0\nnot-base64!! 1\n", "t")
    with pytest.raises(EncodingDataError, match="malformed line"):
        encodings._parse_ranks(b"IQ==\n", "t")


def test_tiktoken_loader_is_restored_even_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str, expected_hash: str) -> dict[bytes, int]:
        raise EncodingDataError("boom")

    monkeypatch.setattr(encodings, "_load_ranks", broken)
    with pytest.raises(EncodingDataError, match="boom"):
        encodings._build_encoding("cl100k_base")
    assert openai_public.load_tiktoken_bpe is tiktoken.load.load_tiktoken_bpe


def test_built_encodings_match_tiktoken_definitions() -> None:
    # pat_str and special tokens come from tiktoken's own constructors.
    enc = encoding_for_model("gpt-4o")
    assert enc.name == "o200k_base"
    assert enc.n_vocab == 200019
    assert enc.special_tokens_set == {"<|endoftext|>", "<|endofprompt|>"}
    assert encoding_for_model("gpt-4").n_vocab == 100277
    assert openai_public.load_tiktoken_bpe is tiktoken.load.load_tiktoken_bpe


# --- offline proof -------------------------------------------------------------------


def test_counts_in_a_fresh_process_without_network(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in {"no_proxy", "https_proxy", "http_proxy", "all_proxy"}
    }
    env.update(
        TIKTOKEN_CACHE_DIR=str(cache),
        DATA_GYM_CACHE_DIR=str(cache),
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    # Besides the dead proxy, an audit hook aborts on any socket use at all.
    code = textwrap.dedent(
        """
        import sys

        def no_network(event, args):
            if event.startswith(("socket.", "urllib.Request")):
                raise SystemExit(f"network access attempted: {event} {args!r}")

        sys.addaudithook(no_network)
        from tokenguard.counting import count_text, count_chat_prompt
        print(count_text('gpt-4o', 'hi'))
        print(count_text('gpt-4', 'tiktoken is great!'))
        print(count_chat_prompt('gpt-4o', [{'role': 'user', 'content': 'hi'}]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "6", "8"]
    assert list(cache.iterdir()) == []

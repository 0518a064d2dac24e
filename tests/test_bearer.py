"""The one reading of ``Authorization: Bearer <token>`` (tokenguard/bearer.py), which
the usage feed, the node's and the supervisor's /metrics share."""

from __future__ import annotations

import pytest

from tokenguard import bearer
from tokenguard.bearer import bearer_matches, bearer_token
from tokenguard.model import digest_of

SECRET = "metrics-token-0123456789"


@pytest.mark.parametrize(
    ("authorization", "token"),
    [("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER abc", "abc"),
     ("  Bearer   abc  ", "abc"), ("Bearer a b", "a b"), (None, None), ("", None),
     ("   ", None), ("Bearer", None), ("Bearer ", None), ("Bearer    ", None),
     ("Basic abc", None), ("abc", None), ("Bearerabc", None), ("Bearer\tabc", None),
     ("Token abc", None)],
)  # fmt: skip
def test_a_bearer_token_is_read_one_way(authorization: str | None, token: str | None) -> None:
    assert bearer_token(authorization) == token


@pytest.mark.parametrize(
    ("authorization", "matches"),
    [(f"Bearer {SECRET}", True), (f"bearer  {SECRET} ", True), (f"Bearer {SECRET}x", False),
     ("Bearer other-token-0123456789", False), (f"Basic {SECRET}", False), (SECRET, False),
     ("Bearer", False), ("", False), (None, False)],
)  # fmt: skip
def test_a_required_token_must_be_sent_as_bearer(authorization: str | None, matches: bool) -> None:
    assert bearer_matches(authorization, digest_of(SECRET)) is matches


@pytest.mark.parametrize("authorization", [None, "", "Basic x", f"Bearer {SECRET}"])
def test_no_token_required_lets_anything_through(authorization: str | None) -> None:
    assert bearer_matches(authorization, None) is True


def test_tokens_are_compared_by_digest_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[str, str]] = []
    real = bearer.hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(bearer.hmac, "compare_digest", spy)
    assert not bearer_matches("Bearer wrong", digest_of(SECRET))
    assert bearer_matches(f"Bearer {SECRET}", digest_of(SECRET))
    assert compared == [(digest_of("wrong"), digest_of(SECRET))] + [(digest_of(SECRET),) * 2]

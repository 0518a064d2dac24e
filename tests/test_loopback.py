"""Which bind addresses stay on this machine (tokenguard/loopback.py): the one answer
the node's /metrics warning and the admin API's bind check rely on."""

from __future__ import annotations

import pytest

from tokenguard.loopback import is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("localhost", True), ("LocalHost", True), ("127.0.0.1", True), ("127.0.0.5", True),
     ("127.255.255.254", True), ("::1", True), ("[::1]", True), ("0:0:0:0:0:0:0:1", True),
     ("::ffff:127.0.0.1", True), ("[::ffff:127.0.0.2]", True),
     ("0.0.0.0", False), ("::", False), ("[::]", False), ("", False), ("10.1.2.3", False),
     ("192.168.0.1", False), ("128.0.0.1", False), ("::ffff:10.0.0.1", False),
     ("fe80::1", False), ("example.com", False), ("127.example.com", False),
     ("127.0.0.1.nip.io", False), ("localhost.example.com", False), ("[::1", False),
     ("::1]", False), ("127.1", False), (" 127.0.0.1", False)],
)  # fmt: skip
def test_only_loopback_addresses_and_localhost_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback

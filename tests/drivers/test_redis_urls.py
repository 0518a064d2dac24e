"""The Redis driver's store URLs: parsed, refused when malformed, never showing the password.

``store_from_url`` picks the Redis driver for every Redis scheme without connecting,
and passes malformed URLs on as errors. No server is started here.
"""

from __future__ import annotations

import pytest

from drivers.redis import (
    DEFAULT_TIMEOUT,
    RedisStore,
    RedisTarget,
    parse_redis_url,
)
from tokenguard.store.window_store import store_from_url

# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisTarget(kind="standalone", hosts=(("localhost", 6379),))),
        (
            "redis://127.0.0.1:6380/2?timeout=0.5",
            RedisTarget(kind="standalone", hosts=(("127.0.0.1", 6380),), db=2, timeout=0.5),
        ),
        (
            "redis://:s%40cret@h:1/0",
            RedisTarget(kind="standalone", hosts=(("h", 1),), password="s@cret"),
        ),
        (
            "redis://alice:pw@h:1",
            RedisTarget(kind="standalone", hosts=(("h", 1),), username="alice", password="pw"),
        ),
        ("redis://[::1]:7000/3", RedisTarget(kind="standalone", hosts=(("::1", 7000),), db=3)),
        (
            "rediss://:pw@h:6390/1?ssl_cert_reqs=none&ssl_ca_certs=/ca.pem",
            RedisTarget(
                kind="standalone",
                hosts=(("h", 6390),),
                db=1,
                password="pw",
                ssl=True,
                ssl_cert_reqs="none",
                ssl_ca_certs="/ca.pem",
            ),
        ),
        (
            "unix:///run/redis.sock?db=4&timeout=2",
            RedisTarget(kind="standalone", unix_socket="/run/redis.sock", db=4, timeout=2.0),
        ),
        (
            "unix://:pw@/run/redis.sock",
            RedisTarget(kind="standalone", unix_socket="/run/redis.sock", password="pw"),
        ),
        (
            "redis+sentinel://:pw@s1:26380,s2/mymaster/5?sentinel_password=sp",
            RedisTarget(
                kind="sentinel",
                hosts=(("s1", 26380), ("s2", 26379)),
                service_name="mymaster",
                db=5,
                password="pw",
                sentinel_password="sp",
            ),
        ),
        (
            "redis+sentinel://s1/mymaster",
            RedisTarget(kind="sentinel", hosts=(("s1", 26379),), service_name="mymaster"),
        ),
        (
            "redis+cluster://:pw@n1:7000,n2:7001,n3?pipelines=4",
            RedisTarget(
                kind="cluster",
                hosts=(("n1", 7000), ("n2", 7001), ("n3", 6379)),
                password="pw",
                pipelines=4,
            ),
        ),
    ],
)
def test_store_urls_parse(url: str, expected: RedisTarget) -> None:
    target = parse_redis_url(url)
    assert target == expected
    if "timeout" not in url:
        assert target.timeout == DEFAULT_TIMEOUT


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://", "no host"),
        ("redis://h:0", "port"),
        ("redis://h:99999", "port"),
        ("redis://h:port", "port"),
        ("redis://h/db", "database"),
        ("redis://h/-1", "database"),
        ("redis://h1,h2", "one host"),
        ("redis://h?timeout=0", "timeout"),
        ("redis://h?timeout=fast", "timeout"),
        ("redis://h?pipelines=0", "pipelines"),
        ("redis://h?colour=blue", "unknown option"),
        ("redis://h?ssl_cert_reqs=none", "unknown option"),  # TLS options: rediss:// only
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("redis://h#frag", "fragment"),
        ("unix://", "socket path"),
        ("unix://host/path.sock", "no host"),
        ("unix:///s.sock?db=x", "database"),
        ("redis+sentinel://s1", "service name"),
        ("redis+sentinel://s1/svc/1/2", "service_name/db"),
        ("redis+sentinel:///svc", "no sentinel host"),
        ("redis+cluster://", "no host"),
        ("redis+cluster://n1/1", "database 0"),
        ("redis+cluster://n1,,n2", "empty host"),
        ("redis+cluster://[::1:7000", "IPv6"),
        ("http://h", "scheme"),
        ("localhost:6379", "scheme"),
    ],
)
def test_malformed_urls_are_value_errors(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_redis_url(url)


def test_errors_and_store_url_never_show_the_password() -> None:
    with pytest.raises(ValueError) as raised:
        parse_redis_url("redis://:hunter2@h:0")
    assert "hunter2" not in str(raised.value)
    store = RedisStore.from_url("redis://user:hunter2@h:1/0")
    assert store.url == "redis://user:***@h:1/0"
    assert "hunter2" not in repr(store.target)
    sentinel = RedisStore.from_url("redis+sentinel://:hunter2@s/m?sentinel_password=hunter3")
    assert sentinel.url == "redis+sentinel://:***@s/m?sentinel_password=***"


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:1/0",
        "rediss://h:1/0",
        "unix:///tmp/redis.sock",
        "redis+sentinel://h:26379/mymaster/0",
        "redis+cluster://h:1,h:2",
    ],
)
def test_store_from_url_picks_the_redis_driver_without_connecting(url: str) -> None:
    store = store_from_url(url)
    assert isinstance(store, RedisStore)


def test_store_from_url_passes_on_malformed_urls() -> None:
    with pytest.raises(ValueError, match="port"):
        store_from_url("redis://h:nope")

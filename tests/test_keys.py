"""API keys: ``tokenguard keys new`` and where a key may (never) appear.

A key is shown once, when it is made; the config holds its SHA-256 digest; logs and
events name it by its name; Redis keys carry a key id (a digest prefix), never the key
nor its whole digest. Checked here on a real node process over a real redis-server.
"""

from __future__ import annotations

import io
import re
import tomllib
from pathlib import Path

import httpx
import pytest
import trio

from tests.processes import free_ports, running_tokenguard, wait_healthy
from tests.redis_servers import RedisServer
from tokenguard import cli
from tokenguard.keys import new_key
from tokenguard.settings import digest_of, parse_settings

KEY_PATTERN = re.compile(r"^tg-[A-Za-z0-9_-]{43}$")


def keys_new(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    """Run ``tokenguard keys new ARGS``; return (the key, the config entry)."""
    assert cli.main(["keys", "new", *args]) == 0
    out = capsys.readouterr().out
    keys = [line.strip() for line in out.splitlines() if line.strip().startswith("tg-")]
    assert len(keys) == 1, out
    entry = out[out.index("[[keys]]") :]
    return keys[0], entry


def test_keys_new_prints_a_fresh_key_and_its_config_entry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, entry = keys_new(capsys, "--name", "team-a")
    assert KEY_PATTERN.match(key)
    assert key not in entry  # the config gets the digest only
    config = tomllib.loads(entry + "rpm = 10\n")
    assert config == {"keys": [{"name": "team-a", "sha256": digest_of(key), "rpm": 10}]}
    settings = parse_settings(config, "<pasted>", environ={})
    assert settings.key_by_digest()[digest_of(key)].name == "team-a"


def test_keys_new_can_name_a_tier(capsys: pytest.CaptureFixture[str]) -> None:
    key, entry = keys_new(capsys, "--name", "bot@example.com", "--tier", "free")
    config = tomllib.loads("[tiers.free]\nrpm = 3\n\n" + entry)
    settings = parse_settings(config, "<pasted>", environ={})
    assert settings.key_by_digest()[digest_of(key)].limits.rpm == 3


def test_keys_are_high_entropy_and_never_repeat() -> None:
    keys = {new_key() for _ in range(1000)}
    assert len(keys) == 1000
    assert all(KEY_PATTERN.match(k) for k in keys)
    # 43 base64url characters: 256 bits. Every character position varies (the last
    # one carries 4 bits: 16 values).
    for position in range(3, 45):
        assert len({k[position] for k in keys}) > 40
    assert len({k[45] for k in keys}) == 16


@pytest.mark.parametrize("name", ["", "has space", 'quote"', "-dash-first", "x" * 101, "é"])
def test_bad_key_names_are_usage_errors(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["keys", "new", f"--name={name}"])
    assert exit_.value.code == 2
    assert "key name" in capsys.readouterr().err


def test_keys_digest_reads_keys_from_stdin() -> None:
    args = cli.build_parser().parse_args(["keys", "digest"])
    out = io.StringIO()
    from tokenguard.keys import run_keys_command

    assert run_keys_command(args, stdin=io.StringIO("sk-one\n\n sk-two \n"), stdout=out) == 0
    assert out.getvalue().split() == [digest_of("sk-one"), digest_of("sk-two")]


async def test_keys_never_reach_redis_or_the_log(tmp_path: Path, redis_server: RedisServer) -> None:
    """A node on Redis serves a plaintext-configured key and a digest-configured one
    (200s, a 429, a 400, a 401): Redis holds key ids only, the log neither key nor
    digest."""
    digest_key = new_key()
    config = tmp_path / "tokenguard.toml"
    config.write_text(
        '[[keys]]\nkey = "sk-plain-secret"\nname = "plain"\nrpm = 2\n\n'
        f'[[keys]]\nsha256 = "{digest_of(digest_key)}"\nname = "hashed"\nrpm = 5\n'
    )
    port = free_ports()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--config", str(config), "--port", str(port), "--store", redis_server.url]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with trio.fail_after(30):
        async with running_tokenguard(args, output_path=tmp_path / "node.out") as node:
            await wait_healthy(url)
            async with httpx.AsyncClient(timeout=10) as client:
                statuses = []
                for key in ("sk-plain-secret", "sk-plain-secret", "sk-plain-secret", digest_key):
                    answer = await client.post(
                        f"{url}/v1/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    statuses.append(answer.status_code)
                    assert "sk-plain-secret" not in answer.text and digest_key not in answer.text
                bad = await client.post(
                    f"{url}/v1/chat/completions",
                    content=b"{",
                    headers={"Authorization": f"Bearer {digest_key}"},
                )
                unknown = await client.post(
                    f"{url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": "Bearer sk-plain-secreT"},
                )
            log = node.output()
    assert statuses == [200, 200, 429, 200]
    assert bad.status_code == 400 and unknown.status_code == 401
    names = [k.decode() for k in redis_server.command("KEYS", "*")]  # type: ignore[union-attr]
    assert names
    ids = {digest_of("sk-plain-secret")[:16], digest_of(digest_key)[:16]}
    for name in names:
        assert any(f"{{{key_id}}}" in name for key_id in ids), name
    secrets = ("sk-plain-secret", digest_key, digest_of("sk-plain-secret"), digest_of(digest_key))
    for secret in secrets:
        assert all(secret not in name for name in names)
        assert secret not in log

"""API keys: ``tokenguard keys new`` and where a key may (never) appear.

A key is shown once, when it is made; the config holds its SHA-256 digest; logs and
events name it by its name; Redis keys carry a key id (a digest prefix), never the key
nor its whole digest; the registry of live keys (tokenguard/keyring.py) stores digests.
Checked here on a real node process over a real redis-server. Keys made live through
the admin API (``tokenguard keys new --admin URL``): tests/test_admin*.py.
"""

from __future__ import annotations

import io
import re
import tomllib
from pathlib import Path

import httpx
import pytest
import trio

from drivers.redis import REGISTRY_RECORDS, REGISTRY_VERSION
from tests.support.processes import START_TIMEOUT, free_ports, running_tokenguard, wait_healthy
from tests.support.redis_servers import RedisServer
from tokenguard.cli import main as cli
from tokenguard.cli.keys import parse_assignments
from tokenguard.config.loading import parse_settings
from tokenguard.model import digest_of, new_key

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
    from tokenguard.cli.keys import run_keys_command

    assert run_keys_command(args, stdin=io.StringIO("sk-one\n\n sk-two \n"), stdout=out) == 0
    assert out.getvalue().split() == [digest_of("sk-one"), digest_of("sk-two")]


async def test_keys_never_reach_redis_or_the_log(tmp_path: Path, redis_server: RedisServer) -> None:
    """A node on Redis serves a plaintext-configured key and a digest-configured one
    (200s, a 429, a 400, a 401): Redis key names hold key ids only, the registry's
    records digests only, the log neither key nor digest."""
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
    with trio.fail_after(START_TIMEOUT + 30):
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
    # The registry (keys and tiers, tokenguard/keyring.py) holds digests, never keys.
    registry = [REGISTRY_RECORDS, REGISTRY_VERSION]
    assert sorted(n for n in names if n in registry) == sorted(registry)
    records = redis_server.command("HGETALL", REGISTRY_RECORDS)
    assert isinstance(records, dict)
    assert set(records) == {b"key/plain", b"key/hashed", b"meta/epoch"}  # (and the marker)
    stored = b" ".join(records.values()).decode()
    assert digest_of("sk-plain-secret") in stored and digest_of(digest_key) in stored
    names = [n for n in names if n not in registry]
    assert names
    ids = {digest_of("sk-plain-secret")[:16], digest_of(digest_key)[:16]}
    for name in names:
        assert any(f"{{{key_id}}}" in name for key_id in ids), name
    secrets = ("sk-plain-secret", digest_key, digest_of("sk-plain-secret"), digest_of(digest_key))
    for secret in secrets:
        assert all(secret not in name for name in names)
        assert secret not in log
    assert "sk-plain-secret" not in stored and digest_key not in stored


# --- the live commands (admin API): argument handling; against a cluster, see
# tests/test_admin_cluster.py::test_the_keys_command_drives_the_admin_api


@pytest.mark.parametrize(
    ("assignments", "fields"),
    [
        (["rpm=10"], {"rpm": 10}),
        (["tpd=none", "mode=shadow"], {"tpd": None, "mode": "shadow"}),
        (["models.gpt-4o*.rpm=5"], {"models": {"gpt-4o*": {"rpm": 5}}}),
        (
            ["models.gpt-4.1*.rpm=5", "models.gpt-4.1*.tpm=9"],
            {"models": {"gpt-4.1*": {"rpm": 5, "tpm": 9}}},
        ),
        (["models.o3*=none"], {"models": {"o3*": None}}),
        (["default_max_tokens=-1"], {"default_max_tokens": -1}),  # the node refuses it
    ],
)
def test_field_assignments_become_the_admin_apis_fields(
    assignments: list[str], fields: dict[str, object]
) -> None:
    assert parse_assignments(assignments) == fields


@pytest.mark.parametrize("assignment", ["rpm", "=5", "models.o3*=5", "models.o3*.bogus=1"])
def test_malformed_assignments_are_refused(assignment: str) -> None:
    with pytest.raises(ValueError):
        parse_assignments([assignment])


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["keys", "list"], "--admin URL"),
        (["keys", "revoke", "bob"], "--admin URL"),
        (["keys", "set", "bob", "rpm=1"], "--admin URL"),
        (["keys", "new", "--name", "bob", "rpm=1"], "need --admin"),
        (["keys", "new", "--name", "bob", "--team", "t"], "need --admin"),
        (["keys", "list", "--admin", "http://127.0.0.1:1"], "no admin token"),
        (["keys", "set", "bob", "rpm", "--admin", "http://127.0.0.1:1"], "FIELD=VALUE"),
    ],
)
def test_live_commands_without_what_they_need_are_usage_errors(
    argv: list[str],
    words: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TOKENGUARD_ADMIN_URL", raising=False)
    monkeypatch.delenv("TOKENGUARD_ADMIN_TOKEN", raising=False)
    if "set" in argv and "rpm" in argv:
        monkeypatch.setenv("TOKENGUARD_ADMIN_TOKEN", "t" * 32)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert words in captured.err and captured.out == ""


def test_an_unreachable_admin_api_is_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENGUARD_ADMIN_TOKEN", "t" * 32)
    port = free_ports()  # nobody listens there
    assert cli.main(["keys", "list", "--admin", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach the admin API" in err and "t" * 32 not in err

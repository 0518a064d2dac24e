"""The admin API's bind check: only loopback binds go without a long admin token.

``tokenguard serve`` (one node or several) and the supervisor refuse a public admin
bind whose token is shorter than 32 bytes.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.admin_node import (
    settings_of,
)
from tokenguard.api.admin import check_admin_bind, is_loopback
from tokenguard.cli import main as cli
from tokenguard.config.settings import ConfigError

# --- the bind check --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False),
     ("example.com", False)],
)  # fmt: skip
def test_only_loopback_binds_go_without_a_long_token(host: str, loopback: bool) -> None:
    assert is_loopback(host) == loopback
    short = settings_of({"feed": {"admin_token": "x" * 31}})
    long = settings_of({"feed": {"admin_token": "x" * 32}})
    none = settings_of({})
    check_admin_bind(host, long)
    for settings in (short, none):
        if loopback:
            check_admin_bind(host, settings)
        else:
            with pytest.raises(ConfigError, match="at least 32 bytes"):
                check_admin_bind(host, settings)


def test_serve_refuses_a_public_admin_bind_without_a_long_token(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENGUARD_ADMIN_TOKEN", raising=False)
    config = tmp_path / "c.toml"
    config.write_text('[feed]\nadmin_token = "short-but-16-chars"\n')
    for nodes in ("1", "3"):
        argv = ["serve", "--config", str(config), "--admin-port", "29999", "--nodes", nodes]
        status = cli.main([*argv, "--admin-host", "0.0.0.0", "--state-dir", str(tmp_path)])
        assert status == 2
        err = capsys.readouterr().err
        assert "--admin-host 0.0.0.0" in err and "at least 32 bytes" in err
        assert "Traceback" not in err


def test_the_supervisor_checks_admin_ports(tmp_path: Any) -> None:
    from tokenguard.cluster.errors import SupervisorError
    from tokenguard.cluster.supervisor import Supervisor

    ok = Supervisor(nodes=3, state_dir=tmp_path, port=20000, admin_port=20003)
    spec = ok._node_spec(2, lock_fd=0)
    assert spec.argv[spec.argv.index("--admin-port") + 1] == "20005"
    assert spec.argv[spec.argv.index("--admin-host") + 1] == "127.0.0.1"
    for admin_port in (19998, 20002, 65534, 0):
        with pytest.raises(SupervisorError, match="admin"):
            Supervisor(nodes=3, state_dir=tmp_path, port=20000, admin_port=admin_port)

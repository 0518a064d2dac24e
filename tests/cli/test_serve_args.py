"""``tokenguard serve``'s cluster options, as the supervisor receives them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenguard.cli import main as cli
from tokenguard.cli.serve import _cluster
from tokenguard.cluster.children import HealthPolicy


def cluster_of(tmp_path: Path, *extra: str):  # noqa: ANN201 (a Supervisor)
    args = cli.build_parser().parse_args(
        ["serve", "--nodes", "2", "--state-dir", str(tmp_path), *extra]
    )
    return _cluster(args)


def test_a_cluster_waits_30_s_for_a_node_to_start_unless_told_otherwise(tmp_path: Path) -> None:
    assert cluster_of(tmp_path).policy.start_timeout == 30.0
    slow = cluster_of(tmp_path, "--start-timeout", "120")
    assert slow.policy.start_timeout == 120.0
    # Only the start deadline changes: the probes of a running node are the same.
    assert slow.policy.max_failed_probes == HealthPolicy().max_failed_probes


@pytest.mark.parametrize("bad", ["0", "-5", "nan", "inf", "soon"])
def test_a_start_timeout_that_is_not_a_positive_number_is_a_usage_error(
    tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cluster_of(tmp_path, "--start-timeout", bad)
    assert exited.value.code == 2
    assert "--start-timeout" in capsys.readouterr().err

"""Prometheus scrapes read in tests, and the config of the metrics tests.

:func:`parse` reads every sample of a scrape with prometheus_client's own parser, by
(sample name, labels); :func:`value` sums the samples of a name whose labels include
the ones given; :func:`node_metric` scrapes a running node. :data:`CONFIG` holds the
keys of tests/observe/test_metrics_*.py (``sk-alice``, ``sk-bob``, ``sk-shadow``).
"""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

TEST_TIMEOUT = 30.0
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Count the tokens of this request, please."}]
CONFIG: dict[str, Any] = {
    "keys": [
        {"key": "sk-alice", "name": "alice", "rpm": 3, "output_tpm": 10_000},
        {"key": "sk-bob", "name": "bob", "rpm": 1000},
        {"key": "sk-shadow", "name": "shade", "rpm": 1, "mode": "shadow"},
    ],
}


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by (sample name, labels)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a series that does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def node_metric(client: httpx.AsyncClient, url: str, name: str) -> float:
    """The value of the unlabelled sample ``name`` in the ``/metrics`` of the node at
    ``url`` (a real process); fails if the node does not report it."""
    response = await client.get(f"{url}/metrics")
    assert response.status_code == 200, response.text
    samples = parse(response.text)
    assert (name, frozenset()) in samples, f"no {name} in /metrics"
    return samples[(name, frozenset())]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}

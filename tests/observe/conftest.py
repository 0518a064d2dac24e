"""Fixtures of the in-process feed tests (tests/observe/test_feed_*.py): ``node``, a node
of :func:`~tests.support.usage_feed.settings_for` (the memory store) on a free port,
fresh for every test. A module that tests another node defines its own ``node``, which
takes precedence over this one (pytest's fixture override).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.usage_feed import Node, running_node, settings_for


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    async with running_node(settings_for()) as running:
        yield running

"""Fixtures of the in-process tests of tests/api/: fresh for every test.

For tests/api/test_app_*.py: ``clock`` is the memory store's
:class:`~tests.support.chat_app.FakeClock`, ``app`` the app of
:data:`~tests.support.chat_app.CONFIG` over that store, ``client`` its test client.
For tests/api/test_admin_*.py: ``node``, an in-process node with the admin API over a
memory store (:mod:`tests.support.admin_node`). A module that tests another
configuration defines its own ``app``, ``client`` or ``node``, which takes precedence
over these (pytest's fixture override).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from drivers.memory import MemoryStore
from tests.support.admin_node import TEST_TIMEOUT, Node, make_node
from tests.support.chat_app import CONFIG, FakeClock
from tokenguard.api.app import create_app
from tokenguard.config.loading import parse_settings


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(clock: FakeClock):  # type: ignore[no-untyped-def]
    settings = parse_settings(CONFIG, "<test>")
    return create_app(settings, MemoryStore(clock=clock))


@pytest.fixture
def client(app):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    with trio.fail_after(TEST_TIMEOUT):
        yield await make_node(MemoryStore())

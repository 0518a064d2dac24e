"""The app of the HTTP surface, for tests/api/test_app_*.py: fresh for every test.

``clock`` is the memory store's :class:`~tests.support.chat_app.FakeClock`, ``app`` the
app of :data:`~tests.support.chat_app.CONFIG` over that store, ``client`` its test
client. A module that tests another configuration defines its own ``app`` or
``client``, which takes precedence over these (pytest's fixture override).
"""

from __future__ import annotations

import pytest

from drivers.memory import MemoryStore
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

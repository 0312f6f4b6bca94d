"""Shared fixtures for live tests against a real, isolated Prosody.

Event-loop scheme (pytest-asyncio 1.x, ``asyncio_mode = "auto"``, default loop scope
"function" from pyproject.toml):

* ``prosody`` is a session-scoped async fixture declared with
  ``loop_scope="session"``: it is set up and torn down in pytest-asyncio's session loop.
  This is safe because :class:`ProsodyServer` is loop-agnostic (a plain ``subprocess``
  polled with ``asyncio.sleep``) -- nothing it holds is bound to that loop.
* Tests and every other fixture (``proxy``, ``fresh_prosody``, slixmpp clients) run in
  the default per-test *function* loop. No test needs a ``loop_scope`` marker; a test
  only has to avoid sharing loop-bound objects (proxies, clients, streams) across tests.
* Never skip: if Prosody cannot be installed or started, the fixture raises
  ``ProsodyError`` and every test using it errors with the Prosody log tail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from xmpp_sm_tracker.testing import FaultProxy, ProsodyServer, ensure_prosody_installed
from xmpp_sm_tracker.testing.client import PASSWORD, USERS, ClientPool

# Our own suite uses the test kit we ship to users.
pytest_plugins = ["xmpp_sm_tracker.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def prosody(xmpp_server: ProsodyServer) -> ProsodyServer:
    """One Prosody for the whole run (the test kit's), with alice/bob/carol ("pass")."""
    return xmpp_server


@pytest.fixture
def proxy(flaky_link: FaultProxy) -> FaultProxy:
    """A FaultProxy in front of the shared Prosody's c2s port (fresh per test)."""
    return flaky_link


@pytest.fixture
def clients(client_pool: ClientPool) -> ClientPool:
    """``await clients(user, address, tracked=..., **plugin_config)`` gives a Party."""
    return client_pool


@pytest_asyncio.fixture
async def fresh_prosody(tmp_path: Path) -> AsyncIterator[ProsodyServer]:
    """A private Prosody (hibernation_time=5) for tests that restart or kill it."""
    ensure_prosody_installed()
    server = ProsodyServer(tmp_path / "prosody", hibernation_time=5)
    for user in USERS:
        server.register(user, PASSWORD)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()

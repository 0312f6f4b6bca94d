"""Shared fixtures for live tests against real, isolated servers (Prosody and ejabberd).

Every live test runs once per server (``pytest --server prosody|ejabberd|all``, default
all: the test kit's ``xmpp_server_kind`` parametrization); the test id says which,
e.g. ``test_x[ejabberd]``.

Event-loop scheme (pytest-asyncio 1.x, ``asyncio_mode = "auto"``, default loop scope
"function" from pyproject.toml):

* ``server`` (the test kit's ``xmpp_server``) is a session-scoped async fixture
  declared with ``loop_scope="session"``: it is set up and torn down in
  pytest-asyncio's session loop. This is safe because the launchers are loop-agnostic
  (a plain ``subprocess`` polled with ``asyncio.sleep``) -- nothing they hold is
  bound to that loop. One instance per server kind; pytest runs every test of one
  kind before it starts the other.
* Tests and every other fixture (``proxy``, ``fresh_server``, slixmpp clients) run in
  the default per-test *function* loop. No test needs a ``loop_scope`` marker; a test
  only has to avoid sharing loop-bound objects (proxies, clients, streams) across tests.
* Never skip: if a server cannot be installed or started, the fixture raises
  (``ProsodyError`` / ``EjabberdError``) and every test using it errors with the
  server's log tail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import ClientPool

if TYPE_CHECKING:  # imported by pytest_plugins below, before assertion rewriting
    from xmpp_sm_tracker.testing.pytest_plugin import ServerFactory

# Our own suite uses the test kit we ship to users.
pytest_plugins = ["xmpp_sm_tracker.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def server(xmpp_server: LocalXMPPServer) -> LocalXMPPServer:
    """One server per kind for the whole run (the test kit's), alice/bob/carol ("pass")."""
    return xmpp_server


@pytest.fixture
def proxy(flaky_link: FaultProxy) -> FaultProxy:
    """A FaultProxy in front of the shared server's c2s port (fresh per test)."""
    return flaky_link


@pytest.fixture
def clients(client_pool: ClientPool) -> ClientPool:
    """``await clients(user, address, tracked=..., **plugin_config)`` gives a Party."""
    return client_pool


@pytest.fixture
async def fresh_server(xmpp_server_factory: ServerFactory) -> LocalXMPPServer:
    """A private server (hibernation_time=5) for tests that restart or kill it."""
    return await xmpp_server_factory(hibernation_time=5)


@pytest.fixture
def prosody(server: LocalXMPPServer) -> LocalXMPPServer:
    """The old name of ``server`` (tests written before ejabberd joined run on both)."""
    return server


@pytest.fixture
def fresh_prosody(fresh_server: LocalXMPPServer) -> LocalXMPPServer:
    """The old name of ``fresh_server``."""
    return fresh_server

"""A pytest plugin for testing your own app against a real server and a flaky link.

Enable it in your ``conftest.py``::

    pytest_plugins = ["xmpp_sm_tracker.testing.pytest_plugin"]

Fixtures (pytest-asyncio):

- ``xmpp_server``: one isolated Prosody 0.12 for the session (installed with apt-get
  when missing), 127.0.0.1 only, accounts ``alice``, ``bob``, ``carol`` with the
  password ``"pass"``, MUC on ``conference.localhost``. It fails loudly, never skips.
- ``flaky_link``: a :class:`FaultProxy` in front of it for one test: ``cut()``,
  ``stall()``, ``blackhole()``, ``refuse()``, ``drop_after(n)``, ``heal()``.
- ``xmpp_client``: ``await xmpp_client("alice", via=flaky_link)`` gives a connected
  slixmpp client with ``sm_tracker`` (pass ``tracked=False`` for a plain one, and
  plugin config as keywords); every client is disconnected after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import slixmpp

from .client import PASSWORD, USERS, ClientPool
from .prosody import ProsodyServer, ensure_prosody_installed
from .proxy import FaultProxy

__all__ = [
    "PASSWORD",
    "USERS",
    "ClientFactory",
    "client_pool",
    "flaky_link",
    "xmpp_client",
    "xmpp_server",
]

ClientFactory = Callable[..., Awaitable[slixmpp.ClientXMPP]]


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def xmpp_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProsodyServer]:
    """One Prosody for the whole test session."""
    ensure_prosody_installed()
    server = ProsodyServer(tmp_path_factory.mktemp("prosody"))
    for user in USERS:
        server.register(user, PASSWORD)
    async with server:
        yield server


@pytest_asyncio.fixture
async def flaky_link(xmpp_server: ProsodyServer) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the server, for this test only."""
    async with FaultProxy(xmpp_server.host, xmpp_server.c2s_port) as proxy:
        yield proxy


@pytest_asyncio.fixture
async def xmpp_client(xmpp_server: ProsodyServer) -> AsyncIterator[ClientFactory]:
    """Connected clients on demand; all are disconnected when the test ends."""
    pool = ClientPool(domain=xmpp_server.domain)

    async def factory(
        user: str, *, via: FaultProxy | None = None, tracked: bool = True, **config: Any
    ) -> slixmpp.ClientXMPP:
        address = via.address if via is not None else xmpp_server.address
        party = await pool(user, address, tracked=tracked, **config)
        return party.xmpp

    yield factory
    await pool.aclose()


@pytest_asyncio.fixture
async def client_pool(xmpp_server: ProsodyServer) -> AsyncIterator[ClientPool]:
    """A :class:`ClientPool`: ``await client_pool(user, address, ...)`` gives a Party."""
    pool = ClientPool(domain=xmpp_server.domain)
    yield pool
    await pool.aclose()

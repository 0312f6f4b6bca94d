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

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
import slixmpp

from .client import PASSWORD, USERS, connect_client, make_client, tracker_of
from .prosody import ProsodyServer, ensure_prosody_installed
from .proxy import FaultProxy

__all__ = ["PASSWORD", "USERS", "ClientFactory", "flaky_link", "xmpp_client", "xmpp_server"]

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
    made: list[slixmpp.ClientXMPP] = []

    async def factory(
        user: str, *, via: FaultProxy | None = None, tracked: bool = True, **config: Any
    ) -> slixmpp.ClientXMPP:
        jid = f"{user}@{xmpp_server.domain}/{uuid.uuid4().hex[:8]}"
        xmpp = make_client(jid, PASSWORD, tracked=tracked, tracker_config=config)
        made.append(xmpp)
        address = via.address if via is not None else xmpp_server.address
        await connect_client(xmpp, address)
        return xmpp

    yield factory
    for xmpp in made:
        if "sm_tracker" in xmpp.plugin:
            tracker_of(xmpp).auto_reconnect = False
        xmpp.disconnect(wait=0.5)
    await asyncio.sleep(0.1)
    for xmpp in made:
        if xmpp.transport is not None:
            xmpp.abort()

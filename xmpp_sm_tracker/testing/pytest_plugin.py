"""A pytest plugin for testing your own app against real servers and a flaky link.

It needs pytest and pytest-asyncio: ``pip install xmpp_sm_tracker[testing]``. Enable it
in your ``conftest.py``::

    pytest_plugins = ["xmpp_sm_tracker.testing.pytest_plugin"]

Every test that uses a server runs once per server: Prosody 0.12 and ejabberd 23.01
(installed with apt-get when missing). ``pytest --server prosody`` (or ``ejabberd``)
runs one of them only; the default is ``--server all``. A test that exercises one
server's own facility says so, and why::

    @pytest.mark.xmpp_server("prosody", reason="uses Prosody's mod_smacks queue limit")

Fixtures (pytest-asyncio):

- ``xmpp_server``: one isolated server of the test's kind for the session,
  127.0.0.1 only, accounts ``alice``, ``bob``, ``carol`` with the password
  ``"pass"``, MUC on ``conference.localhost``. It fails loudly, never skips.
- ``xmpp_server_kind``: ``"prosody"`` or ``"ejabberd"``, the kind of this run.
- ``xmpp_server_factory``: ``await xmpp_server_factory(hibernation_time=5)`` starts a
  private server of the same kind (the accounts above), stopped after the test: for
  tests that restart or kill it.
- ``flaky_link``: a :class:`FaultProxy` in front of ``xmpp_server`` for one test:
  ``cut()``, ``stall()``, ``blackhole()``, ``refuse()``, ``drop_after(n)``, ``heal()``.
- ``xmpp_client``: ``await xmpp_client("alice", via=flaky_link)`` gives a connected
  slixmpp client with ``sm_tracker`` (pass ``tracked=False`` for a plain one, and
  plugin config as keywords); every client is disconnected after the test.
- ``postgres_dsn``: the DSN of one private PostgreSQL cluster for the session
  (:class:`~.postgres.PostgresServer`: installed with apt-get when missing, 127.0.0.1
  only, removed at the end), started only by the tests that ask. It fails, never skips.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import slixmpp

try:
    import pytest
    import pytest_asyncio
except ModuleNotFoundError as exc:  # pragma: no cover - only without the extra
    raise ModuleNotFoundError(
        f"xmpp_sm_tracker's pytest plugin needs {exc.name}: pip install 'xmpp_sm_tracker[testing]'",
        name=exc.name,
    ) from exc

from .client import PASSWORD, USERS, ClientPool
from .postgres import PostgresServer
from .proxy import FaultProxy
from .server import LocalXMPPServer
from .servers import SERVER_KINDS, ensure_server_installed, make_server

__all__ = [
    "PASSWORD",
    "USERS",
    "ClientFactory",
    "ServerFactory",
    "client_pool",
    "flaky_link",
    "postgres_dsn",
    "postgres_server",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_generate_tests",
    "xmpp_client",
    "xmpp_server",
    "xmpp_server_factory",
    "xmpp_server_kind",
]

ClientFactory = Callable[..., Awaitable[slixmpp.ClientXMPP]]
ServerFactory = Callable[..., Awaitable[LocalXMPPServer]]

_KIND = "xmpp_server_kind"
_MARKER = "xmpp_server"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("xmpp_sm_tracker", "xmpp_sm_tracker test servers")
    group.addoption(
        "--server",
        choices=(*SERVER_KINDS, "all"),
        default="all",
        help="run the live tests against this server, or every one (default: all)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_MARKER}(*kinds, reason): the test exercises a facility of these servers only "
        "(say why in reason); it runs on them alone",
    )


def _selected(config: pytest.Config) -> tuple[str, ...]:
    choice = config.getoption("--server", default="all")
    return SERVER_KINDS if choice in (None, "all") else (str(choice),)


def _allowed(node: pytest.Item | Any) -> tuple[str, ...]:
    marker = node.get_closest_marker(_MARKER)
    if marker is None:
        return SERVER_KINDS
    unknown = set(marker.args) - set(SERVER_KINDS)
    if not marker.args or unknown or not marker.kwargs.get("reason"):
        raise pytest.UsageError(
            f"{node.nodeid}: @pytest.mark.{_MARKER} takes server kinds out of "
            f"{SERVER_KINDS} and a reason= (got {marker.args}, {marker.kwargs})"
        )
    return tuple(k for k in SERVER_KINDS if k in marker.args)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that needs a server runs once per server kind it may run on."""
    if _KIND in metafunc.fixturenames:
        kinds = _allowed(metafunc.definition)
        metafunc.parametrize(_KIND, kinds, indirect=True, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--server X`` deselects the other servers' runs (deselected, never skipped).

    A test without a server fixture that is marked for some servers only (a launcher's
    own check, say) is deselected too when none of them is selected.
    """
    selected = set(_selected(config))
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        kind = callspec.params.get(_KIND) if callspec is not None else None
        kinds = {kind} if kind is not None else set(_allowed(item))
        (keep if kinds & selected else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def xmpp_server_kind(request: pytest.FixtureRequest) -> str:
    """The server kind this test runs against (``"prosody"`` or ``"ejabberd"``)."""
    kind: str = request.param
    return kind


async def _started(kind: str, base_dir: Path, **options: Any) -> LocalXMPPServer:
    ensure_server_installed(kind)
    server = make_server(kind, base_dir, **options)
    for user in USERS:
        server.register(user, PASSWORD)
    await server.start()
    return server


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def xmpp_server(
    xmpp_server_kind: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LocalXMPPServer]:
    """One server of the test's kind for the whole test session."""
    server = await _started(xmpp_server_kind, tmp_path_factory.mktemp(xmpp_server_kind))
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def xmpp_server_factory(
    xmpp_server_kind: str, tmp_path: Path
) -> AsyncIterator[ServerFactory]:
    """Private servers of the test's kind on demand; all are stopped after the test."""
    made: list[LocalXMPPServer] = []

    async def factory(**options: Any) -> LocalXMPPServer:
        base_dir = tmp_path / f"{xmpp_server_kind}-{len(made)}"
        server = await _started(xmpp_server_kind, base_dir, **options)
        made.append(server)
        return server

    try:
        yield factory
    finally:
        for server in made:
            await server.stop()


@pytest_asyncio.fixture
async def flaky_link(xmpp_server: LocalXMPPServer) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of the server, for this test only."""
    async with FaultProxy(xmpp_server.host, xmpp_server.c2s_port) as proxy:
        yield proxy


@pytest_asyncio.fixture
async def xmpp_client(xmpp_server: LocalXMPPServer) -> AsyncIterator[ClientFactory]:
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
async def client_pool(xmpp_server: LocalXMPPServer) -> AsyncIterator[ClientPool]:
    """A :class:`ClientPool`: ``await client_pool(user, address, ...)`` gives a Party."""
    pool = ClientPool(domain=xmpp_server.domain)
    yield pool
    await pool.aclose()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL cluster for the session, removed at its end."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """The session cluster's DSN (a role with a password, on 127.0.0.1)."""
    return postgres_server.dsn

"""Live tests of the harness itself: the isolated servers and the fault-injecting proxy.

Pure proxy behaviour is checked with raw asyncio sockets against a tiny local server
(fast and exact); the XMPP-level tests prove the pieces work together with slixmpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import slixmpp

from xmpp_sm_tracker.testing import (
    EjabberdServer,
    FaultProxy,
    LocalXMPPServer,
    ProsodyError,
    ProsodyServer,
    ServerError,
    ensure_prosody_installed,
)
from xmpp_sm_tracker.testing import prosody as prosody_module
from xmpp_sm_tracker.testing.proxy import Direction
from xmpp_sm_tracker.testing.servers import make_server

from .helpers.procfs import listening_sockets

PASSWORD = "pass"
QUIET = 0.2  # how long "nothing arrives" is observed; positive checks poll instead

# ---------------------------------------------------------------------------------------
# raw-socket helpers


class Upstream:
    """A tiny TCP server whose accepted connections the test drives by hand."""

    def __init__(self) -> None:
        self.conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]]
        self.conns = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        await self.conns.put((reader, writer))

    async def next_conn(self, timeout: float = 5.0) -> tuple[asyncio.StreamReader, Any]:
        return await asyncio.wait_for(self.conns.get(), timeout)

    async def aclose(self) -> None:
        for w in self.writers:
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@dataclass
class Net:
    upstream: Upstream
    proxy: FaultProxy
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a client connection through the proxy."""
        reader, writer = await asyncio.open_connection(self.proxy.host, self.proxy.port)
        self.writers.append(writer)
        return reader, writer

    async def pair(
        self,
    ) -> tuple[
        asyncio.StreamReader, asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamWriter
    ]:
        """Client connection plus the matching server-side connection."""
        cr, cw = await self.dial()
        sr, sw = await self.upstream.next_conn()
        return cr, cw, sr, sw


@pytest_asyncio.fixture
async def net() -> AsyncIterator[Net]:
    upstream = Upstream()
    await upstream.start()
    proxy = FaultProxy("127.0.0.1", upstream.port)
    await proxy.start()
    n = Net(upstream, proxy)
    try:
        yield n
    finally:
        for w in n.writers:
            w.close()
        await proxy.aclose()
        await upstream.aclose()


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until EOF; a reset counts as EOF (it is how cut() looks)."""
    chunks: list[bytes] = []
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    return b"".join(chunks)


async def read_exactly(reader: asyncio.StreamReader, n: int, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout)


async def assert_silent(reader: asyncio.StreamReader, wait: float = QUIET) -> None:
    """Neither data nor EOF arrives within ``wait``."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), wait)


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


# ---------------------------------------------------------------------------------------
# pure proxy tests


async def test_proxy_forwards_both_ways_and_counts(net: Net) -> None:
    cr, cw, sr, sw = await net.pair()
    await send(cw, b"hello server")
    assert await read_exactly(sr, 12) == b"hello server"
    await send(sw, b"hi client")
    assert await read_exactly(cr, 9) == b"hi client"
    assert (net.proxy.bytes_up, net.proxy.bytes_down) == (12, 9)
    assert (net.proxy.connections, net.proxy.active) == (1, 1)
    assert net.proxy.host == "127.0.0.1" and net.proxy.port > 0


async def test_proxy_large_transfer_keeps_data_intact(net: Net) -> None:
    up, down = os.urandom(3 << 20), os.urandom(3 << 20)
    cr, cw, sr, sw = await net.pair()
    results = await asyncio.gather(
        send(cw, up),
        send(sw, down),
        read_exactly(sr, len(up), 20),
        read_exactly(cr, len(down), 20),
    )
    assert results[2] == up and results[3] == down
    assert (net.proxy.bytes_up, net.proxy.bytes_down) == (len(up), len(down))


async def test_proxy_half_close_propagates(net: Net) -> None:
    cr, cw, sr, sw = await net.pair()
    await send(cw, b"request")
    cw.write_eof()
    assert await read_to_eof(sr) == b"request"
    await send(sw, b"reply")
    sw.close()
    assert await read_to_eof(cr) == b"reply"
    await net.proxy.wait_active(0, timeout=5)


async def test_proxy_cut_resets_every_connection_but_accepts_new(net: Net) -> None:
    pairs = [await net.pair() for _ in range(2)]
    assert net.proxy.active == 2
    net.proxy.cut()
    for cr, _cw, sr, _sw in pairs:
        assert await read_to_eof(cr) == b""
        assert await read_to_eof(sr) == b""
    await net.proxy.wait_active(0, timeout=5)
    cr, cw, sr, _sw = await net.pair()
    await send(cw, b"again")
    assert await read_exactly(sr, 5) == b"again"
    assert net.proxy.connections == 3


async def test_proxy_refuse_rejects_until_switched_off(net: Net) -> None:
    net.proxy.refuse(True)
    cr, _cw = await net.dial()
    assert await read_to_eof(cr) == b""
    assert (net.proxy.connections, net.proxy.refused, net.upstream.accepted) == (1, 1, 0)
    net.proxy.refuse(False)
    _cr, cw, sr, _sw = await net.pair()
    await send(cw, b"up")
    assert await read_exactly(sr, 2) == b"up"


async def test_proxy_stall_holds_bytes_until_heal(net: Net) -> None:
    cr, cw, sr, sw = await net.pair()
    net.proxy.stall()
    assert net.proxy.mode == "stall"
    await send(cw, b"client->server")
    await send(sw, b"server->client")
    await assert_silent(sr)
    await assert_silent(cr)
    # A connection opened during the stall is stalled too.
    _cr2, cw2, sr2, _sw2 = await net.pair()
    await send(cw2, b"late")
    await assert_silent(sr2)
    net.proxy.heal()
    assert await read_exactly(sr, 14) == b"client->server"
    assert await read_exactly(cr, 14) == b"server->client"
    assert await read_exactly(sr2, 4) == b"late"
    assert net.proxy.active == 2


async def test_proxy_blackhole_discards_for_good(net: Net) -> None:
    cr, cw, sr, sw = await net.pair()
    net.proxy.blackhole()
    await send(cw, b"lost-up")
    await send(sw, b"lost-down")
    await net.proxy.wait_until(lambda: net.proxy.bytes_discarded == 16, 5, "discard")
    await assert_silent(sr)
    await assert_silent(cr)
    net.proxy.heal()
    await send(cw, b"after")
    await send(sw, b"AFTER")
    assert await read_exactly(sr, 5) == b"after"
    assert await read_exactly(cr, 5) == b"AFTER"
    assert (net.proxy.bytes_up, net.proxy.bytes_down) == (5, 5)


async def test_proxy_blackhole_hides_a_close_until_heal(net: Net) -> None:
    """Like a dead NAT: the server does not learn that the client went away."""
    _cr, cw, sr, _sw = await net.pair()
    net.proxy.blackhole()
    cw.close()
    await net.proxy.wait_active(0, timeout=5)
    await assert_silent(sr)
    net.proxy.heal()
    assert await read_to_eof(sr) == b""


@pytest.mark.parametrize("direction", ["upstream", "downstream"])
async def test_proxy_drop_after_cuts_mid_stream(net: Net, direction: Direction) -> None:
    net.proxy.drop_after(10, direction)
    payload = bytes(range(65, 65 + 25))
    for _ in range(2):  # the mode also applies to the next connection
        cr, cw, sr, sw = await net.pair()
        src, dst_reader, other_reader = (cw, sr, cr) if direction == "upstream" else (sw, cr, sr)
        await send(src, payload)
        assert await read_to_eof(dst_reader) == payload[:10]
        assert await read_to_eof(other_reader) == b""
    net.proxy.heal()
    cr, cw, sr, sw = await net.pair()
    await send(cw if direction == "upstream" else sw, payload)
    assert await read_exactly(sr if direction == "upstream" else cr, 25) == payload
    expected_up = 20 + 25 if direction == "upstream" else 0
    assert net.proxy.bytes_up == expected_up


async def test_proxy_drop_after_both_shares_one_budget(net: Net) -> None:
    cr, cw, sr, sw = await net.pair()
    net.proxy.drop_after(10, "both")
    await send(cw, b"123456")
    assert await read_exactly(sr, 6) == b"123456"
    await send(sw, b"abcdefgh")
    assert await read_to_eof(cr) == b"abcd"
    assert await read_to_eof(sr) == b""


async def test_proxy_unreachable_target_closes_client() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with FaultProxy("127.0.0.1", dead_port) as proxy:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        try:
            assert await read_to_eof(reader) == b""
            await proxy.wait_active(0, timeout=5)
        finally:
            writer.close()


async def test_proxy_aclose_closes_everything(net: Net) -> None:
    pairs = [await net.pair() for _ in range(2)]
    port = net.proxy.port
    await net.proxy.aclose()
    for cr, _cw, sr, _sw in pairs:
        assert await read_to_eof(cr) == b""
        assert await read_to_eof(sr) == b""
    assert net.proxy.active == 0
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    leftovers = [
        t for t in asyncio.all_tasks() if "connect_upstream" in repr(t.get_coro()) and not t.done()
    ]
    assert leftovers == []


# ---------------------------------------------------------------------------------------
# the servers (Prosody, ejabberd) + slixmpp


ClientFactory = Callable[[str], slixmpp.ClientXMPP]
_resource_ids = itertools.count(1)


@pytest_asyncio.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """slixmpp clients (plain c2s, SM on) that are disconnected after the test."""
    clients: list[slixmpp.ClientXMPP] = []

    def factory(user: str) -> slixmpp.ClientXMPP:
        # A unique resource per client so that no test kicks another's session.
        resource = f"harness-{next(_resource_ids)}"
        xmpp = slixmpp.ClientXMPP(f"{user}@localhost/{resource}", PASSWORD)
        xmpp.register_plugin("xep_0198")
        xmpp.enable_starttls = False
        xmpp.enable_direct_tls = False
        xmpp.enable_plaintext = True
        xmpp.plugin["feature_mechanisms"].unencrypted_plain = True
        clients.append(xmpp)
        return xmpp

    yield factory
    for xmpp in clients:
        if xmpp.transport is not None:
            xmpp.plugin["xep_0198"].allow_resume = False
            await asyncio.wait_for(xmpp.disconnect(wait=1), 5)


def event_future(xmpp: slixmpp.ClientXMPP, name: str) -> asyncio.Future[Any]:
    """A future set the first time ``name`` fires (register before triggering it)."""
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def handler(data: Any) -> None:
        if not fut.done():
            fut.set_result(data)

    xmpp.add_event_handler(name, handler)
    return fut


async def online(xmpp: slixmpp.ClientXMPP, address: tuple[str, int]) -> None:
    """Connect and wait for a bound session with stream management enabled."""
    started = event_future(xmpp, "session_start")
    sm = event_future(xmpp, "sm_enabled")
    xmpp.connect(*address)
    await asyncio.wait_for(asyncio.gather(started, sm), 10)


async def wait_for(awaitable: Awaitable[Any], timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


async def test_the_server_is_isolated_on_loopback(server: LocalXMPPServer) -> None:
    assert server.running and server.pid is not None
    assert server.host == "127.0.0.1"
    assert (server.domain, server.muc_domain) == ("localhost", "conference.localhost")
    # Only loopback: no s2s, http, component, epmd or IPv6 listener. Prosody listens
    # on c2s only; ejabberd also on its Erlang distribution port (ejabberdctl's way in).
    assert listening_sockets(server.pid) == {("127.0.0.1", port) for port in server.listen_ports}
    for path in (server.log_path, server.config_path, server.stderr_path):
        assert path.is_relative_to(server.base_dir)
    if isinstance(server, ProsodyServer):
        assert server.listen_ports == {server.c2s_port}
        assert server.pidfile_path.read_text().strip() == str(server.pid)
        assert "Activated service 'c2s'" in server.log_path.read_text()
        assert (server.data_path / "localhost" / "accounts" / "carol.dat").exists()
    else:
        assert isinstance(server, EjabberdServer)
        assert server.listen_ports == {server.c2s_port, server.dist_port}
        assert f"is started in the node '{server.node}'" in server.log_path.read_text()
        assert server.ctl("registered_users", "localhost").split() == ["alice", "bob", "carol"]


async def test_login_through_proxy_with_stream_management(
    server: LocalXMPPServer, proxy: FaultProxy, make_client: ClientFactory
) -> None:
    alice = make_client("alice")
    await online(alice, proxy.address)
    assert alice.boundjid.bare == "alice@localhost"
    assert alice.plugin["xep_0198"].sm_id
    assert proxy.active == 1 and proxy.bytes_up > 0 and proxy.bytes_down > 0


async def test_cut_disconnects_client_and_session_resumes(
    server: LocalXMPPServer, proxy: FaultProxy, make_client: ClientFactory
) -> None:
    alice = make_client("alice")
    await online(alice, proxy.address)
    disconnected = event_future(alice, "disconnected")
    proxy.cut()
    await wait_for(disconnected, 5)
    resumed = event_future(alice, "session_resumed")
    alice.connect(*proxy.address)
    await wait_for(resumed)  # the shared server hibernates sessions for 60 s
    assert proxy.connections == 2


async def test_stall_delays_a_message_until_heal(
    server: LocalXMPPServer, proxy: FaultProxy, make_client: ClientFactory
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    await asyncio.gather(online(alice, proxy.address), online(bob, server.address))
    got = event_future(bob, "message")
    proxy.stall()
    alice.send_message(mto=bob.boundjid.full, mbody="held back", mtype="chat")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(got), QUIET * 2)
    proxy.heal()
    msg = await wait_for(got, 5)
    assert msg["body"] == "held back"


async def test_refuse_keeps_client_out_until_healed(
    server: LocalXMPPServer, proxy: FaultProxy, make_client: ClientFactory
) -> None:
    alice = make_client("alice")
    proxy.refuse(True)
    disconnected = event_future(alice, "disconnected")
    started = event_future(alice, "session_start")
    alice.connect(*proxy.address)
    await wait_for(disconnected, 5)
    assert not started.done() and proxy.refused >= 1
    alice.cancel_connection_attempt()
    proxy.heal()
    await online(alice, proxy.address)


async def test_restart_keeps_accounts_but_not_sessions(
    fresh_server: LocalXMPPServer, make_client: ClientFactory
) -> None:
    server = fresh_server
    server.register("dave", PASSWORD)  # works while running
    port = server.c2s_port
    dave = make_client("dave")
    await online(dave, server.address)
    old_sm_id = dave.plugin["xep_0198"].sm_id
    disconnected = event_future(dave, "disconnected")
    await server.restart()
    await wait_for(disconnected, 5)
    assert server.running and server.c2s_port == port
    resumed = event_future(dave, "session_resumed")
    await online(dave, server.address)  # the account survived ...
    assert not resumed.done()  # ... the SM session did not
    assert dave.plugin["xep_0198"].sm_id not in (None, old_sm_id)


async def test_kill_is_abrupt_and_start_recovers(
    fresh_server: LocalXMPPServer, make_client: ClientFactory
) -> None:
    server = fresh_server
    carol = make_client("carol")
    await online(carol, server.address)
    disconnected = event_future(carol, "disconnected")
    await server.kill()
    assert not server.running
    await wait_for(disconnected, 5)
    await server.start()
    carol2 = make_client("carol")
    await online(carol2, server.address)


async def test_start_failure_raises_with_log_tail(xmpp_server_kind: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = make_server(xmpp_server_kind, tmp_path, c2s_port=port, start_timeout=10)
        with pytest.raises(ServerError) as info:
            await server.start()
    message = str(info.value)
    assert isinstance(info.value, server.error)
    assert "could not bind c2s port" in message
    # The log tail is included: each server says it in its own words.
    assert ("Failed to open server port" if server.kind == "prosody" else "eaddrinuse") in message
    assert not server.running


async def test_auto_port_taken_before_start_is_replaced(
    xmpp_server_kind: str, tmp_path: Path
) -> None:
    server = make_server(xmpp_server_kind, tmp_path)
    picked = server.c2s_port
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", picked))
        thief.listen()
        try:
            await server.start()
            assert server.c2s_port != picked
            expected = {("127.0.0.1", port) for port in server.listen_ports}
            assert listening_sockets(server.pid or 0) == expected
        finally:
            await server.stop()
    assert not server.running


@pytest.mark.xmpp_server("prosody", reason="the Prosody launcher's own install check")
def test_prosody_version_and_install_check(monkeypatch: pytest.MonkeyPatch) -> None:
    version = prosody_module.installed_prosody_version()
    assert version is not None and version.startswith("0.12.")
    assert ensure_prosody_installed().exists()
    # Without the binary and without apt-get the failure must say what to do.
    monkeypatch.setattr(prosody_module, "_DEFAULT_PROSODY", "/nonexistent/prosody")
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(ProsodyError, match="apt-get is unavailable"):
        ensure_prosody_installed()


@pytest.mark.xmpp_server("prosody", reason="prosodyctl's own error message")
def test_prosody_register_error_is_reported(tmp_path: Path) -> None:
    server = ProsodyServer(tmp_path)
    with pytest.raises(ProsodyError, match="hostname does not exist"):
        server.register("eve", PASSWORD, domain="nowhere.example")


async def test_register_many_makes_accounts_that_log_in(tmp_path: Path) -> None:
    """A fleet's accounts, written straight into Prosody's store, are real accounts."""
    from xmpp_sm_tracker.testing import ProsodyServer
    from xmpp_sm_tracker.testing.client import connect_client, make_client

    server = ProsodyServer(tmp_path / "fleet", log_level="warn")
    server.register_many(["fleet0", "fleet1"], "fleet-pass")
    with pytest.raises(ValueError, match="plain user names"):
        server.register_many(["bad_name"], "x")
    async with server:
        for name in ("fleet0", "fleet1"):
            xmpp = make_client(f"{name}@localhost/t", "fleet-pass", tracked=False)
            await connect_client(xmpp, server.address)
            xmpp.disconnect()
        wrong = make_client("fleet0@localhost/t", "wrong", tracked=False)
        failed = asyncio.get_running_loop().create_future()
        wrong.add_event_handler("failed_all_auth", lambda _e: failed.set_result(True))
        wrong.connect(*server.address)
        assert await asyncio.wait_for(failed, 10)
        wrong.abort()

"""Every example runs against a local server, as its docstring tells a user to run it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from devtools.serve import ACCOUNTS, PASSWORD
from xmpp_sm_tracker.testing import LocalXMPPServer
from xmpp_sm_tracker.testing.client import Received, connect_client, make_client, wait_for
from xmpp_sm_tracker.testing.servers import ensure_server_installed, make_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(
    xmpp_server_kind: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LocalXMPPServer]:
    """A server with the demo's accounts and password (``scripts/demo --serve``)."""
    ensure_server_installed(xmpp_server_kind)
    demo = make_server(xmpp_server_kind, tmp_path_factory.mktemp(f"examples-{xmpp_server_kind}"))
    for user in ACCOUNTS:
        demo.register(user, PASSWORD)
    async with demo:
        yield demo


async def run_example(*args: str, stdin: bytes = b"", timeout: float = 40) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), timeout)
    text = out.decode()
    assert proc.returncode == 0, text
    return text


async def test_minimal_example_sees_its_message_acked(server: LocalXMPPServer) -> None:
    out = await run_example(str(EXAMPLES / "minimal.py"), str(server.c2s_port))
    assert "→ sent 'hello bob'" in out
    assert "✓ server has it" in out


async def test_console_chat_shows_ticks_and_receipts(server: LocalXMPPServer) -> None:
    bob = make_client("bob@localhost/phone", PASSWORD, tracked=False)
    bob.register_plugin("xep_0184")
    received = Received()
    received.attach(bob)
    await connect_client(bob, server.address)
    try:
        out = await run_example(
            str(EXAMPLES / "console_chat.py"),
            "alice",
            "bob",
            "--port",
            str(server.c2s_port),
            stdin=b"hi there\n/failed\n/quit\n",
        )
    finally:
        await bob.disconnect()
    assert "connected as alice" in out
    assert "✓✓  hi there" in out  # bob's client answered the receipt request
    assert received.bodies == ["hi there"]


async def test_restart_bot_echoes_and_keeps_its_state_across_runs(
    server: LocalXMPPServer, tmp_path: Path
) -> None:
    db = tmp_path / "bot.sqlite"
    bob = make_client("bob@localhost/desk", PASSWORD, tracked=False)
    received = Received()
    received.attach(bob)
    await connect_client(bob, server.address)
    args = (str(EXAMPLES / "restart_bot.py"), "--db", str(db), "--port", str(server.c2s_port))
    try:
        first = asyncio.ensure_future(run_example(*args, "--run-for", "4"))
        await asyncio.sleep(2.0)
        bob.send_message(mto="carol@localhost", mbody="ping", mtype="chat")
        await wait_for(lambda: "echo: ping" in received.bodies, timeout=10)
        out = await first
        assert "✓ echo: ping" in out
        second = await run_example(*args, "--run-for", "2")
        assert "online; 0 failed replies sent again" in second
    finally:
        await bob.disconnect()
    assert db.exists()

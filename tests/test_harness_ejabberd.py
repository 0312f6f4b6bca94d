"""The ejabberd launcher on its own: isolation, accounts, a tracked client, a restart.

The tests every server shares are in test_harness.py; these check what only the
ejabberd launcher does (ejabberdctl, the Erlang node, tables in RAM).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xmpp_sm_tracker.testing import (
    EjabberdError,
    EjabberdServer,
    ensure_ejabberd_installed,
)
from xmpp_sm_tracker.testing import ejabberd as ejabberd_module
from xmpp_sm_tracker.testing.client import EventLog, connect_client, make_client, wait_for

from .helpers.procfs import listening_sockets

PASSWORD = "pass"

pytestmark = pytest.mark.xmpp_server("ejabberd", reason="the ejabberd launcher's own checks")


async def test_ejabberd_starts_isolated_tracks_a_message_and_restarts(tmp_path: Path) -> None:
    ensure_ejabberd_installed()
    server = EjabberdServer(tmp_path / "ejabberd", hibernation_time=5)
    server.register("alice", PASSWORD)  # before start: made by the start
    async with server:
        assert server.running and server.pid is not None
        # Only c2s and the Erlang distribution port, both on loopback; no epmd.
        assert listening_sockets(server.pid) == {
            ("127.0.0.1", server.c2s_port),
            ("127.0.0.1", server.dist_port),
        }
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert b"-start_epmd" in cmdline and server.node.encode() in cmdline
        for path in (server.config_path, server.spool_path, server.log_path):
            assert path.is_relative_to(server.base_dir)
        server.register("bob", PASSWORD)  # while running
        assert server.ctl("registered_users", "localhost").split() == ["alice", "bob"]

        alice = make_client("alice@localhost/smoke", PASSWORD, tracker_config={"ack_delay": 0.05})
        log = EventLog()
        log.attach(alice, ["message:acked", "message:failed"])
        try:
            await connect_client(alice, server.address)
            first_stream = alice.plugin["sm_tracker"].core.session.sm_id
            alice.send_message(mto="bob@localhost", mbody="hello ejabberd")
            await wait_for(lambda: log.count("message:acked") == 1)

            await server.restart()  # accounts kept, SM sessions gone
            await wait_for(lambda: alice.plugin["sm_tracker"].managed, timeout=20)
            assert alice.plugin["sm_tracker"].core.session.sm_id not in (None, first_stream)
            alice.send_message(mto="bob@localhost", mbody="after the restart")
            await wait_for(lambda: log.count("message:acked") == 2)
            assert log.count("message:failed") == 0
        finally:
            alice.plugin["sm_tracker"].auto_reconnect = False
            await alice.disconnect(wait=0.5)
        # The archive and offline messages live in RAM: no table files for them.
        spooled = {p.name for p in server.spool_path.iterdir()}
        assert "passwd.DAT" in spooled
        assert not {"archive_msg.DAT", "offline_msg.DAT"} & spooled
        server.register("alice", "new password")  # an existing account: its password
    assert not server.running


def test_ejabberd_version_and_install_check(monkeypatch: pytest.MonkeyPatch) -> None:
    version = ejabberd_module.installed_ejabberd_version()
    assert version is not None and version.startswith("23.01")
    assert ensure_ejabberd_installed().exists()
    monkeypatch.setattr(ejabberd_module, "_DEFAULT_EJABBERDCTL", "/nonexistent/ejabberdctl")
    monkeypatch.setattr(ejabberd_module.shutil, "which", lambda _name: None)
    with pytest.raises(EjabberdError, match="apt-get is unavailable"):
        ensure_ejabberd_installed()


async def test_ejabberd_register_error_is_reported(tmp_path: Path) -> None:
    async with EjabberdServer(tmp_path / "ejabberd") as server:
        with pytest.raises(EjabberdError, match="ejabberdctl register"):
            server.register("eve", PASSWORD, domain="nowhere.example")

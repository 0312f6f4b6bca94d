"""Issue #4: tracking survives the process. Real processes, SIGKILL, a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.child_sender import DSN_VARIABLE, open_store, take_over
from tests.helpers.pgdb import fresh_database
from xmpp_sm_tracker import DeliveryState, SMStateError, SQLiteStore, StoreError
from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import (
    EventLog,
    Received,
    connect_client,
    make_client,
    tracker_of,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
COUNT = 50


class Child:
    """The first process: sends COUNT durable messages into a blackhole, then dies."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def expect(self, word: str, timeout: float = 20.0) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not line:
                raise AssertionError(f"child exited before printing {word}")
            if line.decode().strip() == word:
                return

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()


@pytest.fixture(params=["sqlite", "postgres"])
async def where(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """alice's store for both processes: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "alice.sqlite")
        return
    async with fresh_database(request.getfixturevalue("postgres_dsn")) as dsn:
        yield dsn


async def start_child(db: Path | str, proxy: FaultProxy, count: int = COUNT) -> Child:
    db = str(db)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if db.startswith("postgresql://"):
        env[DSN_VARIABLE], db = db, "-"  # a password stays off the command line
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.helpers.child_sender",
        db,
        proxy.host,
        str(proxy.port),
        str(count),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    return Child(proc)


async def crash_child_with_messages_in_a_blackhole(db: Path | str, proxy: FaultProxy) -> None:
    child = await start_child(db, proxy)
    try:
        await child.expect("READY")
        proxy.blackhole()
        child.go()
        await child.expect("FLUSHED")
    finally:
        await child.kill()
    proxy.cut()
    proxy.heal()


async def start_bob(server: LocalXMPPServer) -> tuple[Any, Received]:
    bob = make_client("bob@localhost/desk", "pass", tracked=False)
    received = Received()
    received.attach(bob)
    await connect_client(bob, server.address)
    return bob, received


async def restarted_alice(db: Path | str, address: tuple[str, int]) -> tuple[Any, Any, EventLog]:
    """The second process's client: same store, saved state loaded, then connect."""
    alice = make_client("alice@localhost/other", "pass", tracker_config={"ack_delay": 0.05})
    log = EventLog()
    log.attach(alice, ["message:acked", "message:failed", "message:resent"])
    tracker = tracker_of(alice)
    store = open_store(str(db))
    await take_over(store)
    await tracker.attach(store)
    tracker.sm.load(await store.load_sm_state())
    tracker.sm.cache(store.save_sm_state)
    alice.connect(*address)
    return alice, store, log


async def test_killed_process_is_resumed_by_the_next_one_nothing_lost_nothing_twice(
    server: LocalXMPPServer, where: str
) -> None:
    db = where
    durable = {f"durable {i}" for i in range(COUNT)}
    bob, received = await start_bob(server)
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        await crash_child_with_messages_in_a_blackhole(db, proxy)
        peek = open_store(db, read_only=True)
        try:
            in_flight = await peek.pending()
            state = await peek.load_sm_state()
        finally:
            await peek.aclose()
        assert len(in_flight) == COUNT
        assert state is not None and len(state["unacked"]) >= COUNT
        if not db.startswith("postgresql://"):
            # SQLiteStore kept those stanzas by reference to their rows: what the next
            # process resumes with was read back from the records (sqlite_smstate.py).
            with contextlib.closing(sqlite3.connect(db)) as raw:
                kept = raw.execute("SELECT state FROM sm_state").fetchone()[0]
            assert kept.startswith("[") and "durable 1" not in kept

        alice, store, log = await restarted_alice(db, proxy.address)
        try:
            await wait_for(lambda: log.count("message:acked") == COUNT, timeout=20)
            try:
                await wait_for(lambda: received.counts.keys() >= durable, timeout=20)
            except TimeoutError:
                missing = sorted(durable - set(received.bodies))
                raise AssertionError(f"acked but bob did not get {missing}") from None
            assert log.count("message:failed") == 0
            # Only this test's bodies: bob's bare JID is shared by the session's tests,
            # and a server re-routes what an earlier bob left unacked when it expires.
            ours = [body for body in received.bodies if body in durable]
            assert ours == [f"durable {i}" for i in range(COUNT)]
            assert all(received.counts[body] == 1 for body in ours)
            assert alice.boundjid.resource == "child"  # the resumed stream keeps its JID
            await tracker_of(alice).flush()
            assert await store.pending() == []
        finally:
            alice.disconnect(wait=0.5)
            bob.disconnect(wait=0.5)
            await asyncio.sleep(0.2)
            await store.aclose()


async def test_killed_process_after_server_restart_fails_them_and_resend_works(
    fresh_server: LocalXMPPServer, where: str
) -> None:
    server = fresh_server
    db = where
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        await crash_child_with_messages_in_a_blackhole(db, proxy)
        await server.restart()
        bob, received = await start_bob(server)
        alice, store, log = await restarted_alice(db, proxy.address)
        try:
            await wait_for(lambda: log.count("message:failed") == COUNT, timeout=20)
            await tracker_of(alice).flush()
            failed = await store.failed()
            assert len(failed) == COUNT
            assert {r.reason for r in failed} == {"resume-failed"}
            assert [r.body for r in failed] == [f"durable {i}" for i in range(COUNT)]
            await wait_for(lambda: tracker_of(alice).managed, timeout=10)

            record = await tracker_of(alice).resend(failed[0].id)
            assert record.state is DeliveryState.RESENT
            await wait_for(lambda: log.count("message:acked") == 1)
            await wait_for(lambda: "durable 0" in received.counts)
            await tracker_of(alice).flush()
            stored = await store.get(failed[0].id)
            assert stored is not None and stored.state is DeliveryState.ACKED
            assert stored.attempts == 2
            assert len(await store.failed()) == COUNT - 1
        finally:
            alice.disconnect(wait=0.5)
            bob.disconnect(wait=0.5)
            await asyncio.sleep(0.2)
            await store.aclose()


async def test_state_of_another_account_is_refused_and_records_kept(
    server: LocalXMPPServer, tmp_path: Path
) -> None:
    db = tmp_path / "alice.sqlite"
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        await crash_child_with_messages_in_a_blackhole(db, proxy)
    async with SQLiteStore(db) as store:
        state = await store.load_sm_state()
        assert state is not None
        carol = make_client("carol@localhost/x", "pass")
        with pytest.raises(SMStateError, match="alice@localhost, not to carol@localhost"):
            tracker_of(carol).sm.load(state)
        assert tracker_of(carol).core.session.sm_id is None  # fresh session
        truncated = json.loads(json.dumps(state))
        truncated["unacked"][3] = {"seq": truncated["unacked"][3]["seq"]}
        alice = make_client("alice@localhost/y", "pass")
        with pytest.raises(SMStateError, match=r"unacked\[3\]\.xml"):
            tracker_of(alice).sm.load(truncated)
        with pytest.raises(SMStateError, match="version"):
            tracker_of(alice).sm.load({**state, "version": 99})
        assert tracker_of(alice).core.session.sm_id is None
        # the records of the dead process are all still there
        assert len(await store.pending()) == COUNT


async def test_corrupt_database_is_a_clear_error_and_is_not_overwritten(tmp_path: Path) -> None:
    db = tmp_path / "broken.sqlite"
    garbage = b"this is not a database at all" * 100
    db.write_bytes(garbage)
    store = SQLiteStore(db)
    with pytest.raises(StoreError, match=r"broken\.sqlite"):
        await store.pending()
    await store.aclose()
    assert db.read_bytes() == garbage

"""Issue 18: failover. The owner of alice's account dies with 200 messages in flight; a
standby process, on the same PostgreSQL, takes the account over when the owner's lease
lapses, resumes the dead process's stream and settles every message: bob gets each body
exactly once. Real processes, SIGKILL, a real server, a real database, a real proxy."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.helpers.child_sender import DSN_VARIABLE, LEASE_TTL
from tests.helpers.pgdb import fresh_database
from tests.test_live_restart import Child, start_bob, start_child
from xmpp_sm_tracker import AccountLeased, DeliveryState, LinkPhase
from xmpp_sm_tracker.stores.postgres import PostgresStore
from xmpp_sm_tracker.stores.postgres_schema import LEASES
from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import (
    EventLog,
    connect_client,
    make_client,
    tracker_of,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
COUNT = 200
DURABLE = {f"durable {i}" for i in range(COUNT)}


@pytest.fixture
async def dsn(postgres_dsn: str) -> AsyncIterator[str]:
    async with fresh_database(postgres_dsn) as fresh:
        yield fresh


async def start_standby(dsn: str, address: tuple[str, int]) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.helpers.standby",
        address[0],
        str(address[1]),
        str(COUNT),
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), DSN_VARIABLE: dsn},
    )
    return Child(proc)


async def test_a_standby_takes_over_a_killed_owner_and_settles_all_it_left(
    server: LocalXMPPServer, dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bob, received = await start_bob(server)
    standby: Child | None = None
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        owner = await start_child(dsn, proxy, COUNT)
        try:
            await owner.expect("READY")
            standby = await start_standby(dsn, server.address)
            await standby.expect("WAITING")
            with pytest.raises(TimeoutError):  # the owner lives: the standby waits
                await standby.expect("OWNED", timeout=LEASE_TTL * 1.5)
            proxy.blackhole()
            owner.go()
            await owner.expect("FLUSHED", timeout=60)
        finally:
            await owner.kill()
        killed = time.monotonic()
        proxy.cut()  # the server sees the link go: it keeps the session for resumption
        try:
            await standby.expect("OWNED", timeout=LEASE_TTL * 5)
            owned = time.monotonic() - killed
            await standby.expect("SETTLED", timeout=60)
            settled = time.monotonic() - killed
            assert standby.proc.stdout is not None
            outcome = json.loads(await asyncio.wait_for(standby.proc.stdout.readline(), 10))
            await wait_for(lambda: received.counts.keys() >= DURABLE, timeout=20)
            await asyncio.sleep(0.5)  # a duplicate would come now
        finally:
            if standby.proc.returncode is None:
                standby.proc.kill()
            await standby.proc.wait()
            bob.disconnect(wait=0.5)
    assert outcome["states"] == {"acked": COUNT}, outcome
    assert outcome["jid"] == "alice@localhost/child"  # the dead owner's stream, resumed
    # Only this test's bodies: bob's bare JID is shared by the session's tests, and a
    # server re-routes what an earlier bob left unacked to him when its session expires.
    ours = [body for body in received.bodies if body.startswith("durable ")]
    assert sorted(ours) == sorted(f"durable {i}" for i in range(COUNT))
    assert all(received.counts[body] == 1 for body in ours)
    assert ours == [f"durable {i}" for i in range(COUNT)]  # in order
    with capsys.disabled():
        print(
            f"\nfailover on {server.kind}: lease taken {owned:.2f} s after the SIGKILL "
            f"(lease_ttl {LEASE_TTL} s), all {COUNT} settled {settled:.2f} s after it "
            f"({outcome['resent']} resent after the resumption)"
        )


async def test_an_owner_that_lost_its_lease_lets_go_of_the_stream_for_the_new_owner(
    server: LocalXMPPServer, dsn: str
) -> None:
    """The owner is alive but its lease went to another process (a pause longer than the
    lease, a partition from the database): it stops touching the stream at once, without
    ending the server's session and without reconnecting, so the new owner resumes it
    and the two never fight over it."""
    alice = make_client("alice@localhost/first", "pass", tracker_config={"ack_delay": 0.05})
    tracker = tracker_of(alice)
    store = PostgresStore(dsn, account="alice@localhost", lease_ttl=LEASE_TTL)
    await tracker.attach(store)
    tracker.sm.load(await store.load_sm_state())
    tracker.sm.cache(store.save_sm_state)
    await connect_client(alice, server.address)
    await wait_for(lambda: tracker.managed and tracker.sm.calls > 0)
    await tracker.send_message("bob@localhost", "before")
    await tracker.flush()
    with pytest.raises(AccountLeased):
        await PostgresStore(dsn, account="alice@localhost").open()

    conn = await asyncpg.connect(dsn)
    try:  # what a standby does once the lease lapsed
        await conn.execute(f"UPDATE {LEASES} SET owner = 'standby', token = token + 1")
    finally:
        await conn.close()
    await wait_for(lambda: tracker.lease_lost is not None, timeout=LEASE_TTL * 2)
    await wait_for(lambda: tracker.link_phase is LinkPhase.CLOSED, timeout=5)
    await asyncio.sleep(1.0)
    assert alice.transport is None and not alice.is_connecting()  # no reconnect
    assert tracker.link_phase is LinkPhase.CLOSED

    # The session was left for the new owner: it resumes it.
    successor = PostgresStore(dsn, account="alice@localhost", lease_ttl=LEASE_TTL)
    await successor.take_over(timeout=10)
    state = await successor.load_sm_state()
    assert state is not None
    heir = make_client("alice@localhost/heir", "pass")
    heir_tracker = tracker_of(heir)
    await heir_tracker.attach(successor)
    heir_tracker.sm.load(state)
    heir.connect(*server.address)
    try:
        await wait_for(lambda: heir_tracker.managed, timeout=10)
        assert heir.boundjid.resource == "first"  # resumed, not a fresh session
    finally:
        heir.disconnect(wait=0.5)
        await asyncio.sleep(0.2)
        await successor.aclose()
        await store.aclose()


async def test_a_tracker_that_let_go_neither_fails_nor_resumes_what_it_held(
    server: LocalXMPPServer, dsn: str
) -> None:
    """After its lease went elsewhere, the app's own disconnect() or connect() must not
    fail the messages the new owner will settle, nor take the stream back."""
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        alice = make_client("alice@localhost/gone", "pass", tracker_config={"ack_delay": 0.05})
        tracker = tracker_of(alice)
        log = EventLog()
        log.attach(alice, ["message:acked", "message:failed", "message:resent"])
        store = PostgresStore(dsn, account="alice@localhost", lease_ttl=LEASE_TTL)
        await tracker.attach(store)
        tracker.sm.cache(store.save_sm_state)
        await connect_client(alice, proxy.address)
        await wait_for(lambda: tracker.managed)
        proxy.blackhole()
        for i in range(3):
            await tracker.send_message("bob@localhost", f"held {i}")
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"UPDATE {LEASES} SET owner = 'standby', token = token + 1")
        finally:
            await conn.close()
        await wait_for(lambda: tracker.lease_lost is not None, timeout=LEASE_TTL * 2)
        await wait_for(lambda: alice.transport is None, timeout=5)
        proxy.heal()
        alice.disconnect()  # the app's own close, link already down
        await asyncio.sleep(0.3)
        assert log.count("message:failed") == 0
        states = {r.state for r in tracker.core.records.values()}
        assert states == {DeliveryState.HIBERNATED} or states == {DeliveryState.SENT}, states

        alice.connect(*proxy.address)  # the app tries again: no stream management
        try:
            await wait_for(lambda: tracker.session_live, timeout=10)
            await asyncio.sleep(0.5)
            assert not tracker.managed
            assert log.count("message:resent") == log.count("message:failed") == 0
        finally:
            alice.disconnect(wait=0.5)
            await asyncio.sleep(0.2)
            await store.aclose()


async def test_an_owner_acks_no_more_than_its_saved_state_so_the_heir_still_resumes(
    server: LocalXMPPServer, dsn: str
) -> None:
    """A stanza comes in and the server asks for an ack just before the lease goes: the
    <a h> must not count it before sm.cache has saved it, or the heir resumes with an h
    below what the server saw and Prosody refuses ("acknowledged less stanzas")."""
    bob = make_client("bob@localhost/poker", "pass", tracked=False)
    await connect_client(bob, server.address)
    alice = make_client("alice@localhost/first", "pass", tracker_config={"ack_delay": 0.05})
    tracker = tracker_of(alice)
    store = PostgresStore(dsn, account="alice@localhost", lease_ttl=LEASE_TTL)
    successor = PostgresStore(dsn, account="alice@localhost", lease_ttl=LEASE_TTL)
    await tracker.attach(store)
    tracker.sm.cache(store.save_sm_state)
    await connect_client(alice, server.address)
    await wait_for(lambda: tracker.managed and tracker.sm.calls > 0)
    await tracker.flush()
    conn = await asyncpg.connect(dsn)
    heir = make_client("alice@localhost/heir", "pass")
    try:
        handled = tracker.core.session.handled
        await asyncio.sleep(0.3)  # the next save waits cache_interval after this one
        bob.send_message(mto="alice@localhost/first", mbody="stray")
        await wait_for(lambda: tracker.core.session.handled > handled, interval=0.001)
        await conn.execute(f"UPDATE {LEASES} SET owner = 'standby', token = token + 1")
        await wait_for(lambda: tracker.link_phase is LinkPhase.CLOSED, timeout=LEASE_TTL * 2)
        await successor.take_over(timeout=10)
        heir_tracker = tracker_of(heir)
        await heir_tracker.attach(successor)
        heir_tracker.sm.load(await successor.load_sm_state())
        heir.connect(*server.address)
        await wait_for(lambda: heir_tracker.managed, timeout=10)
        assert heir.boundjid.resource == "first"  # resumed, not a fresh session
    finally:
        await conn.close()
        heir.disconnect(wait=0.5)
        bob.disconnect(wait=0.5)
        await asyncio.sleep(0.2)
        await successor.aclose()
        await store.aclose()

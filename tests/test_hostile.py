"""Hostile input: bad saved states and databases, a lying server, raising user code,
a failing store, and the security promises (private files, bound SQL, quiet logs).

Every test drives the real plugin against a real Prosody. A hostile server is a
:class:`FaultProxy` that injects bytes (``proxy.inject``) or rewrites what Prosody
says (``proxy.rewrite``). Each case must end with a clear error or a logged warning,
a stream that goes on (or fails cleanly and starts afresh), and no record lost.
The tests named "Regression" guard bugs this suite found (since fixed).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
import pytest_asyncio
import slixmpp

from xmpp_sm_tracker import (
    AckPolicy,
    DeliveryState,
    MemoryStore,
    SMState,
    SMStateError,
    SQLiteStore,
    StoreError,
    TrackedMessage,
)
from xmpp_sm_tracker.core.phases import SMPhase
from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import connect_client, make_client, tracker_of, wait_for
from xmpp_sm_tracker.writer import StoreWriter

ROOT = Path(__file__).resolve().parent.parent
SM_NS = "urn:xmpp:sm:3"
MESSAGE_EVENTS = [
    "message:sent",
    "message:acked",
    "message:hibernated",
    "message:resent",
    "message:failed",
    "message:room_received",
    "message:delivered",
    "message:displayed",
]
STANZA_EVENTS = ["stanza:acked", "stanza:hibernated", "stanza:resent", "stanza:failed"]
FAST = {"reconnect_delay": 0.1, "reconnect_max_delay": 1.0, "ack_delay": 0.05}
#: Never ask for acks: messages stay unacked until a test injects or allows one.
SILENT = {**FAST, "ack_every": 10**6, "ack_delay": 3600.0, "ack_at_burst_end": False}


# ---------------------------------------------------------------------- helpers


class Party:
    """A connected client: every tracker event in order, the last record per id, and
    the bodies it received live (with how often each came)."""

    def __init__(self, xmpp: slixmpp.ClientXMPP) -> None:
        self.xmpp = xmpp
        self.events: list[tuple[str, str]] = []
        self.last: dict[str, TrackedMessage] = {}
        self.bodies: list[str] = []
        if "sm_tracker" in xmpp.plugin:
            for name in MESSAGE_EVENTS:
                xmpp.add_event_handler(name, lambda r, n=name: self._record(n, r))
        xmpp.add_event_handler("message", self._on_message)
        # a fresh session after a failed resumption must be reachable again
        xmpp.add_event_handler("session_start", lambda _: xmpp.send_presence())

    def _record(self, name: str, record: TrackedMessage) -> None:
        self.events.append((name, record.id))
        self.last[record.id] = record

    def _on_message(self, msg: Any) -> None:
        delay = msg.xml.find("{urn:xmpp:delay}delay")
        if delay is not None and "@" not in delay.get("from", "@"):
            return  # stored offline by the server for an earlier test
        if msg["body"] and msg["type"] in ("chat", "normal", "groupchat"):
            self.bodies.append(str(msg["body"]))

    @property
    def tracker(self) -> Any:
        return tracker_of(self.xmpp)

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.events if n == name)

    def ids(self, name: str) -> list[str]:
        return [i for n, i in self.events if n == name]

    def send(self, to: str, body: str, mtype: str = "chat", mid: str | None = None) -> str:
        message = self.xmpp.make_message(mto=to, mbody=body, mtype=mtype)
        if mid is not None:
            message["id"] = mid
        message.send()
        return str(message["id"])

    def on_wire(self, ids: Sequence[str]) -> bool:
        records = self.tracker.core.records
        return all(i in records and records[i].seq is not None for i in ids)

    def ask_for_acks(self) -> None:
        """From now on ask for acks like FAST does (SILENT never asks)."""
        self.tracker.ack_clock.policy = AckPolicy(delay=0.05)

    async def join(self, room: str, nick: str) -> None:
        await self.xmpp.plugin["xep_0045"].join_muc_wait(slixmpp.JID(room), nick, maxchars=0)


Factory = Callable[..., Awaitable[Party]]


@pytest_asyncio.fixture
async def clients() -> AsyncIterator[Factory]:
    """Make clients (connected unless ``connect=False``); all are closed at the end."""
    made: list[slixmpp.ClientXMPP] = []

    async def factory(
        user: str,
        address: tuple[str, int] | None,
        *,
        tracked: bool = True,
        password: str = "pass",
        plugins: tuple[str, ...] = (),
        **config: Any,
    ) -> Party:
        jid = f"{user}@localhost/{uuid.uuid4().hex[:8]}"
        xmpp = make_client(jid, password, tracked=tracked, tracker_config={**FAST, **config})
        for plugin in plugins:
            xmpp.register_plugin(plugin)
        party = Party(xmpp)
        made.append(xmpp)
        if address is not None:
            await connect_client(xmpp, address)
        return party

    yield factory
    for xmpp in made:
        if "sm_tracker" in xmpp.plugin:
            tracker_of(xmpp).auto_reconnect = False
        xmpp.disconnect(wait=0.5)
    await asyncio.sleep(0.1)
    for xmpp in made:
        if xmpp.transport is not None:
            xmpp.abort()


def room_jid(server: LocalXMPPServer) -> str:
    return f"hostile-{uuid.uuid4().hex[:8]}@{server.muc_domain}"


async def leave_a_crashed_store(server: LocalXMPPServer, db: Path, count: int = 5) -> SMState:
    """A client that sent ``count`` durable messages into a stalled link, then vanished
    without a word: the file keeps them in flight, with a resumable SM state."""
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        xmpp = make_client(
            "alice@localhost/crashed", "pass", tracker_config={**FAST, "auto_reconnect": False}
        )
        tracker = tracker_of(xmpp)
        store = SQLiteStore(db)
        await tracker.attach(store)
        tracker.sm.cache(store.save_sm_state)
        await connect_client(xmpp, proxy.address)
        proxy.stall()
        for i in range(count):
            await tracker.send_message("bob@localhost", f"crashed {i}")
        await wait_for(lambda: all(r.seq is not None for r in tracker.core.records.values()))
        await tracker.flush()
        xmpp.abort()
        await tracker.flush()
        state = await store.load_sm_state()
        await store.aclose()
    assert state is not None and len(state["unacked"]) >= count
    return state


async def stored_records(db: Path) -> list[TrackedMessage]:
    async with SQLiteStore(db) as store:
        return await store.conversation("bob@localhost", limit=10_000)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """Make a file unwritable even for root (CI runs as root): ``chattr +i``."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o400)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    chattr = shutil.which("chattr")
    assert chattr is not None, "chattr is needed to make a file read-only for root"
    subprocess.run([chattr, "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


class FlakyStore:
    """A MemoryStore whose writes raise while ``failing`` is set (a full disk, a lock)."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.failing = False
        self.refused = 0

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        if self.failing:
            self.refused += 1
            raise OSError(28, "No space left on device")
        await self.inner.upsert(records)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# ---------------------------------------------------------------------- saved SM state


def _corrupt(state: SMState, how: str) -> object:
    state = json.loads(json.dumps(state))
    unacked = state["unacked"]
    if how == "not-a-dict":
        return [state]
    if how == "xml-not-xml":
        unacked[1]["xml"] = "<message><body>cut off"
    elif how == "xml-not-a-stanza":
        unacked[1]["xml"] = "<stream:features xmlns:stream='http://etherx.jabber.org/streams'/>"
    elif how == "seq-outside-window":
        unacked[0]["seq"] = state["last_ack"]
    elif how == "seq-out-of-order":
        unacked[0]["seq"], unacked[1]["seq"] = unacked[1]["seq"], unacked[0]["seq"]
    elif how == "counter-too-big":
        state["handled"] = 2**32
    elif how == "counter-is-bool":
        state["last_ack"] = True
    elif how == "empty-stream-id":
        state["stream_id"] = ""
    elif how == "jid-not-a-jid":
        state["jid"] = "localhost"
    elif how == "room-nick-not-a-string":
        state["rooms"] = {"room@conference.localhost": 5}
    elif how == "deeply-nested-xml":
        unacked[1]["xml"] = "<message>" + "<x>" * 5000 + "</x>" * 5000 + "</message>"
    elif how == "jid-slixmpp-refuses":
        state["jid"] = "alice@localhost/" + "r" * 2000 + "@"  # resource part too long
    elif how == "saved-at-overflow":
        state["saved_at"] = 10**400
    elif how == "iq-among-unacked":
        unacked[1]["xml"] = (
            "<iq xmlns='jabber:client' type='set' id='r1'><query xmlns='jabber:iq:roster'>"
            "<item jid='bob@localhost' subscription='remove'/></query></iq>"
        )
    elif how == "huge-stream-id":
        state["stream_id"] = "x" * 50_000_000
    elif how == "a-million-rooms":
        state["rooms"] = {f"r{i}@conference.localhost": "me" for i in range(1_000_000)}
    elif how == "no-version":
        del state["version"]
    elif how == "next-version":
        state["version"] += 1
        state["new_field_of_the_future"] = {"x": 1}
    else:
        raise AssertionError(how)
    return state


@pytest.mark.parametrize(
    "how",
    [
        "not-a-dict",
        "xml-not-xml",
        "xml-not-a-stanza",
        "seq-outside-window",
        "seq-out-of-order",
        "counter-too-big",
        "counter-is-bool",
        "empty-stream-id",
        "jid-not-a-jid",
        "room-nick-not-a-string",
        "deeply-nested-xml",
        "jid-slixmpp-refuses",
        "saved-at-overflow",
        "iq-among-unacked",
        "huge-stream-id",
        "a-million-rooms",
        "no-version",
        "next-version",
    ],
)
async def test_a_corrupt_sm_state_is_refused_whole_and_the_records_settle_failed(
    how: str, server: LocalXMPPServer, tmp_path: Path, clients: Factory
) -> None:
    db = tmp_path / "alice.sqlite"
    state = await leave_a_crashed_store(server, db)
    alice = await clients("alice", None)
    store = SQLiteStore(db)
    try:
        await alice.tracker.attach(store)
        with pytest.raises(SMStateError):
            alice.tracker.sm.load(_corrupt(state, how))
        core = alice.tracker.core
        assert core.session.sm_id is None and len(core.ledger) == 0  # nothing half-applied
        await connect_client(alice.xmpp, server.address)  # a fresh session
        await wait_for(lambda: alice.count("message:failed") == 5)
        failed = await alice.tracker.failed()
        assert [r.body for r in failed] == [f"crashed {i}" for i in range(5)]
        assert {r.reason for r in failed} == {"resume-failed"}
        assert await alice.tracker.pending() == []
    finally:
        alice.tracker.auto_reconnect = False
        await alice.xmpp.disconnect(wait=0.5)
        await store.aclose()


async def test_a_truncated_sm_state_in_the_database_is_a_clear_error_and_records_are_kept(
    server: LocalXMPPServer, tmp_path: Path, clients: Factory
) -> None:
    db = tmp_path / "alice.sqlite"
    await leave_a_crashed_store(server, db)
    with contextlib.closing(sqlite3.connect(db)) as raw:
        raw.execute("UPDATE sm_state SET state = substr(state, 1, length(state) / 2)")
        raw.commit()
    alice = await clients("alice", None)
    store = SQLiteStore(db)
    try:
        await alice.tracker.attach(store)
        with pytest.raises(StoreError, match=r"alice\.sqlite.*not valid JSON"):
            await store.load_sm_state()
        await connect_client(alice.xmpp, server.address)
        await wait_for(lambda: alice.count("message:failed") == 5)
        assert len(await alice.tracker.failed()) == 5
        assert await alice.tracker.pending() == []
    finally:
        alice.tracker.auto_reconnect = False
        await alice.xmpp.disconnect(wait=0.5)
        await store.aclose()


async def test_a_state_forged_for_another_accounts_stream_cannot_resume_it(
    server: LocalXMPPServer, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """The client refuses a state whose JID is another account's (test_live_restart);
    here the JID is rewritten to ours, so only the server stands between us and
    carol's stream: resumption must fail, we stay alice, carol's session stays hers."""
    bob = await clients("bob", server.address, tracked=False)
    async with FaultProxy(server.host, server.c2s_port) as carols_link:
        carol = await clients("carol", carols_link.address, **SILENT)
        states: list[Any] = []
        carol.tracker.sm.cache(states.append)
        carols_link.stall()
        carol.send("bob@localhost", "carol's own words")
        await wait_for(lambda: carol.on_wire(carol.ids("message:sent")))
        await carol.tracker.flush()
        carols_link.refuse(True)
        carols_link.cut()
        await wait_for(lambda: carol.count("message:hibernated") == 1)
        stolen = json.loads(json.dumps(states[-1]))
        assert stolen["unacked"], "carol's state carries her unacked message"
        stolen["jid"] = "alice@localhost/thief"

        alice = await clients("alice", None)
        with caplog.at_level(logging.INFO):
            alice.tracker.sm.load(stolen)  # passes the client-side check: the JID says alice
        assert "loaded a saved SM state" in caplog.text
        assert stolen["stream_id"] not in caplog.text  # a key to the stream: never logged
        await connect_client(alice.xmpp, server.address)
        assert alice.xmpp.boundjid.bare == "alice@localhost"
        assert alice.tracker.core.session.sm_id != stolen["stream_id"]
        assert alice.tracker.managed

        carol.ask_for_acks()
        carols_link.heal()
        await wait_for(lambda: carol.count("message:acked") == 1, timeout=15)
        assert carol.count("message:failed") == 0  # her stream was still hers to resume
        await wait_for(lambda: "carol's own words" in bob.bodies)
        await asyncio.sleep(0.3)
        assert bob.bodies.count("carol's own words") == 1  # alice never resent it


# ---------------------------------------------------------------------- database files


async def test_attaching_a_corrupt_database_is_a_clear_error_and_the_stream_goes_on(
    server: LocalXMPPServer, tmp_path: Path, clients: Factory
) -> None:
    db = tmp_path / "garbage.sqlite"
    garbage = b"SQLite format 3\x00" + os.urandom(4096)
    db.write_bytes(garbage)
    alice = await clients("alice", server.address)
    broken = SQLiteStore(db)
    with pytest.raises(StoreError, match=r"garbage\.sqlite"):
        await alice.tracker.attach(broken)
    await broken.aclose()
    alice.send("bob@localhost", "after a bad attach")
    await wait_for(lambda: alice.count("message:acked") == 1)
    assert db.read_bytes() == garbage


async def test_a_failed_attach_keeps_the_store_that_works(
    server: LocalXMPPServer, tmp_path: Path, clients: Factory
) -> None:
    """Regression: attach() used to switch to the new store before reading it, so a
    broken file left the tracker writing into it (found by this suite)."""
    db = tmp_path / "garbage.sqlite"
    db.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    alice = await clients("alice", server.address)
    working = MemoryStore()
    await alice.tracker.attach(working)
    broken = SQLiteStore(db)
    with pytest.raises(StoreError):
        await alice.tracker.attach(broken)
    await broken.aclose()
    message_id = alice.send("bob@localhost", "after a bad attach")
    await wait_for(lambda: alice.count("message:acked") == 1)
    await alice.tracker.flush()
    assert alice.tracker.store is working
    assert (await working.get(message_id)) is not None


async def test_a_read_only_database_is_a_clear_error_and_the_stream_goes_on(
    server: LocalXMPPServer, tmp_path: Path, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "alice.sqlite"
    await leave_a_crashed_store(server, db)
    before = db.read_bytes()
    alice = await clients("alice", None)
    with immutable(db):
        store = SQLiteStore(db)
        try:
            await alice.tracker.attach(store)  # reading works: 5 records adopted
            await connect_client(alice.xmpp, server.address)
            await wait_for(lambda: alice.count("message:failed") == 5)
            ids = [alice.send("bob@localhost", f"unsaved {i}") for i in range(3)]
            await wait_for(lambda: alice.count("message:acked") == 3)
            assert alice.ids("message:acked") == ids  # the stream does not care
            with pytest.raises(StoreError, match=r"alice\.sqlite.*(readonly|read-only)"):
                await alice.tracker.flush()
            assert "alice.sqlite" in caplog.text and "retrying" in caplog.text
            # nothing is dropped: every change waits in the writer for a working store
            assert alice.tracker._writer.backlog == 8
        finally:
            alice.tracker.auto_reconnect = False
            await alice.xmpp.disconnect(wait=0.5)
            with contextlib.suppress(StoreError):
                await store.aclose()
    assert db.read_bytes() == before


async def test_records_queued_for_a_read_only_database_move_to_a_new_store(
    server: LocalXMPPServer, tmp_path: Path, clients: Factory
) -> None:
    """Regression: attach() used to flush the old store first and raise, so records
    queued for a store that cannot write were stuck and lost at exit."""
    db = tmp_path / "alice.sqlite"
    await leave_a_crashed_store(server, db)
    alice = await clients("alice", None)
    with immutable(db):
        store = SQLiteStore(db)
        await alice.tracker.attach(store)
        await connect_client(alice.xmpp, server.address)
        ids = [alice.send("bob@localhost", f"unsaved {i}") for i in range(3)]
        await wait_for(lambda: alice.count("message:acked") == 3)
    rescue = SQLiteStore(tmp_path / "rescue.sqlite")
    try:
        await alice.tracker.attach(rescue)
        await alice.tracker.flush()
        for message_id in ids:
            assert (await rescue.get(message_id)) is not None
    finally:
        alice.tracker.auto_reconnect = False
        await alice.xmpp.disconnect(wait=0.5)
        await rescue.aclose()
        with contextlib.suppress(StoreError):
            await store.aclose()


# ---------------------------------------------------------------------- a store that fails


async def test_a_store_whose_writes_fail_for_a_while_loses_nothing(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyStore()
    alice = await clients("alice", proxy.address)
    await alice.tracker.attach(flaky)
    flaky.failing = True
    ids = [alice.send("bob@localhost", f"while the disk is full {i}") for i in range(5)]
    await wait_for(lambda: alice.count("message:acked") == 5)
    with pytest.raises(StoreError, match=r"FlakyStore.*No space left"):
        await alice.tracker.flush()
    assert flaky.refused >= 1
    assert "No space left" in caplog.text

    flaky.failing = False
    later = alice.send("bob@localhost", "after the disk was cleaned")
    await wait_for(lambda: alice.count("message:acked") == 6)
    await alice.tracker.flush()
    for message_id in [*ids, later]:
        record = await flaky.inner.get(message_id)
        assert record is not None and record.state is DeliveryState.ACKED


async def test_records_reach_a_recovered_store_after_a_failed_flush_without_new_events(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory
) -> None:
    """Regression: a failed flush() used to cancel the writer's retry timer, so queued
    records waited for some later event to be written."""
    flaky = FlakyStore()
    alice = await clients("alice", proxy.address)
    await alice.tracker.attach(flaky)
    flaky.failing = True
    ids = [alice.send("bob@localhost", f"queued {i}") for i in range(3)]
    await wait_for(lambda: alice.count("message:acked") == 3)
    await wait_for(lambda: alice.tracker._writer._retry is not None)
    with pytest.raises(StoreError):
        await alice.tracker.flush()
    flaky.failing = False
    await wait_for(lambda: all(i in flaky.inner._records for i in ids), timeout=3)


async def test_send_message_into_a_failing_store_leaves_no_stuck_record(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory
) -> None:
    """Regression: a durable send whose flush failed used to leave a SENT record that
    never went out, could not be resent and could not be deleted."""
    flaky = FlakyStore()
    alice = await clients("alice", proxy.address)
    await alice.tracker.attach(flaky)
    flaky.failing = True
    with pytest.raises(StoreError):
        await alice.tracker.send_message("bob@localhost", "not durable, not sent")
    flaky.failing = False
    await asyncio.sleep(0.3)
    stuck = [r for r in alice.tracker.core.records.values() if r.in_flight]
    assert stuck == [], f"left in flight although never sent: {stuck}"
    [failed] = await alice.tracker.failed()  # resendable once the store works again
    assert failed.body == "not durable, not sent" and failed.retryable


# ---------------------------------------------------------------------- a lying server


async def test_h_beyond_what_was_sent_fails_unacked_as_protocol_error_and_starts_fresh(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, **SILENT)
    ids = [alice.send("bob@localhost", f"too high {i}") for i in range(5)]
    await wait_for(lambda: len(bob.bodies) == 5)  # the server has them, unacked
    first_stream = alice.tracker.core.session.sm_id
    written: list[str] = []
    write = alice.xmpp.send_raw
    alice.xmpp.send_raw = lambda data: (written.append(str(data)), write(data))[1]

    assert proxy.inject(f"<a xmlns='{SM_NS}' h='4000000'/>".encode()) == 1
    await wait_for(lambda: alice.count("message:failed") == 5)
    assert alice.ids("message:failed") == ids
    # XEP-0198 §4: the server is told why, in a stream error
    [error] = [data for data in written if "handled-count-too-high" in data]
    assert (
        error.startswith("<stream:error>") and "h='4000000' send-count='7'" in error
    )  # 2 presences + 5
    assert {alice.last[i].reason for i in ids} == {"protocol-error"}
    assert any(
        r.levelno >= logging.ERROR and "protocol error" in r.getMessage() for r in caplog.records
    )
    # a fresh session on a new connection, never a resumption of the broken one (managed,
    # not only live: the session starts before <enabled/> gives its stream id)
    await wait_for(lambda: alice.tracker.session_live and alice.tracker.managed, timeout=10)
    session = alice.tracker.core.session
    assert proxy.connections == 2 and session.sm_id not in (None, first_stream)
    assert [r.id for r in await alice.tracker.failed()] == ids
    alice.ask_for_acks()
    alice.send("bob@localhost", "after the protocol error")
    await wait_for(lambda: alice.count("message:acked") == 1)
    await asyncio.sleep(0.2)
    assert sorted(bob.bodies) == sorted(
        [f"too high {i}" for i in range(5)] + ["after the protocol error"]
    )


async def test_h_going_backwards_is_ignored_as_a_stale_ack(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    alice = await clients("alice", proxy.address)
    ids = [alice.send("bob@localhost", f"acked {i}") for i in range(5)]
    await wait_for(lambda: alice.count("message:acked") == 5)
    ledger = alice.tracker.core.ledger
    await wait_for(lambda: ledger.in_flight == 0)
    last_ack = ledger.last_ack

    proxy.inject(f"<a xmlns='{SM_NS}' h='{last_ack - 3}'/>".encode())
    await wait_for(lambda: "stale ack" in caplog.text)
    assert ledger.last_ack == last_ack
    more = [alice.send("bob@localhost", f"after {i}") for i in range(3)]
    await wait_for(lambda: alice.count("message:acked") == 8)
    assert alice.ids("message:acked") == ids + more
    assert alice.count("message:failed") == 0 and proxy.connections == 1


@pytest.mark.parametrize(
    "ack",
    [
        f"<a xmlns='{SM_NS}'/>",
        f"<a xmlns='{SM_NS}' h=''/>",
        f"<a xmlns='{SM_NS}' h='many'/>",
        f"<a xmlns='{SM_NS}' h='-1'/>",
        f"<a xmlns='{SM_NS}' h='4294967296'/>",
        f"<a xmlns='{SM_NS}' h='2.0'/>",
        f"<a xmlns='{SM_NS}' h='0x10'/>",
    ],
)
async def test_an_ack_without_a_valid_h_is_ignored_with_a_warning(
    ack: str,
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: Factory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = await clients("alice", proxy.address, **SILENT)
    ids = [alice.send("bob@localhost", f"unacked {i}") for i in range(3)]
    await wait_for(lambda: alice.on_wire(ids))
    before = alice.tracker.core.ledger.last_ack
    proxy.inject(ack.encode())
    await wait_for(lambda: "without a valid h" in caplog.text)
    assert alice.tracker.core.ledger.last_ack == before
    assert alice.count("message:acked") == 0 and alice.count("message:failed") == 0
    alice.ask_for_acks()
    alice.send("bob@localhost", "the stream goes on")
    await wait_for(lambda: alice.count("message:acked") == 4)
    assert proxy.connections == 1


@pytest.mark.parametrize("h", ["1_0", "\u0661\u0660"])
async def test_an_ack_with_a_python_only_number_is_ignored(
    h: str, server: LocalXMPPServer, proxy: FaultProxy, clients: Factory
) -> None:
    """Regression: h used to be parsed with int(), which takes '1_0' and non-ASCII
    digits: not XML numbers, they must be ignored like any other bad h."""
    alice = await clients("alice", proxy.address, **SILENT)
    ids = [alice.send("bob@localhost", f"unacked {i}") for i in range(3)]
    await wait_for(lambda: alice.on_wire(ids))
    proxy.inject(f"<a xmlns='{SM_NS}' h='{h}'/>".encode())
    await asyncio.sleep(0.5)
    assert alice.count("message:failed") == 0
    assert proxy.connections == 1


_ENABLED = rb"<enabled "


@pytest.mark.parametrize("location", ["nonsense", "host:", ":5222", "host:port", "[::1]"])
async def test_enabled_with_an_unusable_location_is_ignored_with_a_warning(
    location: str,
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: Factory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy.rewrite(_ENABLED, b"<enabled location='" + location.encode() + b"' ")
    alice = await clients("alice", proxy.address, **SILENT)
    assert "unusable <enabled location" in caplog.text
    assert alice.tracker.core.session.location is None
    proxy.heal()  # the rule is spent; reconnecting must go where we went before
    ids = [alice.send("bob@localhost", f"located {i}") for i in range(3)]
    await wait_for(lambda: alice.on_wire(ids))
    proxy.cut()
    await wait_for(lambda: alice.count("message:hibernated") == 3)
    alice.ask_for_acks()
    await wait_for(lambda: alice.count("message:acked") == 3, timeout=10)
    assert proxy.connections == 2 and alice.count("message:failed") == 0


@pytest.mark.parametrize("location", ["127.0.0.1:99999", "127.0.0.1:0"])
async def test_enabled_with_an_out_of_range_location_port_is_ignored(
    location: str, server: LocalXMPPServer, proxy: FaultProxy, clients: Factory
) -> None:
    """Regression: a location port of 0 or above 65535 used to be kept, and the
    reconnect went there and never came back."""
    proxy.rewrite(_ENABLED, b"<enabled location='" + location.encode() + b"' ")
    alice = await clients("alice", proxy.address, **SILENT)
    proxy.heal()
    message_id = alice.send("bob@localhost", "where do I go")
    await wait_for(lambda: alice.on_wire([message_id]))
    proxy.cut()
    alice.ask_for_acks()
    await wait_for(lambda: alice.count("message:acked") == 1, timeout=5)


async def test_a_location_that_does_not_answer_falls_back_to_the_address_we_were_given(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    # A server may prefer another node for resumption; if that node is down the client
    # must come back to the address the app gave, not knock on the dead one for ever.
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    proxy.rewrite(_ENABLED, f"<enabled location='127.0.0.1:{dead}' ".encode())
    alice = await clients("alice", proxy.address, location_allow=["127.0.0.1"], **SILENT)
    assert alice.tracker.core.session.location == f"127.0.0.1:{dead}"
    proxy.heal()
    ids = [alice.send("bob@localhost", f"elsewhere {i}") for i in range(3)]
    await wait_for(lambda: alice.on_wire(ids))
    proxy.cut()
    await wait_for(lambda: alice.count("message:hibernated") == 3)
    alice.ask_for_acks()

    await wait_for(lambda: alice.count("message:acked") == 3, timeout=10)
    assert alice.count("message:failed") == 0
    assert "does not answer" in caplog.text
    assert alice.xmpp.custom_address == proxy.address


@pytest.mark.parametrize("max_value", ["soon", "-5", "4294967296", ""])
async def test_enabled_with_a_bad_max_keeps_a_working_resumable_session(
    max_value: str, server: LocalXMPPServer, proxy: FaultProxy, clients: Factory
) -> None:
    proxy.rewrite(rb"max=(['\"])[^'\"]*\1", b"max='" + max_value.encode() + b"'")
    alice = await clients("alice", proxy.address, **SILENT)
    session = alice.tracker.core.session
    assert session.max is None and session.can_resume
    proxy.heal()
    ids = [alice.send("bob@localhost", f"max {i}") for i in range(3)]
    await wait_for(lambda: alice.on_wire(ids))
    proxy.cut()
    alice.ask_for_acks()
    await wait_for(lambda: alice.count("message:acked") == 3, timeout=10)
    assert alice.count("message:failed") == 0 and proxy.connections == 2


async def test_enabled_with_a_bad_max_is_warned_about(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: an unparseable max used to be dropped without a word."""
    proxy.rewrite(rb"max=(['\"])[^'\"]*\1", b"max='soon'")
    await clients("alice", proxy.address)
    assert any(r.levelno >= logging.WARNING and "max" in r.getMessage() for r in caplog.records), (
        "no warning about <enabled max='soon'>"
    )


async def test_resumed_for_another_stream_drops_the_session_and_loses_nothing(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, **SILENT)
    first_stream = alice.tracker.core.session.sm_id
    ids = [alice.send("bob@localhost", f"resumed {i}") for i in range(3)]
    await wait_for(lambda: len(bob.bodies) == 3)
    proxy.rewrite(rb"previd=(['\"])[^'\"]*\1", b"previd='somebody-elses-stream'")
    proxy.cut()

    await wait_for(lambda: alice.count("message:failed") == 3, timeout=10)
    assert {alice.last[i].reason for i in ids} == {"protocol-error"}
    assert "does not match our stream" in caplog.text
    assert str(first_stream) not in caplog.text  # a resumption id is a key to the stream
    proxy.heal()
    await wait_for(lambda: alice.tracker.session_live and alice.tracker.managed, timeout=10)
    session = alice.tracker.core.session
    assert session.sm_id not in (None, first_stream)  # started afresh
    assert [r.id for r in await alice.tracker.failed()] == ids
    alice.ask_for_acks()
    alice.send("bob@localhost", "on the fresh stream")
    await wait_for(lambda: alice.count("message:acked") == 1)
    await asyncio.sleep(0.2)
    assert sorted(bob.bodies) == sorted(
        [f"resumed {i}" for i in range(3)] + ["on the fresh stream"]
    )


async def test_a_connection_lost_while_waiting_for_resumed_does_not_end_the_next_session(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by scripts/chaos: the wait for <resumed/> outlived its connection; when it
    # timed out it fired session_end on the next connection's session (its messages
    # failed, and the server's next <a/> looked like a protocol error).
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, negotiation_timeout=1.5)
    [first] = [alice.send("bob@localhost", "before the cuts")]
    await wait_for(lambda: alice.count("message:acked") == 1)
    proxy.rewrite(rb"<resumed [^>]*/>", b"")  # the server's answer never arrives...
    proxy.cut()
    await wait_for(lambda: alice.tracker.sm_phase is SMPhase.RESUMING, timeout=10)
    alice.tracker.allow_resume = False  # the next connection starts a fresh session
    proxy.heal()  # ...and the connection is lost while alice waits for it
    proxy.cut()
    await wait_for(lambda: alice.tracker.session_live, timeout=10)
    await asyncio.sleep(2.0)  # past the first wait's timeout
    assert alice.tracker.session_live and alice.tracker.core.counting_out
    later = alice.send("bob@localhost", "after the stale wait")
    await wait_for(lambda: alice.count("message:acked") == 2)
    assert alice.ids("message:acked") == [first, later]
    assert alice.ids("message:failed") == []
    assert "protocol error" not in caplog.text
    await wait_for(lambda: "after the stale wait" in bob.bodies)


# ---------------------------------------------------------------------- raising user code


async def _every_message_event(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory
) -> tuple[Party, Party, dict[str, str]]:
    """One run that fires every ``message:*`` event: sent, acked, delivered, displayed,
    room_received, failed (a bounce), hibernated and resent (a cut)."""
    bob = await clients("bob", server.address, tracked=False, plugins=("xep_0184",))
    bob.xmpp.plugin["xep_0184"].auto_ack = True
    alice = await clients(
        "alice",
        proxy.address,
        plugins=("xep_0045",),
        request_receipts=True,
        request_markers=True,
    )
    room = room_jid(server)
    await alice.join(room, "Alice")
    ids = {
        "chat": alice.send(str(bob.xmpp.boundjid), "read me"),
        "room": alice.send(room, "to the room", "groupchat"),
        "bounce": alice.send(room_jid(server), "to nowhere", "groupchat"),
    }
    await wait_for(lambda: alice.count("message:delivered") == 1)
    marker = bob.xmpp.make_message(mto=alice.xmpp.boundjid, mtype="chat")
    marker.xml.append(
        slixmpp.xmlstream.ET.Element("{urn:xmpp:chat-markers:0}displayed", {"id": ids["chat"]})
    )
    marker.send()
    await wait_for(lambda: alice.count("message:displayed") == 1)
    await wait_for(lambda: alice.count("message:room_received") == 1)
    await wait_for(lambda: alice.count("message:failed") == 1)
    # no receipt for the last one: it ends acked (a receipt would overtake the ack)
    alice.tracker.config["request_receipts"] = False
    proxy.stall()
    ids["cut"] = alice.send("bob@localhost", "through a cut")
    await wait_for(lambda: alice.on_wire([ids["cut"]]))
    proxy.cut()
    proxy.heal()
    await wait_for(lambda: alice.last[ids["cut"]].state is DeliveryState.ACKED, timeout=10)
    return alice, bob, ids


def _assert_every_record_right(alice: Party, bob: Party, ids: dict[str, str]) -> None:
    assert alice.last[ids["chat"]].state is DeliveryState.DISPLAYED
    assert alice.last[ids["room"]].state is DeliveryState.ROOM_RECEIVED
    bounce = alice.last[ids["bounce"]]
    assert bounce.state is DeliveryState.FAILED and bounce.reason.startswith("cancel:")
    assert alice.last[ids["cut"]].state is DeliveryState.ACKED
    for name in MESSAGE_EVENTS:
        assert alice.count(name) >= 1, f"{name} never fired"
    assert bob.bodies.count("read me") == 1 and bob.bodies.count("through a cut") == 1


class Raiser:
    """Raising callbacks that count their calls (sync and async)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def sync(self, name: str) -> Callable[[Any], None]:
        def handler(_payload: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            raise RuntimeError(f"user bug in a {name} handler")

        return handler

    def coro(self, name: str) -> Callable[[Any], Awaitable[None]]:
        async def handler(_payload: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            raise RuntimeError(f"user bug in an async {name} handler")

        return handler


@pytest.mark.parametrize("bus", ["slixmpp", "pyee"])
async def test_raising_handlers_on_every_message_event_break_nothing(
    bus: str,
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: Factory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    raiser = Raiser()
    original = clients

    async def raising_clients(user: str, address: Any, **kw: Any) -> Party:
        party = await original(user, address, **kw)
        if user == "alice":
            for name in MESSAGE_EVENTS + (STANZA_EVENTS if bus == "pyee" else []):
                for handler in (raiser.sync(name), raiser.coro(f"{name} async")):
                    if bus == "slixmpp":
                        party.xmpp.add_event_handler(name, handler)
                    else:
                        party.tracker.events.on(name, handler)
        return party

    alice, bob, ids = await _every_message_event(server, proxy, raising_clients)
    _assert_every_record_right(alice, bob, ids)
    # every event reached the raising callbacks too, and each raise was logged
    # (the handlers were added after session start: sent/acked fire from the first message)
    for name in MESSAGE_EVENTS:
        assert raiser.calls.get(name, 0) >= 1 and raiser.calls.get(f"{name} async", 0) >= 1
    assert "user bug in a message:acked handler" in caplog.text
    assert "user bug in an async message:failed async handler" in caplog.text
    stored = await alice.tracker.get(ids["room"])
    assert stored.state is DeliveryState.ROOM_RECEIVED


async def test_a_raising_stanza_handler_on_the_slixmpp_bus_sends_nothing(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory
) -> None:
    """Regression: slixmpp hands a handler's exception to the payload's exception(),
    and a stanza's replies with an error stanza: with our own outgoing stanza as
    payload, every ack made us send an error, which was acked, and so on."""
    alice = await clients("alice", proxy.address)
    raiser = Raiser()
    errors_out: list[str] = []

    def watch(stanza: Any) -> Any:
        if stanza.xml.get("type") == "error":
            errors_out.append(stanza.xml.tag)
        return stanza

    alice.xmpp.add_filter("out", watch)
    for name in STANZA_EVENTS:
        alice.xmpp.add_event_handler(name, raiser.sync(name))
    message_id = alice.send("bob@localhost", "one message")
    await wait_for(lambda: alice.count("message:acked") == 1)
    await asyncio.sleep(1.0)
    assert alice.last[message_id].state is DeliveryState.ACKED
    assert errors_out == [], f"{len(errors_out)} error stanzas sent on our behalf"
    assert raiser.calls["stanza:acked"] <= 3


async def test_a_raising_should_track_tracks_the_message_anyway(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    def predicate(_message: Any) -> bool:
        raise ValueError("user bug in should_track")

    alice = await clients("alice", proxy.address, should_track=predicate)
    ids = [alice.send("bob@localhost", f"judged {i}") for i in range(3)]
    await wait_for(lambda: alice.count("message:acked") == 3)
    assert alice.ids("message:acked") == ids
    assert "should_track raised" in caplog.text
    for message_id in ids:
        assert (await alice.tracker.get(message_id)).state is DeliveryState.ACKED


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_raising_sm_cache_is_logged_retried_and_never_breaks_the_stream(
    kind: str,
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: Factory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = await clients("alice", proxy.address)
    saved: list[Any] = []
    calls = 0

    def save(state: Any) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise OSError("user bug in sm.cache")
        saved.append(state)

    async def save_async(state: Any) -> None:
        await asyncio.sleep(0)
        save(state)

    alice.tracker.sm.cache(save if kind == "sync" else save_async)
    ids = [alice.send("bob@localhost", f"cached {i}") for i in range(5)]
    proxy.cut()  # and a resumption while the callback is failing
    await wait_for(lambda: alice.count("message:acked") == 5, timeout=10)
    assert alice.count("message:failed") == 0 and alice.ids("message:acked") == ids
    await wait_for(lambda: saved and saved[-1]["unacked"] == [], timeout=5)
    assert saved[-1]["stream_id"] == alice.tracker.core.session.sm_id
    assert alice.tracker.sm.errors == 3
    assert caplog.text.count("sm.cache callback raised") == 3


# ---------------------------------------------------------------------- security


async def test_database_and_state_files_are_private_after_a_live_session(
    server: LocalXMPPServer, proxy: FaultProxy, tmp_path: Path, clients: Factory
) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    old_umask = os.umask(0)  # the most permissive umask a process can have
    try:
        alice = await clients("alice", None)
        store = SQLiteStore(folder / "alice.sqlite")
        await alice.tracker.attach(store)
        alice.tracker.sm.cache(store.save_sm_state)
        await connect_client(alice.xmpp, proxy.address)
        for i in range(5):
            await alice.tracker.send_message("bob@localhost", f"private {i}")
        proxy.cut()
        await wait_for(lambda: alice.count("message:acked") == 5, timeout=10)
        await alice.tracker.flush()
        assert await store.load_sm_state() is not None
        files = sorted(folder.iterdir())
        assert {f.name for f in files} >= {"alice.sqlite", "alice.sqlite-wal", "alice.sqlite-shm"}
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        alice.tracker.auto_reconnect = False
        await alice.xmpp.disconnect(wait=0.5)
        await store.aclose()
    finally:
        os.umask(old_umask)
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


_SQL_CALLS = {
    "execute",
    "executemany",
    "executescript",
    "fetch",
    "fetchrow",
    "fetchval",
    "_read",
    "_records",
    "_delete",
}
_SCHEMAS = ("sqlite_schema", "postgres_schema", "postgres_lease")


def _constant_names(tree: ast.Module) -> set[str]:
    """Names bound at module level: a store's SQL fragments. A value from a caller
    never lives in a module global, so text built only from these is ours."""
    names: set[str] = set()
    for node in tree.body:
        target = value = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if isinstance(target, ast.Name) and value is not None:
            names.add(target.id)
        # SQL fragments defined in the schema module (checked there the same way).
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module in _SCHEMAS:
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _sql_is_static(node: ast.expr, constants: set[str], local_sql: set[str]) -> bool:
    """True when ``node`` can only be SQL text written by us: literals, module
    constants (or an entry of a module's table of statements), and f-strings of those
    (or of ``int(...)`` for PRAGMA values)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Subscript):
        return isinstance(node.value, ast.Name) and node.value.id in constants
    if isinstance(node, ast.Name):
        return node.id in constants or node.id in local_sql
    if isinstance(node, ast.JoinedStr):
        for part in node.values:
            if isinstance(part, ast.Constant):
                continue
            assert isinstance(part, ast.FormattedValue)
            value = part.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "int":
                continue
            if not _sql_is_static(value, constants, local_sql):
                return False
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _sql_is_static(node.left, constants, local_sql) and _sql_is_static(
            node.right, constants, local_sql
        )
    return False


def test_sql_is_written_by_us_and_every_value_is_a_bound_parameter() -> None:
    """Static half: every statement the stores run is text from the source, never
    built from a value (no %, no .format, no f-string of anything but our constants)."""
    for path in sorted((ROOT / "xmpp_sm_tracker" / "stores").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = _constant_names(tree)
        checked = 0
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            # ``sql`` parameters of the plumbing are checked where they are called
            local_sql = {a.arg for a in func.args.args if a.arg == "sql"}
            for node in ast.walk(func):
                if (
                    isinstance(node, ast.For)
                    and isinstance(node.target, ast.Name)
                    and isinstance(node.iter, ast.Tuple | ast.List)
                    and all(_sql_is_static(e, constants, local_sql) for e in node.iter.elts)
                ):
                    local_sql.add(node.target.id)  # for statement in ("CREATE ...", ...)
                if (
                    isinstance(node, ast.For)
                    and isinstance(node.target, ast.Name)
                    and isinstance(node.iter, ast.Subscript)
                    and isinstance(node.iter.value, ast.Name)
                    and node.iter.value.id in constants
                ):
                    local_sql.add(node.target.id)  # for statement in MIGRATIONS[step]
                if isinstance(node, ast.Assign | ast.AnnAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    value = node.value
                    for target in targets:
                        if (
                            isinstance(target, ast.Name)
                            and target.id in ("sql", "marks")
                            and value is not None
                        ):
                            if isinstance(value, ast.Call):  # ", ".join("?" * n)
                                assert "'?'" in ast.unparse(value), ast.unparse(value)
                            else:
                                assert _sql_is_static(value, constants, local_sql), (
                                    f"{path.name}:{node.lineno}: {ast.unparse(value)}"
                                )
                            local_sql.add(target.id)
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name not in _SQL_CALLS:
                    continue
                checked += 1
                sql = node.args[0]
                assert _sql_is_static(sql, constants, local_sql), (
                    f"{path.name}:{node.lineno}: SQL built at run time: {ast.unparse(sql)}"
                )
        if path.name in ("sqlite.py", "postgres.py"):
            assert checked >= 10, "the checker found too few SQL calls to be looking right"


HOSTILE = "x'); DROP TABLE records; -- \" % _ \\ ☃"


async def test_hostile_ids_bodies_and_jids_only_travel_as_bound_parameters(
    server: LocalXMPPServer,
    proxy: FaultProxy,
    tmp_path: Path,
    clients: Factory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dynamic half: values that would break or widen a query if spliced into SQL go
    through the plugin into SQLite and back unchanged, and never appear in SQL text."""
    statements: list[str] = []
    for cls, method in (
        (aiosqlite.Connection, "execute"),
        (aiosqlite.Connection, "executemany"),
        (aiosqlite.Cursor, "execute"),
        (aiosqlite.Cursor, "executemany"),
    ):
        original = getattr(cls, method)

        def spy(self: Any, sql: str, *args: Any, _original: Any = original) -> Any:
            statements.append(sql)
            return _original(self, sql, *args)

        monkeypatch.setattr(cls, method, spy)

    db = tmp_path / "hostile.sqlite"
    alice = await clients("alice", None)
    store = SQLiteStore(db)
    await alice.tracker.attach(store)
    alice.tracker.sm.cache(store.save_sm_state)
    await connect_client(alice.xmpp, proxy.address)
    to = f"bob@localhost/{HOSTILE}"
    ids = [alice.send(to, f"{HOSTILE} {i}", mid=f"{HOSTILE} id {i}") for i in range(3)]
    await wait_for(lambda: alice.count("message:acked") == 3)
    await alice.tracker.flush()
    for i, message_id in enumerate(ids):
        record = await store.get(message_id)
        assert record is not None and record.body == f"{HOSTILE} {i}" and record.to == to
    assert await store.failed("x' OR '1'='1") == []
    assert await store.conversation("%") == []
    assert len(await store.conversation("bob@localhost", limit=10)) == 3
    alice.tracker.auto_reconnect = False
    await alice.xmpp.disconnect(wait=0.5)
    await store.aclose()
    assert statements, "the spy saw no SQL"
    # (The schema's own migration drops tables: look for the values' text, "x'); DROP".)
    leaked = [s for s in statements if "x'); DROP" in s or "☃" in s or "' OR '" in s]
    assert leaked == []
    with contextlib.closing(sqlite3.connect(db)) as raw:
        assert raw.execute("SELECT count(*) FROM records").fetchone() == (3,)


async def test_no_password_and_no_body_in_logs_at_info_and_above(
    server: LocalXMPPServer,
    proxy: FaultProxy,
    tmp_path: Path,
    clients: Factory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A whole eventful session (resumption, a refused resumption, resends, a bounce,
    a protocol error, a store error, a clean close) logs neither the password nor
    a message body at INFO or above, from any logger, slixmpp's included."""
    password = "s3cret-pass"
    server.register("erin", password)
    caplog.set_level(logging.DEBUG)
    bob = await clients("bob", server.address, tracked=False)
    erin = await clients("erin", None, password=password, **SILENT)
    flaky = FlakyStore()
    await erin.tracker.attach(flaky)
    await connect_client(erin.xmpp, proxy.address)
    erin.ask_for_acks()
    stream_ids = {erin.tracker.core.session.sm_id}

    erin.send("bob@localhost", "secret body 0")
    await wait_for(lambda: erin.count("message:acked") == 1)
    proxy.stall()
    stalled = erin.send("bob@localhost", "secret body 1")
    await wait_for(lambda: erin.on_wire([stalled]))
    proxy.cut()
    proxy.heal()
    await wait_for(lambda: erin.count("message:acked") == 2, timeout=10)

    proxy.blackhole()
    erin.send("bob@localhost", "secret body 2")
    await asyncio.sleep(0.2)
    proxy.heal()
    # <resume previd> for a stream the server never had: refused without an h.
    proxy.rewrite(rb'previd="[^"]*"', b'previd="a-stream-the-server-never-heard-of"', upstream=True)
    proxy.cut()
    await wait_for(lambda: erin.count("message:failed") == 1, timeout=10)
    await wait_for(lambda: erin.tracker.session_live, timeout=10)
    # slixmpp starts the session before <enabled/> comes: wait for the new stream's id.
    await wait_for(lambda: erin.tracker.core.session.sm_id is not None, timeout=10)
    stream_ids.add(erin.tracker.core.session.sm_id)
    await erin.tracker.resend_failed()
    erin.send(room_jid(server), "secret body 3", "groupchat")  # bounces
    flaky.failing = True
    erin.send("bob@localhost", "secret body 4")
    await wait_for(lambda: flaky.refused >= 1)
    with contextlib.suppress(StoreError):
        await erin.tracker.flush()
    flaky.failing = False
    erin.tracker.ack_clock.policy = AckPolicy(every=10**6, delay=3600.0, at_burst_end=False)
    last = erin.send("bob@localhost", "secret body 5")
    await wait_for(lambda: erin.on_wire([last]))
    proxy.inject(f"<a xmlns='{SM_NS}' h='4000000'/>".encode())
    await wait_for(lambda: any(r.reason == "protocol-error" for r in erin.last.values()))
    await wait_for(lambda: erin.tracker.session_live, timeout=10)
    erin.tracker.auto_reconnect = False
    await erin.xmpp.disconnect(wait=0.5)
    await wait_for(lambda: "secret body 2" in bob.bodies)

    plain = base64.b64encode(f"\0erin\0{password}".encode()).decode()
    # A resumption id is a key to the stream: none at INFO or above either (issue 20).
    assert None not in stream_ids and len(stream_ids) == 2
    secrets = [password, plain, "secret body", *(str(i) for i in stream_ids)]
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert loud, "nothing was logged at INFO or above: the check would be empty"
    leaks = [
        formatter.format(r)
        for r in loud
        if any(secret in formatter.format(r) for secret in secrets)
    ]
    assert leaks == []
    # and our own loggers write no body at any level (slixmpp's DEBUG log has them all)
    ours = [r for r in caplog.records if r.name.startswith("xmpp_sm_tracker")]
    assert ours and not [r for r in ours if "secret body" in formatter.format(r)]
    # the secrets were there to leak: slixmpp logs the stream at DEBUG
    debug = "\n".join(r.getMessage() for r in caplog.records if r.levelno < logging.INFO)
    assert "secret body" in debug and plain in debug


def test_the_logs_checker_would_see_a_leak(caplog: pytest.LogCaptureFixture) -> None:
    """Guard for the test above: a body logged at INFO is found by the same filter."""
    caplog.set_level(logging.INFO)
    logging.getLogger("xmpp_sm_tracker.plugin").info("sent %s", "secret body 9")
    found = [
        r for r in caplog.records if r.levelno >= logging.INFO and "secret body" in r.getMessage()
    ]
    assert len(found) == 1


# ---------------------------------------------------------------------- text XML cannot carry

#: What ``json.loads('"\\ud83d"')`` gives: half an emoji, as a bridge may pass it on.
LONE = json.loads('"secret half \\ud83d emoji"')


def plain_record(message_id: str, body: str) -> TrackedMessage:
    return TrackedMessage(
        id=message_id,
        origin_id=message_id,
        to="bob@localhost",
        type="chat",
        body=body,
        state=DeliveryState.SENT,
        xml="<message/>",
        created_at=1.0,
        updated_at=1.0,
    )


async def test_a_lone_surrogate_is_refused_at_send_and_blocks_nothing_after_it(
    server: LocalXMPPServer, tmp_path: Path, clients: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """It cannot be written to the stream (UTF-8) nor stored (SQLite): tracked, it made
    every later batch fail for ever, the whole batch being retried, and the writer's
    ERROR line quoted it. Now both ways to send refuse it; nothing tracked or sent."""
    caplog.set_level(logging.DEBUG, logger="xmpp_sm_tracker")
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", server.address)
    store = SQLiteStore(tmp_path / "alice.sqlite")
    try:
        await alice.tracker.attach(store)
        with pytest.raises(ValueError, match=r"lone surrogate \(U\+D83D\).*body") as caught:
            await alice.tracker.send_message("bob@localhost", LONE)
        assert "secret" not in str(caught.value)
        with pytest.raises(ValueError, match="lone surrogate"):
            alice.send("bob@localhost", LONE)  # xmpp.send, as any slixmpp code sends
        with pytest.raises(ValueError, match=r"lone surrogate.*'to'"):
            alice.send(f"bob@localhost/{LONE}", "fine words")
        assert len(alice.tracker.core.records) == 0
        after = [await alice.tracker.send_message("bob@localhost", f"after {i}") for i in range(3)]
        for handle in after:
            assert (await handle.settled(timeout=10)).state is DeliveryState.ACKED
        await alice.tracker.flush()  # the store takes every batch
        stored = await store.conversation("bob@localhost")
        assert [r.body for r in stored] == ["after 0", "after 1", "after 2"]
        await wait_for(lambda: len(bob.bodies) == 3)
        assert bob.bodies == ["after 0", "after 1", "after 2"]
    finally:
        alice.tracker.auto_reconnect = False
        await alice.xmpp.disconnect(wait=0.5)
        await store.aclose()
    assert "secret" not in caplog.text


async def test_the_sqlite_store_names_a_record_it_cannot_encode_not_its_text(
    tmp_path: Path,
) -> None:
    """Should such text reach the store anyway: a StoreError naming the file and the
    record, without the text, and the store goes on."""
    good, bad = plain_record("m1", "fine"), plain_record("m2", LONE)
    async with SQLiteStore(tmp_path / "t.sqlite") as store:
        with pytest.raises(StoreError, match=r"t\.sqlite.*'m2'.*lone surrogate") as caught:
            await store.upsert([good, bad])
        assert "secret" not in str(caught.value)
        await store.upsert([good])
        assert await store.get("m1") == good


async def test_the_writer_does_not_quote_what_a_store_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store's exception may carry the text it choked on (UnicodeEncodeError's repr
    does): the writer's ERROR line must not pass it on."""

    class Choking(MemoryStore):
        async def upsert(self, records: Sequence[TrackedMessage]) -> None:
            for r in records:
                r.body.encode("utf-8")
            await super().upsert(records)

    writer = StoreWriter(Choking(), retry_delay=3600)
    writer.put(plain_record("m1", LONE))
    with pytest.raises(StoreError, match="UnicodeEncodeError") as caught:
        await writer.flush()
    await asyncio.sleep(0.05)
    await writer.aclose_quietly()
    assert "secret" not in str(caught.value)
    assert "secret" not in caplog.text


# ---------------------------------------------------------------------- the tools


async def test_inject_and_rewrite_speak_for_one_end_of_the_link() -> None:
    """``FaultProxy.inject`` writes as if an end had spoken, even through a stall;
    ``rewrite`` edits only what the server says, until ``heal``."""
    upstream: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(b"<hello max='5'/>")
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(100):
                upstream.append(data)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy("127.0.0.1", port) as proxy:
        assert proxy.inject(b"nobody") == 0
        with pytest.raises(ValueError):
            proxy.inject(b"x", "sideways")  # type: ignore[arg-type]
        proxy.rewrite(rb"max='\d+'", b"max='soon'")
        reader, writer = await asyncio.open_connection(*proxy.address)
        assert await reader.readexactly(19) == b"<hello max='soon'/>"
        writer.write(b"<up max='5'/>")
        await wait_for(lambda: b"".join(upstream) == b"<up max='5'/>")

        proxy.stall()
        ack = f"<a xmlns='{SM_NS}' h='7'/>".encode()
        assert proxy.inject(ack) == 1
        assert await reader.readexactly(len(ack)) == ack
        assert proxy.inject(b"<as-client/>", "upstream") == 1
        await wait_for(lambda: b"".join(upstream).endswith(b"<as-client/>"))
        proxy.heal()  # drops the rewrite rule too

        writers[0].write(b"<again max='5'/>")
        assert await reader.readexactly(16) == b"<again max='5'/>"
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("room_rejoin_wait", -1),
        ("room_rejoin_wait", "10"),
        ("room_rejoin_wait", float("nan")),
        ("ack_keepalive", 0),
        ("ack_keepalive", -5.0),
        ("location_allow", "127.0.0.1"),  # a string, not a list: each letter a host
        ("location_allow", [None]),
        ("max_unacked", 0),
        ("max_unacked", True),
        ("max_unacked", "5000"),
        ("time_ordered_ids", "no"),  # a non-empty string: read as True
        ("time_ordered_ids", None),
    ],
)
def test_a_bad_setting_is_refused_when_the_plugin_is_registered(key: str, value: object) -> None:
    xmpp = slixmpp.ClientXMPP("alice@localhost/bad", "pass")
    xmpp.register_plugin("xep_0198")
    with pytest.raises(ValueError, match=key):
        xmpp.register_plugin("sm_tracker", pconfig={key: value})

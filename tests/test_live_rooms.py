"""Issue #5 scenarios: room reflection, bounces, carbons, receipts, against Prosody."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import slixmpp

from xmpp_sm_tracker import DeliveryState, SQLiteStore
from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import ClientPool, Party, make_client, wait_for

from .helpers.wire import Inbound

FAST = {"reconnect_delay": 0.1, "reconnect_max_delay": 1.0, "ack_delay": 0.05}


@pytest.fixture
def clients(client_pool: ClientPool) -> Any:
    """Clients that can join rooms, with fast acks and reconnects."""

    async def factory(
        user: str,
        address: tuple[str, int],
        *,
        plugins: tuple[str, ...] = ("xep_0045",),
        **config: Any,
    ) -> Party:
        return await client_pool(user, address, plugins=plugins, **{**FAST, **config})

    return factory


def room_jid(server: LocalXMPPServer) -> str:
    return f"room-{uuid.uuid4().hex[:8]}@{server.muc_domain}"


async def room_with_bob(server: LocalXMPPServer, clients: Any) -> tuple[str, Party]:
    """A new room with bob (untracked) in it, to see what reaches it."""
    room = room_jid(server)
    bob = await clients("bob", server.address, tracked=False)
    await bob.join(room, "Bob")
    return room, bob


async def test_groupchat_messages_end_room_received_in_order(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    room = room_jid(server)
    alice = await clients("alice", proxy.address)
    bob = await clients("bob", server.address, tracked=False)
    await alice.join(room, "Alice")
    await bob.join(room, "Bob")
    wire = Inbound(alice.xmpp)
    ids = [alice.send(room, f"to the room {i}", "groupchat") for i in range(20)]

    await wait_for(lambda: alice.log.count("message:room_received") == 20)
    assert alice.log.ids("message:room_received") == ids
    # Both servers reflect our message with its id and origin-id (Prosody adds an
    # occupant-id and a stanza-id, ejabberd a stanza-id and <archived/>).
    reflections = wire.find(r"<message [^>]*from='[^']*/Alice'.*?</message>")
    assert len(reflections) == 20
    for message_id, reflection in zip(ids, reflections, strict=True):
        assert f"id='{message_id}'" in reflection
        assert re.search(f"<origin-id [^>]*id='{message_id}'", reflection)
    for message_id in ids:
        names = alice.log.names_for(message_id)
        assert names[0] == "message:sent"
        assert names.count("message:room_received") == 1
        assert "message:failed" not in names
    await wait_for(lambda: len(bob.received.bodies) >= 20)
    assert [b for b in bob.received.bodies if b.startswith("to the room")] == [
        f"to the room {i}" for i in range(20)
    ]
    record = await alice.tracker.get(ids[-1])
    assert record.state is DeliveryState.ROOM_RECEIVED


async def test_message_to_a_room_not_joined_bounces_as_failed(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    alice = await clients("alice", proxy.address)
    message_id = alice.send(room_jid(server), "nobody hears me", "groupchat")
    await wait_for(lambda: alice.log.count("message:failed") == 1)
    record = alice.records[message_id]
    assert record.state is DeliveryState.FAILED
    assert record.reason.startswith(("cancel:", "modify:", "auth:"))
    assert not record.retryable
    assert alice.log.names_for(message_id)[0] == "message:sent"


async def test_message_to_an_unknown_domain_fails_with_the_server_condition(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    alice = await clients("alice", proxy.address)
    message_id = alice.send("someone@no-such-domain.invalid", "hello?")
    await wait_for(lambda: alice.log.count("message:failed") == 1)
    record = alice.records[message_id]
    # The test servers have no s2s. Prosody 0.12 answers not-allowed ("Communication
    # with remote domains is not enabled"); with s2s on, remote-server-not-found.
    # ejabberd (s2s_access: none) answers forbidden ("Access denied by service
    # policy"). Either way the message fails with the server's condition and text.
    if server.kind == "prosody":
        assert record.reason.startswith(("cancel:not-allowed", "cancel:remote-server-not-found"))
        assert "remote domains" in record.reason or "remote-server" in record.reason
    else:
        assert record.reason == "auth:forbidden (Access denied by service policy)"
    assert not record.retryable
    names = alice.log.names_for(message_id)
    assert names[0] == "message:sent" and names[-1] == "message:failed"


async def test_sent_carbon_from_our_other_resource_is_tracked_via_carbon(
    server: LocalXMPPServer, clients: Any
) -> None:
    first = await clients("alice", server.address, plugins=("xep_0280",))
    second = await clients("alice", server.address, tracked=False, plugins=("xep_0280",))
    await first.xmpp.plugin["xep_0280"].enable()
    await second.xmpp.plugin["xep_0280"].enable()
    message_id = second.send("bob@localhost", "from my phone")

    await wait_for(lambda: message_id in first.records)
    record = first.records[message_id]
    assert record.via_carbon is True
    assert record.state is DeliveryState.ACKED
    assert first.log.names_for(message_id) == ["message:sent", "message:acked"]
    assert record.body == "from my phone"


async def test_receipts_from_bob_move_messages_to_delivered(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    bob = await clients("bob", server.address, tracked=False, plugins=("xep_0184",))
    bob.xmpp.plugin["xep_0184"].auto_ack = True
    alice = await clients("alice", proxy.address, request_receipts=True)
    ids = [alice.send(str(bob.xmpp.boundjid), f"please confirm {i}") for i in range(5)]

    await wait_for(lambda: alice.log.count("message:delivered") == 5)
    assert sorted(alice.log.ids("message:delivered")) == sorted(ids)
    for message_id in ids:
        names = alice.log.names_for(message_id)
        assert names.index("message:delivered") > names.index("message:sent")
        assert alice.records[message_id].state is DeliveryState.DELIVERED
    stored = await alice.tracker.get(ids[0])
    assert stored.state is DeliveryState.DELIVERED


async def test_cut_before_the_reflection_still_ends_room_received_once(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    room = room_jid(server)
    alice = await clients(
        "alice", proxy.address, ack_every=10**6, ack_delay=3600.0, ack_at_burst_end=False
    )
    bob = await clients("bob", server.address, tracked=False)
    await alice.join(room, "Alice")
    await bob.join(room, "Bob")
    proxy.drop_after(0, "downstream")  # the first byte back (reflection or ack) cuts
    message_id = alice.send(room, "through the cut", "groupchat")
    await wait_for(lambda: alice.log.count("message:hibernated") == 1)
    proxy.heal()

    await wait_for(lambda: "through the cut" in bob.received.counts)
    await wait_for(lambda: alice.log.count("message:room_received") == 1, timeout=15)
    await asyncio.sleep(0.3)
    names = alice.log.names_for(message_id)
    assert names.count("message:room_received") == 1
    assert "message:failed" not in names
    assert alice.records[message_id].state is DeliveryState.ROOM_RECEIVED
    assert bob.received.counts["through the cut"] == 1


async def test_leaving_a_room_fails_what_it_has_not_reflected(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    room = room_jid(server)
    alice = await clients("alice", proxy.address)
    await alice.join(room, "Alice")
    proxy.stall()
    message_id = alice.send(room, "said while leaving", "groupchat")
    alice.xmpp.plugin["xep_0045"].leave_muc(slixmpp.JID(room), "Alice")
    proxy.heal()
    await wait_for(
        lambda: alice.log.count("message:room_received") + alice.log.count("message:failed") == 1
    )
    record = alice.records[message_id]
    # Prosody reflects before it processes our unavailable presence: either way it settles.
    assert record.state in (DeliveryState.ROOM_RECEIVED, DeliveryState.FAILED)
    if record.state is DeliveryState.FAILED:
        assert record.reason == "left-room"


async def test_being_kicked_fails_messages_the_room_never_reflected(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    room = room_jid(server)
    bob = await clients("bob", server.address, tracked=False)
    await bob.join(room, "Bob")  # bob creates the room: he owns it
    alice = await clients("alice", proxy.address)
    await alice.join(room, "Alice")
    proxy.stall()  # alice's message waits on the wire while bob kicks her
    message_id = alice.send(room, "too late", "groupchat")
    await bob.xmpp.plugin["xep_0045"].set_role(slixmpp.JID(room), "Alice", "none")
    proxy.heal()

    await wait_for(lambda: alice.log.count("message:failed") == 1)
    record = alice.records[message_id]
    # Either the kick (307) arrives first, or the room bounces the message of a non-occupant.
    assert record.reason == "removed-from-room" or record.reason.startswith(
        ("cancel:", "modify:", "auth:")
    ), record.reason
    await asyncio.sleep(0.3)  # the room's bounce, if it comes after the kick, adds nothing
    assert alice.log.count("message:failed") == 1
    assert not record.retryable
    assert alice.log.count("message:room_received") == 0


async def test_should_track_predicate_and_no_store_hint_opt_out(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    def only_important(message: Any) -> bool:
        return str(message["body"]).startswith("!")

    alice = await clients("alice", proxy.address, should_track=only_important)
    kept = alice.send("bob@localhost", "! tracked")
    skipped = alice.send("bob@localhost", "chit-chat")
    await wait_for(lambda: alice.log.count("message:acked") == 1)
    await asyncio.sleep(0.2)
    assert alice.log.ids("message:sent") == [kept]
    assert await alice.tracker.get(skipped) is None


async def test_a_restarted_process_that_resumes_still_knows_its_rooms(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any, tmp_path: Path
) -> None:
    # The room never sees a resumed session leave, so it sends no new self-presence:
    # the nick has to come from the saved SM state, or reflections go unrecognised
    # and the room's messages stay ACKED forever.
    room, bob = await room_with_bob(server, clients)
    db = tmp_path / "alice.sqlite"

    async def start_alice(resource: str) -> tuple[Party, SQLiteStore]:
        xmpp = make_client(f"alice@localhost/{resource}", "pass", tracker_config=FAST)
        xmpp.register_plugin("xep_0045")
        party = Party(xmpp)
        store = SQLiteStore(db)
        await party.tracker.attach(store)
        party.tracker.sm.load(await store.load_sm_state())
        party.tracker.sm.cache(store.save_sm_state)
        xmpp.connect(*proxy.address)
        await wait_for(lambda: party.tracker.managed, timeout=15)
        return party, store

    first, first_store = await start_alice("first")
    try:
        await first.join(room, "Alice")
        proxy.blackhole()
        in_flight = first.send(room, "in flight at the crash", "groupchat")
        await wait_for(lambda: first.on_wire([in_flight]))
        await first.tracker.flush()
        # The process dies: its connection goes, nothing more is written.
        first.tracker.auto_reconnect = False
        proxy.cut()
        await wait_for(lambda: first.log.count("message:hibernated") == 1)
        await first.tracker.flush()
    finally:
        await first_store.aclose()
    proxy.heal()

    second, second_store = await start_alice("second")
    try:
        assert second.xmpp.boundjid.resource == "first"  # the same stream, resumed
        after = second.send(room, "after the restart", "groupchat")
        await wait_for(lambda: second.log.count("message:room_received") == 2, timeout=15)
        assert second.log.ids("message:room_received") == [in_flight, after]
        assert "message:failed" not in second.log.names_for(in_flight)
        await wait_for(lambda: "after the restart" in bob.received.counts)
        assert bob.received.counts["in flight at the crash"] == 1
        assert bob.received.counts["after the restart"] == 1
    finally:
        second.tracker.auto_reconnect = False
        second.xmpp.disconnect(wait=0.5)
        await asyncio.sleep(0.2)
        await second_store.aclose()
        first.xmpp.abort()


async def end_the_session_offline(alice: Party, proxy: FaultProxy) -> None:
    """Drop alice's link and keep the server out of reach until her session has ended."""
    ended = asyncio.Event()
    alice.xmpp.add_event_handler("session_end", lambda _: ended.set(), disposable=True)
    proxy.refuse()
    proxy.cut()
    await asyncio.wait_for(ended.wait(), 10)


def rejoin_late(alice: Party, room: str, send_first: str | None = None) -> list[str]:
    """What an app does on its next session: join ``room`` again, here 0.5 s late, maybe
    sending ``send_first`` to it before; the returned list gets that message's id."""
    sent: list[str] = []

    async def on_start(_event: Any) -> None:
        if send_first is not None:
            sent.append(alice.send(room, send_first, "groupchat"))
        await asyncio.sleep(0.5)
        await alice.join(room, "Alice")

    alice.xmpp.add_event_handler("session_start", on_start, disposable=True)
    return sent


async def test_room_messages_wait_for_the_rejoin_after_a_fresh_session(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    # A fresh session is in no room: a message the app (or slixmpp's queue) sends to
    # the room before the app has joined it again would bounce (not-acceptable).
    room, bob = await room_with_bob(server, clients)
    alice = await clients("alice", proxy.address, allow_resume=False)
    await alice.join(room, "Alice")
    await end_the_session_offline(alice, proxy)
    offline = alice.send(room, "sent while offline", "groupchat")
    early = rejoin_late(alice, room, send_first="sent before the rejoin")
    proxy.heal()

    await wait_for(lambda: alice.log.count("message:room_received") == 2, timeout=15)
    assert alice.log.ids("message:room_received") == [offline, *early]
    assert alice.log.count("message:failed") == 0
    await wait_for(lambda: "sent before the rejoin" in bob.received.counts)
    assert bob.received.counts["sent while offline"] == 1
    assert bob.received.counts["sent before the rejoin"] == 1


async def test_a_join_lost_with_its_session_holds_room_messages_until_it_is_redone(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    room, bob = await room_with_bob(server, clients)
    alice = await clients("alice", proxy.address, allow_resume=False)
    proxy.blackhole()
    alice.xmpp.plugin["xep_0045"].join_muc(slixmpp.JID(room), "Alice")  # never arrives
    await asyncio.sleep(0.2)
    await end_the_session_offline(alice, proxy)
    offline = alice.send(room, "sent after a lost join", "groupchat")
    rejoin_late(alice, room)
    proxy.heal()

    await wait_for(lambda: alice.log.count("message:room_received") == 1, timeout=15)
    assert alice.log.ids("message:room_received") == [offline]
    assert alice.log.count("message:failed") == 0
    await wait_for(lambda: "sent after a lost join" in bob.received.counts)
    assert bob.received.counts["sent after a lost join"] == 1


async def test_room_messages_go_out_anyway_when_the_app_does_not_rejoin(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    room = room_jid(server)
    alice = await clients("alice", proxy.address, allow_resume=False, room_rejoin_wait=0.5)
    await alice.join(room, "Alice")
    await end_the_session_offline(alice, proxy)
    message_id = alice.send(room, "to a room left behind", "groupchat")
    proxy.heal()

    await wait_for(lambda: alice.log.count("message:failed") == 1, timeout=15)
    failed = alice.records[message_id]
    # The room is gone (item-not-found) or refuses non-occupants (not-acceptable);
    # ejabberd adds a text to the condition ("Conference room does not exist").
    condition = failed.reason.split(" ", 1)[0]
    assert condition in ("cancel:item-not-found", "cancel:not-acceptable")
    assert alice.tracker.core.rejoining == {}


async def test_a_server_restart_holds_room_messages_until_the_app_is_back(
    fresh_server: LocalXMPPServer, clients: Any
) -> None:
    # Prosody stops: the session and the room are gone. The app joins again once the
    # server is back; what it sends before must wait (the room does not exist yet).
    room = room_jid(fresh_server)
    alice = await clients("alice", fresh_server.address)
    await alice.join(room, "Alice")
    ended = asyncio.Event()
    alice.xmpp.add_event_handler("session_end", lambda _: ended.set())
    early = rejoin_late(alice, room, send_first="sent before the rejoin")
    await fresh_server.stop()
    offline = alice.send(room, "sent while the server was down", "groupchat")
    await fresh_server.start()
    await asyncio.wait_for(ended.wait(), 20)

    await wait_for(lambda: alice.log.count("message:room_received") == 2, timeout=20)
    assert alice.log.ids("message:room_received") == [offline, *early]
    assert alice.log.count("message:failed") == 0


@pytest.mark.parametrize("code", ["332", "333"])
async def test_removed_by_a_shutdown_or_a_technical_error_the_app_is_expected_back(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any, code: str
) -> None:
    # 332 (the service shuts down) and 333 (removed for a technical reason) end our
    # occupancy before the session ends; unlike a kick, the app will join again.
    room, bob = await room_with_bob(server, clients)
    alice = await clients("alice", proxy.address, allow_resume=False)
    await alice.join(room, "Alice")
    removed = (
        f"<presence from='{room}/Alice' to='{alice.xmpp.boundjid.full}' type='unavailable'>"
        "<x xmlns='http://jabber.org/protocol/muc#user'>"
        f"<item affiliation='none' role='none'/><status code='{code}'/><status code='110'/>"
        "</x></presence>"
        # Prosody follows a 333 with an error presence (the bounce that caused it): it
        # is not the answer to a join and must not cancel the wait.
        f"<presence from='{room}/Alice' to='{alice.xmpp.boundjid.full}' type='error'>"
        "<error type='cancel'><recipient-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
        "</error></presence>"
    )
    assert proxy.inject(removed.encode()) == 1
    await wait_for(lambda: alice.tracker.core.nick_in(room) is None)
    await end_the_session_offline(alice, proxy)
    offline = alice.send(room, f"after a {code}", "groupchat")
    rejoin_late(alice, room)
    proxy.heal()

    await wait_for(lambda: alice.log.count("message:room_received") == 1, timeout=15)
    assert alice.log.ids("message:room_received") == [offline]
    assert alice.log.count("message:failed") == 0
    await wait_for(lambda: f"after a {code}" in bob.received.counts)
    assert bob.received.counts[f"after a {code}"] == 1


async def alice_in_the_room_deaf_to_it(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> tuple[str, Party, Party]:
    """(room, bob, alice): alice is in the room with bob, never asks for acks, and the
    room's reflections never reach her, so the room may have what she cannot confirm."""
    room, bob = await room_with_bob(server, clients)
    alice = await clients(
        "alice", proxy.address, ack_every=10**6, ack_delay=3600.0, ack_at_burst_end=False
    )
    await alice.join(room, "Alice")
    proxy.rewrite(rb"<message [^>]*type=['\"]groupchat['\"][^>]*>.*?</message>", b"")
    return room, bob, alice


async def refuse_the_resumption(alice: Party, proxy: FaultProxy) -> None:
    """The link drops and the resumption is refused without an h; a fresh session follows."""
    proxy.heal()  # drops the rewrite too
    # <resume previd> for a stream the server never had: refused without an h.
    proxy.rewrite(rb'previd="[^"]*"', b'previd="not-a-stream-the-server-knows"', upstream=True)
    proxy.cut()
    await wait_for(lambda: alice.log.count("message:failed") >= 1, timeout=15)
    await wait_for(lambda: alice.tracker.session_live, timeout=15)


async def test_a_failed_room_message_the_history_shows_is_room_received_and_not_resent(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    # Conversations #1245: the room has the message but its reflection never reached
    # us and the resumption was refused, so it failed. The room's history on the next
    # join shows it (same origin-id): it is there, and resending would duplicate it.
    room, bob, alice = await alice_in_the_room_deaf_to_it(server, proxy, clients)
    message_id = alice.send(room, "the room has it, alice does not know", "groupchat")
    await wait_for(lambda: "the room has it, alice does not know" in bob.received.bodies)
    await refuse_the_resumption(alice, proxy)
    assert alice.records[message_id].state is DeliveryState.FAILED

    await alice.xmpp.plugin["xep_0045"].join_muc_wait(slixmpp.JID(room), "Alice")  # + history

    await wait_for(lambda: alice.records[message_id].state is DeliveryState.ROOM_RECEIVED)
    assert await alice.tracker.resend_failed() == []
    await asyncio.sleep(0.5)
    assert bob.received.bodies.count("the room has it, alice does not know") == 1


async def test_resending_a_failed_room_message_asks_the_room_archive_first(
    server: LocalXMPPServer, proxy: FaultProxy, clients: Any
) -> None:
    # The same loss as above, but the app rejoins without history: the room's own
    # archive (XEP-0313 on the room) shows the message, so resend_failed() does not
    # send it into the room a second time.
    room, bob, alice = await alice_in_the_room_deaf_to_it(server, proxy, clients)
    kept = alice.send(room, "archived by the room", "groupchat")
    await wait_for(lambda: "archived by the room" in bob.received.bodies)
    proxy.blackhole()  # this one never reaches the room
    lost = alice.send(room, "lost on the way", "groupchat")
    await wait_for(lambda: alice.on_wire([lost]))
    await refuse_the_resumption(alice, proxy)
    await wait_for(lambda: alice.log.count("message:failed") == 2)
    await alice.join(room, "Alice")  # no history

    results = {r.id: r for r in await alice.tracker.resend_failed()}

    assert results[kept].state is DeliveryState.ROOM_RECEIVED
    assert results[lost].state is DeliveryState.RESENT
    await wait_for(lambda: alice.records[lost].state is DeliveryState.ROOM_RECEIVED)
    await asyncio.sleep(0.5)
    assert bob.received.bodies.count("archived by the room") == 1
    assert bob.received.bodies.count("lost on the way") == 1

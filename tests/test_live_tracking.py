"""Issue #3 scenarios against a real Prosody, with faults through a real TCP proxy."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
import slixmpp

from xmpp_sm_tracker import DeliveryState
from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import ClientPool, Party, connect_client, wait_for
from xmpp_sm_tracker.testing.pytest_plugin import ServerFactory

from .helpers.wire import RESUMED_JOURNEY, Inbound

MESSAGE_EVENTS = [
    "message:sent",
    "message:acked",
    "message:hibernated",
    "message:resent",
    "message:failed",
]
STANZA_EVENTS = ["stanza:acked", "stanza:hibernated", "stanza:resent", "stanza:failed"]
FAST = {"reconnect_delay": 0.1, "reconnect_max_delay": 1.0, "ack_delay": 0.05}
#: Never ask for acks: what the server has is only learnt from <resumed h> / <failed h>.
SILENT = {**FAST, "ack_every": 100_000, "ack_delay": 3600.0, "ack_at_burst_end": False}

ClientFactory = ClientPool


async def test_hundred_messages_each_sent_then_acked_once_in_order(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", (proxy.host, proxy.port), **FAST)
    ids = [alice.send("bob@localhost", f"hello {i}") for i in range(100)]

    await wait_for(lambda: alice.log.count("message:acked") == 100)
    await wait_for(lambda: len(bob.received.bodies) == 100)

    assert alice.log.ids("message:sent") == ids
    assert alice.log.ids("message:acked") == ids
    for message_id in ids:
        assert alice.log.names_for(message_id) == ["message:sent", "message:acked"]
    assert bob.received.bodies == [f"hello {i}" for i in range(100)]
    record = await alice.tracker.get(ids[-1])
    assert record.state is DeliveryState.ACKED
    assert record.origin_id == ids[-1]
    assert record.seq is not None
    assert await alice.tracker.pending() == []


async def test_cut_link_hibernates_then_resume_resends_each_once(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", (proxy.host, proxy.port), **SILENT)
    proxy.stall()  # the server never sees these before the cut
    ids = [alice.send("bob@localhost", f"cut {i}") for i in range(20)]
    await wait_for(lambda: alice.on_wire(ids))
    proxy.cut()
    proxy.heal()

    await wait_for(lambda: alice.log.count("message:hibernated") == 20)
    await wait_for(lambda: alice.log.count("message:acked") == 20, timeout=15)
    await wait_for(lambda: len(bob.received.bodies) >= 20)  # more: the diff below says
    await asyncio.sleep(0.2)

    assert alice.log.ids("message:hibernated") == ids
    assert alice.log.ids("message:resent") == ids
    for message_id in ids:
        assert alice.log.names_for(message_id) == RESUMED_JOURNEY
    assert bob.received.bodies == [f"cut {i}" for i in range(20)]
    assert all(count == 1 for count in bob.received.counts.values())
    assert proxy.connections >= 2


async def _send_half_then_blackhole(alice: Party, bob: Party, proxy: FaultProxy) -> list[str]:
    """10 messages reach the server (bob has them) unacked, 10 vanish in a blackhole."""
    delivered = [alice.send("bob@localhost", f"kept {i}") for i in range(10)]
    await wait_for(lambda: len(bob.received.bodies) == 10)
    proxy.blackhole()
    lost = [alice.send("bob@localhost", f"lost {i}") for i in range(10)]
    await wait_for(lambda: alice.on_wire(delivered + lost))
    assert alice.log.count("message:acked") == 0
    return delivered + lost


async def test_resumption_after_server_restart_acks_what_failed_h_covers(
    fresh_server: LocalXMPPServer, clients: ClientFactory
) -> None:
    async with FaultProxy(fresh_server.host, fresh_server.c2s_port) as proxy:
        bob = await clients("bob", fresh_server.address, tracked=False)
        alice = await clients("alice", (proxy.host, proxy.port), **SILENT)
        wire = Inbound(alice.xmpp)
        ids = await _send_half_then_blackhole(alice, bob, proxy)
        proxy.heal()
        await fresh_server.restart()
        proxy.cut()

        await wait_for(
            lambda: alice.log.count("message:failed") + alice.log.count("message:acked") == 20,
            timeout=20,
        )
        acked, failed = alice.log.ids("message:acked"), alice.log.ids("message:failed")
        [refusal] = wire.find(r"<failed [^>]*>")
        if fresh_server.kind == "prosody":
            # Prosody 0.12 remembers h for sessions it no longer has: <failed h='12'>
            # (the 10 messages and what alice sent before them, her presence and all).
            assert re.search(r" h='\d+'", refusal)
            assert acked == ids[:10]
            assert failed == ids[10:]
        else:
            # ejabberd forgets a session's h with the restart: <failed> with an
            # <item-not-found/> and no h. Nothing is confirmed, so all 20 fail, the
            # 10 bob has too ("failed" means not confirmed: a resend carries the same
            # origin-id for bob to drop, and the archive check finds them first).
            assert " h=" not in refusal
            assert "<item-not-found" in wire.text
            assert acked == []
            assert failed == ids
        assert bob.received.bodies == [f"kept {i}" for i in range(10)]
        stored = await alice.tracker.failed()
        assert [r.id for r in stored] == failed
        assert {r.reason for r in stored} == {"resume-failed"}
        assert all(r.state is DeliveryState.FAILED for r in stored)
        # The client went on with a fresh session.
        await wait_for(lambda: alice.tracker.managed, timeout=10)
        assert await alice.tracker.pending() == []


async def test_resumption_after_hibernation_expiry_fails_the_rest(
    clients: ClientFactory, xmpp_server_factory: ServerFactory
) -> None:
    server = await xmpp_server_factory(hibernation_time=1)
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        bob = await clients("bob", server.address, tracked=False)
        alice = await clients(
            "alice",
            (proxy.host, proxy.port),
            **{**SILENT, "reconnect_delay": 3.0, "reconnect_max_delay": 3.0},
        )
        wire = Inbound(alice.xmpp)
        ids = await _send_half_then_blackhole(alice, bob, proxy)
        proxy.cut()
        proxy.heal()
        await wait_for(lambda: alice.log.count("message:hibernated") == 20)
        await wait_for(
            lambda: (
                len(alice.log.ids("message:failed")) + len(alice.log.ids("message:acked")) == 20
            ),
            timeout=20,
        )
        # Both servers remember h for a session that expired: <failed h='…'>.
        [refusal] = wire.find(r"<failed [^>]*>")
        assert re.search(r" h='\d+'", refusal)
        assert alice.log.ids("message:acked") == ids[:10]
        assert alice.log.ids("message:failed") == ids[10:]
        assert [r.id for r in await alice.tracker.failed()] == ids[10:]


async def test_clean_disconnect_on_a_stalled_link_fails_unacked_as_session_ended(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    alice = await clients("alice", (proxy.host, proxy.port), **SILENT)
    proxy.stall()
    ids = [alice.send("bob@localhost", f"bye {i}") for i in range(5)]
    await wait_for(lambda: alice.on_wire(ids))
    await alice.xmpp.disconnect(wait=0.5)

    await wait_for(lambda: alice.log.count("message:failed") == 5)
    assert alice.log.ids("message:failed") == ids
    failed = await alice.tracker.failed()
    assert [r.id for r in failed] == ids
    assert {r.reason for r in failed} == {"session-ended"}
    assert alice.tracker.core.session.sm_id is None  # the next connect() will not resume
    assert await alice.tracker.pending() == []


async def test_clean_disconnect_on_a_healthy_link_gets_everything_acked_first(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    alice = await clients("alice", (proxy.host, proxy.port), **SILENT)
    written: list[str] = []
    write = alice.xmpp.send_raw
    alice.xmpp.send_raw = lambda data: (written.append(str(data)), write(data))[1]
    ids = [alice.send("bob@localhost", f"last words {i}") for i in range(5)]
    await wait_for(lambda: alice.on_wire(ids))
    await alice.xmpp.disconnect(wait=2)
    # XEP-0198 §4: our last <a/> goes right before the stream's end, so what came in
    # while slixmpp drained its queue is acknowledged too (not redelivered later).
    assert written[-1] == alice.xmpp.stream_footer
    # Messages go out as slixmpp writes stanzas: the stream's namespace is not repeated.
    messages = [data for data in written if data.startswith("<message")]
    assert len(messages) == 5
    assert all(data.startswith('<message type="chat"') for data in messages)
    assert re.fullmatch(r"<a xmlns='urn:xmpp:sm:3' h='\d+'/>", written[-2])

    await wait_for(lambda: alice.log.count("message:acked") == 5)
    assert alice.log.ids("message:acked") == ids
    assert alice.log.count("message:failed") == 0


async def take_the_link_down(alice: Party, proxy: FaultProxy) -> None:
    """Cut alice's link and keep refusing her reconnects until ``proxy.refuse(False)``."""
    proxy.refuse(True)
    proxy.cut()
    await wait_for(lambda: alice.xmpp.transport is None)


async def test_messages_sent_while_link_down_hibernate_then_resend_after_resume(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", (proxy.host, proxy.port), **FAST)
    await take_the_link_down(alice, proxy)
    ids = [alice.send("bob@localhost", f"offline {i}") for i in range(5)]
    for message_id in ids:
        assert alice.log.names_for(message_id) == ["message:sent", "message:hibernated"]
    proxy.refuse(False)

    await wait_for(lambda: alice.log.count("message:acked") == 5, timeout=15)
    await wait_for(lambda: len(bob.received.bodies) == 5)
    for message_id in ids:
        assert alice.log.names_for(message_id) == RESUMED_JOURNEY
    assert bob.received.bodies == [f"offline {i}" for i in range(5)]


async def test_bodyless_stanzas_are_not_tracked_but_get_stanza_events(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    alice = await clients("alice", (proxy.host, proxy.port), **FAST)
    before = alice.log.count("stanza:acked")
    state = alice.xmpp.make_message(mto="bob@localhost", mtype="chat")
    state.append(slixmpp.xmlstream.ET.Element("{http://jabber.org/protocol/chatstates}composing"))
    state.send()
    receipt = alice.xmpp.make_message(mto="bob@localhost/x", mtype="chat")
    receipt.append(slixmpp.xmlstream.ET.Element("{urn:xmpp:receipts}received", {"id": "some-id"}))
    receipt.send()
    hint = alice.xmpp.make_message(mto="bob@localhost", mbody="do not track", mtype="chat")
    hint.append(slixmpp.xmlstream.ET.Element("{urn:xmpp:hints}no-store"))
    hint.send()

    await wait_for(lambda: alice.log.count("stanza:acked") >= before + 3)
    assert alice.log.count("message:sent") == 0
    assert alice.log.count("message:acked") == 0
    assert await alice.tracker.get(state["id"]) is None
    acked_stanzas = [p for n, p in alice.log.entries if n == "stanza:acked"]
    assert any(getattr(s, "get", lambda *_: None)("id") == hint["id"] for s in acked_stanzas)


async def test_ack_timeout_detects_blackhole_and_recovers_without_loss(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients(
        "alice", (proxy.host, proxy.port), **FAST, ack_timeout=1.0, negotiation_timeout=2.0
    )
    proxy.blackhole()
    ids = [alice.send("bob@localhost", f"void {i}") for i in range(10)]

    await wait_for(lambda: alice.log.count("message:hibernated") == 10, timeout=10)
    proxy.heal()
    await wait_for(lambda: alice.log.count("message:acked") == 10, timeout=20)
    await wait_for(lambda: len(bob.received.bodies) == 10)
    assert alice.log.ids("message:acked") == ids
    assert sorted(bob.received.bodies) == sorted(f"void {i}" for i in range(10))
    assert all(count == 1 for count in bob.received.counts.values())


async def test_pyee_emitter_sees_the_same_sequence_as_the_slixmpp_bus(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    alice = await clients("alice", (proxy.host, proxy.port), **FAST)
    pyee_seen: list[tuple[str, Any]] = []
    for name in MESSAGE_EVENTS + STANZA_EVENTS:
        alice.tracker.events.on(
            name, lambda payload, n=name: pyee_seen.append((n, getattr(payload, "id", payload)))
        )
    start = len(alice.log.entries)
    for i in range(5):
        alice.send("bob@localhost", f"twice {i}")
    proxy.cut()
    await wait_for(lambda: alice.log.count("message:acked") == 5, timeout=15)
    assert alice.log.entries[start:] == pyee_seen
    assert len(pyee_seen) >= 10


@pytest.mark.parametrize("where", ["slixmpp", "pyee"])
async def test_a_raising_event_handler_breaks_nothing(
    where: str,
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = await clients("alice", (proxy.host, proxy.port), **FAST)

    def explode(_payload: Any) -> None:
        raise RuntimeError("user bug")

    if where == "slixmpp":
        alice.xmpp.add_event_handler("message:sent", explode)
    else:
        alice.tracker.events.on("message:sent", explode)
    ids = [alice.send("bob@localhost", f"robust {i}") for i in range(3)]
    await wait_for(lambda: alice.log.count("message:acked") == 3)
    assert alice.log.ids("message:acked") == ids
    assert "user bug" in caplog.text


async def test_sm_cache_coalesces_a_burst_and_reports_the_end_with_none(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    alice = await clients("alice", (proxy.host, proxy.port), **FAST)
    states: list[Any] = []
    alice.tracker.sm.cache(states.append)
    await alice.tracker.flush()
    assert states and states[-1]["stream_id"] == alice.tracker.core.session.sm_id
    calls_before = alice.tracker.sm.calls
    ids = [alice.send("bob@localhost", f"burst {i}") for i in range(1000)]
    await wait_for(lambda: alice.log.count("message:acked") == 1000, timeout=20)
    await alice.tracker.flush()
    calls = alice.tracker.sm.calls - calls_before
    assert calls < 200, f"{calls} sm.cache calls for 1000 stanzas"
    final = states[-1]
    assert final["unacked"] == [] and final["seq"] == final["last_ack"]
    assert final["jid"] == alice.xmpp.boundjid.full
    assert len(ids) == 1000

    await alice.xmpp.disconnect(wait=1)
    await alice.tracker.flush()
    assert states[-1] is None


async def test_messages_failed_while_queued_never_go_out_unless_resent(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", (proxy.host, proxy.port), **FAST)
    await take_the_link_down(alice, proxy)
    ids = [alice.send("bob@localhost", f"queued {i}") for i in range(3)]
    await alice.xmpp.disconnect()  # the user gives up: the session ends here
    assert alice.log.ids("message:failed") == ids
    proxy.refuse(False)

    await connect_client(alice.xmpp, (proxy.host, proxy.port))
    await alice.tracker.resend(ids[1])
    await wait_for(lambda: alice.log.count("message:acked") == 1)
    await wait_for(lambda: len(bob.received.bodies) == 1)
    await asyncio.sleep(0.3)  # room for a stray copy to arrive, which must not
    assert bob.received.bodies == ["queued 1"]
    assert [r.id for r in await alice.tracker.failed()] == [ids[0], ids[2]]


@pytest.mark.parametrize("rewriting_filter", [False, True])
async def test_saved_state_holds_the_stanza_as_it_went_on_the_wire(
    rewriting_filter: bool, server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    plugins = ("xep_0184",) if rewriting_filter else ()
    alice = await clients("alice", proxy.address, plugins=plugins, **SILENT)
    if rewriting_filter:
        alice.xmpp.plugin["xep_0184"].auto_request = True  # an 'out' filter adds <request/>
    states: list[Any] = []
    alice.tracker.sm.cache(states.append)
    proxy.stall()
    message_id = alice.send("bob@localhost", "as written")
    await wait_for(lambda: alice.on_wire([message_id]))
    await alice.tracker.flush()
    [saved] = [u for u in states[-1]["unacked"] if u["id"] == message_id]
    assert ("urn:xmpp:receipts" in saved["xml"]) is rewriting_filter
    assert "as written" in saved["xml"]
    proxy.heal()


async def test_a_second_stanza_reusing_a_tracked_id_goes_out_with_its_own_text(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    # A tracked message goes out as its record's text (serialized once); a different
    # stanza with the same id must never be written as that text.
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, **FAST)
    first = alice.xmpp.make_message(mto="bob@localhost", mbody="first text", mtype="chat")
    second = alice.xmpp.make_message(mto="bob@localhost", mbody="second text", mtype="chat")
    second["id"] = first["id"]
    first.send()
    second.send()
    await wait_for(lambda: len(bob.received.bodies) == 2)
    assert bob.received.bodies == ["first text", "second text"]
    await wait_for(lambda: alice.log.count("message:acked") == 1)
    assert alice.log.ids("message:sent") == [first["id"]]


async def test_a_filter_added_later_still_sees_and_changes_what_goes_out(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    # Whether other filters may rewrite messages is cached; adding one must reset that,
    # or later messages would go out as their record's text, without the filter's change.
    bob = await clients("bob", server.address, tracked=False)
    seen: list[str] = []
    bob.xmpp.add_event_handler(
        "message", lambda msg: seen.append(msg["thread"] or "-") if msg["body"] else None
    )
    alice = await clients("alice", proxy.address, **FAST)
    alice.send("bob@localhost", "before")
    await wait_for(lambda: seen == ["-"])

    def add_thread(stanza: Any) -> Any:
        if isinstance(stanza, slixmpp.Message) and stanza["body"]:
            stanza["thread"] = "from-filter"
        return stanza

    alice.xmpp.add_filter("out", add_thread)
    alice.send("bob@localhost", "with the filter")
    await wait_for(lambda: len(seen) == 2)
    alice.xmpp.del_filter("out", add_thread)
    alice.send("bob@localhost", "after")
    await wait_for(lambda: len(seen) == 3)
    assert seen == ["-", "from-filter", "-"]
    await wait_for(lambda: alice.log.count("message:acked") == 3)


async def test_an_ack_request_follows_the_stanza_that_fills_the_window_not_the_burst(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    # slixmpp writes its <r/> before the stanza that completes the window; queued behind
    # the send queue it would wait for the whole burst. Ours goes right after the stanza.
    alice = await clients("alice", proxy.address, ack_every=3, ack_delay=3600.0)
    writes: list[str] = []
    send_raw = alice.xmpp.send_raw

    def logged(data: str | bytes) -> None:
        writes.append(data if isinstance(data, str) else data.decode())
        send_raw(data)

    alice.xmpp.send_raw = logged  # type: ignore[method-assign]
    ids = [alice.send("bob@localhost", f"window {i}") for i in range(7)]
    await wait_for(lambda: alice.log.count("message:acked") >= 4)
    sent = [w for w in writes if "<message" in w or "<r " in w]
    messages = [i for i, w in enumerate(sent) if "<message" in w]
    requests = [i for i, w in enumerate(sent) if "<r " in w]
    assert len(messages) == 7 and len(requests) >= 2
    assert set(requests) <= set(messages)  # every <r/> shares the write of a message...
    for i in requests:
        assert sent[i].index("<message") < sent[i].index("<r ")  # ...and comes after it
    assert requests[0] < messages[-1]  # the first one did not wait for the whole burst
    assert alice.log.ids("message:acked") == ids[: alice.log.count("message:acked")]


async def test_the_text_is_made_when_written_and_every_later_snapshot_carries_it(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    # On a live session a message is serialized once, when written: its message:sent
    # snapshot has no text yet; get(), pending(), the store and every later event do.
    alice = await clients("alice", proxy.address, **FAST)
    sent: list[Any] = []
    alice.xmpp.add_event_handler("message:sent", sent.append)
    proxy.stall()
    first = alice.send("bob@localhost", "text when written")
    assert [(r.id, r.xml) for r in sent] == [(first, "")]
    fetched = await alice.tracker.get(first)  # asked before it was written
    assert fetched is not None and "text when written" in fetched.xml
    [pending] = await alice.tracker.pending()
    assert pending.id == first and pending.xml == fetched.xml
    second = alice.send("bob@localhost", "written by the filter")
    await wait_for(lambda: alice.on_wire([first, second]))
    await alice.tracker.flush()
    stored = await alice.tracker.store.get(second)
    assert stored is not None and "written by the filter" in stored.xml
    assert stored.xml.startswith("<message") and f'id="{second}"' in stored.xml
    proxy.heal()
    await wait_for(lambda: alice.log.count("message:acked") == 2)
    assert alice.records[second].xml == stored.xml


async def test_a_message_the_link_drops_under_before_it_is_written_keeps_its_text(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    # Tracked on a live session, so serialized only when written; but the link is
    # lost first (connection_lost runs before the send queue): the hibernated
    # snapshot must carry the text all the same, and the message goes out once.
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, **FAST)
    hibernated: list[Any] = []
    alice.xmpp.add_event_handler("message:hibernated", hibernated.append)
    transport = alice.xmpp.transport
    assert transport is not None
    transport.abort()  # its connection_lost is scheduled before the send below
    message_id = alice.send("bob@localhost", "dropped before written")
    await wait_for(lambda: alice.log.count("message:acked") == 1)
    [snapshot] = [r for r in hibernated if r.id == message_id]
    assert snapshot.seq is None and "dropped before written" in snapshot.xml
    assert alice.log.names_for(message_id)[:2] == ["message:sent", "message:hibernated"]
    await wait_for(lambda: bob.received.bodies == ["dropped before written"])
    await asyncio.sleep(0.2)
    assert bob.received.counts["dropped before written"] == 1


async def test_unacked_messages_go_out_again_before_those_sent_while_the_link_was_down(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientFactory
) -> None:
    # The order slixmpp gets wrong (new0, new1, old0, old1): what the server never got
    # from the old connection is resent first, then what was written while down, once.
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", (proxy.host, proxy.port), **FAST)
    proxy.blackhole()
    old = [alice.send("bob@localhost", f"old {i}") for i in range(3)]
    await wait_for(lambda: alice.on_wire(old))
    await take_the_link_down(alice, proxy)
    new = [alice.send("bob@localhost", f"new {i}") for i in range(3)]
    proxy.heal()  # back, and the blackhole gone

    await wait_for(lambda: alice.log.count("message:acked") == 6, timeout=15)
    await wait_for(lambda: len(bob.received.bodies) == 6)
    await asyncio.sleep(0.3)
    assert bob.received.bodies == [f"old {i}" for i in range(3)] + [f"new {i}" for i in range(3)]
    assert alice.log.ids("message:acked") == old + new

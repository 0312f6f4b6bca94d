"""Ways a session can end or go on that slixmpp gets wrong, live through a FaultProxy.

Each was found by reading the plugin against XEP-0198 and the bug reports of other
libraries (docs/reliability.md): a stream error answering ``<resume/>`` (aioxmpp #382,
a reconnect loop), and ``xmpp.reconnect()`` (what an app calls on a network change
and what ``xep_0199`` calls on a ping timeout), which closes the stream gracefully
and so ends a session that could simply have been resumed. And one a server decides:
a stanza over its size limit ends the stream (Prosody and ejabberd end it differently).
"""

from __future__ import annotations

import asyncio
import re

import pytest

from xmpp_sm_tracker import DeliveryState, RetryPolicy
from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import ClientPool, wait_for

from .helpers.wire import RESUMED_JOURNEY, Inbound

FAST = {"reconnect_delay": 0.1, "reconnect_max_delay": 1.0, "ack_delay": 0.05}
STREAM_ERROR = (
    b"<stream:error><undefined-condition xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
    b"</stream:error></stream:stream>"
)


async def test_a_stream_error_answering_resume_ends_the_session_instead_of_looping(
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: ClientPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, **FAST)
    first_stream = alice.tracker.core.session.sm_id
    connections: list[object] = []
    alice.xmpp.add_event_handler("connected", connections.append)
    proxy.blackhole()
    ids = [alice.send("bob@localhost", f"into the hole {i}") for i in range(3)]
    await wait_for(lambda: alice.on_wire(ids))
    proxy.heal()
    proxy.rewrite(rb"<resumed [^>]*/>", STREAM_ERROR)  # every resumption is refused so
    proxy.cut()

    await wait_for(lambda: alice.log.count("message:failed") == 3, timeout=15)
    assert {alice.records[i].reason for i in ids} == {"resume-failed"}
    assert "stream error" in caplog.text
    # session_start fires before <enabled/> comes back: wait for the managed session
    await wait_for(lambda: alice.tracker.managed, timeout=10)
    session = alice.tracker.core.session
    assert session.sm_id not in (None, first_stream)  # a fresh stream, not a loop
    made = len(connections)
    await asyncio.sleep(1.5)
    assert len(connections) == made, "it kept reconnecting"
    assert [r.id for r in await alice.tracker.failed()] == ids
    later = alice.send("bob@localhost", "on the fresh stream")
    await wait_for(lambda: alice.log.names_for(later)[-1:] == ["message:acked"])
    await wait_for(lambda: "on the fresh stream" in bob.received.bodies)
    assert not any(body.startswith("into the hole") for body in bob.received.bodies)


async def test_reconnect_resumes_the_session_instead_of_ending_it(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientPool
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, **FAST)
    stream = alice.tracker.core.session.sm_id
    proxy.blackhole()
    ids = [alice.send("bob@localhost", f"before the switch {i}") for i in range(3)]
    await wait_for(lambda: alice.on_wire(ids))
    proxy.heal()

    alice.xmpp.reconnect(0.0)  # as xep_0199 does on a ping timeout

    await wait_for(lambda: alice.log.count("message:acked") == 3, timeout=15)
    for message_id in ids:
        assert alice.log.names_for(message_id) == RESUMED_JOURNEY
    assert alice.tracker.core.session.sm_id == stream
    await wait_for(lambda: len(bob.received.bodies) == 3)
    assert bob.received.bodies == [f"before the switch {i}" for i in range(3)]


async def test_reconnect_without_a_resumable_session_still_reconnects(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientPool
) -> None:
    alice = await clients("alice", proxy.address, allow_resume=False, **FAST)
    connections: list[object] = []
    alice.xmpp.add_event_handler("session_start", connections.append)

    alice.xmpp.reconnect(0.0)

    await wait_for(lambda: len(connections) == 1, timeout=15)
    later = alice.send("bob@localhost", "after a plain reconnect")
    await wait_for(lambda: alice.log.names_for(later)[-1:] == ["message:acked"])


async def test_a_link_that_dies_while_idle_is_found_without_sending_anything(
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: ClientPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients(
        "alice", proxy.address, ack_keepalive=0.5, ack_timeout=1.0, negotiation_timeout=2.0, **FAST
    )
    stream = alice.tracker.core.session.sm_id
    await asyncio.sleep(1.5)  # idle, healthy: the keepalive is answered
    assert "presumed dead" not in caplog.text and alice.tracker.session_live
    proxy.blackhole()  # the link dies silently: no FIN, no RST

    await wait_for(lambda: "presumed dead" in caplog.text, timeout=5)
    proxy.heal()
    await wait_for(lambda: alice.tracker.session_live, timeout=15)
    assert alice.tracker.core.session.sm_id == stream  # resumed, not started afresh
    message_id = alice.send("bob@localhost", "after the silent death")
    await wait_for(lambda: alice.log.names_for(message_id)[-1:] == ["message:acked"])
    await wait_for(lambda: "after the silent death" in bob.received.bodies)


async def test_an_oversized_stanza_ends_the_stream_and_what_came_before_is_not_lost(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientPool
) -> None:
    bob = await clients("bob", server.address, tracked=False)
    # alice never asks for an ack: only the server's last word can confirm anything.
    alice = await clients(
        "alice",
        proxy.address,
        **{**FAST, "ack_every": 10**6, "ack_delay": 3600.0, "ack_at_burst_end": False},
    )
    wire = Inbound(alice.xmpp)
    small = [alice.send("bob@localhost", f"before the big one {i}") for i in range(3)]
    await wait_for(lambda: len(bob.received.bodies) == 3)
    big = alice.send("bob@localhost", "x" * 300_000)  # over both servers' 256 KiB limit
    ids = [*small, big]
    settled = (DeliveryState.ACKED, DeliveryState.FAILED)
    await wait_for(lambda: all(alice.records[i].state in settled for i in ids), timeout=20)

    before_error, _, error = wire.text.partition("<stream:error>")
    assert "<policy-violation" in error
    # The server closed the stream on it: failed for good, never resent (issue 20).
    assert (alice.records[big].state, alice.records[big].reason) == (
        DeliveryState.FAILED,
        "stanza-too-big",
    )
    assert not alice.records[big].retryable
    if server.kind == "prosody":
        # Prosody acknowledges what it handled right before the stream error:
        # <a h='…'/><stream:error><policy-violation/>…: the three are acked.
        assert re.search(r"<a [^>]*h='\d+'[^>]*/>$", before_error)
        assert all(alice.records[i].state is DeliveryState.ACKED for i in small)
    else:
        # ejabberd sends the stream error without a last <a/>, and refuses the
        # resumption without h: the three bob has are failed, "not confirmed" ...
        assert "<a " not in before_error
        assert {alice.records[i].reason for i in small} == {"resume-failed"}
        # ... and the archive check before a resend finds them: acked, not sent twice.
        # (It asks the archive only on a live session: offline, it would resend blind.)
        await wait_for(lambda: alice.tracker.managed, timeout=15)
        for message_id in small:
            record = await alice.tracker.resend(message_id)
            assert (record.state, record.reason) == (DeliveryState.ACKED, "found-in-archive")
    await asyncio.sleep(0.3)
    assert bob.received.bodies == [f"before the big one {i}" for i in range(3)]


async def test_one_oversized_message_does_not_take_the_innocent_ones_down(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientPool
) -> None:
    # Issue 20, tried live: 3 messages, one of 400 KiB, 3 more, back to back, with a
    # retry policy. Was: the big one and the three after it failed alike (retryable)
    # and were resent in the old order on each fresh session, so the big one closed
    # the stream again before the others were read: three stream errors, and the
    # innocent three ended retries-exhausted, never delivered.
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients(
        "alice", proxy.address, retry_policy=RetryPolicy(delay=0.2, max_attempts=3), **FAST
    )
    wire = Inbound(alice.xmpp)
    before = [alice.send("bob@localhost", f"before {i}") for i in range(3)]
    big = alice.send("bob@localhost", "x" * 400 * 1024)
    after = [alice.send("bob@localhost", f"after {i}") for i in range(3)]
    await wait_for(
        lambda: all(alice.records[i].state is DeliveryState.ACKED for i in before + after),
        timeout=30,
    )
    await wait_for(lambda: len(bob.received.bodies) >= 6, timeout=10)
    await asyncio.sleep(0.5)  # a retry of the big one would show now
    record = alice.records[big]
    assert (record.state, record.reason) == (DeliveryState.FAILED, "stanza-too-big")
    assert wire.text.count("<stream:error>") == 1  # closed once, never again
    assert sorted(bob.received.bodies) == sorted(
        [f"before {i}" for i in range(3)] + [f"after {i}" for i in range(3)]
    )
    assert all(n == 1 for n in bob.received.counts.values())  # each once
    assert [r.id for r in await alice.tracker.resend_failed()] == []  # never resent
    with pytest.raises(ValueError, match="stanza-too-big"):
        await alice.tracker.resend(big)

"""Issue 20: believe only what can be proven (the stream's side).

Each test plays a server, a network or a peer that misbehaves in one way, through
the fault proxy or a real server, and checks that the tracker believes nothing it
could not prove and loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from xmpp_sm_tracker import DeliveryState
from xmpp_sm_tracker.core.reconnect import location_trusted
from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import ClientPool, Party, make_client, tracker_of, wait_for

FAST = {"reconnect_delay": 0.1, "reconnect_max_delay": 1.0, "ack_delay": 0.05}
SILENT = {**FAST, "ack_every": 10**6, "ack_delay": 3600.0, "ack_at_burst_end": False}


def record_sends(xmpp: Any) -> list[str]:
    """Everything the client writes from now on, as text."""
    sent: list[str] = []
    write = xmpp.send_raw

    def send_raw(data: str | bytes) -> None:
        sent.append(data.decode() if isinstance(data, bytes) else data)
        write(data)

    xmpp.send_raw = send_raw
    return sent


async def test_no_resume_goes_out_before_authentication(
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: ClientPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A server (or anyone on the path) that offers <sm/> before SASL would get the
    # resumption id, and could answer <resumed h> for messages it never delivered.
    await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, **SILENT)
    proxy.stall()
    ids = [alice.send("bob@localhost", f"held {i}") for i in range(2)]
    await wait_for(lambda: alice.on_wire(ids))
    proxy.cut()
    await wait_for(lambda: alice.log.count("message:hibernated") == 2)
    sent = record_sends(alice.xmpp)
    proxy.heal()
    # The next connection's first features offer <sm/> in place of SASL.
    proxy.rewrite(
        rb"<mechanisms xmlns=['\"]urn:ietf:params:xml:ns:xmpp-sasl['\"]>.*?</mechanisms>",
        b"<sm xmlns='urn:xmpp:sm:3'/>",
    )
    with caplog.at_level(logging.WARNING, logger="xmpp_sm_tracker.session"):
        await wait_for(lambda: "before authentication" in caplog.text, timeout=10)
    await asyncio.sleep(0.3)
    assert not any("<resume" in data or "<enable" in data for data in sent), sent
    records = [alice.tracker.core.get(i) for i in ids]
    assert [r.state for r in records if r is not None] == [DeliveryState.HIBERNATED] * 2
    # An honest server later: the stream resumes and both are acked, once.
    proxy.heal()
    proxy.cut()
    await wait_for(lambda: alice.log.count("message:acked") == 2, timeout=15)
    assert alice.log.ids("message:failed") == []


async def test_no_stream_management_on_an_unencrypted_stream_unless_the_app_allows_it(
    server: LocalXMPPServer, caplog: pytest.LogCaptureFixture
) -> None:
    # slixmpp goes on without TLS when STARTTLS is not offered; our local servers offer
    # none. Only slixmpp's own switch (enable_plaintext) allows SM on such a stream.
    xmpp = make_client("alice@localhost/plain", "pass", tracker_config=FAST)
    xmpp.enable_plaintext = False
    xmpp.enable_starttls = True  # tried, not offered: the stream stays plain
    sent = record_sends(xmpp)
    started = asyncio.Event()
    xmpp.add_event_handler("session_start", lambda _: started.set())
    try:
        with caplog.at_level(logging.WARNING, logger="xmpp_sm_tracker.session"):
            xmpp.connect(*server.address)
            await asyncio.wait_for(started.wait(), 15)
            await asyncio.sleep(0.3)
        assert xmpp.authenticated
        assert "not encrypted" in caplog.text
        assert not tracker_of(xmpp).managed
        assert not any("<enable" in data or "<resume" in data for data in sent), sent
    finally:
        tracker_of(xmpp).auto_reconnect = False
        xmpp.disconnect(wait=0.5)
        await asyncio.sleep(0.1)


async def test_with_plaintext_allowed_the_local_server_session_is_managed(
    server: LocalXMPPServer, clients: ClientPool
) -> None:
    # The control for the test above: the test kit's clients allow plaintext.
    alice: Party = await clients("alice", server.address, **FAST)
    assert alice.xmpp.enable_plaintext and alice.tracker.managed


SM_NS = "urn:xmpp:sm:3"


@pytest.mark.parametrize(
    "answer",
    [
        f"<resumed xmlns='{SM_NS}' previd='PREVID' h='1'/>",
        f"<enabled xmlns='{SM_NS}' id='sm-forged' resume='true'/>",
        f"<failed xmlns='{SM_NS}' h='1'/>",
    ],
    ids=["resumed", "enabled", "failed"],
)
async def test_an_sm_answer_nobody_asked_for_closes_the_stream_and_nothing_is_believed(
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: ClientPool,
    answer: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Unsolicited <resumed h=0> three times rewrote the unacked messages three times.
    # An answer counts only in the phase that asked for it; otherwise the server's SM
    # state cannot be trusted: a stream error, nothing acked by its h, a fresh session.
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, **SILENT)
    first_stream = alice.tracker.core.session.sm_id
    message_id = alice.send("bob@localhost", "unacked")
    await wait_for(lambda: "unacked" in bob.received.bodies)
    sent = record_sends(alice.xmpp)
    with caplog.at_level(logging.ERROR, logger="xmpp_sm_tracker.session"):
        proxy.inject(answer.replace("PREVID", str(first_stream)).encode())
        await wait_for(lambda: alice.log.count("message:failed") == 1, timeout=10)
    assert "nobody asked for" in caplog.text
    assert any("<stream:error>" in data and "unsolicited" in data for data in sent), sent
    assert alice.log.count("message:acked") == 0  # the forged h acked nothing
    [failed] = await alice.tracker.failed()
    assert failed.id == message_id and failed.reason == "protocol-error"
    await wait_for(lambda: alice.tracker.managed, timeout=10)
    assert alice.tracker.core.session.sm_id not in (None, first_stream)  # started afresh


_ENABLED = rb"<enabled "


async def test_a_location_outside_the_accounts_domain_is_not_followed(
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: ClientPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Was: <enabled location> was followed to any host and port, IP literals and
    # loopback included, and saved and followed again after a restart.
    async with FaultProxy(server.host, server.c2s_port) as elsewhere:
        await clients("bob", server.address, tracked=False)
        proxy.rewrite(_ENABLED, f"<enabled location='127.0.0.1:{elsewhere.port}' ".encode())
        with caplog.at_level(logging.WARNING, logger="xmpp_sm_tracker.session"):
            alice = await clients("alice", proxy.address, **SILENT)
        assert "not following <enabled location" in caplog.text
        assert alice.tracker.core.session.location is None  # never saved either
        proxy.heal()
        message_id = alice.send("bob@localhost", "stay here")
        await wait_for(lambda: alice.on_wire([message_id]))
        proxy.cut()
        await wait_for(lambda: alice.log.count("message:acked") == 1, timeout=10)
        assert elsewhere.connections == 0 and proxy.connections == 2


async def test_a_location_the_app_allows_is_followed(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientPool
) -> None:
    async with FaultProxy(server.host, server.c2s_port) as elsewhere:
        await clients("bob", server.address, tracked=False)
        proxy.rewrite(_ENABLED, f"<enabled location='127.0.0.1:{elsewhere.port}' ".encode())
        alice = await clients("alice", proxy.address, location_allow=["127.0.0.1"], **SILENT)
        assert alice.tracker.core.session.location == f"127.0.0.1:{elsewhere.port}"
        proxy.heal()
        message_id = alice.send("bob@localhost", "go there")
        await wait_for(lambda: alice.on_wire([message_id]))
        proxy.cut()
        await wait_for(lambda: alice.log.count("message:acked") == 1, timeout=10)
        assert elsewhere.connections == 1


def test_only_the_accounts_domain_its_subdomains_and_allowed_hosts_are_trusted() -> None:
    assert location_trusted("example.org", "example.org")
    assert location_trusted("node1.xmpp.Example.org.", "example.org")
    assert not location_trusted("evil-example.org", "example.org")
    assert not location_trusted("example.org.evil.net", "example.org")
    assert not location_trusted("127.0.0.1", "example.org")
    assert not location_trusted("::1", "example.org")
    assert location_trusted("10.0.0.7", "example.org", ["10.0.0.7"])
    assert not location_trusted("anything", "")  # no domain known: only the allow-list


async def test_acks_that_never_move_h_are_no_proof_of_life(
    server: LocalXMPPServer,
    proxy: FaultProxy,
    clients: ClientPool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Was: a server answering every <r/> with the same h kept the link "alive" for
    # ever while unacked messages piled up. Now the ack timeout runs on: the link is
    # dropped, the stream resumed, and <resumed h> settles them.
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, ack_timeout=1.5, ack_keepalive=None, **FAST)
    await wait_for(lambda: len(alice.tracker.core.ledger) == 0)  # all acked so far
    stuck = alice.tracker.core.ledger.last_ack
    proxy.rewrite(rb"(<a [^>]*h=['\"])\d+", rb"\g<1>" + str(stuck).encode())
    with caplog.at_level(logging.WARNING, logger="xmpp_sm_tracker.acking"):
        ids = [alice.send("bob@localhost", f"stuck {i}") for i in range(3)]
        await wait_for(lambda: len(bob.received.bodies) == 3)  # the server has them
        await wait_for(lambda: "presumed dead" in caplog.text, timeout=10)
    await wait_for(lambda: alice.log.count("message:acked") == 3, timeout=15)
    assert alice.log.ids("message:acked") == ids
    assert proxy.connections >= 2
    assert bob.received.bodies == [f"stuck {i}" for i in range(3)]


async def test_a_server_that_acks_nothing_cannot_make_the_unacked_window_grow_for_ever(
    server: LocalXMPPServer, proxy: FaultProxy, clients: ClientPool
) -> None:
    # Was: unacked messages piled up without bound (2.7 KB each, and every sm.cache
    # serialized all of them). With max_unacked, new stanzas wait unwritten until acks
    # come; nothing is dropped, the order is kept.
    bob = await clients("bob", server.address, tracked=False)
    alice = await clients("alice", proxy.address, max_unacked=5, ack_timeout=60.0, **FAST)
    states: list[Any] = []
    alice.tracker.sm.cache(states.append)
    proxy.stall()  # nothing reaches the server: no acks
    ids = [alice.send("bob@localhost", f"windowed {i}") for i in range(20)]
    await asyncio.sleep(0.5)
    unacked = len(alice.tracker.core.ledger)
    assert unacked <= 5, unacked
    assert alice.tracker.outbox.window_held >= 15
    await alice.tracker.flush()
    assert all(len(s["unacked"]) <= 5 for s in states if s)
    assert [alice.tracker.core.get(i).state for i in ids] == [DeliveryState.SENT] * 20  # type: ignore[union-attr]
    proxy.heal()
    await wait_for(lambda: alice.log.count("message:acked") == 20, timeout=20)
    assert alice.log.ids("message:acked") == ids
    await wait_for(lambda: len(bob.received.bodies) == 20)
    assert bob.received.bodies == [f"windowed {i}" for i in range(20)]
    assert alice.tracker.outbox.window_held == 0

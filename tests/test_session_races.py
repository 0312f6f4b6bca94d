"""Races around resumption, driven through the real plugin over a transport that only
records what is written: which stanza reaches the outgoing filter in which event-loop
turn is what matters here, and a live server cannot pin that."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
import slixmpp
from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.xmlstream import ET

from xmpp_sm_tracker import DeliveryState
from xmpp_sm_tracker.acking import BURST_ASK_EVERY

from .helpers.wire import RecordingTransport, WiredClient

SM_NS = "urn:xmpp:sm:3"


class Client(WiredClient):
    """alice with a live, resumable SM session over a recording transport."""

    def __init__(self) -> None:
        super().__init__(auto_reconnect=False)
        self.tracker.core.sm_offered()
        self.tracker.core.enable_queued()
        self.tracker._outbound.on_outgoing(sm_stanza.Enable(self.xmpp))
        self.tracker.core.enabled(
            "sm-1", resumable=True, location=None, max=None, jid="alice@localhost/r"
        )
        self.start_writing()

    def message(self, body: str) -> slixmpp.Message:
        return self.xmpp.make_message(mto="bob@localhost", mbody=body, mtype="chat")

    def drop_and_reconnect(self) -> RecordingTransport:
        """The link drops; a new connection is up and ``<resume/>`` went out on it."""
        self.xmpp.transport = None
        self.xmpp.event("disconnected", "cut")
        self.transport = RecordingTransport()
        self.xmpp.transport = self.transport
        self.xmpp.event("connected")
        self.tracker._outbound.on_outgoing(sm_stanza.Resume(self.xmpp))
        return self.transport

    def server_says(self, xml: str) -> None:
        element = ET.fromstring(xml)
        session = self.tracker._session
        if element.tag == f"{{{SM_NS}}}resumed":
            session.on_resumed(sm_stanza.Resumed(self.xmpp, xml=element))
        elif element.tag == f"{{{SM_NS}}}enabled":
            session.on_enabled(sm_stanza.Enabled(self.xmpp, xml=element))
        elif element.tag == f"{{{SM_NS}}}failed":
            session.on_failed(sm_stanza.Failed(self.xmpp, xml=element))
        else:
            self.tracker._acks.on_ack(sm_stanza.Ack(self.xmpp, xml=element))


@pytest_asyncio.fixture
async def alice() -> AsyncIterator[Client]:
    client = Client()
    yield client
    await client.aclose()


async def test_a_stanza_reaching_the_wire_while_resuming_waits_for_resumed(
    alice: Client,
) -> None:
    # Smack #185: a stanza written between <resume/> and <resumed/> is counted before
    # the resends, then once more among them; the server's next <a/> is "too high".
    first = alice.message("on the wire before the cut")
    first.send()
    await alice.turns()
    late = alice.message("queued before the cut, written after it")
    wire = alice.drop_and_reconnect()
    alice.xmpp.waiting_queue.put_nowait((late, True))  # slixmpp's queue gets to it now
    await alice.turns()
    assert wire.bodies() == []  # not before <resumed/>

    alice.server_says(f"<resumed xmlns='{SM_NS}' previd='sm-1' h='0'/>")
    await alice.turns()
    assert wire.bodies() == [
        "on the wire before the cut",
        "queued before the cut, written after it",
    ]
    alice.server_says(f"<a xmlns='{SM_NS}' h='2'/>")
    core = alice.tracker.core
    assert core.session.sm_id == "sm-1" and len(core.ledger) == 0
    for message in (first, late):
        record = alice.tracker.core.get(message["id"])
        assert record is None or record.state is DeliveryState.ACKED


async def test_a_resend_is_one_write_that_asks_as_it_goes(alice: Client) -> None:
    # 10 000 resent with one <r/> at the end: every ack, and the work of moving 10 000
    # records, waited for the server to read the last one.
    k = BURST_ASK_EVERY
    n = 2 * k + k // 2
    sent = [alice.message(f"m{i}") for i in range(n)]
    for message in sent:
        message.send()
    await alice.turns()
    wire = alice.drop_and_reconnect()
    alice.server_says(f"<resumed xmlns='{SM_NS}' previd='sm-1' h='0'/>")
    [write] = [data for data in wire.out if "<message" in data]
    assert write.count("<message") == n
    chunks = write.split("<r xmlns='urn:xmpp:sm:3'/>")
    assert [chunk.count("<message") for chunk in chunks] == [k, k, k // 2, 0]
    await alice.turns()
    assert sum(data.count("<r xmlns") for data in wire.out) == 3  # no other request

    # Each answer settles its part while the server still reads the rest.
    alice.server_says(f"<a xmlns='{SM_NS}' h='{k}'/>")
    states = [alice.tracker.core.get(m["id"]) for m in sent]
    acked = [r is None or r.state is DeliveryState.ACKED for r in states]
    assert acked == [True] * k + [False] * (n - k)
    alice.server_says(f"<a xmlns='{SM_NS}' h='{n}'/>")
    assert len(alice.tracker.core.ledger) == 0

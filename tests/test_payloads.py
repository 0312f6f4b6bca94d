"""A written tracked message stays in the ledger as its text, not as the slixmpp object
(about 1.5 KB less per message in flight), and is a stanza again for whoever listens to
stanza events; a resumption and a saved state use that text. Through the real plugin
over a transport that records writes."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.stanza import Message
from slixmpp.xmlstream import ET

from xmpp_sm_tracker.payloads import SentText

from .helpers.wire import RecordingTransport, WiredClient

SM_NS = "urn:xmpp:sm:3"


class Client(WiredClient):
    """alice with a live, resumable SM session (nothing answers unless told)."""

    def __init__(self) -> None:
        super().__init__(auto_reconnect=False)
        core = self.tracker.core
        core.sm_offered()
        core.enable_queued()
        self.tracker._outbound.on_outgoing(sm_stanza.Enable(self.xmpp))
        core.enabled("sm-1", resumable=True, location=None, max=None, jid="alice@localhost/r")
        self.start_writing()

    def message(self, body: str) -> Message:
        return self.xmpp.make_message(mto="bob@localhost", mbody=body, mtype="chat")

    def ack(self, h: int) -> None:
        element = ET.fromstring(f"<a xmlns='{SM_NS}' h='{h}'/>")
        self.tracker._acks.on_ack(sm_stanza.Ack(self.xmpp, xml=element))


async def test_the_ledger_keeps_the_text_and_lets_the_stanza_object_go() -> None:
    alice = Client()
    message = alice.message("kept as text")
    message.send()
    gone = weakref.ref(message)
    await alice.turns()
    [entry] = list(alice.tracker.core.ledger)
    assert isinstance(entry.payload, SentText)
    assert entry.payload.text is alice.tracker.core.get(message["id"]).xml  # no copy
    del message
    gc.collect()
    assert gone() is None
    await alice.aclose()


async def test_a_stanza_listener_gets_the_stanza_parsed_from_its_text() -> None:
    alice = Client()
    acked: list[Any] = []
    message = alice.message("heard")
    message.send()
    await alice.turns()
    alice.xmpp.add_event_handler("stanza_acked", acked.append)  # after it was written
    alice.tracker.events.on("stanza:acked", acked.append)
    alice.ack(1)
    assert [type(s) for s in acked] == [Message, Message]
    assert {s["id"] for s in acked} == {message["id"]} and acked[0]["body"] == "heard"
    await alice.aclose()


async def test_while_an_app_listens_to_stanza_events_the_stanza_is_kept() -> None:
    alice = Client()
    acked: list[Any] = []
    alice.xmpp.add_event_handler("stanza_acked", acked.append)
    message = alice.message("kept whole")
    message.send()
    await alice.turns()
    [entry] = list(alice.tracker.core.ledger)
    assert entry.payload is message
    alice.ack(1)
    assert acked == [message]
    await alice.aclose()


async def test_a_resumption_resends_the_text_written_the_first_time() -> None:
    alice = Client()
    for body in ("one", "two"):
        alice.message(body).send()
    await alice.turns()
    first = [w for w in alice.transport.out if "<message" in w]
    state = alice.tracker.sm._export()
    assert state is not None and [e["xml"] for e in state["unacked"]] == [
        r.xml for r in alice.tracker.core.records.values()
    ]
    alice.xmpp.transport = None
    alice.xmpp.event("disconnected", "cut")
    alice.transport = RecordingTransport()
    alice.xmpp.transport = alice.transport
    alice.xmpp.event("connected")
    alice.tracker._outbound.on_outgoing(sm_stanza.Resume(alice.xmpp))
    element = ET.fromstring(f"<resumed xmlns='{SM_NS}' previd='sm-1' h='0'/>")
    alice.tracker._session.on_resumed(sm_stanza.Resumed(alice.xmpp, xml=element))
    [resent] = [w for w in alice.transport.out if "<message" in w]
    ask = f"<r xmlns='{SM_NS}'/>"
    assert resent.endswith(ask)  # the resend asks for its ack in the same write
    assert resent.removesuffix(ask) == "".join(w.removesuffix(ask) for w in first)
    await alice.aclose()

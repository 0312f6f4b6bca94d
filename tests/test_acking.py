"""When ``<r/>`` goes out, through the real plugin over a transport that records writes:
after ``ack_every`` stanzas and right behind the last stanza of a burst, in its write."""

from __future__ import annotations

from typing import Any

from slixmpp.plugins.xep_0198 import stanza as sm_stanza

from .helpers.wire import WiredClient


class Client(WiredClient):
    """alice with a live SM session (nothing answers her requests)."""

    def __init__(self, **config: Any) -> None:
        super().__init__(auto_reconnect=False, **config)
        core = self.tracker.core
        core.sm_offered()
        core.enable_queued()
        self.tracker._outbound.on_outgoing(sm_stanza.Enable(self.xmpp))
        core.enabled("sm-1", resumable=True, location=None, max=None, jid="alice@localhost/r")
        self.start_writing()

    def send(self, n: int) -> None:
        for i in range(n):
            self.xmpp.send_message(mto="bob@localhost", mbody=f"m{i}", mtype="chat")

    def requests_after(self) -> list[int]:
        """For each <r/> written, how many messages were written before it."""
        found, messages = [], 0
        for data in self.transport.out:
            messages += data.count("<message")
            found += [messages] * data.count("<r xmlns")
        return found


async def test_a_lone_message_carries_its_request_in_the_same_write() -> None:
    alice = Client()
    alice.send(1)
    await alice.turns()
    [write] = [data for data in alice.transport.out if "<message" in data]
    assert write.index("<message") < write.index("<r xmlns")
    assert alice.requests_after() == [1]
    await alice.aclose()


async def test_a_burst_asks_every_ack_every_stanzas_and_once_at_its_end() -> None:
    alice = Client(ack_every=10)
    alice.send(25)
    await alice.turns()
    assert alice.requests_after() == [10, 20, 25]
    alice.send(10)  # a burst of exactly ack_every: no extra request at its end
    await alice.turns()
    assert alice.requests_after() == [10, 20, 25, 35]
    await alice.aclose()


async def test_without_asking_at_the_burst_end_the_tail_waits_for_ack_delay() -> None:
    alice = Client(ack_every=10, ack_delay=3600.0, ack_at_burst_end=False)
    alice.send(25)
    await alice.turns()
    assert alice.requests_after() == [10, 20]
    await alice.aclose()

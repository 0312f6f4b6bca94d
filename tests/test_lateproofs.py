"""Issue 20: proofs for ids not in memory cannot fan out into store queries and tasks."""

from __future__ import annotations

import asyncio
import logging
from xml.etree import ElementTree as ET

import pytest
from slixmpp.stanza import Message

from xmpp_sm_tracker.core.records import TrackedMessage
from xmpp_sm_tracker.core.states import DeliveryState
from xmpp_sm_tracker.lateproofs import MAX_PENDING, LateProofs
from xmpp_sm_tracker.stores.memory import MemoryStore

from .helpers.wire import WiredClient


def record(mid: str) -> TrackedMessage:
    return TrackedMessage(
        id=mid,
        origin_id=mid,
        to="bob@localhost",
        type="chat",
        body="hi",
        state=DeliveryState.ACKED,
        xml="<message/>",
        created_at=1.0,
        updated_at=1.0,
    )


class CountingStore:
    """A fetch that counts queries and how many run at once."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.queries: list[str] = []
        self.running = 0
        self.most = 0

    async def fetch(self, message_id: str) -> TrackedMessage | None:
        self.queries.append(message_id)
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(0)
        self.running -= 1
        return record(message_id) if message_id in self.known else None


async def test_lookups_run_one_at_a_time_and_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    store = CountingStore(known={"ours"})
    late = LateProofs(store.fetch)
    applied: list[str] = []
    with caplog.at_level(logging.WARNING):
        late.look_up("ours", lambda r: applied.append(r.id))
        for n in range(5000):
            late.look_up(f"forged {n}", lambda r: applied.append(r.id))
        for _ in range(5000):
            await asyncio.sleep(0)
            if not late.pending:
                break
    assert applied == ["ours"]  # the real one is not lost in the flood
    assert store.most == 1
    assert len(store.queries) == MAX_PENDING  # the rest was dropped, not queued
    assert "dropped" in caplog.text


async def test_an_id_the_store_does_not_know_is_not_asked_for_again() -> None:
    store = CountingStore(known=set())
    late = LateProofs(store.fetch)
    late.look_up("nobody", lambda r: None)
    await asyncio.sleep(0.01)
    for _ in range(100):
        late.look_up("nobody", lambda r: None)
    await asyncio.sleep(0.01)
    assert store.queries == ["nobody"]


async def test_proofs_for_the_same_id_share_one_lookup() -> None:
    store = CountingStore(known={"m"})
    late = LateProofs(store.fetch)
    applied: list[str] = []
    late.look_up("m", lambda r: applied.append("receipt"))
    late.look_up("m", lambda r: applied.append("marker"))
    await asyncio.sleep(0.01)
    assert store.queries == ["m"] and applied == ["receipt", "marker"]


async def test_a_flood_of_bounces_for_unknown_ids_through_the_plugin() -> None:
    alice = WiredClient()
    store = MemoryStore()
    queries: list[str] = []
    get = store.get

    async def counted_get(message_id: str) -> TrackedMessage | None:
        queries.append(message_id)
        return await get(message_id)

    store.get = counted_get  # type: ignore[method-assign]
    await alice.tracker.attach(store)

    for n in range(5000):
        bounce = Message(
            xml=ET.fromstring(
                f"<message xmlns='jabber:client' type='error' from='bob@localhost' "
                f"id='forged-{n}'><error type='cancel'><item-not-found "
                "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
            )
        )
        alice.tracker._inbound.on_incoming(bounce)
    for _ in range(2000):
        await asyncio.sleep(0)
    assert len(queries) <= MAX_PENDING
    assert len(asyncio.all_tasks()) < 10  # no task per forged id
    alice.tracker._cancel_timers()

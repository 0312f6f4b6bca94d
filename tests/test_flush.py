"""flush() and durable sends: records durable before the stanza leaves, the SM state
handed to sm.cache at its own pace (once per batch), concurrent flushes sharing the work.
Driven through the real plugin over a transport that records writes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from slixmpp.plugins.xep_0198 import stanza as sm_stanza

from xmpp_sm_tracker import TrackedMessage
from xmpp_sm_tracker.stores.memory import MemoryStore

from .helpers.wire import WiredClient


class Journal(MemoryStore):
    """A store that writes into the same journal as the transport."""

    def __init__(self, journal: list[tuple[str, str]]) -> None:
        super().__init__()
        self.journal = journal
        self.batches: list[int] = []

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        self.batches.append(len(records))
        self.journal += [("stored", r.id) for r in records]
        await asyncio.sleep(0)  # a real store suspends
        await super().upsert(records)


class Client(WiredClient):
    """alice on a live SM session (nothing answers her), an sm.cache that counts."""

    def __init__(self) -> None:
        super().__init__(auto_reconnect=False, ack_at_burst_end=False)
        core = self.tracker.core
        core.sm_offered()
        core.enable_queued()
        self.tracker._outbound.on_outgoing(sm_stanza.Enable(self.xmpp))
        core.enabled("sm-1", resumable=True, location=None, max=None, jid="alice@localhost/r")
        self.journal: list[tuple[str, str]] = []
        self.states: list[Any] = []
        write = self.transport.write

        def journaled(data: bytes) -> None:
            for message_id in re.findall(r"<message[^>]* id=['\"]([^'\"]+)", data.decode()):
                self.journal.append(("written", message_id))
            write(data)

        self.transport.write = journaled  # type: ignore[method-assign]
        self.start_writing()

    async def with_store(self) -> Journal:
        store = Journal(self.journal)
        await self.tracker.attach(store)
        self.tracker.sm.cache(self.states.append)
        await self.tracker.flush()
        self.states.clear()
        return store


async def test_durable_sends_store_each_record_first_and_hand_the_state_over_in_batches() -> None:
    alice = Client()
    await alice.with_store()
    ids = [(await alice.tracker.send_message("bob@localhost", f"d{i}")).id for i in range(300)]
    await alice.turns()
    for message_id in ids:  # the durable send's promise
        assert alice.journal.index(("stored", message_id)) < alice.journal.index(
            ("written", message_id)
        )
    # Was: one sm.cache call with the whole state per send (300 here).
    assert len(alice.states) <= 3
    await alice.tracker.flush()
    assert [e["id"] for e in alice.states[-1]["unacked"]][-300:] == ids
    await alice.aclose()


async def test_concurrent_flushes_share_one_write_and_one_state() -> None:
    alice = Client()
    store = await alice.with_store()
    store.batches.clear()
    for i in range(50):
        alice.xmpp.send_message(mto="bob@localhost", mbody=f"m{i}", mtype="chat")
    await alice.turns(5)
    await asyncio.gather(*(alice.tracker.flush() for _ in range(100)))
    assert store.batches == [50] and len(alice.states) == 1
    await alice.aclose()

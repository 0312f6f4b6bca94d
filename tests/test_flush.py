"""flush() and durable sends: records durable before the stanza leaves, the SM state
handed to sm.cache at its own pace (once per batch), concurrent flushes sharing the work.
Driven through the real plugin over a transport that records writes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

import pytest
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

    def __init__(self, **config: Any) -> None:
        super().__init__(auto_reconnect=False, ack_at_burst_end=False, **config)
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


async def test_changes_that_keep_coming_wait_for_the_next_batch_a_flush_writes_at_once() -> None:
    """The store pays per transaction: acks trickling in must not make one write each.
    The first change after a quiet spell is written at once, later ones wait for
    ``store_interval``; ``flush()`` (and a close) does not wait."""
    alice = Client(store_interval=3600.0)
    store = Journal(alice.journal)
    await alice.tracker.attach(store)
    alice.tracker._writer._last_write_at = float("-inf")  # a quiet spell
    alice.xmpp.send_message(mto="bob@localhost", mbody="first", mtype="chat")
    await alice.turns()
    assert store.batches == [1]
    for i in range(3):
        alice.xmpp.send_message(mto="bob@localhost", mbody=f"next {i}", mtype="chat")
        await alice.turns()
    assert store.batches == [1]  # waiting for the interval, not one write per change
    await alice.tracker.flush()
    assert store.batches == [1, 3]
    alice.xmpp.send_message(mto="bob@localhost", mbody="last", mtype="chat")
    await alice.turns()
    await asyncio.wait_for(alice.tracker._writer.aclose(), 10)  # no waiting for the interval
    assert store.batches == [1, 3, 1]
    await alice.aclose()


def test_a_bad_store_interval_is_refused_at_registration() -> None:
    for bad in (-1, "0.1", True, float("nan")):
        with pytest.raises(ValueError, match="store_interval"):
            Client(store_interval=bad)

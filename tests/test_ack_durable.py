"""An ``<a h>`` never counts a stanza the saved SM state does not: a next process
resumes from that state, and a server that saw a higher ``h`` refuses the resumption
(Prosody: <failed/>, "acknowledged less stanzas"): a fresh session instead. The rest
is acked once saved; without ``sm.cache``, and at a clean close, all of it at once.
The live race (a lease lost between the <a/> and the save) is in test_live_failover."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from .test_acking import Client

_ACK = re.compile(r"<a xmlns='urn:xmpp:sm:3' h='(\d+)'/>")


class Saves:
    """An ``sm.cache`` function that saves only when let through, and notes how many
    acks had been written by then."""

    def __init__(self, alice: Client) -> None:
        self.alice = alice
        self.open = asyncio.Event()
        self.saved: list[tuple[int, int]] = []  # (handled saved, acks written before)

    async def __call__(self, state: dict[str, Any] | None) -> None:
        await self.open.wait()
        if state is not None:
            self.saved.append((state["handled"], len(acks(self.alice))))


def acks(alice: Client) -> list[int]:
    return [int(h) for data in alice.transport.out for h in _ACK.findall(data)]


def handle(alice: Client, n: int) -> None:
    for _ in range(n):
        alice.tracker.core.inbound()


async def test_without_sm_cache_an_ack_says_everything_handled() -> None:
    alice = Client()
    handle(alice, 3)
    alice.tracker._acks.on_request(None)
    assert acks(alice) == [3]
    await alice.aclose()


async def test_an_ack_waits_for_the_state_that_counts_its_stanzas() -> None:
    alice = Client(cache_interval=0.01)
    saves = Saves(alice)
    alice.tracker.sm.cache(saves)
    await alice.turns()
    handle(alice, 3)
    alice.tracker._acks.on_request(None)
    assert acks(alice) == [0]  # nothing of this stream saved yet
    saves.open.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if acks(alice)[-1:] == [3]:
            break
    assert acks(alice)[-1] == 3  # the rest, once a state with it was saved
    # No ack ever said more than the states saved before it.
    for written, h in enumerate(acks(alice)):
        saved_before = [handled for handled, n in saves.saved if n <= written]
        assert h <= max(saved_before, default=0), (h, saves.saved)
    await alice.aclose()


async def test_the_last_ack_of_a_clean_close_says_everything_handled() -> None:
    alice = Client()
    saves = Saves(alice)  # never lets a save through
    alice.tracker.sm.cache(saves)
    await alice.turns()
    handle(alice, 4)
    alice.tracker._acks.send_ack(final=True)  # right before </stream:stream>
    assert acks(alice) == [4]  # else the server delivers the four again
    await alice.aclose()

"""Races of the room hold, driven through the real plugin over a transport that only
records what is written (the live scenarios are in test_live_rooms.py; these orders
depend on what happens within one event-loop turn, which a live server cannot pin)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
from slixmpp.stanza import Presence
from slixmpp.xmlstream import ET

from xmpp_sm_tracker import DeliveryState, RetryPolicy

from .helpers.wire import WiredClient

ROOM = "room@muc.localhost"


class Client(WiredClient):
    """alice on a live session whose previous one was in ROOM: she is not back yet."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        core = self.tracker.core  # the previous session was in ROOM, then ended
        core.joined_room(ROOM, "Alice")
        core.session_ended()
        self.xmpp.event("session_start")  # the session goes live: the rejoin wait starts
        self.start_writing()

    def send(self, body: str) -> str:
        message = self.xmpp.make_message(mto=ROOM, mbody=body, mtype="groupchat")
        message.send()
        return str(message["id"])

    def back_in_the_room(self) -> None:
        """Our own occupant presence (status 110) comes in."""
        self.tracker._inbound.on_incoming(
            Presence(
                xml=ET.fromstring(
                    f"<presence xmlns='jabber:client' from='{ROOM}/Alice' to='alice@localhost/r'>"
                    "<x xmlns='http://jabber.org/protocol/muc#user'>"
                    "<item affiliation='none' role='participant'/><status code='110'/></x>"
                    "</presence>"
                )
            )
        )

    def wire(self) -> list[str]:
        bodies = (re.search(r"<body>(.*?)</body>", data) for data in self.transport.out)
        return [found.group(1) for found in bodies if found is not None]


@pytest_asyncio.fixture
async def clients() -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        await client.aclose()


async def test_a_message_queued_as_the_room_answers_does_not_overtake_the_held_one(
    clients: list[Client],
) -> None:
    alice = Client()
    clients.append(alice)
    alice.send("m1")
    await alice.turns(5)
    assert alice.wire() == []  # held
    alice.send("m2")  # same loop turn as the room's answer: still in slixmpp's queue
    alice.back_in_the_room()
    await alice.turns()
    assert alice.wire() == ["m1", "m2"]


async def test_held_messages_go_first_even_behind_an_async_outgoing_filter(
    clients: list[Client],
) -> None:
    alice = Client()
    clients.append(alice)

    async def caps_like(stanza: Any) -> Any:  # slixmpp's XEP-0115 filter is async
        return stanza

    alice.xmpp.add_filter("out", caps_like)
    for body in ("m1", "m2", "m3", "m4"):
        alice.send(body)
    while ROOM not in alice.tracker.outbox.held_rooms():
        await asyncio.sleep(0)
    alice.back_in_the_room()  # mid-burst
    await alice.turns()
    assert alice.wire() == ["m1", "m2", "m3", "m4"]


async def test_waiting_for_the_room_is_not_counted_against_the_attempt_timeout(
    clients: list[Client],
) -> None:
    alice = Client(retry_policy=RetryPolicy(attempt_timeout=0.2, delay=0.3))
    clients.append(alice)
    first = alice.send("m1")
    await asyncio.sleep(0.15)
    alice.send("m2")
    await asyncio.sleep(0.15)  # m1 has waited longer than an attempt may take
    assert alice.tracker.core.records[first].state is DeliveryState.SENT
    alice.back_in_the_room()
    await alice.turns()
    assert alice.wire() == ["m1", "m2"]
    assert alice.tracker.core.records[first].attempts == 1


async def test_ending_the_plugin_hands_held_messages_to_slixmpp(clients: list[Client]) -> None:
    alice = Client()
    clients.append(alice)
    alice.send("m1")
    await alice.turns(10)
    assert alice.wire() == []
    alice.tracker.plugin_end()
    await alice.turns()
    assert alice.wire() == ["m1"]

"""A drop-in: an app written for bare ``xep_0198`` keeps the events it listens for.

The same app runs twice through a cut (resumed) and a server restart (resumption
refused, a fresh session), once on bare slixmpp and once with ``sm_tracker`` added,
and must see the same stream-management events.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import slixmpp
from slixmpp.stanza import Message

from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import PASSWORD, make_client, wait_for

LIFECYCLE = ("sm_enabled", "sm_disabled", "session_resumed", "sm_failed")


class BareApp:
    """Written for bare xep_0198: waits for ``sm_enabled``, counts ``stanza_acked``,
    notes ``sm_failed``, and reconnects by itself after a drop (slixmpp does not)."""

    def __init__(self, xmpp: slixmpp.ClientXMPP, address: tuple[str, int]) -> None:
        self.xmpp, self.address = xmpp, address
        self.events: list[str] = []
        self.acked: list[str] = []
        self.closing = False
        for name in LIFECYCLE:
            xmpp.add_event_handler(name, lambda _e, name=name: self.events.append(name))
        xmpp.add_event_handler("stanza_acked", self.on_acked)
        xmpp.add_event_handler("session_start", lambda _e: xmpp.send_presence())
        xmpp.add_event_handler("disconnected", self.on_disconnected)

    def on_acked(self, stanza: Any) -> None:
        if isinstance(stanza, Message) and stanza["body"]:
            self.acked.append(str(stanza["body"]))

    def on_disconnected(self, _reason: Any) -> None:
        if not self.closing:
            self.xmpp.loop.call_later(0.3, self.reconnect)

    def reconnect(self) -> None:
        if self.xmpp.transport is None and not self.xmpp.is_connecting():
            self.xmpp.connect(*self.address)

    def enabled_count(self) -> int:
        return self.events.count("sm_enabled")

    def send(self, body: str) -> None:
        self.xmpp.send_message(mto="bob@localhost", mbody=body, mtype="chat")


async def run_the_app(
    server: LocalXMPPServer, tracked: bool, bodies: list[str]
) -> tuple[list[str], list[str]]:
    """(the app's lifecycle events with repeats folded, the bodies it saw acked)."""
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        config = {"reconnect_delay": 0.5, "ack_delay": 0.05}
        xmpp = make_client("alice@localhost/app", PASSWORD, tracked=tracked, tracker_config=config)
        app = BareApp(xmpp, proxy.address)
        xmpp.connect(*proxy.address)
        try:
            await wait_for(lambda: app.enabled_count() == 1, timeout=15)
            for body in bodies:
                app.send(body)
            await asyncio.sleep(0.3)
            proxy.cut()  # resumed: <resumed h> acks what the server had
            await wait_for(lambda: "session_resumed" in app.events, timeout=15)
            await wait_for(lambda: sorted(app.acked) == sorted(bodies), timeout=10)
            await server.restart()  # the session is gone: resumption refused, a fresh one
            await wait_for(lambda: app.enabled_count() == 2, timeout=30)
            seen = list(app.events)  # before the app's own disconnect
        finally:
            app.closing = True
            await xmpp.disconnect()
    return [name for name, _ in itertools.groupby(seen)], app.acked


async def test_an_app_written_for_bare_xep_0198_sees_the_same_events_with_the_tracker(
    fresh_server: LocalXMPPServer,
) -> None:
    bodies = [f"drop-in {i}" for i in range(7)]
    bare_events, bare_acked = await run_the_app(fresh_server, False, bodies)
    tracked_events, tracked_acked = await run_the_app(fresh_server, True, bodies)
    expected_start = ["sm_enabled", "sm_disabled", "session_resumed", "sm_disabled"]
    assert bare_events[:4] == expected_start, bare_events
    assert "sm_failed" in bare_events and bare_events[-1] == "sm_enabled", bare_events
    assert tracked_events == bare_events
    assert sorted(tracked_acked) == sorted(bare_acked) == sorted(bodies)

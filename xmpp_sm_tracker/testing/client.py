"""Ready-made slixmpp clients on a local server: for tests, and for ``devtools/`` (the
demo, benchmark and chaos runs)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import slixmpp

from ..plugin import SMTracker, tracker_of

__all__ = [
    "PASSWORD",
    "TRACKER_EVENTS",
    "USERS",
    "ClientPool",
    "EventLog",
    "Party",
    "Received",
    "connect_client",
    "make_client",
    "tracker_of",
    "wait_for",
]

#: The accounts the test kit registers, and their password.
USERS = ("alice", "bob", "carol")
PASSWORD = "pass"


def make_client(
    jid: str,
    password: str,
    *,
    tracked: bool = True,
    tracker_config: dict[str, Any] | None = None,
) -> slixmpp.ClientXMPP:
    """A plain-text slixmpp client with xep_0198 and, unless ``tracked=False``, sm_tracker."""
    xmpp = slixmpp.ClientXMPP(jid, password)
    xmpp.enable_starttls = False
    xmpp.enable_direct_tls = False
    xmpp.enable_plaintext = True
    xmpp.register_plugin("xep_0198")
    if tracked:
        xmpp.register_plugin("sm_tracker", pconfig=dict(tracker_config or {}))
    xmpp.plugin["feature_mechanisms"].unencrypted_plain = True
    return xmpp


async def connect_client(
    xmpp: slixmpp.ClientXMPP, address: tuple[str, int], timeout: float = 15.0
) -> None:
    """Connect and wait for the session to start (and SM to be enabled when tracked)."""
    started = asyncio.get_running_loop().create_future()

    def on_start(_event: Any) -> None:
        xmpp.send_presence()  # without it the server keeps messages to the bare JID offline
        if not started.done():
            started.set_result(True)

    xmpp.add_event_handler("session_start", on_start, disposable=True)
    xmpp.connect(*address)
    await asyncio.wait_for(started, timeout)
    if "sm_tracker" in xmpp.plugin:
        await wait_for(lambda: tracker_of(xmpp).managed, timeout)


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until true; TimeoutError says what was awaited."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s: {predicate!r}")
        await asyncio.sleep(interval)


@dataclass
class EventLog:
    """Every tracker event of a client, in order: (event name, message id or stanza)."""

    entries: list[tuple[str, Any]] = field(default_factory=list)

    def attach(self, xmpp: slixmpp.ClientXMPP, names: list[str]) -> None:
        for name in names:
            xmpp.add_event_handler(name, lambda payload, n=name: self._add(n, payload))

    def _add(self, name: str, payload: Any) -> None:
        self.entries.append((name, getattr(payload, "id", payload)))

    def names_for(self, message_id: str) -> list[str]:
        return [n for n, p in self.entries if p == message_id]

    def ids(self, name: str) -> list[str]:
        return [p for n, p in self.entries if n == name]

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.entries if n == name)


@dataclass
class Received:
    """Message bodies a client received live, with how often each came.

    Offline messages (stamped with ``<delay/>``) from earlier runs are left out.
    """

    bodies: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def attach(self, xmpp: slixmpp.ClientXMPP) -> None:
        def on_message(msg: Any) -> None:
            delay = msg.xml.find("{urn:xmpp:delay}delay")
            if delay is not None and "@" not in delay.get("from", "@"):
                return  # stored offline by the server (stamped by its domain)
            if msg["body"] and msg["type"] in ("chat", "normal", "groupchat"):
                self.bodies.append(msg["body"])
                self.counts[msg["body"]] += 1

        xmpp.add_event_handler("message", on_message)


#: Every event the tracker emits.
TRACKER_EVENTS = [
    *(f"message:{s}" for s in (
        "sent", "hibernated", "resent", "acked", "failed", "room_received", "delivered",
        "displayed",
    )),
    *(f"stanza:{s}" for s in ("acked", "hibernated", "resent", "failed")),
]  # fmt: skip


class Party:
    """A connected client and what a test looks at: its events, the latest snapshot of
    each of its messages, and what it received. It re-announces presence on every
    fresh session so it stays reachable after a failed resumption."""

    def __init__(self, xmpp: slixmpp.ClientXMPP) -> None:
        self.xmpp = xmpp
        self.log = EventLog()
        self.log.attach(xmpp, TRACKER_EVENTS)
        self.received = Received()
        self.received.attach(xmpp)
        #: The latest TrackedMessage seen in an event, by id.
        self.records: dict[str, Any] = {}
        for name in TRACKER_EVENTS:
            if name.startswith("message:"):
                xmpp.add_event_handler(name, self._keep)
        xmpp.add_event_handler("session_start", lambda _: xmpp.send_presence())

    def _keep(self, record: Any) -> None:
        self.records[record.id] = record

    @property
    def tracker(self) -> SMTracker:
        return tracker_of(self.xmpp)

    def send(self, to: str, body: str, mtype: str = "chat") -> str:
        """Send a message the usual slixmpp way; returns its id."""
        message = self.xmpp.make_message(mto=to, mbody=body, mtype=mtype)
        message.send()
        return str(message["id"])

    def on_wire(self, ids: list[str]) -> bool:
        """True once every one of these messages was counted (written or about to be)."""
        records = self.tracker.core.records
        return all(i in records and records[i].seq is not None for i in ids)

    async def join(self, room: str, nick: str) -> None:
        """Join a room (needs the xep_0045 plugin)."""
        await self.xmpp.plugin["xep_0045"].join_muc_wait(slixmpp.JID(room), nick, maxchars=0)


class ClientPool:
    """Makes connected clients and disconnects them all at the end (``aclose``)."""

    def __init__(self, domain: str = "localhost", password: str = PASSWORD) -> None:
        self.domain = domain
        self.password = password
        self.made: list[slixmpp.ClientXMPP] = []

    async def __call__(
        self,
        user: str,
        address: tuple[str, int],
        *,
        tracked: bool = True,
        resource: str | None = None,
        plugins: tuple[str, ...] = (),
        **config: Any,
    ) -> Party:
        jid = f"{user}@{self.domain}/{resource or uuid.uuid4().hex[:8]}"
        xmpp = make_client(jid, self.password, tracked=tracked, tracker_config=config)
        for plugin in plugins:
            xmpp.register_plugin(plugin)
        party = Party(xmpp)
        self.made.append(xmpp)
        await connect_client(xmpp, address)
        return party

    async def aclose(self) -> None:
        for xmpp in self.made:
            if "sm_tracker" in xmpp.plugin:
                tracker_of(xmpp).auto_reconnect = False
            elif xmpp.plugin["xep_0198"].enabled_in:
                # Bare xep_0198 closes without a last <a/>: the server would store what
                # it thinks unacked offline, and the next test's client of that account
                # would receive it (sm_tracker acks before its </stream> itself).
                xmpp.plugin["xep_0198"].send_ack()
            xmpp.disconnect(wait=0.5)
        await asyncio.sleep(0.1)
        for xmpp in self.made:
            if xmpp.transport is not None:
                xmpp.abort()

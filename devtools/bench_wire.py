"""Per-message costs at 1 000, 10 000, 100 000 in flight, without a server or a socket.

A live server cannot hold 100 000 unacked stanzas for long, and its own time would
hide the client's. Here alice is the whole client (slixmpp's parser, send loop and
filters, ``xep_0198`` or the ``sm_tracker`` plugin with its store) on a transport that
only counts bytes; the bench plays the server by feeding its answers (``<a h>``,
``<resumed h>``, room reflections) through ``data_received``, as the socket would.
Costs are CPU time of the whole process (the SQLite worker thread included), per
message, for a batch handled while ``n`` others are in flight: a cost that grows with
``n`` is a path that is not flat. Each batch starts after a ``gc.collect()``: with
100 000 in flight one full collection takes a few hundred ms, and landing in a sample
of 1 000 messages or not would decide the number; the send cost averaged over the whole
fill (``fill_us``) includes the collections, amortized.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import slixmpp
from slixmpp.xmlstream import ET

from xmpp_sm_tracker.testing.client import tracker_of

__all__ = ["SCALE_OPS", "scale_run", "send_and_ack"]

#: What a scale run measures, per message: in the table's order.
SCALE_OPS = ("send", "ack", "reflection", "resume")

_SM = "urn:xmpp:sm:3"
_ROOM = "room@muc.localhost"
_NICK = "alice"
_BOB = "bob@localhost"
_JID = "alice@localhost/wire"
_ORIGIN_ID = "{urn:xmpp:sid:0}origin-id"
_HEADER = (
    "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
    "from='localhost' id='bench-wire' version='1.0' xml:lang='en'>"
)
#: Settings for a run that asks as usual but never gives the link up for silence, and
#: writes what it is given however much is unacked (no max_unacked window).
_CONFIG: dict[str, Any] = {
    "auto_reconnect": False,
    "ack_timeout": 3600.0,
    "ack_keepalive": None,
    "max_unacked": None,
}
#: ``<a/>`` every this many stanzas, like the default ``ack_every``.
_ACK_STEP = 10


class _CountingTransport:
    """Stands in for the socket: counts what is written, keeps nothing."""

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def get_extra_info(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _Wire:
    """alice on a live, resumable SM session over a :class:`_CountingTransport`."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.tracked = variant in ("memory", "sqlite")
        xmpp = slixmpp.ClientXMPP(_JID, "pass")
        xmpp.register_plugin("xep_0198")
        if self.tracked:
            import xmpp_sm_tracker  # noqa: F401  (registers the plugin)

            xmpp.register_plugin("sm_tracker", pconfig=dict(_CONFIG))
        self.xmpp = xmpp
        self.sender: asyncio.Future[None] | None = None
        self.store: Any = None
        self._connect()

    def _connect(self) -> None:
        xmpp = self.xmpp
        xmpp.boundjid = slixmpp.JID(_JID)
        xmpp.transport = _CountingTransport()
        xmpp.init_parser()
        xmpp.data_received(_HEADER)
        xmpp.event("connected")

    async def start(self, store: Any = None) -> None:
        """Attach ``store`` (tracked), enable stream management, start the send loop."""
        xmpp = self.xmpp
        self.sender = asyncio.ensure_future(xmpp.run_filters())
        if self.tracked:
            tracker = tracker_of(xmpp)
            if store is not None:
                self.store = store
                await tracker.attach(store)
            tracker.core.sm_offered()
            xmpp.event("session_bind", xmpp.boundjid)  # the plugin sends <enable/>
            await xmpp.waiting_queue.join()
        else:
            xmpp.send(xmpp.plugin["xep_0198"].stanza.Enable(xmpp))
            await xmpp.waiting_queue.join()
        self.feed(f"<enabled xmlns='{_SM}' id='sm-wire' resume='true'/>")
        xmpp.event("session_start")
        await self.settle()

    def feed(self, text: str) -> None:
        """The server says ``text`` (read as if from the socket)."""
        self.xmpp.data_received(text)

    @property
    def seq(self) -> int:
        """Stanzas counted out on this stream so far."""
        if self.tracked:
            seq: int = tracker_of(self.xmpp).core.ledger.seq
            return seq
        xep_seq: int = self.xmpp.plugin["xep_0198"].seq
        return xep_seq

    @property
    def in_flight(self) -> int:
        if self.tracked:
            return len(tracker_of(self.xmpp).core.ledger)
        return len(self.xmpp.plugin["xep_0198"].unacked_queue)

    async def settle(self) -> None:
        """Everything sent is written, every record change stored (the SM state is
        not handed to ``sm.cache`` here: see :func:`scale_run`)."""
        await self.xmpp.waiting_queue.join()
        if self.tracked:
            await tracker_of(self.xmpp).flush()  # no sm.cache function: records only
        for _ in range(3):
            await asyncio.sleep(0)

    async def send(self, n: int, tag: str, mtype: str = "chat") -> list[str]:
        """``n`` messages, as an app sends them; their ids."""
        to = _ROOM if mtype == "groupchat" else _BOB
        make = self.xmpp.make_message
        origin_id = self.variant == "bare_oid"  # the tracker's stanzas, sent bare
        ids = []
        for i in range(n):
            message = make(mto=to, mbody=f"{tag}:{i}", mtype=mtype)
            if origin_id:
                ET.SubElement(message.xml, _ORIGIN_ID, {"id": message["id"]})
            message.send()
            ids.append(message["id"])
        await self.settle()
        return ids

    async def ack(self, n: int) -> None:
        """The server acks the oldest ``n`` in flight, one ``<a/>`` per ten stanzas."""
        h = self.seq - self.in_flight
        for _ in range(0, n, _ACK_STEP):
            h += _ACK_STEP
            self.feed(f"<a xmlns='{_SM}' h='{h}'/>")
        await self.settle()

    async def ack_all(self) -> None:
        self.feed(f"<a xmlns='{_SM}' h='{self.seq}'/>")
        await self.settle()

    async def join_room(self) -> None:
        self.feed(
            f"<presence xmlns='jabber:client' from='{_ROOM}/{_NICK}' to='{_JID}'>"
            "<x xmlns='http://jabber.org/protocol/muc#user'>"
            "<item affiliation='member' role='participant'/><status code='110'/></x></presence>"
        )
        await self.settle()

    async def reflect(self, ids: list[str], tag: str) -> None:
        """The room reflects our messages ``ids`` (sent with ``tag``), in order."""
        for i, message_id in enumerate(ids):
            self.feed(
                f"<message xmlns='jabber:client' from='{_ROOM}/{_NICK}' to='{_JID}' "
                f"type='groupchat' id='{message_id}'><body>{tag}:{i}</body>"
                f"<origin-id xmlns='urn:xmpp:sid:0' id='{message_id}'/>"
                f"<stanza-id xmlns='urn:xmpp:sid:0' by='{_ROOM}' id='r-{message_id}'/></message>"
            )
        await self.settle()

    async def resume(self) -> None:
        """The link drops with everything unacked; a new one resumes the stream, the
        server has none of them: all are resent, then acked."""
        from slixmpp.plugins.xep_0198 import stanza as sm_stanza

        xmpp = self.xmpp
        h = self.seq - self.in_flight
        xmpp.transport = None
        xmpp.event("disconnected", "bench cut")
        xmpp.transport = _CountingTransport()
        xmpp.event("connected")
        xmpp.send(sm_stanza.Resume(xmpp))
        await xmpp.waiting_queue.join()
        self.feed(f"<resumed xmlns='{_SM}' previd='sm-wire' h='{h}'/>")
        await self.settle()
        await self.ack_all()

    async def hand_over_state(self) -> None:
        """One ``sm.cache`` call with the whole SM state: exported, and saved by the store
        (``SQLiteStore.save_sm_state``) or dropped (``MemoryStore``)."""
        sm = tracker_of(self.xmpp).sm
        save = getattr(self.store, "save_sm_state", None)
        sm.cache(save if save is not None else (lambda _state: None))
        await sm.flush()
        sm.cache(None)

    async def aclose(self) -> None:
        if self.tracked:
            tracker = tracker_of(self.xmpp)
            with contextlib.suppress(Exception):
                await tracker.flush()
            self.xmpp.plugin.disable("sm_tracker")  # its timers stop
        if self.sender is not None:
            self.sender.cancel()
            await asyncio.gather(self.sender, return_exceptions=True)
        if self.store is not None:
            await self.store.aclose()


async def _cpu(work: Callable[[], Awaitable[object]]) -> float:
    gc.collect()  # not timed: see the module's docstring
    start = time.process_time()
    await work()
    return time.process_time() - start


async def scale_run(
    variant: str, n: int, batch: int, store: Any = None, say: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """µs per message of each operation with ``n`` in flight (``batch`` of them timed).

    ``store``: the tracked client's store (None: its default MemoryStore).
    """
    wire = _Wire(variant)
    result: dict[str, Any] = {"variant": variant, "in_flight": n, "batch": batch}
    try:
        await wire.start(store)
        start = time.process_time()  # the whole fill, collections included
        await wire.send(n, "fill")
        fill = time.process_time() - start
        result["fill_us"] = 1e6 * fill / n
        result["send_us"] = 1e6 * await _cpu(lambda: wire.send(batch, "batch")) / batch
        result["ack_us"] = 1e6 * await _cpu(lambda: wire.ack(batch)) / batch
        result["in_flight_at_ack"] = wire.in_flight + batch
        if wire.tracked:
            in_flight = wire.in_flight
            result["sm_state_ms"] = 1e3 * await _cpu(wire.hand_over_state)
            result["resume_us"] = 1e6 * await _cpu(wire.resume) / in_flight
            result["resumed"] = in_flight
            await wire.join_room()
            ids = await wire.send(n, "room", "groupchat")
            await wire.ack_all()
            cost = await _cpu(lambda: wire.reflect(ids[:batch], "room"))
            result["reflection_us"] = 1e6 * cost / batch
            core = tracker_of(wire.xmpp).core
            result["unreflected_after"] = sum(1 for r in core.records.values())
        if say is not None:
            say(
                f"scale {variant:<6} n={n:>6}: "
                + ", ".join(
                    f"{op} {result[op + '_us']:.1f} µs" for op in SCALE_OPS if op + "_us" in result
                )
            )
        return result
    finally:
        await wire.aclose()


async def send_and_ack(variant: str, n: int, warmup: int, store: Any = None) -> None:
    """``warmup`` messages sent and acked, then ``n`` more: the work whose cost the
    instruction counts (``bench_instructions``) take per message."""
    wire = _Wire(variant)
    try:
        await wire.start(store)
        await wire.send(warmup, "warm")
        await wire.ack(warmup)
        gc.collect()
        if n:
            await wire.send(n, "timed")
            await wire.ack(n)
    finally:
        await wire.aclose()


def sqlite_store(path: Path) -> Any:
    """An ``SQLiteStore`` at ``path`` (imported late: it is optional)."""
    from xmpp_sm_tracker.stores.sqlite import SQLiteStore

    return SQLiteStore(path)

"""Where the plugin's events leave: the store first, then slixmpp's bus and
``tracker.events``, in the same order, each event only if somebody listens."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

from pyee.asyncio import AsyncIOEventEmitter
from slixmpp.xmlstream import StanzaBase

from .core.events import STANZA_ACKED, STANZA_EVENT
from .core.records import TrackedMessage
from .core.states import IN_FLIGHT, DeliveryState
from .core.tracker import Event, Tracker
from .handles import HandleRegistry
from .outbound import Outbound
from .payloads import Payload, SentText, as_stanza
from .resend import Resender
from .writer import StoreWriter

__all__ = ["EventsOut", "TrackerEvents"]

log = logging.getLogger(__name__)

#: Each state's name, as ``stats().reached`` counts it (an enum's ``.value`` is slow).
_STATE_VALUE = {state: state.value for state in DeliveryState}


class TrackerEvents(AsyncIOEventEmitter):
    """``tracker.events``: a pyee emitter that can tell cheaply whether anyone listens."""

    def has_listeners(self, event: str) -> bool:
        """Like ``bool(listeners(event))`` without copying the list under a lock."""
        table = self.listener_table()
        if table is None:
            return bool(self.listeners(event))
        return bool(table.get(event))

    def listener_table(self) -> dict[str, Any] | None:
        """pyee's live table of listeners by event name, to look up many events in
        (None if this pyee keeps none: then ask :meth:`has_listeners`)."""
        events = getattr(self, "_events", None)
        return events if isinstance(events, dict) else None


class EventsOut:
    """Emits what the core decided, and decides what the ledger keeps of a written
    message (:meth:`compact`), which depends on who listens to stanza events."""

    __slots__ = (
        "_checked_at",
        "_core",
        "_handles",
        "_outbound",
        "_pyee",
        "_reached",
        "_resender",
        "_stanza_listeners",
        "_xmpp",
        "writer",
    )

    def __init__(
        self,
        xmpp: Any,
        pyee: TrackerEvents,
        core: Tracker[Payload],
        writer: StoreWriter,
        outbound: Outbound,
        resender: Resender,
        handles: HandleRegistry,
        reached: Counter[str],
    ) -> None:
        self._xmpp, self._pyee, self._core = xmpp, pyee, core
        #: Where record snapshots go (the plugin swaps it on ``attach()``).
        self.writer = writer
        self._outbound, self._resender = outbound, resender
        self._handles, self._reached = handles, reached
        self._stanza_listeners = False
        self._checked_at = float("-inf")

    def emit(self, events: Iterable[Event]) -> None:
        """Store snapshot first, then both buses, same order.

        An event nobody listens to is not emitted at all (the hot path: three events
        per message otherwise cost more than the tracking itself).
        """
        xmpp, pyee, writer, outbound = self._xmpp, self._pyee, self.writer, self._outbound
        handles, reached, resender = self._handles, self._reached, self._resender
        retrying = self._core.retry_policy is not None
        handled = xmpp.event_handled
        # Asked once per batch: handles are made only by awaited calls, never while
        # events go out (a weak dictionary's len() costs a Python call per event).
        watched = bool(handles)
        # Looked up per event (a listener added by a handler hears the next one), in
        # pyee's live table itself when it has one: a method call per event costs more.
        table = pyee.listener_table()
        listens = pyee.has_listeners if table is None else table.get
        for event in events:
            payload = event.payload
            if isinstance(payload, TrackedMessage):
                state = payload.state
                reached[_STATE_VALUE[state]] += 1
                if payload.xml:
                    writer.put(payload)
                elif state is not DeliveryState.SENT and outbound.is_unwritten(payload.id):
                    # Moving on (failing, hibernating) before it was written: no snapshot
                    # leaves without its text. Only message:sent may, and is stored once
                    # the stanza is written.
                    text, _ = outbound.text_now(payload.id)
                    payload = payload.moved(state, payload.updated_at, xml=text)
                    event = Event(event.name, payload)
                    writer.put(payload)
                if state not in IN_FLIGHT:
                    # Settled (acked, failed, refused): a copy still held back must never
                    # go out by itself (a resend sends a new one).
                    outbound.withhold_parked(payload.id)
                if retrying:
                    resender.on_record(payload)
                if watched:
                    handles.observe(payload, retrying and resender.retry_pending(payload.id))
            name = event.name
            if isinstance(payload, SentText):
                # A stanza again only for someone who listens (parsed from its text).
                if not (
                    handled(name)
                    or listens(name)
                    or (name is STANZA_ACKED and handled("stanza_acked"))
                ):
                    continue
                payload = as_stanza(payload, xmpp)
            if isinstance(payload, StanzaBase):
                # slixmpp hands a handler's exception to payload.exception(), which
                # for a stanza *sends an error reply*: never for our own stanzas.
                if name is STANZA_ACKED and handled("stanza_acked"):
                    payload.exception = _log_bus_handler_error
                    xmpp.event("stanza_acked", payload)  # bare xep_0198's, for its apps
                if handled(name):
                    payload.exception = _log_bus_handler_error
                    xmpp.event(name, payload)
            elif handled(name):
                xmpp.event(name, payload)
            if listens(name):
                pyee.emit(name, payload)

    def compact(self, stanza: Payload, text: str) -> Payload:
        """What the ledger keeps of a written tracked message: its text (1.5 KB less
        per message in flight), or the stanza while an app listens to stanza events (it
        would be parsed again for each one). Who listens is asked once a second: a
        guess either way only costs memory or a parse, never an event."""
        now = self._xmpp.loop.time()
        if now - self._checked_at >= 1.0:
            self._checked_at = now
            handled, pyee = self._xmpp.event_handled, self._pyee
            self._stanza_listeners = bool(handled("stanza_acked")) or any(
                handled(name) or pyee.has_listeners(name) for name in STANZA_EVENT.values()
            )
        return stanza if self._stanza_listeners else SentText(text)


def _log_bus_handler_error(exc: Exception) -> None:
    log.error("an sm_tracker event handler raised: %r", exc, exc_info=exc)

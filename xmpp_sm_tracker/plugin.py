"""The ``sm_tracker`` slixmpp plugin: a thin adapter between slixmpp and the core.

It takes over XEP-0198 from slixmpp's ``xep_0198`` (whose queue is cleared without
a word on ``<failed/>`` and at session end, and which ignores ``<failed h>``),
keeps its own ledger in :class:`~xmpp_sm_tracker.core.Tracker`, and turns what
the core decides into writes, timers and events. The xep_0198 plugin stays
loaded for its stanza classes; its handlers come back on ``plugin_end``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, ClassVar
from xml.etree import ElementTree as ET

from pyee.asyncio import AsyncIOEventEmitter
from slixmpp.jid import JID
from slixmpp.plugins.base import BasePlugin
from slixmpp.plugins.base import register_plugin as _register_slixmpp_plugin
from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.stanza import Iq, Message, Presence
from slixmpp.xmlstream import StanzaBase, tostring
from slixmpp.xmlstream.handler import Callback, Waiter
from slixmpp.xmlstream.matcher import MatchMany, MatchXPath

from . import stanzas
from .core.acks import AckClock, AckPolicy
from .core.ledger import Entry, HBackwards, SMProtocolError
from .core.phases import (
    CLOSED_BY_APP,
    LINK_TRANSITIONS,
    SESSION_UP,
    LinkEvent,
    LinkPhase,
    PhaseMachine,
    SMPhase,
)
from .core.reconnect import backoff_delay, choose_address
from .core.records import FailureReason, TrackedMessage
from .core.retry import RetryPolicy
from .core.rooms import Joined, Left, NickChanged, own_presence
from .core.smstate import SMStateError, parse_state
from .core.states import DeliveryState
from .core.tracker import Event, OutgoingMessage, Tracker
from .resend import Resender
from .smhooks import SMStateHooks
from .stanzas import FAILED_TAG, REQUEST_ACK, parse_counter, parse_location
from .stores.base import StoreError, TrackerStore
from .stores.memory import MemoryStore
from .writer import StoreWriter

__all__ = ["SMTracker"]

log = logging.getLogger(__name__)

#: xep_0198's stream handlers: (handler name, tag, xep_0198 method). Used both to
#: take them over and to give them back in ``plugin_end``.
_XEP_0198_HANDLERS = (
    ("Stream Management Enabled", sm_stanza.Enabled.tag_name(), "_handle_enabled"),
    ("Stream Management Resumed", sm_stanza.Resumed.tag_name(), "_handle_resumed"),
    ("Stream Management Failed", FAILED_TAG, "_handle_failed"),
    ("Stream Management Ack", sm_stanza.Ack.tag_name(), "_handle_ack"),
    ("Stream Management Request Ack", sm_stanza.RequestAck.tag_name(), "_handle_request_ack"),
)
_XEP_0198_FILTERS = (("in", "_handle_incoming"), ("out_sync", "_handle_outgoing"))
_XEP_0198_EVENTS = (("disconnected", "disconnected"), ("session_end", "session_end"))


#: slixmpp outgoing filters that never touch a message stanza (checked on 1.17).
_MESSAGE_SAFE_FILTERS = frozenset({"Roster._save_last_status", "XEP_0115._filter_add_caps"})


class TrackerEvents(AsyncIOEventEmitter):
    """``tracker.events``: a pyee emitter that can tell cheaply whether anyone listens."""

    def has_listeners(self, event: str) -> bool:
        """Like ``bool(listeners(event))`` without copying the list under a lock."""
        events = getattr(self, "_events", None)  # pyee's table; if it ever goes, ask it
        if not isinstance(events, dict):
            return bool(self.listeners(event))
        return bool(events.get(event))


class SMTracker(BasePlugin):  # type: ignore[misc]
    """Per-message delivery tracking on top of XEP-0198 stream management."""

    name = "sm_tracker"
    description = "Per-message delivery tracking over XEP-0198 stream management"
    dependencies: ClassVar[set[str]] = {"xep_0198"}
    default_config: ClassVar[dict[str, Any]] = {
        #: Ask for an ack after this many counted stanzas.
        "ack_every": 10,
        #: Ask for an ack this many seconds after the first stanza nobody asked about.
        "ack_delay": 0.2,
        #: Seconds an ``<r/>`` may stay unanswered before the link is declared dead.
        "ack_timeout": 15.0,
        #: Ask for an ack when the server has been silent this many seconds (None: never),
        #: so a link that died while idle is found before a message is written into it.
        "ack_keepalive": 60.0,
        #: Reconnect (and resume) by itself after the link drops; never after disconnect().
        "auto_reconnect": True,
        #: Seconds before the first reconnect; doubled per attempt up to reconnect_max_delay.
        "reconnect_delay": 0.5,
        #: Upper bound of the reconnect backoff, in seconds.
        "reconnect_max_delay": 30.0,
        #: Abort a connection that has not (re)started its session in this many seconds.
        "negotiation_timeout": 20.0,
        #: Ask the server to keep the session resumable.
        "allow_resume": True,
        #: Preferred resumption window sent as ``<enable max>``, in seconds; None: server's.
        "resume_max": None,
        #: Add an XEP-0359 origin-id (equal to the id) to tracked messages that have none.
        "add_origin_id": True,
        #: ``should_track(message) -> bool``; None tracks every message with a body.
        "should_track": None,
        #: Ask for XEP-0184 receipts on tracked chat messages (``message:delivered``).
        "request_receipts": False,
        #: Mark tracked chat messages markable (XEP-0333) to get ``message:displayed``.
        "request_markers": False,
        #: A RetryPolicy to resend retryable failures by itself; None never resends unasked.
        "retry_policy": None,
        #: Hold new messages to a conversation while older ones there are being resent.
        "keep_order": True,
        #: Seconds a new session holds messages to the rooms the ended one was in, waiting
        #: for the app to join them again (they would bounce before); 0 never holds.
        "room_rejoin_wait": 10.0,
        #: Seconds between two sm.cache calls while acks keep coming; session changes
        #: and lone messages are handed over at once.
        "cache_interval": 0.25,
        #: Before resending what failed unanswered, look it up in our XEP-0313 archive.
        "reconcile_with_archive": True,
        #: Seconds before the oldest failed message to start the archive query at.
        "reconcile_slack": 60.0,
        #: At most this many archived messages are read per check.
        "reconcile_limit": 1000,
        #: Give up the archive check (and resend) after this many seconds.
        "reconcile_timeout": 10.0,
    }

    # ---------------------------------------------------------------- lifecycle

    def plugin_init(self) -> None:
        xmpp = self.xmpp
        self.core: Tracker[StanzaBase] = Tracker(clock=time.time)
        try:
            policy = AckPolicy(
                every=self.ack_every,
                delay=self.ack_delay,
                timeout=self.ack_timeout,
                keepalive=self.ack_keepalive,
            )
        except (TypeError, ValueError) as exc:
            message = str(exc)  # named as the user wrote them: ack_every, ack_delay, ...
            for field in ("every", "delay", "timeout", "keepalive"):
                message = message.replace(f"'{field}'", f"ack_{field}")
            raise ValueError(f"sm_tracker config: {message}") from exc
        self.ack_clock = AckClock(policy)
        wait = self.room_rejoin_wait
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
            raise ValueError(f"room_rejoin_wait must be a number of seconds >= 0, not {wait!r}")
        #: pyee emitter with the same events, names, payloads and order as the slixmpp bus.
        self.events = TrackerEvents()
        self.events.add_listener("error", self._log_listener_error)
        self.store: TrackerStore = MemoryStore()
        self._writer = StoreWriter(self.store)
        #: ``sm.load(state)`` before connect, ``sm.cache(fn)`` to persist the SM state.
        self.sm = SMStateHooks(
            export=self._export_state, load=self._load_state, min_interval=self.cache_interval
        )
        self._xep = xmpp.plugin["xep_0198"]

        #: The connection's phase; the SM session's is the core's (``core.sm_phase``).
        self._link = PhaseMachine(LINK_TRANSITIONS, LinkPhase.OFFLINE)
        #: Tracked messages slixmpp holds until the next session start, by id.
        self._parked: dict[str, StanzaBase] = {}
        #: Messages tracked on a live session, serialized only when written (the text
        #: is made once, for the record and the wire, and a burst starts going out sooner).
        self._unwritten: dict[str, Message] = {}
        #: Parked copies of messages that failed meanwhile (by object id): never sent.
        self._withheld_copies: set[int] = set()
        #: Messages to rooms the app has not joined again since a session ended, by room:
        #: they go out once it has, or after room_rejoin_wait seconds.
        self._room_held: dict[str, list[StanzaBase]] = {}
        self._rejoin_timer: asyncio.TimerHandle | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._ack_timer_at: float | None = None
        self._reconnect_timer: asyncio.TimerHandle | None = None
        self._negotiation_timer: asyncio.TimerHandle | None = None
        self._reconnect_attempt = 0
        #: Where the app connected us (None: DNS), the ``<enabled location>`` we went
        #: to instead, and one that did not answer (not tried again for that session).
        self._app_address: tuple[str, int] | None = None
        self._location_tried: tuple[str, int] | None = None
        self._location_dead: tuple[str, int] | None = None
        self._late_tasks: set[asyncio.Future[None]] = set()

        self.resender = Resender(_ResendHost(self))
        self.core.retry_policy = self.retry_policy

        self._displace_xep_0198()
        self._handlers = (
            ("SM Tracker Enabled", sm_stanza.Enabled.tag_name(), self._on_enabled),
            ("SM Tracker Resumed", sm_stanza.Resumed.tag_name(), self._on_resumed),
            ("SM Tracker Failed", FAILED_TAG, self._on_failed),
            ("SM Tracker Ack", sm_stanza.Ack.tag_name(), self._on_ack),
            ("SM Tracker Request Ack", sm_stanza.RequestAck.tag_name(), self._on_request_ack),
        )
        for name, tag, method in self._handlers:
            xmpp.register_handler(Callback(name, MatchXPath(tag), method, instream=True))
        self._filters = (("in", self._count_inbound), ("out_sync", self._on_outgoing))
        for mode, filter_ in self._filters:
            xmpp.add_filter(mode, filter_)
        self._event_handlers: tuple[tuple[str, Callable[[Any], None]], ...] = (
            ("connected", self._on_connected),
            ("session_bind", self._on_session_bind),
            ("session_start", self._on_session_live),
            ("session_resumed", self._on_session_live),
            ("stanza_not_sent", self._on_stanza_not_sent),
            ("session_end", self._on_session_end),
            ("disconnected", self._on_disconnected),
            ("stream_error", self._on_stream_error),
            ("connection_failed", self._on_connection_failed),
        )
        for event, handler in self._event_handlers:
            xmpp.add_event_handler(event, handler)
        for order in (self._xep.resume_order, self._xep.order):
            xmpp.register_feature("sm", self._handle_sm_feature, restart=True, order=order)

        # slixmpp offers no hook at send time for stanzas that will not pass the
        # filters yet, nor a way to end an SM session cleanly, and its reconnect()
        # closes the stream (which ends the session on the server): wrap all three.
        self._original_send = xmpp.send
        self._original_disconnect = xmpp.disconnect
        self._original_reconnect = xmpp.reconnect
        xmpp.send = self._send
        xmpp.disconnect = self._disconnect
        xmpp.reconnect = self._reconnect_requested
        # Whether other filters may rewrite messages is asked per message: cache it,
        # and forget it whenever the filters change.
        self._filter_facts_cache: tuple[bool, bool] | None = None
        self._original_add_filter = xmpp.add_filter
        self._original_del_filter = xmpp.del_filter
        xmpp.add_filter = self._add_filter
        xmpp.del_filter = self._del_filter

    def plugin_end(self) -> None:
        xmpp = self.xmpp
        xmpp.send = self._original_send
        xmpp.disconnect = self._original_disconnect
        xmpp.reconnect = self._original_reconnect
        xmpp.add_filter = self._original_add_filter
        xmpp.del_filter = self._original_del_filter
        for order in (self._xep.resume_order, self._xep.order):
            xmpp.unregister_feature("sm", order)
        for event, handler in self._event_handlers:
            xmpp.del_event_handler(event, handler)
        for mode, filter_ in self._filters:
            xmpp.del_filter(mode, filter_)
        for name, _tag, _method in self._handlers:
            xmpp.remove_handler(name)
        self._cancel_timers()
        self.resender.cancel()
        self._restore_xep_0198()
        # What waited for a rejoin or a resend is no longer ours to hold: slixmpp sends
        # it (untracked from now on) rather than nobody.
        held = [stanza for stanzas in self._room_held.values() for stanza in stanzas]
        self._room_held.clear()
        for stanza in [*held, *self.resender.take_held()]:
            if id(stanza) not in self._withheld_copies:
                self._original_send(stanza)

    def _displace_xep_0198(self) -> None:
        """Unhook xep_0198's handlers, filters and feature: the tracker does its job."""
        xmpp, xep = self.xmpp, self._xep
        for name, _tag, _method in _XEP_0198_HANDLERS:
            xmpp.remove_handler(name)
        for mode, method in _XEP_0198_FILTERS:
            xmpp.del_filter(mode, getattr(xep, method))
        for event, method in _XEP_0198_EVENTS:
            xmpp.del_event_handler(event, getattr(xep, method))
        for order in (xep.resume_order, xep.order):
            xmpp.unregister_feature("sm", order)

    def _restore_xep_0198(self) -> None:
        """Give xep_0198 back everything :meth:`_displace_xep_0198` took."""
        xmpp, xep = self.xmpp, self._xep
        for name, tag, method in _XEP_0198_HANDLERS:
            xmpp.register_handler(
                Callback(name, MatchXPath(tag), getattr(xep, method), instream=True)
            )
        for mode, method in _XEP_0198_FILTERS:
            xmpp.add_filter(mode, getattr(xep, method))
        for event, method in _XEP_0198_EVENTS:
            xmpp.add_event_handler(event, getattr(xep, method))
        for order in (xep.resume_order, xep.order):
            xmpp.register_feature("sm", xep._handle_sm_feature, restart=True, order=order)

    # ---------------------------------------------------------------- public API

    async def attach(self, store: TrackerStore) -> None:
        """Use ``store`` for records from now on (write what the old one had queued first)."""
        # Read the new store first: if it is unusable, nothing changes.
        left_in_flight = await store.pending()
        old = self._writer
        self.store = store
        self._writer = StoreWriter(store)
        for snapshot in old.take_pending():  # queued changes go to the new store
            self._writer.put(snapshot)
        await old.aclose_quietly()
        # Records a previous process left in flight settle with the first session.
        self.core.adopt(left_in_flight)

    @property
    def session_live(self) -> bool:
        """True while a session (fresh or resumed) is up and stanzas can go out."""
        return self._link.phase in SESSION_UP

    @property
    def link_phase(self) -> LinkPhase:
        """Where the connection stands (see :mod:`xmpp_sm_tracker.core.phases`)."""
        return self._link.phase

    @property
    def sm_phase(self) -> SMPhase:
        """Where the XEP-0198 session stands (see :mod:`xmpp_sm_tracker.core.phases`)."""
        return self.core.sm_phase

    @property
    def managed(self) -> bool:
        """True while stream management is on for this connection (both ways counted)."""
        return self.core.counting_in

    async def flush(self) -> None:
        """Make every record change so far durable, and hand the SM state to ``sm.cache``."""
        for message_id in list(self._unwritten):
            self._write_text(message_id)
        await self._writer.flush()
        await self.sm.flush()

    async def get(self, message_id: str) -> TrackedMessage | None:
        """The latest record of a message."""
        record = self.core.get(message_id)
        if record is not None:
            if message_id in self._unwritten:
                return self._write_text(message_id)[1] or record
            return record
        await self.flush()
        return await self.store.get(message_id)

    async def pending(self) -> list[TrackedMessage]:
        """Messages still in flight, oldest first."""
        await self.flush()
        return await self.store.pending()

    async def failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        """Messages that failed (all, or one conversation's), oldest first."""
        await self.flush()
        return await self.store.failed(conversation)

    async def conversation(
        self, jid: str, limit: int = 50, before: float | None = None
    ) -> list[TrackedMessage]:
        """The newest ``limit`` messages to ``jid`` created before ``before``, oldest first."""
        await self.flush()
        return await self.store.conversation(jid, limit, before)

    async def delete(self, message_id: str) -> bool:
        """Forget a message that is not in flight (the user deleted it)."""
        record = self.core.get(message_id)
        if record is not None and record.in_flight:
            raise ValueError(f"message {message_id} is still {record.state.name}")
        await self.flush()
        return await self.store.delete(message_id)

    async def delete_failed(self, conversation: str | None = None) -> int:
        """Delete failed messages (all, or one conversation's) instead of resending them."""
        await self.flush()
        return await self.store.delete_failed(conversation)

    async def send_message(
        self, mto: str, mbody: str, mtype: str = "chat", **kwargs: Any
    ) -> TrackedMessage:
        """The durable send: the record is in the store before the stanza leaves."""
        message = self.xmpp.make_message(mto=mto, mbody=mbody, mtype=mtype, **kwargs)
        record = self._track(message)
        if record is None:
            raise ValueError("this message is not tracked (no body, <no-store/> or predicate)")
        try:
            await self.flush()
        except StoreError:
            # Never handed over: fail it (it can be resent once the store works again).
            self._dispatch(self.core.abandon(record.id, FailureReason.STORE_FAILED))
            raise
        current = self.core.get(record.id)
        if current is None or not current.in_flight:
            return current or record  # the session ended meanwhile: it failed, unsent
        if not self.resender.hold(current, message):  # behind older ones being resent
            self._hand_over(message)
        return current

    async def resend(self, message_id: str) -> TrackedMessage:
        """Send a failed message again: same id and origin-id (receivers drop a duplicate),
        a ``<delay/>`` with its original time, and an archive check first."""
        record = await self.get(message_id)
        if record is None:
            raise KeyError(f"no tracked message with id {message_id!r}")
        if record.state is not DeliveryState.FAILED:
            raise ValueError(f"message {message_id} is {record.state.name}; only FAILED is resent")
        [result] = await self.resender.resend([record])
        return result

    async def resend_failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        """Resend every failed message (or one conversation's), in their original order."""
        return await self.resender.resend(await self.failed(conversation))

    def set_retry_policy(self, policy: RetryPolicy | None) -> None:
        """Turn automatic retries on (or off with None) for this client."""
        self.config["retry_policy"] = policy
        self.core.retry_policy = policy

    # ---------------------------------------------------------------- SM state

    def _export_state(self) -> dict[str, Any] | None:
        return self.core.export_state(self._serialize_entry, now=time.time())

    @staticmethod
    def _serialize_entry(entry: Entry[StanzaBase]) -> str:
        if entry.serialized is None:
            entry.serialized = tostring(entry.payload.xml, top_level=True)
        return entry.serialized

    def _load_state(self, state: object) -> None:
        """Check a saved state completely, then install it; on error stay fresh."""
        if self.xmpp.transport is not None or self.core.counting_out:
            raise SMStateError("sm.load() must be called before connect()")
        try:
            restored = parse_state(state, bare_jid=self.xmpp.boundjid.bare)
            payloads = [self._stanza_from_xml(entry.xml) for entry in restored.unacked]
        except SMStateError as exc:
            log.warning("not resuming from the saved SM state: %s", exc)
            raise
        self.core.restore(restored, payloads)
        log.info(
            "loaded SM state of stream %s: %d unacked stanzas to resume",
            restored.stream_id,
            len(payloads),
        )

    def _stanza_from_xml(self, xml: str) -> StanzaBase:
        try:
            element = ET.fromstring(xml)
        except ET.ParseError as exc:
            raise SMStateError(f"SM state: an unacked stanza is not valid XML ({exc})") from exc
        kind = stanzas.stanza_kind(element)
        stanza_class = {"message": Message, "presence": Presence, "iq": Iq}.get(kind)
        if stanza_class is None:
            raise SMStateError(f"SM state: <{kind}> is not a stanza that can be resent")
        stanza: StanzaBase = stanza_class(self.xmpp, xml=element)
        return stanza

    # ---------------------------------------------------------------- events out

    def _dispatch(self, events: Iterable[Event]) -> None:
        """The one place events leave: store snapshot first, then both buses, same order.

        An event nobody listens to is not emitted at all (the hot path: three events
        per message otherwise cost more than the tracking itself).
        """
        xmpp, pyee, writer = self.xmpp, self.events, self._writer
        retrying = self.core.retry_policy is not None
        for event in events:
            payload = event.payload
            if isinstance(payload, TrackedMessage):
                if payload.xml:
                    writer.put(payload)
                elif payload.state is not DeliveryState.SENT and payload.id in self._unwritten:
                    # Moving on (failing, hibernating) before it was written: no snapshot
                    # leaves without its text. Only message:sent may, and is stored once
                    # the stanza is written.
                    text, _ = self._write_text(payload.id)
                    payload = payload.moved(payload.state, payload.updated_at, xml=text)
                    event = Event(event.name, payload)
                    writer.put(payload)
                if retrying:
                    self.resender.on_record(payload)
            name = event.name
            if xmpp.event_handled(name):
                if isinstance(payload, StanzaBase):
                    # slixmpp hands a handler's exception to payload.exception(), which
                    # for a stanza *sends an error reply*: never for our own stanzas.
                    payload.exception = self._log_bus_handler_error
                xmpp.event(name, payload)
            if pyee.has_listeners(name):
                pyee.emit(name, payload)

    @staticmethod
    def _log_bus_handler_error(exc: Exception) -> None:
        log.error("an sm_tracker event handler raised: %r", exc, exc_info=exc)

    @staticmethod
    def _log_listener_error(exc: Exception) -> None:
        log.error("an sm_tracker event listener raised: %r", exc, exc_info=exc)

    # ---------------------------------------------------------------- sending

    def _send(self, data: StanzaBase | str, use_filters: bool = True) -> None:
        """``xmpp.send`` as wrapped: track outgoing messages with a body, then send."""
        if use_filters and isinstance(data, Message):
            # On a live session the text is made when the stanza is written, unless
            # another filter would come after ours (then slixmpp writes it itself).
            record = self._track(data, lazy=self.session_live and self._we_write_last())
            if record is not None and self.resender.hold(record, data):
                if record.id in self._unwritten:
                    self._write_text(record.id)  # it waits: the record needs its text now
                return  # goes out after the older messages being resent to that peer
        self._hand_over(data, use_filters)

    def _hand_over(self, data: StanzaBase | str, use_filters: bool = True) -> None:
        self._original_send(data, use_filters)

    def _track(self, message: Message, *, lazy: bool = False) -> TrackedMessage | None:
        """Start tracking a message, unless it is already tracked or is not for tracking.

        ``lazy``: leave the record's text to the outgoing filter (see ``_unwritten``).
        """
        xml = message.xml
        message_id = xml.get("id")
        records = self.core.records
        if message_id and message_id in records:
            return records[message_id]
        body = self._body_to_track(message)
        if body is None:
            return None
        config = self.config  # read once: each plugin attribute is a config lookup
        fields = stanzas.complete_outgoing(
            xml,
            body,
            uuid.uuid4().hex,
            add_origin_id=config["add_origin_id"],
            request_receipts=config["request_receipts"],
            request_markers=config["request_markers"],
        )
        outgoing = OutgoingMessage(*fields, xml="" if lazy else tostring(xml, top_level=True))
        if lazy:
            self._unwritten[fields.id] = message
        self._dispatch(self.core.track(outgoing, link_up=self.session_live))
        return records.get(fields.id)

    def _body_to_track(self, message: Message) -> str | None:
        """The body of a message to track; None for one that is not for tracking."""
        text = stanzas.trackable_body(message.xml)
        if text is None:
            return None
        predicate = self.config["should_track"]
        if predicate is None:
            return text
        try:
            return text if predicate(message) else None
        except Exception:
            log.warning("should_track raised; tracking the message anyway", exc_info=True)
            return text

    def _on_stanza_not_sent(self, data: Any) -> None:
        """slixmpp parked a stanza until the next session start: remember which."""
        if isinstance(data, Message):
            message_id = data.xml.get("id")
            if message_id in self.core.records:
                self._parked[message_id] = data
                if message_id in self._unwritten:
                    self._write_text(message_id)  # it waits: the record needs its text now

    def _filters_keep_messages(self) -> bool:
        """True when no other outgoing filter can have rewritten a message since we
        serialized it (only filters known to leave messages alone are registered)."""
        return self._filter_facts()[1]

    def _we_write_last(self) -> bool:
        """True when our out_sync filter is the last filter a stanza passes, so it may
        hand slixmpp the text to write (no filter is skipped by that)."""
        return self._filter_facts()[0]

    def _filter_facts(self) -> tuple[bool, bool]:
        """(we write last, messages kept), asked for every stanza: kept until a filter
        is added or removed."""
        if self._filter_facts_cache is None:
            self._filter_facts_cache = self._check_filters()
        return self._filter_facts_cache

    def _filters_changed(self) -> None:
        self._filter_facts_cache = None

    def _add_filter(self, mode: str, handler: Callable[..., Any], order: int | None = None) -> None:
        self._filters_changed()
        self._original_add_filter(mode, handler, order)

    def _del_filter(self, mode: str, handler: Callable[..., Any]) -> None:
        self._filters_changed()
        self._original_del_filter(mode, handler)

    def _check_filters(self) -> tuple[bool, bool]:
        filters = getattr(self.xmpp, "_XMLStream__filters", None)
        if filters is None:
            return False, False
        last = not filters.get("out_sce") and all(
            f == self._on_outgoing for f in filters.get("out_sync", ())
        )
        kept = last and all(
            getattr(f, "__qualname__", None) in _MESSAGE_SAFE_FILTERS
            for f in filters.get("out", ())
        )
        return last, kept

    def _write_text(self, message_id: str) -> tuple[str, TrackedMessage | None]:
        """Serialize a lazily tracked message now (it waits, or its record is needed)."""
        message = self._unwritten.pop(message_id)
        text = tostring(message.xml, top_level=True)
        return text, self._record_written(message_id, text)

    def _record_written(self, message_id: str, text: str) -> TrackedMessage | None:
        record = self.core.written(message_id, text)
        if record is not None:
            self._writer.put(record)
        return record

    def _hold_for_room(self, stanza: StanzaBase, message_id: str, written: str | None) -> bool:
        """Keep back a message to a room the ended session was in, until the app is in
        it again: before that, the room would bounce it (not-acceptable)."""
        xml = stanza.xml
        room = xml.get("to", "").partition("/")[0]
        if xml.get("type") != "groupchat" or room not in self.core.rejoining:
            return False
        if written is not None:
            self._record_written(message_id, written)
        self._room_held.setdefault(room, []).append(stanza)
        self._parked[message_id] = stanza  # it goes out later, like one slixmpp parks
        self.resender.cancel_timer(message_id)  # its attempt starts when it is written
        return True

    def _release_room(self, room: str) -> None:
        """The app is in ``room`` again: what waited for it goes out, in order."""
        held = self._room_held.pop(room, ())
        if not self.core.rejoining:
            self._cancel_rejoin_timer()
        for stanza in held:
            self._send_held(stanza)

    def _send_held(self, stanza: StanzaBase) -> None:
        """Write a held message now, counted as it is written. It is older than anything
        queued for the room since (queued, those would overtake it), and it has passed
        every outgoing filter up to ours already (queued, they would run twice)."""
        message_id = stanza.xml.get("id", "")
        record = self.core.records.get(message_id)
        if record is not None and self.resender.hold(record, stanza):
            return  # older messages to the room are being resent: it goes after them
        if self.xmpp.transport is None or not self._we_write_last():
            self._parked.pop(message_id, None)  # slixmpp parks it again if it must
            self._hand_over(stanza)
            return
        out = self._count_outgoing(stanza)
        if out is None:
            return
        if not isinstance(out, str):
            out = tostring(out.xml, xmlns=self.xmpp.default_ns, stream=self.xmpp, top_level=True)
        self.xmpp.send_raw(out)
        record = self.core.records.get(message_id)
        if record is not None and self.core.retry_policy is not None:
            self.resender.on_record(record)  # its attempt starts now

    def _drop_held(self, room: str) -> None:
        """We left ``room`` for good: its held messages failed with it; their copies must
        not go out by themselves (resend() sends them again)."""
        for stanza in self._room_held.pop(room, ()):
            self._withheld_copies.discard(id(stanza))
            self._parked.pop(stanza.xml.get("id", ""), None)

    def _wait_for_rejoins(self) -> None:
        """A session is live: give the app room_rejoin_wait seconds to be back in the
        rooms of the ended session."""
        self._cancel_rejoin_timer()
        wait = self.room_rejoin_wait
        if self.core.rejoining and wait > 0:
            log.info(
                "messages to %s wait until the app is back in them (at most %gs)",
                ", ".join(sorted(self.core.rejoining)),
                wait,
            )
            self._rejoin_timer = self.xmpp.loop.call_later(wait, self._stop_waiting_for_rooms)
        else:
            self._stop_waiting_for_rooms()

    def _stop_waiting_for_rooms(self) -> None:
        self._rejoin_timer = None
        rooms = sorted(self.core.rejoining)
        if rooms:
            log.info("not back in %s: sending what waited for them anyway", ", ".join(rooms))
        self.core.stop_waiting_for_rooms()
        for room in list(self._room_held):
            self._release_room(room)

    def _cancel_rejoin_timer(self) -> None:
        self._cancel(self._rejoin_timer)
        self._rejoin_timer = None

    def _withhold_parked(self, message_id: str) -> None:
        """A failed message's copy in slixmpp's queue must never go out by itself."""
        parked = self._parked.pop(message_id, None)
        if parked is not None:
            self._withheld_copies.add(id(parked))

    def _on_outgoing(self, stanza: StanzaBase) -> StanzaBase | str | None:
        """out_sync filter: the last look at a stanza before it is written.

        Returns the record's text for a tracked message nothing rewrote since it was
        serialized: slixmpp 1.17 writes a string a filter returns as it is, so each
        message is serialized once, not once for us and once for the wire.
        """
        if isinstance(stanza, (Message, Presence, Iq)):
            if isinstance(stanza, Presence):
                self._read_own_presence(stanza)
            return self._count_outgoing(stanza)
        if isinstance(stanza, sm_stanza.Enable):
            self.ack_clock.reset()
            self._dispatch(self.core.enable_sent())
        elif isinstance(stanza, sm_stanza.Resume):
            self.ack_clock.reset()
            self.core.resume_sent()
        return stanza

    def _count_outgoing(self, stanza: StanzaBase) -> StanzaBase | str | None:
        core = self.core
        if self._withheld_copies and id(stanza) in self._withheld_copies:
            # Failed while parked in slixmpp's queue: only an explicit resend sends it.
            self._withheld_copies.discard(id(stanza))
            return None
        message_id = stanza.xml.get("id") if isinstance(stanza, Message) else None
        written = None  # the text made now for a record tracked before it was serialized
        if message_id is not None:
            if self._parked.get(message_id) is stanza:
                del self._parked[message_id]
            if core.should_drop(message_id):
                return None  # failed before it ever went out; only resend() sends it
            if message_id not in core.records:
                message_id = None
            else:
                unwritten = self._unwritten.get(message_id)
                if unwritten is not None and unwritten is stanza:
                    del self._unwritten[message_id]
                    written = tostring(unwritten.xml, top_level=True)
        if core.sm_phase is SMPhase.RESUMING or (
            message_id is not None and self.xmpp.transport is None and not self.session_live
        ):
            # Written between <resume/> and <resumed/>, any stanza would be counted
            # before the resends and then again among them (Smack #185). And a message
            # whose link dropped while it waited in slixmpp's send queue would be
            # written into nothing and forgotten. Either way: park it for the session
            # start, as if it had been sent offline (it goes out after the resends).
            if written is not None:
                self._record_written(message_id, written)  # type: ignore[arg-type]
            self._original_send(stanza)
            return None
        if (
            message_id is not None
            and self._rejoin_timer is not None
            and self._hold_for_room(stanza, message_id, written)
        ):
            return None
        if not core.counting_out:
            if written is None:
                return stanza
            self._record_written(message_id, written)  # type: ignore[arg-type]
            return stanzas.on_the_wire(written) if self._we_write_last() else stanza
        link_up = self.xmpp.transport is not None
        same = written is None and message_id is not None and self._filters_keep_messages()
        events = core.counted(stanza, message_id, link_up=link_up, same_as_record=same, xml=written)
        if events:
            self._dispatch(events)
        if written is not None:
            record = core.records.get(message_id)  # type: ignore[arg-type]
            if record is not None:
                self._writer.put(record)  # the first snapshot with its text
        self.sm.changed()
        if not link_up:
            return None  # counted: the server will ask for it back after <resumed/>
        text = None
        if written is not None:
            text = written if self._we_write_last() else None
        elif same:
            counted = core.ledger.newest
            if counted is not None and counted.message_id == message_id and counted.serialized:
                text = counted.serialized  # the record's text, tied to this very stanza
        if text is not None:
            text = stanzas.on_the_wire(text)
        now = self.xmpp.loop.time()
        if not self.ack_clock.counted(now):
            self._arm_ack_timer()  # cheap when the deadline did not move (the usual case)
            return stanza if text is None else text
        # Ask for an ack right behind this stanza, in the same write: queued instead, the
        # <r/> would wait behind everything already queued (a whole burst), and the acks
        # would only start once the burst is through instead of flowing along with it.
        if text is None and self._we_write_last():
            text = tostring(
                stanza.xml, xmlns=self.xmpp.default_ns, stream=self.xmpp, top_level=True
            )
        if text is None:
            self._request_ack(now)
            return stanza
        self._ack_requested(now)
        return text + REQUEST_ACK

    # ---------------------------------------------------------------- acks

    def _request_ack(self, now: float) -> None:
        """Queue an ``<r/>`` behind what is queued, so it follows the stanzas it asks about."""
        if self.xmpp.transport is None or not self.core.counting_out:
            return
        # As text, straight into slixmpp's send queue: behind what is queued, and
        # without building and serializing a stanza every ack_every messages.
        self.xmpp.waiting_queue.put_nowait((REQUEST_ACK, False))
        self._ack_requested(now)

    def _ack_requested(self, now: float) -> None:
        self.ack_clock.request_sent(now)
        self._arm_ack_timer()

    def _arm_ack_timer(self) -> None:
        deadline = self.ack_clock.next_deadline()
        if deadline is None:
            return
        if self._ack_timer is not None and self._ack_timer_at is not None:
            if self._ack_timer_at <= deadline:
                return
            self._ack_timer.cancel()
        self._ack_timer_at = deadline
        self._ack_timer = self.xmpp.loop.call_at(deadline, self._on_ack_timer)

    def _on_ack_timer(self) -> None:
        self._ack_timer = None
        self._ack_timer_at = None
        now = self.xmpp.loop.time()
        if not self.core.counting_out:
            return  # no SM on this connection: nothing to ask (the next one re-arms)
        if self.ack_clock.link_dead(now):
            log.warning(
                "no <a/> for %.1fs: the link is presumed dead, dropping it to resume",
                self.ack_clock.policy.timeout,
            )
            self.ack_clock.reset()
            self.xmpp.abort()
            return
        if self.ack_clock.request_due(now) or self.ack_clock.keepalive_due(now):
            self._request_ack(now)
        self._arm_ack_timer()

    def _on_ack(self, stanza: StanzaBase) -> None:
        h = parse_counter(stanza.xml.get("h"))
        if h is None:
            log.warning("ignoring an <a/> without a valid h: %r", stanza.xml.get("h"))
            return
        self.ack_clock.ack_received(self.xmpp.loop.time())
        try:
            events = self.core.ack(h)
        except HBackwards as exc:
            log.warning("ignoring a stale ack: %s", exc)
            return
        except SMProtocolError as exc:
            self._protocol_error(exc)
            return
        self._dispatch(events)
        self.sm.changed()
        self._arm_ack_timer()

    def _on_request_ack(self, _stanza: StanzaBase) -> None:
        self.ack_clock.heard(self.xmpp.loop.time())
        self._send_ack()

    def _ack_before_footer(self) -> None:
        """Our last ``<a/>`` goes right before ``</stream:stream>`` (XEP-0198 §4), not
        when disconnect() is called: stanzas that come in while slixmpp drains its
        send queue are acknowledged too, so the server does not deliver them again."""
        xmpp = self.xmpp
        write, footer = xmpp.send_raw, xmpp.stream_footer

        def send_raw(data: str | bytes) -> None:
            if data == footer:
                if xmpp.send_raw is send_raw:
                    xmpp.send_raw = write
                self._send_ack()
            write(data)

        xmpp.send_raw = send_raw

    def _send_ack(self) -> None:
        if self.xmpp.transport is None or not self.core.counting_in:
            return
        self.xmpp.send_raw(stanzas.ack(self.core.session.handled))

    def _count_inbound(self, stanza: StanzaBase) -> StanzaBase:
        """in filter: count handled stanzas, and read the proofs peers send back."""
        if not isinstance(stanza, (Message, Presence, Iq)):
            return stanza
        if self.core.counting_in:
            self.core.inbound()
            self.sm.changed()
            self.ack_clock.heard(self.xmpp.loop.time())
        try:
            if isinstance(stanza, Message):
                self._read_message(stanza)
            elif isinstance(stanza, Presence):
                self._read_presence(stanza)
        except Exception:  # a malformed stanza must never break the inbound path
            log.exception("could not read an inbound stanza for delivery proofs")
        return stanza

    def _read_message(self, message: Message) -> None:
        xml = message.xml
        kind = xml.get("type")
        if kind == "error":
            bounce = stanzas.read_bounce(xml)
            if bounce is not None:
                reason = FailureReason.bounce(bounce.error_type, bounce.condition, bounce.text)
                self._late_signal(bounce.id, lambda mid: self.core.bounced(mid, reason))
            return
        if kind == "groupchat":
            reflection = stanzas.read_reflection(xml)
            if reflection is not None:
                self._read_reflection(reflection)
            return
        carbon = stanzas.read_sent_carbon(xml, self.xmpp.boundjid.bare)
        if carbon is not None:
            if carbon.fields.id not in self.core.records:
                outgoing = OutgoingMessage(*carbon.fields, xml=carbon.xml, via_carbon=True)
                self._dispatch(self.core.track(outgoing, link_up=True))
            return
        for proof in stanzas.read_peer_proofs(xml):
            signal = self.core.delivered if proof.kind == "delivered" else self.core.displayed
            self._late_signal(proof.id, signal)

    def _read_reflection(self, reflection: stanzas.Reflection) -> None:
        room = reflection.room
        if self.core.nick_in(room) != reflection.nick:
            return
        message_id = self.core.find_reflected(
            room,
            reflection.origin_id,
            reflection.id,
            reflection.body,
            history=reflection.history,
        )
        if message_id is not None:
            self._dispatch(self.core.room_received(message_id))
            return
        # Not one in memory: perhaps one that failed (its reflection was lost, the
        # resumption refused) and that the room's history now shows. By its stable id
        # only: the store is asked for it, so a resend does not duplicate it in the room.
        wanted = reflection.origin_id or reflection.id
        if wanted:
            self._late_signal(wanted, lambda mid: self._reflected_late(mid, room))

    def _reflected_late(self, message_id: str, room: str) -> list[Event]:
        record = self.core.get(message_id)
        if record is None or record.type != "groupchat" or record.conversation != room:
            self.core.retire(message_id)  # fetched for nothing
            return []
        return self.core.room_received(message_id)

    def _read_own_presence(self, presence: Presence) -> None:
        """A join on its way: should the session end before the room answers, the next
        one must join again before messages to that room go out."""
        join = stanzas.read_join(presence.xml)
        if join is not None:
            self.core.join_sent(join.room, join.nick)

    def _read_presence(self, presence: Presence) -> None:
        """Our own occupant presence (status 110): which nick is ours in which room.
        stanzas reads the facts; the core decides what its status codes mean."""
        fact = stanzas.read_room_presence(presence.xml)
        if fact is None:
            return
        room = fact.room
        if fact.error:
            if self.core.join_refused(room) and room in self._room_held:
                self._release_room(room)  # they bounce with the room's own condition
            return
        kind = "unavailable" if fact.unavailable else None
        decision = own_presence(fact.codes, kind, fact.nick, fact.new_nick)
        if isinstance(decision, Joined | NickChanged):
            self._joined(room, decision.nick)
        elif isinstance(decision, Left):
            self._dispatch(self.core.left_room(room, decision.reason, rejoin=decision.rejoin))
            self.sm.changed()  # the saved state must not bring this room back
            self._drop_held(room)

    def _joined(self, room: str, nick: str) -> None:
        """We are ``nick`` in ``room``; the saved state learns it too, since a resumed
        stream gets no new self-presence (the room never saw it leave)."""
        if nick and self.core.nick_in(room) != nick:
            self.core.joined_room(room, nick)
            self.sm.changed()
        if room in self._room_held:
            self._release_room(room)

    def _late_signal(self, message_id: str, signal: Callable[[str], list[Event]]) -> None:
        """Apply a peer's proof to a record, fetching it from the store if it was retired."""
        if message_id in self.core.records:
            self._dispatch(signal(message_id))
            return

        async def from_store() -> None:
            try:
                await self._writer.flush()
                record = await self.store.get(message_id)
            except Exception:
                log.exception("could not load message %s for a late delivery proof", message_id)
                return
            if record is None:
                return  # not one of ours
            self.core.reinstate(record)
            self._dispatch(signal(message_id))

        task = asyncio.ensure_future(from_store())
        self._late_tasks.add(task)
        task.add_done_callback(self._late_tasks.discard)

    def _protocol_error(self, exc: SMProtocolError) -> None:
        """XEP-0198 §4: an ``h`` beyond what we sent ends the stream; nothing is lost."""
        log.error("stream management protocol error: %s; dropping the session", exc)
        if self.xmpp.transport is not None:
            self.xmpp.send_raw(stanzas.handled_count_too_high(exc.h, exc.seq))
        self._drop_session()

    def _drop_session(self) -> None:
        """The server's SM state cannot be trusted: fail what is unacked, never resume
        this stream, and drop the connection (a fresh session follows)."""
        self._dispatch(self.core.session_ended(FailureReason.PROTOCOL_ERROR))
        self.sm.changed(urgent=True)
        if self.xmpp.transport is not None:
            self.xmpp.end_session_on_disconnect = True
            self.xmpp.abort()

    # ---------------------------------------------------------------- negotiation

    async def _handle_sm_feature(self, features: StanzaBase) -> bool:
        """Resume before bind when we can, otherwise enable after bind."""
        xmpp, core = self.xmpp, self.core
        if "stream_management" in xmpp.features:
            return False
        if "bind" not in xmpp.features:
            resumable = core.sm_phase is SMPhase.SUSPENDED and core.session.can_resume
            if resumable and self.allow_resume:
                return await self._resume()
            core.sm_offered()  # a fresh session: <enable/> goes out at bind
            return False
        core.sm_offered()
        if core.sm_phase is SMPhase.OFFERED:
            self._send_enable()
        waiter = Waiter(
            f"sm_tracker enabled_or_failed {uuid.uuid4().hex}",  # one per wait: removed by name
            MatchMany([MatchXPath(sm_stanza.Enabled.tag_name()), MatchXPath(FAILED_TAG)]),
        )
        transport = xmpp.transport
        xmpp.register_handler(waiter)
        await waiter.wait(timeout=self.negotiation_timeout)
        # A connection lost meanwhile: these features belong to it; stop reading them.
        return xmpp.transport is not transport

    async def _resume(self) -> bool:
        session = self.core.session
        resume = sm_stanza.Resume(self.xmpp)
        resume["h"] = session.handled
        resume["previd"] = session.sm_id
        waiter = Waiter(
            f"sm_tracker resumed_or_failed {uuid.uuid4().hex}",
            MatchMany([MatchXPath(sm_stanza.Resumed.tag_name()), MatchXPath(FAILED_TAG)]),
        )
        transport = self.xmpp.transport
        self.xmpp.register_handler(waiter)
        self._original_send(resume)
        result = await waiter.wait(timeout=self.negotiation_timeout)
        if self.xmpp.transport is not transport:
            # The connection that asked was lost while waiting (its loss was handled
            # then); a "session_end" now would end the session of the next connection.
            log.info("the connection was lost during <resume/>; nothing more to do for it")
            return True
        if result and result.xml.tag == sm_stanza.Resumed.tag_name():
            return self.core.counting_in  # False if <resumed> was rejected
        if not result and self.core.sm_phase is SMPhase.RESUMING:
            log.warning("no answer to <resume/>: treating it as refused")
            self._dispatch(self.core.resume_failed(None))
        self.xmpp.event("session_end")
        return False

    def _send_enable(self) -> None:
        self.core.enable_queued()
        enable = sm_stanza.Enable(self.xmpp)
        enable["resume"] = self.allow_resume
        if self.resume_max is not None:
            enable.xml.set("max", str(int(self.resume_max)))
        self._original_send(enable)

    def _on_session_bind(self, _jid: Any) -> None:
        """Enable right after bind, before session_start handlers queue their stanzas,
        so that everything the app sends in them is counted."""
        if self.core.sm_phase is SMPhase.OFFERED:
            self._send_enable()

    def _on_enabled(self, stanza: StanzaBase) -> None:
        if self.core.sm_phase is not SMPhase.ENABLING:
            log.warning("ignoring an <enabled/> nobody asked for (%s)", self.core.sm_phase.name)
            return
        xml = stanza.xml
        self.xmpp.features.add("stream_management")
        resumable = xml.get("resume", "false").lower() in ("true", "1")
        location = xml.get("location")
        self._location_dead = None  # a new session: its location gets a chance
        events = self.core.enabled(
            xml.get("id"),
            resumable=resumable and self.allow_resume,
            location=location if parse_location(location) else None,
            max=parse_counter(xml.get("max")),
            jid=self.xmpp.boundjid.full,
        )
        self._dispatch(events)
        self.sm.changed(urgent=True)
        if location and parse_location(location) is None:
            log.warning("ignoring an unusable <enabled location=%r>", location)
        max_text = xml.get("max")
        if max_text is not None and parse_counter(max_text) is None:
            log.warning("ignoring an unusable <enabled max=%r>", max_text)
        self.xmpp.end_session_on_disconnect = not self.core.session.can_resume

    def _on_resumed(self, stanza: StanzaBase) -> None:
        if self.core.sm_phase is not SMPhase.RESUMING:
            log.warning("ignoring a <resumed/> nobody asked for (%s)", self.core.sm_phase.name)
            return
        xml = stanza.xml
        session = self.core.session
        previd = xml.get("previd")
        h = parse_counter(xml.get("h"))
        if previd != session.sm_id or h is None:
            log.error(
                "<resumed previd=%r h=%r> does not match our stream %r: dropping the session",
                previd,
                xml.get("h"),
                session.sm_id,
            )
            self._drop_session()
            return
        try:
            events, resend = self.core.resumed(h)
        except SMProtocolError as exc:
            self._protocol_error(exc)
            return
        self.xmpp.features.add("stream_management")
        if session.jid:
            self.xmpp.boundjid = JID(session.jid)  # a resumed stream keeps its resource
        result = self.core.last_resume
        if result is not None and (result.missing or result.ahead):
            log.warning(
                "the saved SM state was incomplete: %d unacked stanzas could not be resent, "
                "%d handled stanzas were unknown to it",
                result.missing,
                result.ahead,
            )
        # Written here, synchronously: nothing queued meanwhile can overtake them.
        write = self.xmpp.send_raw
        for entry in resend:
            write(
                tostring(
                    entry.payload.xml, xmlns=self.xmpp.default_ns, stream=self.xmpp, top_level=True
                )
            )
        self._dispatch(events)
        self.sm.changed(urgent=True)
        if resend:
            for _ in resend:
                self.ack_clock.counted(self.xmpp.loop.time())
            self._request_ack(self.xmpp.loop.time())
        self.xmpp.end_session_on_disconnect = not self.core.session.can_resume
        self.xmpp.event("session_resumed", stanza)

    def _on_failed(self, stanza: StanzaBase) -> None:
        """``<failed/>`` answers either ``<enable/>`` or ``<resume/>``; slixmpp cannot
        tell which and never reads its ``h``."""
        h = parse_counter(stanza.xml.get("h"))
        phase = self.core.sm_phase
        if phase is SMPhase.RESUMING:
            log.info("resumption refused (h=%s): failing what it does not cover", h)
            self._dispatch(self.core.resume_failed(h))
        elif phase is SMPhase.ENABLING:
            log.warning("the server refused to enable stream management")
            self._dispatch(self.core.enable_failed())
        else:
            log.warning("ignoring a <failed/> nobody asked for (%s)", phase.name)
            return
        self.xmpp.features.discard("stream_management")
        self.sm.changed(urgent=True)

    # ---------------------------------------------------------------- connection

    def _on_connected(self, _event: Any) -> None:
        self._link.handle(LinkEvent.CONNECTED)
        self.ack_clock.reset()
        self._cancel(self._negotiation_timer)
        self._negotiation_timer = self.xmpp.loop.call_later(
            self.negotiation_timeout, self._on_negotiation_timeout
        )

    def _on_negotiation_timeout(self) -> None:
        self._negotiation_timer = None
        if self._link.phase is LinkPhase.NEGOTIATING and self.xmpp.transport is not None:
            log.warning("no session after %.0fs: dropping the connection", self.negotiation_timeout)
            self.xmpp.abort()

    def _on_session_live(self, _event: Any) -> None:
        self._link.handle(LinkEvent.SESSION_STARTED)
        if self.core.counting_out:
            self.ack_clock.heard(self.xmpp.loop.time())  # the keepalive counts from here
            self._arm_ack_timer()
        self._wait_for_rejoins()
        self._reconnect_attempt = 0
        self._cancel(self._negotiation_timer)
        self._negotiation_timer = None

    def _on_disconnected(self, _reason: Any) -> None:
        left = self._link.handle(LinkEvent.DISCONNECTED)
        self._cancel_ack_timer()
        self._cancel_rejoin_timer()  # the wait starts again with the next session
        self._cancel(self._negotiation_timer)
        self._negotiation_timer = None
        self.ack_clock.reset()
        if left in CLOSED_BY_APP:
            return
        self._dispatch(self.core.link_lost())
        if left is LinkPhase.DROPPING:  # asked for by the app: at once, whatever the config
            self._cancel(self._reconnect_timer)
            self._reconnect_timer = self.xmpp.loop.call_later(0, self._reconnect)
        elif self.auto_reconnect:
            self._schedule_reconnect()

    def _on_stream_error(self, error: Any) -> None:
        """A stream error answering ``<resume/>``: that session will not come back.

        Asking again would meet the same error on every reconnect (aioxmpp #382): the
        SM state is dropped instead, what it did not confirm fails ``resume-failed``,
        and the next connection starts a fresh session.
        """
        if self.core.sm_phase is not SMPhase.RESUMING:
            return  # any other stream error: the link drops, resumption is tried
        condition = error["condition"] if error is not None else None
        log.warning("stream error %r answered <resume/>: dropping the SM state", condition)
        self._dispatch(self.core.resume_failed(None))
        self.xmpp.features.discard("stream_management")
        self.sm.changed(urgent=True)
        self.xmpp.event("session_end")

    def _on_session_end(self, _event: Any) -> None:
        """The SM session is over for good: nothing unacked can be confirmed any more."""
        if self._link.phase in CLOSED_BY_APP:
            unsent = self.core.unsent_ids()
        else:
            # slixmpp discarded what it had queued but not written; what it parked
            # for the next session start is still going out.
            unsent = [i for i in self.core.unsent_ids() if i not in self._parked]
        self._dispatch(self.core.session_ended(FailureReason.SESSION_ENDED, unsent=unsent))
        for message_id in unsent:
            self._withhold_parked(message_id)
        self.xmpp.features.discard("stream_management")
        self.sm.changed(urgent=True)

    def _schedule_reconnect(self) -> None:
        self._cancel(self._reconnect_timer)
        delay = backoff_delay(
            self._reconnect_attempt, self.reconnect_delay, self.reconnect_max_delay
        )
        self._reconnect_attempt += 1
        self._reconnect_timer = self.xmpp.loop.call_later(delay, self._reconnect)

    def _reconnect_requested(self, wait: float = 2.0, reason: str = "Reconnecting") -> None:
        """``xmpp.reconnect`` as wrapped: a resumable session is resumed, not ended.

        slixmpp's reconnect closes the stream first, and a closed stream cannot be
        resumed: what was unacked would fail. Apps call it on a network change and
        ``xep_0199`` on a ping timeout, so the link is dropped and resumed instead.
        """
        if not self.core.session.can_resume or self.xmpp.transport is None:
            self._original_reconnect(wait, reason)
            return
        log.info("%s: dropping the link to resume the session", reason)
        self._reconnect_attempt = 0
        self._link.handle(LinkEvent.DROP_TO_RESUME)
        self.xmpp.abort()

    def _reconnect(self) -> None:
        """Connect again: to the server's ``<enabled location>`` while it answers, else
        to the address the app gave (slixmpp would keep the location for good)."""
        self._reconnect_timer = None
        xmpp = self.xmpp
        if self._link.phase in CLOSED_BY_APP or xmpp.transport is not None or xmpp.is_connecting():
            return
        if xmpp.custom_address != self._location_tried:
            self._app_address = xmpp.custom_address  # the app's (None: DNS)
        location = parse_location(self.core.session.location)
        address = choose_address(location, self._location_dead, self._app_address)
        self._location_tried = address if address == location else None
        log.info("reconnecting to %s", address or xmpp.boundjid.domain)
        if address:
            xmpp.connect(*address)
        else:
            xmpp.connect()

    def _on_connection_failed(self, _error: Any) -> None:
        """The server's preferred location did not answer: back to the app's address."""
        tried, xmpp = self._location_tried, self.xmpp
        if tried is None or xmpp.custom_address != tried:
            return
        log.warning(
            "the server's resumption location %s:%s does not answer: back to %s",
            *tried,
            self._app_address or xmpp.boundjid.domain,
        )
        self._location_dead = tried
        xmpp.cancel_connection_attempt()
        self._cancel(self._reconnect_timer)
        self._reconnect_timer = xmpp.loop.call_later(0, self._reconnect)

    def _disconnect(
        self, wait: float = 2.0, reason: str | None = None, ignore_send_queue: bool = False
    ) -> asyncio.Future[Any]:
        """``xmpp.disconnect`` as wrapped: a graceful close ends the SM session.

        Ask for a last ack (it comes back before the server closes), send ours,
        then let slixmpp close; whatever stays unacked ends ``failed``.
        """
        self._link.handle(LinkEvent.CLOSE)
        self._cancel(self._reconnect_timer)
        self._reconnect_timer = None
        xmpp = self.xmpp
        if xmpp.transport is None:
            xmpp.cancel_connection_attempt()
            self._on_session_end(None)
        else:
            if not ignore_send_queue:
                self._request_ack(xmpp.loop.time())
            self._ack_before_footer()
            xmpp.end_session_on_disconnect = True
        future: asyncio.Future[Any] = self._original_disconnect(wait, reason, ignore_send_queue)
        return future

    # ---------------------------------------------------------------- timers

    @staticmethod
    def _cancel(handle: asyncio.TimerHandle | None) -> None:
        if handle is not None:
            handle.cancel()

    def _cancel_ack_timer(self) -> None:
        self._cancel(self._ack_timer)
        self._ack_timer = None
        self._ack_timer_at = None

    def _cancel_timers(self) -> None:
        self._cancel_ack_timer()
        self._cancel_rejoin_timer()
        for handle in (self._reconnect_timer, self._negotiation_timer):
            self._cancel(handle)
        self._reconnect_timer = None
        self._negotiation_timer = None


class _ResendHost:
    """The resender's narrow view of the plugin (:class:`~.resend.ResendHost`)."""

    __slots__ = ("_plugin",)

    def __init__(self, plugin: SMTracker) -> None:
        self._plugin = plugin

    @property
    def xmpp(self) -> Any:
        return self._plugin.xmpp

    @property
    def core(self) -> Tracker[StanzaBase]:
        return self._plugin.core

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = self._plugin.config
        return config

    @property
    def session_live(self) -> bool:
        return self._plugin.session_live

    def apply(self, events: list[Event]) -> None:
        self._plugin._dispatch(events)

    def write(self, message: Message) -> None:
        self._plugin._hand_over(message)

    def withhold_queued_copy(self, message_id: str) -> None:
        self._plugin._withhold_parked(message_id)

    async def get(self, message_id: str) -> TrackedMessage | None:
        return await self._plugin.get(message_id)


# ``xmpp.register_plugin("sm_tracker")`` works once this module is imported.
_register_slixmpp_plugin(SMTracker)

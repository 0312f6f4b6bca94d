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
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from slixmpp.plugins.base import BasePlugin
from slixmpp.plugins.base import register_plugin as _register_slixmpp_plugin
from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.stanza import Message
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from .acking import AckDriver
from .context import Context
from .core.acks import AckClock, AckPolicy
from .core.outbox import Outbox
from .core.phases import (
    LINK_TRANSITIONS,
    SESSION_UP,
    LinkPhase,
    PhaseMachine,
    SMPhase,
)
from .core.records import FailureReason, TrackedMessage
from .core.retry import RetryPolicy
from .core.states import DeliveryState
from .core.tracker import Event, Tracker
from .dispatch import EventsOut, TrackerEvents
from .handles import HandleRegistry, MessageHandle
from .inbound import Inbound
from .outbound import Outbound
from .payloads import Payload
from .resend import Resender
from .session import SessionDriver, displace_xep_0198, restore_xep_0198
from .smhooks import SMStateHooks
from .stanzas import FAILED_TAG
from .statebridge import StateBridge
from .stats import StatsCounters, TrackerStats
from .stores.base import LeasedStore, LeaseLost, StoreError, TrackerStore
from .stores.memory import MemoryStore
from .writer import StoreWriter

__all__ = ["SMTracker", "tracker_of"]

log = logging.getLogger(__name__)


class SMTracker(BasePlugin):  # type: ignore[misc]
    """Per-message delivery tracking on top of XEP-0198 stream management."""

    name = "sm_tracker"
    description = "Per-message delivery tracking over XEP-0198 stream management"
    dependencies: ClassVar[set[str]] = {"xep_0198"}
    default_config: ClassVar[dict[str, Any]] = {
        #: Ask for an ack after this many counted stanzas.
        "ack_every": 10,
        #: At the latest, ask this many seconds after the first stanza nobody asked about.
        "ack_delay": 0.2,
        #: Ask after the last stanza of a burst too (a lone message: acked in one RTT).
        "ack_at_burst_end": True,
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
        #: Give stanzas made without an id one that sorts by time (UUID version 7) rather
        #: than slixmpp's random one: a store indexes them at a fraction of the cost.
        "time_ordered_ids": True,
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
        #: Seconds between two writes of record changes to the store while changes keep
        #: coming (bigger batches cost the store less per record); the first change
        #: after a quiet spell is written at once, ``flush()`` writes everything now.
        "store_interval": 0.05,
        #: Before resending what failed unanswered, look it up in our XEP-0313 archive.
        "reconcile_with_archive": True,
        #: Seconds before the oldest failed message to start the archive query at.
        "reconcile_slack": 60.0,
        #: At most this many archived messages are read per check.
        "reconcile_limit": 1000,
        #: Give up the archive check (and resend) after this many seconds.
        "reconcile_timeout": 10.0,
        #: At most this many stanzas unacked (or queued to be written): beyond it, new
        #: ones wait, unwritten, until acks come (memory and the saved state stay bounded).
        "max_unacked": 5000,
        #: Hosts an ``<enabled location>`` may send us to besides the account's domain
        #: and its subdomains (e.g. an IP literal of a cluster node).
        "location_allow": (),
    }

    # ---------------------------------------------------------------- lifecycle

    def plugin_init(self) -> None:
        xmpp = self.xmpp
        self.core: Tracker[Payload] = Tracker(clock=time.time)
        #: When to ask for acks and when silence means a dead link (sans-I/O).
        self.ack_clock = ack_clock = AckClock(_checked_settings(self.config))
        #: pyee emitter with the same events, names, payloads and order as the slixmpp bus.
        self.events = TrackerEvents()
        self.events.add_listener("error", self._log_listener_error)
        self.store: TrackerStore = MemoryStore()
        self._writer = StoreWriter(self.store, min_interval=self.store_interval)
        #: ``sm.load(state)`` before connect, ``sm.cache(fn)`` to persist the SM state.
        bridge = StateBridge(xmpp, self.core)
        self.sm = SMStateHooks(
            export=bridge.export, load=bridge.load, min_interval=self.cache_interval
        )
        self._xep = xmpp.plugin["xep_0198"]

        #: The connection's phase; the SM session's is the core's (``core.sm_phase``).
        self._link = PhaseMachine(LINK_TRANSITIONS, LinkPhase.OFFLINE)
        self._original_send = xmpp.send
        self._stats = StatsCounters()
        ctx = Context(
            xmpp=xmpp,
            core=self.core,
            config=self.config,
            link=self._link,
            emit=self._dispatch,
            state_changed=self.sm.changed,
            send=self._original_send,
            stats=self._stats,
        )
        self._ctx = ctx
        self._acks = AckDriver(
            ctx, ack_clock, lambda exc: self._session.protocol_error(exc), self.sm.ackable
        )
        self.sm.on_saved = self._acks.state_saved
        #: Every stanza's verdict as it is written, and what is held back (sans-I/O).
        self.outbox: Outbox[StanzaBase] = Outbox()
        self.resender = Resender(_ResendHost(self))
        #: The handles the app holds (send_message, handle()), fed every snapshot.
        self._handles = HandleRegistry()
        #: Closes the store once the plugin ended (await it to know it is closed).
        self.closing_store: asyncio.Task[None] | None = None
        #: Why this tracker let go of its stream: its store's lease went to another process.
        self.lease_lost: LeaseLost | None = None
        self._outbound = Outbound(
            ctx, self._acks, self.outbox, self.resender, lambda record: self._writer.put(record)
        )
        self._session = SessionDriver(ctx, self._acks, self._outbound)
        self._out = EventsOut(
            xmpp,
            self.events,
            self.core,
            self._writer,
            self._outbound,
            self.resender,
            self._handles,
            self._stats.reached,
        )
        # A written tracked message stays in the ledger as its text (see payloads).
        self.core.compact = self._out.compact
        self._inbound = Inbound(ctx, self._acks, self._outbound, self._fetch)

        self.core.retry_policy = self.retry_policy

        displace_xep_0198(xmpp)
        self._handlers = (
            ("SM Tracker Enabled", sm_stanza.Enabled.tag_name(), self._session.on_enabled),
            ("SM Tracker Resumed", sm_stanza.Resumed.tag_name(), self._session.on_resumed),
            ("SM Tracker Failed", FAILED_TAG, self._session.on_failed),
            ("SM Tracker Ack", sm_stanza.Ack.tag_name(), self._acks.on_ack),
            # after it: acks open the unacked window for what waits
            ("SM Tracker Window", sm_stanza.Ack.tag_name(), self._outbound.open_window),
            ("SM Tracker Request Ack", sm_stanza.RequestAck.tag_name(), self._acks.on_request),
        )
        for name, tag, method in self._handlers:
            xmpp.register_handler(Callback(name, MatchXPath(tag), method, instream=True))
        self._filters = (
            ("in", self._inbound.on_incoming),
            ("out_sync", self._outbound.on_outgoing),
        )
        for mode, filter_ in self._filters:
            xmpp.add_filter(mode, filter_)
        self._event_handlers: tuple[tuple[str, Callable[[Any], None]], ...] = (
            ("connected", self._session.on_connected),
            ("session_bind", self._session.on_session_bind),
            ("session_start", self._session.on_session_live),
            ("session_resumed", self._session.on_session_live),
            ("stanza_not_sent", self._outbound.on_stanza_not_sent),
            ("session_end", self._session.on_session_end),
            ("disconnected", self._session.on_disconnected),
            ("stream_error", self._session.on_stream_error),
            ("connection_failed", self._session.on_connection_failed),
        )
        for event, handler in self._event_handlers:
            xmpp.add_event_handler(event, handler)
        for order in (self._xep.resume_order, self._xep.order):
            xmpp.register_feature("sm", self._session.handle_sm_feature, restart=True, order=order)

        # slixmpp's send, disconnect and reconnect are wrapped (see each part).
        self._outbound.install()
        self._session.install()

    def plugin_end(self) -> None:
        xmpp = self.xmpp
        self._session.uninstall()
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
        self._handles.close()
        restore_xep_0198(xmpp)
        # What waited for a rejoin or a resend is no longer ours to hold: slixmpp sends
        # it (untracked from now on) rather than nobody.
        self._outbound.uninstall()
        self._inbound.close()
        # An attached store is the tracker's from attach() on: it goes with it.
        self.closing_store = self._writer.close_with_store(self.store)

    # ---------------------------------------------------------------- public API

    async def attach(self, store: TrackerStore) -> None:
        """Use ``store`` for records from now on (write what the old one had queued first)."""
        # Read the new store first: if it is unusable, nothing changes.
        left_in_flight = await store.pending()
        old = self._writer
        self.store = store
        self._writer = self._out.writer = StoreWriter(store, min_interval=self.store_interval)
        for snapshot in old.take_pending():  # queued changes go to the new store
            self._writer.put(snapshot)
        await old.aclose_quietly()
        # Records a previous process left in flight settle with the first session.
        self.core.adopt(left_in_flight)
        if isinstance(store, LeasedStore):
            store.on_lease_lost(lambda error: self._lease_lost(store, error))

    def _lease_lost(self, store: TrackerStore, error: LeaseLost) -> None:
        """Another process owns the account now: let go of its stream at once."""
        if store is not self.store:
            return  # a store the app has since replaced
        log.error("%s: this tracker lets go of the stream", error)
        self.lease_lost = error
        self._session.let_go()

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
        """Make every record change so far durable, and hand the SM state to ``sm.cache``.

        Concurrent calls share the work: the store writer writes what is pending in one
        batch for every caller waiting, and ``sm.cache`` sees the latest state once."""
        await self._flush_records()
        await self.sm.flush()

    async def _flush_records(self) -> None:
        """Every record change so far in the store, the SM state left to ``sm.cache``'s
        own pace: a query or a durable send needs the records, and the whole state
        handed over per call costs O(in flight) each time (4 000 durable sends while
        unacked made 4 000 calls and 2.4 GB of JSON)."""
        self._outbound.all_text_now()
        await self._writer.flush()

    async def get(self, message_id: str) -> TrackedMessage | None:
        """The latest record of a message."""
        record = self.core.get(message_id)
        if record is not None:
            if self._outbound.is_unwritten(message_id):
                return self._outbound.text_now(message_id)[1] or record
            return record
        await self._flush_records()
        return await self.store.get(message_id)

    async def pending(self) -> list[TrackedMessage]:
        """Messages still in flight, oldest first."""
        await self._flush_records()
        return await self.store.pending()

    async def failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        """Messages that failed (all, or one conversation's), oldest first."""
        await self._flush_records()
        return await self.store.failed(conversation)

    async def conversation(
        self, jid: str, limit: int = 50, before: float | None = None
    ) -> list[TrackedMessage]:
        """The newest ``limit`` messages to ``jid`` created before ``before``, oldest first."""
        await self._flush_records()
        return await self.store.conversation(jid, limit, before)

    async def delete(self, message_id: str) -> bool:
        """Forget a message that is not in flight (the user deleted it)."""
        record = self.core.get(message_id)
        if record is not None and record.in_flight:
            raise ValueError(f"message {message_id} is still {record.state.name}")
        await self._flush_records()
        return await self.store.delete(message_id)

    async def delete_failed(self, conversation: str | None = None) -> int:
        """Delete failed messages (all, or one conversation's) instead of resending them."""
        await self._flush_records()
        return await self.store.delete_failed(conversation)

    async def send_message(
        self, mto: str, mbody: str, mtype: str = "chat", **kwargs: Any
    ) -> MessageHandle:
        """The durable send: the record is in the store before the stanza leaves (the
        SM state follows at ``sm.cache``'s pace, as for any other message).

        Returns the message's handle: ``await handle.settled()`` for the outcome."""
        message = self.xmpp.make_message(mto=mto, mbody=mbody, mtype=mtype, **kwargs)
        record = self._outbound.track(message)
        if record is None:
            raise ValueError("this message is not tracked (no body, <no-store/> or predicate)")
        handle = self._handle_of(record)  # from the start: no snapshot goes unseen
        try:
            await self._flush_records()
        except StoreError:
            # Never handed over: fail it (it can be resent once the store works again).
            self._dispatch(self.core.abandon(record.id, FailureReason.STORE_FAILED))
            raise
        current = self.core.get(record.id)
        if current is None or not current.in_flight:
            return handle  # the session ended meanwhile: it failed, unsent
        self._outbound.hand_over(message, current)  # or behind older resends, a full window
        return handle

    def stats(self) -> TrackerStats:
        """Counts since start, what is in flight now, ack round trips, reconnects."""
        core, counters, now = self.core, self._stats, time.time()
        in_flight = [r for r in core.records.values() if r.in_flight]
        oldest = min((r.created_at for r in in_flight), default=None)
        return TrackerStats(
            reached=dict(counters.reached),
            in_flight=len(in_flight),
            oldest_in_flight_age=None if oldest is None else max(0.0, now - oldest),
            ack_rtt=counters.rtt_percentiles(),
            reconnects=max(0, counters.connections - 1),
            resumptions=core.resumptions,
            resumptions_failed=core.resumptions_failed,
        )

    async def handle(self, message_id: str) -> MessageHandle:
        """The handle of any tracked message (sent by this process or one before it)."""
        record = await self.get(message_id)
        if record is None:
            raise KeyError(f"no tracked message with id {message_id!r}")
        return self._handle_of(record)

    def _handle_of(self, record: TrackedMessage) -> MessageHandle:
        latest = self.core.get(record.id) or record
        return self._handles.handle(latest, self.resender.retry_pending(record.id))

    async def resend(self, message_id: str) -> TrackedMessage:
        """Send a failed message again: same id and origin-id (receivers drop a duplicate),
        a ``<delay/>`` with its original time, and an archive check first."""
        record = await self.get(message_id)
        if record is None:
            raise KeyError(f"no tracked message with id {message_id!r}")
        if (
            record.state is not DeliveryState.FAILED
            or record.reason == FailureReason.STANZA_TOO_BIG
        ):
            raise ValueError(
                f"message {message_id} is {record.state.name} ({record.reason}): "
                "only a FAILED message the server can take is resent"
            )
        [result] = await self.resender.resend([record])
        return result

    async def resend_failed(self, conversation: str | None = None) -> list[TrackedMessage]:
        """Resend every failed message (or one conversation's), in their original order."""
        return await self.resender.resend(await self.failed(conversation))

    def set_retry_policy(self, policy: RetryPolicy | None) -> None:
        """Turn automatic retries on (or off with None) for this client."""
        self.config["retry_policy"] = policy
        self.core.retry_policy = policy

    # ---------------------------------------------------------------- events out

    def _dispatch(self, events: Iterable[Event]) -> None:
        """The one place events leave (see :class:`~.dispatch.EventsOut`)."""
        self._out.emit(events)

    @staticmethod
    def _log_listener_error(exc: Exception) -> None:
        log.error("an sm_tracker event listener raised: %r", exc, exc_info=exc)

    async def _fetch(self, message_id: str) -> TrackedMessage | None:
        """A record from the store, with every change so far written first."""
        await self._writer.flush()
        return await self.store.get(message_id)

    # ---------------------------------------------------------------- timers

    def _cancel_timers(self) -> None:
        self._acks.cancel()
        self._session.cancel_timers()
        self._outbound.cancel_rejoin_wait()


class _ResendHost:
    """The resender's narrow view of the plugin (:class:`~.resend.ResendHost`)."""

    __slots__ = ("_plugin",)

    def __init__(self, plugin: SMTracker) -> None:
        self._plugin = plugin

    @property
    def xmpp(self) -> Any:
        return self._plugin.xmpp

    @property
    def core(self) -> Tracker[Payload]:
        return self._plugin.core

    @property
    def outbox(self) -> Outbox[StanzaBase]:
        return self._plugin.outbox

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
        self._plugin._original_send(message)

    def release(self, message: Message) -> None:
        self._plugin._outbound.past_the_gate(message, message.xml.get("id"))

    async def get(self, message_id: str) -> TrackedMessage | None:
        return await self._plugin.get(message_id)


def tracker_of(xmpp: Any) -> SMTracker:
    """The ``sm_tracker`` plugin of ``xmpp``, typed (slixmpp's typed ``xmpp.plugin`` knows
    only its own plugins, so ``xmpp.plugin["sm_tracker"]`` fails under mypy strict)."""
    if "sm_tracker" not in xmpp.plugin:
        raise LookupError(
            "sm_tracker is not registered on this client: "
            "xmpp.register_plugin('sm_tracker', module='xmpp_sm_tracker') first"
        )
    tracker: SMTracker = xmpp.plugin["sm_tracker"]
    return tracker


def _checked_settings(config: dict[str, Any]) -> AckPolicy:
    """Refuse bad settings when the plugin is registered; the ack policy they give."""
    try:
        policy = AckPolicy(
            every=config["ack_every"],
            delay=config["ack_delay"],
            timeout=config["ack_timeout"],
            keepalive=config["ack_keepalive"],
            at_burst_end=config["ack_at_burst_end"],
        )
    except (TypeError, ValueError) as exc:
        message = str(exc)  # named as the user wrote them: ack_every, ack_delay, ...
        for field in ("every", "delay", "timeout", "keepalive", "at_burst_end"):
            message = message.replace(f"'{field}'", f"ack_{field}")
        raise ValueError(f"sm_tracker config: {message}") from exc
    wait = config["room_rejoin_wait"]
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
        raise ValueError(f"room_rejoin_wait must be a number of seconds >= 0, not {wait!r}")
    interval = config["store_interval"]
    if isinstance(interval, bool) or not isinstance(interval, int | float) or not interval >= 0:
        raise ValueError(f"store_interval must be a number of seconds >= 0, not {interval!r}")
    window = config["max_unacked"]
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ValueError(f"max_unacked must be a positive integer or None, not {window!r}")
    if not isinstance(config["time_ordered_ids"], bool):
        raise ValueError(
            f"time_ordered_ids must be True or False, not {config['time_ordered_ids']!r}"
        )
    allow = config["location_allow"]
    if isinstance(allow, str | bytes) or not all(isinstance(h, str) for h in allow):
        raise ValueError(f"location_allow must be a list of host names, not {allow!r}")
    return policy


# ``xmpp.register_plugin("sm_tracker")`` works once this module is imported.
_register_slixmpp_plugin(SMTracker)

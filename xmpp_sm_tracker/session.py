"""The session's life on the wire: XEP-0198 negotiation, the connection, reconnects.

slixmpp glue: it reads the stream-management answers and slixmpp's connection
events, hands them to the core as facts, and turns the core's answers into writes
and timers. What each fact means (which phase, what a record becomes) is decided
in the core (:mod:`.core.phases`, :mod:`.core.tracker`, :mod:`.core.reconnect`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Container
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

from slixmpp.jid import JID
from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback, Waiter
from slixmpp.xmlstream.matcher import MatchMany, MatchXPath

from . import stanzas
from .acking import AckDriver
from .context import Context
from .core.ledger import ResumeResult, SMProtocolError
from .core.phases import CLOSED_BY_APP, LinkEvent, LinkPhase, SMPhase
from .core.reconnect import backoff_delay
from .core.records import FailureReason, TrackedMessage
from .locations import Locations
from .payloads import wire_text
from .stanzas import FAILED_TAG, parse_counter

__all__ = ["OutboundView", "SessionDriver", "displace_xep_0198", "restore_xep_0198"]

log = logging.getLogger(__name__)


class OutboundView(Protocol):
    """What the session needs from the outgoing side."""

    def parked_ids(self) -> Container[str]:
        """Tracked messages slixmpp holds until the next session start."""

    def withhold_parked(self, message_id: str) -> None:
        """A failed message's copy in slixmpp's queue must never go out by itself."""

    def held_ids(self) -> AbstractSet[str]:
        """Tracked messages whose copy we hold: parked, held for a room or a resend."""

    def wait_for_rejoins(self) -> None:
        """A session is live: messages to the rooms of the ended one wait for a rejoin."""

    def cancel_rejoin_wait(self) -> None:
        """The link dropped: the wait starts again with the next session."""

    def session_started(self) -> None:
        """slixmpp moved what it parked into its send queue (a session started)."""

    def session_ended(self) -> None:
        """slixmpp purged its send queue (the session ended)."""


class SessionDriver:
    """Negotiates stream management, follows the connection, and reconnects."""

    def __init__(self, ctx: Context, acks: AckDriver, outbound: OutboundView) -> None:
        self._ctx = ctx
        self.xmpp = ctx.xmpp
        self.core = ctx.core
        self._config = ctx.config
        self._acks = acks
        self._outbound = outbound
        self._reconnect_timer: asyncio.TimerHandle | None = None
        self._negotiation_timer: asyncio.TimerHandle | None = None
        self._reconnect_attempt = 0
        self._let_go = False  # the account's lease went to another process
        self._locations = Locations(ctx.xmpp, ctx.config)
        # slixmpp's disconnect() does not end an SM session cleanly, and its reconnect()
        # closes the stream (which ends the session on the server): both are wrapped.
        self._original_disconnect: Callable[..., asyncio.Future[Any]] = ctx.xmpp.disconnect
        self._original_reconnect: Callable[..., None] = ctx.xmpp.reconnect

    def install(self) -> None:
        """Put the wrappers of ``disconnect`` and ``reconnect`` in place."""
        self.xmpp.disconnect = self.disconnect
        self.xmpp.reconnect = self.reconnect_requested

    def uninstall(self) -> None:
        self.xmpp.disconnect = self._original_disconnect
        self.xmpp.reconnect = self._original_reconnect
        self.cancel_timers()

    def protocol_error(self, exc: SMProtocolError) -> None:
        """XEP-0198 §4: an ``h`` beyond what we sent ends the stream; nothing is lost."""
        log.error("stream management protocol error: %s; dropping the session", exc)
        if self.xmpp.transport is not None:
            self.xmpp.send_raw(stanzas.handled_count_too_high(exc.h, exc.seq))
        self.drop_session()

    def _unsolicited(self, what: str) -> None:
        """An SM answer to nothing we asked: the server's SM state cannot be trusted.
        Nothing it says is believed (nothing acked, nothing failed by its ``h``): the
        stream is closed with an error and what was unacked fails, to be sent again."""
        log.error(
            "the server sent %s nobody asked for (%s): closing the stream",
            what,
            self.core.sm_phase.name,
        )
        if self.xmpp.transport is not None:
            self.xmpp.send_raw(stanzas.stream_error("undefined-condition", f"unsolicited {what}"))
        self.drop_session()

    def drop_session(self) -> None:
        """The server's SM state cannot be trusted: fail what is unacked, never resume
        this stream, and drop the connection (a fresh session follows)."""
        self._ctx.emit(self.core.session_ended(FailureReason.PROTOCOL_ERROR))
        self._ctx.state_changed(urgent=True)
        if self.xmpp.transport is not None:
            self.xmpp.end_session_on_disconnect = True
            self.xmpp.abort()

    # ---------------------------------------------------------------- negotiation

    async def handle_sm_feature(self, features: StanzaBase) -> bool:
        """Resume before bind when we can, otherwise enable after bind."""
        xmpp, core = self.xmpp, self.core
        if "stream_management" in xmpp.features:
            return False
        refusal = _not_trusted_for_sm(xmpp, self._let_go)
        if refusal:
            # XEP-0198 §5: TLS and authentication come first. Whoever offers <sm/>
            # earlier would get our resumption id and could forge <resumed h>.
            log.warning("not negotiating stream management: %s", refusal)
            return False
        if "bind" not in xmpp.features:
            resumable = core.sm_phase is SMPhase.SUSPENDED and core.session.can_resume
            if resumable and self._config["allow_resume"]:
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
        await waiter.wait(timeout=self._config["negotiation_timeout"])
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
        self._ctx.send(resume)
        result = await waiter.wait(timeout=self._config["negotiation_timeout"])
        if self.xmpp.transport is not transport:
            # The connection that asked was lost while waiting (its loss was handled
            # then); a "session_end" now would end the session of the next connection.
            log.info("the connection was lost during <resume/>; nothing more to do for it")
            return True
        if result and result.xml.tag == sm_stanza.Resumed.tag_name():
            return self.core.counting_in  # False if <resumed> was rejected
        if not result and self.core.sm_phase is SMPhase.RESUMING:
            log.warning("no answer to <resume/>: treating it as refused")
            self._ctx.emit(self.core.resume_failed(None))
        self.xmpp.event("session_end")
        return False

    def _send_enable(self) -> None:
        self.core.enable_queued()
        enable = sm_stanza.Enable(self.xmpp)
        enable["resume"] = self._config["allow_resume"]
        if self._config["resume_max"] is not None:
            enable.xml.set("max", str(int(self._config["resume_max"])))
        self._ctx.send(enable)

    def on_session_bind(self, _jid: Any) -> None:
        """Enable right after bind, before session_start handlers queue their stanzas,
        so that everything the app sends in them is counted."""
        if self.core.sm_phase is SMPhase.OFFERED:
            self._send_enable()

    def on_enabled(self, stanza: StanzaBase) -> None:
        if self.core.sm_phase is not SMPhase.ENABLING:
            self._unsolicited("<enabled/>")
            return
        xml = stanza.xml
        self.xmpp.features.add("stream_management")
        resumable = xml.get("resume", "false").lower() in ("true", "1")
        events = self.core.enabled(
            xml.get("id"),
            resumable=resumable and self._config["allow_resume"],
            location=self._locations.accept(xml.get("location")),
            max=parse_counter(xml.get("max")),
            jid=self.xmpp.boundjid.full,
        )
        self._ctx.emit(events)
        self._ctx.state_changed(urgent=True)
        max_text = xml.get("max")
        if max_text is not None and parse_counter(max_text) is None:
            log.warning("ignoring an unusable <enabled max=%r>", max_text)
        self.xmpp.end_session_on_disconnect = not self.core.session.can_resume
        self.xmpp.event("sm_enabled", stanza)  # as bare xep_0198 does, for its apps

    def on_resumed(self, stanza: StanzaBase) -> None:
        if self.core.sm_phase is not SMPhase.RESUMING:
            self._unsolicited("<resumed/>")
            return
        xml = stanza.xml
        session = self.core.session
        previd = xml.get("previd")
        h = parse_counter(xml.get("h"))
        if previd != session.sm_id or h is None:
            # (not the ids themselves: a resumption id in a log is a key to the stream)
            log.error(
                "<resumed> for another stream (or h=%r): does not match our stream; "
                "dropping the session",
                xml.get("h"),
            )
            self.drop_session()
            return
        try:
            resumption = self.core.resume_counted(h)
        except SMProtocolError as exc:
            self.protocol_error(exc)
            return
        resend = resumption.result.resend
        # Written here, synchronously and in one write, before the records move (10 000
        # of them take a while, and the server can read meanwhile): nothing queued
        # meanwhile can overtake them, and the server reads them in big chunks (one small
        # write per stanza costs it a read each), asked about as it goes (write_burst).
        # A tracked message goes out as the text it went out as (kept with its entry),
        # not serialized again.
        xmpp = self.xmpp
        self._acks.write_burst([wire_text(entry, xmpp) for entry in resend], self._ctx.now)
        events = self.core.resume_records(resumption)
        self.xmpp.features.add("stream_management")
        if session.jid:
            self.xmpp.boundjid = JID(session.jid)  # a resumed stream keeps its resource
        _warn_of_a_short_state(self.core.last_resume)
        self._ctx.emit(events)
        self._ctx.state_changed(urgent=True)
        self.xmpp.end_session_on_disconnect = not self.core.session.can_resume
        self.xmpp.event("session_resumed", stanza)

    def on_failed(self, stanza: StanzaBase) -> None:
        """``<failed/>`` answers either ``<enable/>`` or ``<resume/>``; slixmpp cannot
        tell which and never reads its ``h``."""
        h = parse_counter(stanza.xml.get("h"))
        phase = self.core.sm_phase
        if phase is SMPhase.RESUMING:
            log.info("resumption refused (h=%s): failing what it does not cover", h)
            self._ctx.emit(self.core.resume_failed(h))
        elif phase is SMPhase.ENABLING:
            log.warning("the server refused to enable stream management")
            self._ctx.emit(self.core.enable_failed())
        else:
            self._unsolicited("<failed/>")
            return
        self.xmpp.features.discard("stream_management")
        self._ctx.state_changed(urgent=True)
        self.xmpp.event("sm_failed", stanza)  # as bare xep_0198 does, for its apps

    # ---------------------------------------------------------------- connection

    def on_connected(self, _event: Any) -> None:
        self._ctx.stats.connections += 1
        self._ctx.link.handle(LinkEvent.CONNECTED)
        self._acks.clock.reset()
        _cancel(self._negotiation_timer)
        self._negotiation_timer = self.xmpp.loop.call_later(
            self._config["negotiation_timeout"], self._on_negotiation_timeout
        )

    def _on_negotiation_timeout(self) -> None:
        self._negotiation_timer = None
        if self._ctx.link.phase is LinkPhase.NEGOTIATING and self.xmpp.transport is not None:
            log.warning(
                "no session after %.0fs: dropping the connection",
                self._config["negotiation_timeout"],
            )
            self.xmpp.abort()

    def on_session_live(self, _event: Any) -> None:
        self._ctx.link.handle(LinkEvent.SESSION_STARTED)
        self._outbound.session_started()
        if self.core.counting_out:
            self._acks.clock.heard(self._ctx.now)  # the keepalive counts from here
            self._acks.arm()
        self._outbound.wait_for_rejoins()
        self._reconnect_attempt = 0
        _cancel(self._negotiation_timer)
        self._negotiation_timer = None

    def on_disconnected(self, reason: Any) -> None:
        self.xmpp.event("sm_disabled", reason)  # as bare xep_0198 does, for its apps
        left = self._ctx.link.handle(LinkEvent.DISCONNECTED)
        self._acks.cancel()
        self._outbound.cancel_rejoin_wait()  # the wait starts again with the next session
        _cancel(self._negotiation_timer)
        self._negotiation_timer = None
        self._acks.clock.reset()
        if left in CLOSED_BY_APP:
            return
        # The reconnect delay runs while the records hibernate (10 000 of them take a
        # while); the timer fires once this handler is done, and finds out then whether
        # a handler of those events closed the session or connected meanwhile.
        if left is LinkPhase.DROPPING:  # asked for by the app: at once, whatever the config
            _cancel(self._reconnect_timer)
            self._reconnect_timer = self.xmpp.loop.call_later(0, self._reconnect)
        elif self._config["auto_reconnect"]:
            self._schedule_reconnect()
        self._ctx.emit(self.core.link_lost())

    def on_stream_error(self, error: Any) -> None:
        """A stream error answering ``<resume/>``: asking again would meet it on every
        reconnect (aioxmpp #382), so the SM state goes, what it did not confirm fails
        ``resume-failed``, and the next connection starts a fresh session."""
        if self.core.sm_phase is not SMPhase.RESUMING:
            if error is not None and stanzas.says_stanza_too_big(error.xml):
                _fail_the_stanza_too_big(self._ctx, self._acks.last_ack_at)
            return  # any other stream error: the link drops, resumption is tried
        condition = error["condition"] if error is not None else None
        log.warning("stream error %r answered <resume/>: dropping the SM state", condition)
        self._ctx.emit(self.core.resume_failed(None))
        self.xmpp.features.discard("stream_management")
        self._ctx.state_changed(urgent=True)
        self.xmpp.event("session_end")

    def on_session_end(self, event: Any) -> None:
        """The SM session is over for good: nothing unacked can be confirmed any more."""
        self.xmpp.event("sm_disabled", event)  # as bare xep_0198 does, for its apps
        if self._ctx.link.phase in CLOSED_BY_APP:
            unsent = self.core.unsent_ids()
        else:
            # slixmpp discarded what it had queued but not written; what it parked
            # for the next session start is still going out.
            unsent = [i for i in self.core.unsent_ids() if i not in self._outbound.parked_ids()]
        self._ctx.emit(self.core.session_ended(FailureReason.SESSION_ENDED, unsent=unsent))
        # When slixmpp's send queue is empty (purged with the session, or drained),
        # doomed copies that were in it are gone; a disconnect() with the link down
        # leaves the queue as it was, and they may still surface. The core need only
        # remember the failed messages whose copy we still hold.
        if self.xmpp.waiting_queue.empty():
            self._outbound.session_ended()
        self.core.copies_gone(keep=self._outbound.held_ids())
        self.xmpp.features.discard("stream_management")
        self._ctx.state_changed(urgent=True)

    def _schedule_reconnect(self) -> None:
        _cancel(self._reconnect_timer)
        delay = backoff_delay(
            self._reconnect_attempt,
            self._config["reconnect_delay"],
            self._config["reconnect_max_delay"],
        )
        self._reconnect_attempt += 1
        self._reconnect_timer = self.xmpp.loop.call_later(delay, self._reconnect)

    def reconnect_requested(self, wait: float = 2.0, reason: str = "Reconnecting") -> None:
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
        self._ctx.link.handle(LinkEvent.DROP_TO_RESUME)
        self.xmpp.abort()

    def _reconnect(self) -> None:
        """Connect again: to the server's ``<enabled location>`` while it answers, else
        to the address the app gave (slixmpp would keep the location for good)."""
        self._reconnect_timer = None
        xmpp = self.xmpp
        if (
            self._ctx.link.phase in CLOSED_BY_APP
            or xmpp.transport is not None
            or xmpp.is_connecting()
        ):
            return
        address = self._locations.next_address(self.core.session.location)
        log.info("reconnecting to %s", address or xmpp.boundjid.domain)
        if address:
            xmpp.connect(*address)
        else:
            xmpp.connect()

    def on_connection_failed(self, _error: Any) -> None:
        """The server's preferred location did not answer: back to the app's address."""
        xmpp = self.xmpp
        if not self._locations.tried_failed():
            return
        xmpp.cancel_connection_attempt()
        _cancel(self._reconnect_timer)
        self._reconnect_timer = xmpp.loop.call_later(0, self._reconnect)

    def disconnect(
        self, wait: float = 2.0, reason: str | None = None, ignore_send_queue: bool = False
    ) -> asyncio.Future[Any]:
        """``xmpp.disconnect`` as wrapped: a graceful close ends the SM session.

        Ask for a last ack (it comes back before the server closes), send ours,
        then let slixmpp close; whatever stays unacked ends ``failed``.
        """
        self._ctx.link.handle(LinkEvent.CLOSE)
        _cancel(self._reconnect_timer)
        self._reconnect_timer = None
        xmpp = self.xmpp
        if xmpp.transport is None:
            xmpp.cancel_connection_attempt()
            if not self._let_go:  # else the new owner resumes what is unacked
                self.on_session_end(None)
        else:
            if not ignore_send_queue:
                self._acks.request(xmpp.loop.time())
            self._acks.ack_before_footer()
            xmpp.end_session_on_disconnect = True
        future: asyncio.Future[Any] = self._original_disconnect(wait, reason, ignore_send_queue)
        return future

    def let_go(self) -> None:
        """Another process owns the account now (lease lost): stop like a close, but leave
        the server's session for it to resume (no ``<a/>``, ``</stream>`` or reconnect)."""
        self._let_go = True
        self._ctx.link.handle(LinkEvent.CLOSE)
        _cancel(self._reconnect_timer)
        self._reconnect_timer = None
        self.xmpp.end_session_on_disconnect = False
        if self.xmpp.transport is None:
            self.xmpp.cancel_connection_attempt()
        else:  # suspended here too: nothing counted, no <r/> on a later connection
            self._ctx.emit(self.core.link_lost())
            self.xmpp.abort()

    # ---------------------------------------------------------------- timers

    def cancel_timers(self) -> None:
        for handle in (self._reconnect_timer, self._negotiation_timer):
            _cancel(handle)
        self._reconnect_timer = None
        self._negotiation_timer = None


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


def _warn_of_a_short_state(result: ResumeResult[Any] | None) -> None:
    """A restored state that held less than the server's ``h`` says: logged, not fatal."""
    if result is not None and (result.missing or result.ahead):
        log.warning(
            "the saved SM state did not hold %d unacked stanzas (iqs of the previous "
            "process are never resent: nobody waits for their answer), and %d handled "
            "stanzas were unknown to it",
            result.missing,
            result.ahead,
        )


def _cancel(handle: asyncio.TimerHandle | None) -> None:
    if handle is not None:
        handle.cancel()


def _not_trusted_for_sm(xmpp: Any, let_go: bool) -> str:
    """Why this stream may not carry ``<enable/>`` or ``<resume/>`` yet ("" if it may)."""
    if let_go:
        return "the account's lease went to another process: its stream is not ours"
    if not getattr(xmpp, "authenticated", False):
        return "the server offered <sm/> before authentication"
    transport = xmpp.transport
    encrypted = transport is not None and transport.get_extra_info("ssl_object") is not None
    if not encrypted and not xmpp.enable_plaintext:
        return (
            "the stream is not encrypted (allow that with slixmpp's xmpp.enable_plaintext = True)"
        )
    return ""


def _fail_the_stanza_too_big(ctx: Context, last_ack_at: float) -> None:
    """The server closed the stream on a stanza larger than it accepts: that one fails
    ``stanza-too-big`` and is never resent; the others resume (or fail and are resent)
    without it, instead of meeting the same error again and again. An ``<a h>`` just
    before the error was the server's last word: the culprit comes right after it."""
    right_after_ack = ctx.now - last_ack_at < 0.1
    events = ctx.core.stanza_too_big(stanzas.stanza_size, right_after_ack=right_after_ack)
    failed = [e.payload.id for e in events if isinstance(e.payload, TrackedMessage)]
    log.warning(
        "the server closed the stream on a stanza too big for it: %s",
        f"message {failed[0]} failed" if failed else "not a tracked message",
    )
    ctx.emit(events)
    ctx.state_changed(urgent=True)


def displace_xep_0198(xmpp: Any) -> None:
    """Unhook xep_0198's handlers, filters and feature: the tracker does its job (its
    stanza classes stay registered)."""
    xep = xmpp.plugin["xep_0198"]
    for name, _tag, _method in _XEP_0198_HANDLERS:
        xmpp.remove_handler(name)
    for mode, method in _XEP_0198_FILTERS:
        xmpp.del_filter(mode, getattr(xep, method))
    for event, method in _XEP_0198_EVENTS:
        xmpp.del_event_handler(event, getattr(xep, method))
    for order in (xep.resume_order, xep.order):
        xmpp.unregister_feature("sm", order)


def restore_xep_0198(xmpp: Any) -> None:
    """Give xep_0198 back everything :func:`displace_xep_0198` took (plugin_end)."""
    xep = xmpp.plugin["xep_0198"]
    for name, tag, method in _XEP_0198_HANDLERS:
        xmpp.register_handler(Callback(name, MatchXPath(tag), getattr(xep, method), instream=True))
    for mode, method in _XEP_0198_FILTERS:
        xmpp.add_filter(mode, getattr(xep, method))
    for event, method in _XEP_0198_EVENTS:
        xmpp.add_event_handler(event, getattr(xep, method))
    for order in (xep.resume_order, xep.order):
        xmpp.register_feature("sm", xep._handle_sm_feature, restart=True, order=order)

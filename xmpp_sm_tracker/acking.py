"""Acks on the wire: ``<r/>`` out when the ack clock says so, ``<a/>`` in and out.

slixmpp glue around the sans-I/O :class:`~.core.acks.AckClock` (when to ask, when
silence means a dead link) and the core's ledger (what an ``h`` acknowledges).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from slixmpp.xmlstream import StanzaBase

from . import stanzas
from .context import Context
from .core.acks import AckClock
from .core.ledger import HBackwards, SMProtocolError
from .stanzas import REQUEST_ACK, parse_counter

__all__ = ["BURST_ASK_EVERY", "AckDriver"]

log = logging.getLogger(__name__)

#: Stanzas written at once (a resumption's resend) are asked about every this many.
BURST_ASK_EVERY = 100


class AckDriver:
    """Asks for acks, answers the server's, and finds a dead link by its silence."""

    def __init__(
        self,
        ctx: Context,
        clock: AckClock,
        on_protocol_error: Callable[[SMProtocolError], None],
        durable: Callable[[str | None, int], int],
    ) -> None:
        self._ctx = ctx
        #: The most an ``<a h>`` may say: what a next process resuming from the saved SM
        #: state would say (an ``h`` below one the server has seen makes it refuse the
        #: resumption: Prosody answers <failed/> "acknowledged less stanzas").
        self._durable = durable
        self._owed = False  # an <a/> said less than handled: say more once it is saved
        #: When to ask, and when silence means the link is dead (sans-I/O).
        self.clock = clock
        self._on_protocol_error = on_protocol_error
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        #: When the last ``<a/>`` came in (a stream error right after it: its last word).
        self.last_ack_at = float("-inf")

    # ---------------------------------------------------------------- asking

    def counted(self, now: float) -> bool:
        """A stanza was counted: True when an ``<r/>`` should follow it in the same
        write (the caller then calls :meth:`requested`); otherwise the timer asks.

        slixmpp's send loop writes everything queued in one go, taking each stanza off
        its queue before the filters see it: an empty queue means this stanza ends the
        burst, and its ``<r/>`` rides in the same write (no timer, no extra write)."""
        clock = self.clock
        if clock.counted(now, last=not self._ctx.xmpp.waiting_queue.qsize()):
            return True
        if self._timer is None or clock.unasked == 1:
            self.arm()  # only the first stanza nobody asked about moves a deadline
        return False

    def request(self, now: float) -> None:
        """Queue an ``<r/>`` behind what is queued, so it follows the stanzas it asks about."""
        ctx = self._ctx
        if ctx.xmpp.transport is None or not ctx.core.counting_out:
            return
        # As text, straight into slixmpp's send queue: behind what is queued, and
        # without building and serializing a stanza every ack_every messages.
        ctx.xmpp.waiting_queue.put_nowait((REQUEST_ACK, False))
        self.requested(now)

    def write_burst(self, texts: Sequence[str], now: float) -> None:
        """Write ``texts`` (counted stanzas) in one write, with an ``<r/>`` after every
        :data:`BURST_ASK_EVERY` of them (or ``every``, if larger) and after the last.

        A resumption resends thousands at once. One ``<r/>`` at the end would leave every
        ack, and the work of moving thousands of records, to the moment the server is
        done; asked as they go, the acks come while the server still reads the rest
        (10 000 resent settle ~8% sooner). Asking every 10 (the default ``ack_every``),
        the server answering a thousand ``<r/>`` cost more than it saved. An app whose
        ``ack_every`` is larger than 100 gets fewer: one only at the end for a burst
        shorter than it."""
        if not texts:
            return
        clock = self.clock
        every = max(clock.policy.every, BURST_ASK_EVERY)
        parts: list[str] = []
        for start in range(0, len(texts), every):
            chunk = texts[start : start + every]
            parts.extend(chunk)
            parts.append(REQUEST_ACK)
            clock.counted(now, stanzas=len(chunk))
            clock.request_sent(now)
        self._ctx.xmpp.send_raw("".join(parts))
        self.arm()

    def requested(self, now: float) -> None:
        """An ``<r/>`` went out (queued, or written right behind a stanza)."""
        self.clock.request_sent(now)
        self.arm()

    def arm(self) -> None:
        """Run the timer for the clock's next deadline (an ``<r/>`` or a dead link)."""
        deadline = self.clock.next_deadline()
        if deadline is None:
            return
        if self._timer is not None and self._timer_at is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._ctx.xmpp.loop.call_at(deadline, self._on_timer)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_at = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        ctx = self._ctx
        now = ctx.now
        if not ctx.core.counting_out:
            return  # no SM on this connection: nothing to ask (the next one re-arms)
        if self.clock.link_dead(now):
            log.warning(
                "no <a/> for %.1fs: the link is presumed dead, dropping it to resume",
                self.clock.policy.timeout,
            )
            self.clock.reset()
            ctx.xmpp.abort()
            return
        if self.clock.request_due(now) or self.clock.keepalive_due(now):
            self.request(now)
        self.arm()

    # ---------------------------------------------------------------- answers

    def on_ack(self, stanza: StanzaBase) -> None:
        """``<a h>`` from the server."""
        ctx = self._ctx
        h = parse_counter(stanza.xml.get("h"))
        if h is None:
            log.warning("ignoring an <a/> without a valid h: %r", stanza.xml.get("h"))
            return
        self.last_ack_at = ctx.now
        news = ctx.core.ack_is_news(h)
        rtt = self.clock.ack_received(ctx.now, news=news)
        if rtt is not None:
            ctx.stats.rtts.append(rtt)
        try:
            events = ctx.core.ack(h)
        except HBackwards as exc:
            log.warning("ignoring a stale ack: %s", exc)
            return
        except SMProtocolError as exc:
            self._on_protocol_error(exc)
            return
        ctx.emit(events)
        ctx.state_changed()
        self.arm()

    def on_request(self, _stanza: StanzaBase) -> None:
        """``<r/>`` from the server: answer with what we handled."""
        self.clock.heard(self._ctx.now)
        self.send_ack()

    def send_ack(self, *, final: bool = False) -> None:
        """``<a h>``: what we handled, or (while ``sm.cache`` is on) at most what the
        saved state holds, the rest once it is saved. ``final``: the stream ends and
        nothing will resume it, so all of it (what we do not ack, the server delivers
        again)."""
        ctx = self._ctx
        if ctx.xmpp.transport is None or not ctx.core.counting_in:
            return
        session = ctx.core.session
        h = session.handled
        if session.can_resume and not final:
            h = self._durable(session.sm_id, h)
        self._owed = h != session.handled
        if self._owed:
            ctx.state_changed()  # the <a/> it owes goes out once this state is saved
        ctx.xmpp.send_raw(stanzas.ack(h))

    def state_saved(self) -> None:
        """``sm.cache`` took a state: an ``<a/>`` that said less than handled says more."""
        if self._owed:
            self.send_ack()

    def ack_before_footer(self) -> None:
        """Our last ``<a/>`` goes right before ``</stream:stream>`` (XEP-0198 §4), not
        when disconnect() is called: stanzas that come in while slixmpp drains its
        send queue are acknowledged too, so the server does not deliver them again."""
        xmpp = self._ctx.xmpp
        write, footer = xmpp.send_raw, xmpp.stream_footer

        def send_raw(data: str | bytes) -> None:
            if data == footer:
                if xmpp.send_raw is send_raw:
                    xmpp.send_raw = write
                self.send_ack(final=True)
            write(data)

        xmpp.send_raw = send_raw

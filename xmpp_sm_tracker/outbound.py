"""The outgoing side: messages tracked as they are sent, stanzas judged as written.

slixmpp glue around the core's :class:`~.core.outbox.Outbox`: ``xmpp.send`` is
wrapped so every message with a body is tracked whoever sends it, and the
``out_sync`` filter asks the outbox for each stanza's verdict (count and write,
write, park for the session start, hold for a room rejoin, drop a failed copy),
then does it. Each tracked message is serialized once, when it is written, and
that text goes both to the record and to the wire.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Container
from collections.abc import Set as AbstractSet
from typing import Any

from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.stanza import Iq, Message, Presence
from slixmpp.xmlstream import ET, StanzaBase, tostring

from . import stanzas
from .acking import AckDriver
from .context import Context
from .core.outbox import Outbox, Verdict
from .core.phases import SMPhase
from .core.records import TrackedMessage
from .core.tracker import OutgoingMessage
from .filters import FilterWatch
from .ids import TimeOrderedIds
from .resend import Resender
from .stanzas import REQUEST_ACK

__all__ = ["Outbound"]

log = logging.getLogger(__name__)

_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _refuse_lone_surrogates(xml: ET.Element) -> None:
    """Refuse a message with a lone surrogate (what ``json.loads('"\\ud83d"')`` gives):
    UTF-8 cannot encode it, so it could be neither written to the stream nor stored,
    and its record would block every later write. Names where, never the text."""
    texts: list[str] = []
    for element in xml.iter():
        text, tail = element.text, element.tail
        if text:
            texts.append(text)
        if tail:
            texts.append(tail)
        texts += element.attrib.values()
    # One look over all of it (joined halves stay two code points in Python): every
    # message passes here, and hardly any has one; most are ASCII, which has none.
    joined = "".join(texts)
    if joined.isascii() or _LONE_SURROGATE.search(joined) is None:
        return
    for element in xml.iter():
        tag = element.tag.rpartition("}")[2]
        places = [(f"<{tag}> text", element.text), (f"text after <{tag}>", element.tail)]
        places += [(f"{name!r} attribute of <{tag}>", v) for name, v in element.attrib.items()]
        for what, text in places:
            found = _LONE_SURROGATE.search(text) if text else None
            if found is not None:
                raise ValueError(
                    f"a lone surrogate (U+{ord(found.group()):04X}) in the {what}: XML "
                    "cannot carry it; the message was neither tracked nor sent"
                )


class Outbound:
    """Tracks outgoing messages and carries out the outbox's verdict for each stanza."""

    def __init__(
        self,
        ctx: Context,
        acks: AckDriver,
        outbox: Outbox[StanzaBase],
        resender: Resender,
        store: Callable[[TrackedMessage], None],
    ) -> None:
        self._ctx = ctx
        self.xmpp = ctx.xmpp
        self.core = ctx.core
        self._acks = acks
        self.outbox = outbox
        self._resender = resender
        self._store = store
        #: Messages tracked on a live session, serialized only when written (the text
        #: is made once, for the record and the wire, and a burst starts going out sooner).
        self._unwritten: dict[str, Message] = {}
        self._rejoin_timer: asyncio.TimerHandle | None = None
        #: Whether our filter writes last, and other filters leave messages alone.
        self._filters = FilterWatch(ctx.xmpp, self.on_outgoing)
        #: Ids for stanzas that have none: time-ordered (cheap to index), or slixmpp's.
        self._new_id: Callable[[], str] | None = (
            TimeOrderedIds() if ctx.config["time_ordered_ids"] else None
        )
        self._slixmpp_new_id: Callable[[], str] = ctx.xmpp.new_id

    def install(self) -> None:
        """Wrap ``send`` (slixmpp offers no hook at send time for stanzas that will not
        pass the filters yet) and the filter registry (to know who writes last)."""
        xmpp = self.xmpp
        xmpp.send = self.send
        if self._new_id is not None:
            # slixmpp gives every stanza an id from new_id() when it is made.
            xmpp.new_id = self._new_id
        self._filters.install()

    def uninstall(self) -> None:
        """Undo :meth:`install`; what was held goes to slixmpp (untracked from now on)
        rather than to nobody."""
        xmpp = self.xmpp
        xmpp.send = self._ctx.send
        xmpp.new_id = self._slixmpp_new_id
        self._filters.uninstall()
        self.cancel_rejoin_wait()
        for stanza in self.outbox.take_all():
            self._ctx.send(stanza)

    # ---------------------------------------------------------------- sending

    def send(self, data: StanzaBase | str, use_filters: bool = True) -> None:
        """``xmpp.send`` as wrapped: track outgoing messages with a body, then send."""
        if use_filters and isinstance(data, Message):
            # On a live session the text is made when the stanza is written, unless
            # another filter would come after ours (then slixmpp writes it itself).
            record = self.track(data, lazy=self._ctx.session_live and self._filters.we_write_last())
            self.hand_over(data, record)
            return
        self._ctx.send(data, use_filters)

    def hand_over(self, stanza: StanzaBase, record: TrackedMessage | None) -> None:
        """A new stanza from the app to slixmpp, unless it waits: behind older messages
        being resent to its peer, or behind a full unacked window."""
        if record is not None and self.hold_behind_resend(record, stanza):
            return  # goes out after the older messages being resent to that peer
        self.past_the_gate(stanza, record.id if record is not None else None)

    def past_the_gate(self, stanza: StanzaBase, message_id: str | None) -> None:
        """A new stanza no resend holds back (or that a resend's gate let go): to
        slixmpp, unless the unacked window is full or others already wait for it."""
        in_flight = len(self.core.ledger) + self.xmpp.waiting_queue.qsize()
        was_open = not self.outbox.window_held
        limit = self._ctx.config["max_unacked"]
        if self.outbox.hold_for_window(message_id, stanza, in_flight=in_flight, limit=limit):
            if message_id is not None and message_id in self._unwritten:
                self.text_now(message_id)  # it waits: the record needs its text now
            if was_open:
                log.warning("%d stanzas unacked: new ones wait for acks", in_flight)
                self._acks.request(self._ctx.now)  # ask now: the acks open the window
            return
        self._ctx.send(stanza)

    def open_window(self, _ack: StanzaBase) -> None:
        """An ``<a/>`` came in (handled first by the ack driver)."""
        self.release_window()

    def release_window(self) -> None:
        """Acks came (or a session started): what waited for the window goes out."""
        if not self.outbox.window_held:
            return
        limit = self._ctx.config["max_unacked"]
        in_flight = len(self.core.ledger) + self.xmpp.waiting_queue.qsize()
        room = len(self.outbox) if limit is None else max(0, limit - in_flight)
        for stanza in self.outbox.release_window(room):
            self._ctx.send(stanza)

    def hold_behind_resend(self, record: TrackedMessage, message: Message) -> bool:
        """Keep a new message back while older ones to the same peer are resent."""
        if not self._ctx.config["keep_order"]:
            return False
        if not self.outbox.hold_behind_resend(record.conversation, record.id, message):
            return False
        if record.id in self._unwritten:
            self.text_now(record.id)  # it waits: the record needs its text now
        return True

    def track(self, message: Message, *, lazy: bool = False) -> TrackedMessage | None:
        """Start tracking a message, unless it is already tracked or is not for tracking.

        ``lazy``: leave the record's text to the outgoing filter (see ``_unwritten``).
        """
        xml = message.xml
        message_id = xml.get("id")
        core = self.core
        if message_id:
            known = core.get(message_id)
            if known is not None:
                return known
        body = self._body_to_track(message)
        if body is None:
            return None
        _refuse_lone_surrogates(xml)
        config = self._ctx.config  # read once
        fields = stanzas.complete_outgoing(
            xml,
            body,
            message_id or self.xmpp.new_id(),  # a new id only for a message without one
            add_origin_id=config["add_origin_id"],
            request_receipts=config["request_receipts"],
            request_markers=config["request_markers"],
        )
        outgoing = OutgoingMessage(*fields, xml="" if lazy else tostring(xml, top_level=True))
        if lazy:
            self._unwritten[fields.id] = message
        self._ctx.emit(core.track(outgoing, link_up=self._ctx.session_live))
        return core.get(fields.id)

    def _body_to_track(self, message: Message) -> str | None:
        """The body of a message to track; None for one that is not for tracking."""
        text = stanzas.trackable_body(message.xml)
        if text is None:
            return None
        predicate = self._ctx.config["should_track"]
        if predicate is None:
            return text
        try:
            return text if predicate(message) else None
        except Exception:
            log.warning("should_track raised; tracking the message anyway", exc_info=True)
            return text

    def on_stanza_not_sent(self, data: Any) -> None:
        """slixmpp parked a stanza until the next session start: remember which."""
        if isinstance(data, Message):
            message_id = data.xml.get("id")
            if message_id and self.core.get(message_id) is not None:
                self.outbox.parked(message_id, data)
                if message_id in self._unwritten:
                    self.text_now(message_id)  # it waits: the record needs its text now

    # ---------------------------------------------------------------- text

    def is_unwritten(self, message_id: str) -> bool:
        """True for a tracked message whose text is not made yet."""
        return message_id in self._unwritten

    def text_now(self, message_id: str) -> tuple[str, TrackedMessage | None]:
        """Serialize a lazily tracked message now (it waits, or its record is needed)."""
        message = self._unwritten.pop(message_id)
        text = tostring(message.xml, top_level=True)
        return text, self._record_written(message_id, text)

    def all_text_now(self) -> None:
        """Serialize every lazily tracked message (a flush needs every record whole)."""
        for message_id in list(self._unwritten):
            self.text_now(message_id)

    def _record_written(self, message_id: str, text: str) -> TrackedMessage | None:
        record = self.core.written(message_id, text)
        if record is not None:
            self._store(record)
        return record

    # ---------------------------------------------------------------- rooms

    def wait_for_rejoins(self) -> None:
        """A session is live: give the app room_rejoin_wait seconds to be back in the
        rooms of the ended session."""
        self.cancel_rejoin_wait()
        wait = self._ctx.config["room_rejoin_wait"]
        rejoining = self.core.rejoining
        if rejoining and wait > 0:
            log.info(
                "messages to %s wait until the app is back in them (at most %gs)",
                ", ".join(sorted(rejoining)),
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
        for room in self.outbox.held_rooms():
            self.release_room(room)

    def cancel_rejoin_wait(self) -> None:
        if self._rejoin_timer is not None:
            self._rejoin_timer.cancel()
        self._rejoin_timer = None

    def release_room(self, room: str) -> None:
        """The app is in ``room`` again (or the room refused the join, or the wait is
        over): what waited for it goes out, in order."""
        held = self.outbox.release_room(room)
        if not self.core.rejoining:
            self.cancel_rejoin_wait()
        for stanza in held:
            self._send_held(stanza)

    def drop_room(self, room: str) -> None:
        """We left ``room`` for good: its held messages failed with it; their copies must
        not go out by themselves (resend() sends them again)."""
        self.outbox.drop_room(room)

    def _send_held(self, stanza: StanzaBase) -> None:
        """Write a held message now, counted as it is written. It is older than anything
        queued for the room since (queued, those would overtake it), and it has passed
        every outgoing filter up to ours already (queued, they would run twice)."""
        message_id = stanza.xml.get("id", "")
        record = self.core.get(message_id)
        held = isinstance(stanza, Message) and record is not None
        if held and self.hold_behind_resend(record, stanza):  # type: ignore[arg-type]
            return  # older messages to the room are being resent: it goes after them
        if self.xmpp.transport is None or not self._filters.we_write_last():
            self._ctx.send(stanza)  # slixmpp parks it again if it must
            return
        out = self._judge(stanza)
        if out is None:
            return
        if not isinstance(out, str):
            out = tostring(out.xml, xmlns=self.xmpp.default_ns, stream=self.xmpp, top_level=True)
        self.xmpp.send_raw(out)
        record = self.core.get(message_id)
        if record is not None and self.core.retry_policy is not None:
            self._resender.on_record(record)  # its attempt starts now

    # ---------------------------------------------------------------- waiting copies

    def parked_ids(self) -> Container[str]:
        """Tracked messages whose copy waits outside the wire (parked or held)."""
        return self.outbox.waiting_ids()

    def session_started(self) -> None:
        """slixmpp moved what it parked into its send queue: only room holds still wait
        (and what waits for the window, which the new session may have room for)."""
        self.outbox.session_started()
        self.release_window()

    def session_ended(self) -> None:
        """slixmpp purged its send queue: doomed copies that were in it are gone."""
        self.outbox.session_ended()

    def held_ids(self) -> AbstractSet[str]:
        """Tracked messages whose copy we hold: parked, held for a room or a resend."""
        return self.outbox.held_ids()

    def withhold_parked(self, message_id: str) -> None:
        """A failed message's waiting copy must never go out by itself."""
        self.outbox.doom(message_id)

    # ---------------------------------------------------------------- writing

    def on_outgoing(self, stanza: StanzaBase) -> StanzaBase | str | None:
        """out_sync filter: the last look at a stanza before it is written.

        Returns the record's text for a tracked message nothing rewrote since it was
        serialized: slixmpp 1.17 writes a string a filter returns as it is, so each
        message is serialized once, not once for us and once for the wire.
        """
        if isinstance(stanza, (Message, Presence, Iq)):
            if isinstance(stanza, Presence):
                join = stanzas.read_join(stanza.xml)
                if join is not None:
                    # Should the session end before the room answers, the next one
                    # must join again before messages to that room go out.
                    self.core.join_sent(join.room, join.nick)
            return self._judge(stanza)
        if isinstance(stanza, sm_stanza.Enable):
            self._acks.clock.reset()
            self._ctx.emit(self.core.enable_sent())
        elif isinstance(stanza, sm_stanza.Resume):
            self._acks.clock.reset()
            self.core.resume_sent()
        return stanza

    def _judge(self, stanza: StanzaBase) -> StanzaBase | str | None:
        """The outbox's verdict for ``stanza``, carried out: what slixmpp writes."""
        core, xmpp = self.core, self.xmpp
        raw_id = stanza.xml.get("id") if isinstance(stanza, Message) else None
        message_id = raw_id if raw_id is not None and core.get(raw_id) is not None else None
        room = None
        waiting = message_id is not None and self._rejoin_timer is not None
        if waiting and stanza.xml.get("type") == "groupchat":
            room = stanza.xml.get("to", "").partition("/")[0]
        verdict = self.outbox.verdict(
            stanza,
            raw_id,
            tracked=message_id is not None,
            withheld=core.should_drop(raw_id),
            resuming=core.sm_phase is SMPhase.RESUMING,
            link_down=xmpp.transport is None and not self._ctx.session_live,
            room=room,
            rooms_waited_for=core.rejoining.keys() if room is not None else frozenset(),
            counting=core.counting_out,
        )
        if verdict is Verdict.DROP:
            return None  # failed before it went out; only resend() sends it
        # The text made now for a record tracked before it was serialized.
        written = None
        unwritten = self._unwritten.get(message_id) if message_id is not None else None
        if unwritten is not None and unwritten is stanza and message_id is not None:
            del self._unwritten[message_id]
            written = tostring(unwritten.xml, top_level=True)
        if verdict is Verdict.PARK:
            # Written between <resume/> and <resumed/>, any stanza would be counted
            # before the resends and then again among them (Smack #185). And a message
            # whose link dropped while it waited in slixmpp's send queue would be
            # written into nothing and forgotten. Either way: back to slixmpp, which
            # parks it for the session start (it goes out after the resends).
            if written is not None and message_id is not None:
                self._record_written(message_id, written)
            self._ctx.send(stanza)
            return None
        if verdict is Verdict.HOLD_FOR_ROOM:
            if written is not None and message_id is not None:
                self._record_written(message_id, written)
            if message_id is not None:
                self._resender.cancel_timer(message_id)  # its attempt starts when written
            return None
        if verdict is Verdict.WRITE:
            if written is None or message_id is None:
                return stanza
            self._record_written(message_id, written)
            return stanzas.on_the_wire(written) if self._filters.we_write_last() else stanza
        return self._count(stanza, message_id, written)

    def _count(
        self, stanza: StanzaBase, message_id: str | None, written: str | None
    ) -> StanzaBase | str | None:
        """Count a stanza in the ledger and write it, an ``<r/>`` behind it when due."""
        core, xmpp = self.core, self.xmpp
        link_up = xmpp.transport is not None
        same = written is None and message_id is not None and self._filters.messages_kept()
        events = core.counted(stanza, message_id, link_up=link_up, same_as_record=same, xml=written)
        if events:
            self._ctx.emit(events)
        if written is not None and message_id is not None:
            record = core.get(message_id)
            if record is not None:
                self._store(record)  # the first snapshot with its text
        self._ctx.state_changed()
        if not link_up:
            return None  # counted: the server will ask for it back after <resumed/>
        text = None
        if written is not None:
            text = written if self._filters.we_write_last() else None
        elif same:
            text = core.newest_text(message_id)  # the record's text, tied to this stanza
        if text is not None:
            text = stanzas.on_the_wire(text)
        now = self._ctx.now
        if not self._acks.counted(now):
            return stanza if text is None else text
        # Ask for an ack right behind this stanza, in the same write: queued instead, the
        # <r/> would wait behind everything already queued (a whole burst), and the acks
        # would only start once the burst is through instead of flowing along with it.
        if text is None and self._filters.we_write_last():
            text = tostring(stanza.xml, xmlns=xmpp.default_ns, stream=xmpp, top_level=True)
        if text is None:
            self._acks.request(now)
            return stanza
        self._acks.requested(now)
        return text + REQUEST_ACK

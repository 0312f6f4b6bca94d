"""The tracker: turns stream-management facts into record changes and events.

It holds the ledger of counted stanzas, the records of tracked messages that can
still change, and the facts of the current managed session. Every method takes a
protocol fact (``<enable/>`` went out, ``<a h>`` came in, the link dropped, ...)
and returns the events it causes, in order. It does no I/O: the plugin writes
stanzas, runs timers and emits the events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, NamedTuple, TypeVar

from .ledger import Entry, Ledger, ResumeResult, SMProtocolError
from .phases import COUNTING_IN, COUNTING_OUT, SM_TRANSITIONS, PhaseMachine, SMEvent, SMPhase
from .records import KEEP, FailureReason, Keep, TrackedMessage, build_record
from .retry import RetryPolicy
from .rooms import REFLECTED, ReflectionIndex, Rooms
from .smstate import STATE_VERSION, RestoredState
from .states import IN_FLIGHT, DeliveryState, next_state

__all__ = ["Event", "OutgoingMessage", "SessionFacts", "Tracker"]

P = TypeVar("P")
_S = DeliveryState

#: Event names per state a message moves into.
MESSAGE_EVENT = {state: f"message:{state.value}" for state in DeliveryState}
#: Event names per ledger fate of a stanza.
STANZA_ACKED = "stanza:acked"
STANZA_HIBERNATED = "stanza:hibernated"
STANZA_RESENT = "stanza:resent"
STANZA_FAILED = "stanza:failed"
_STANZA_EVENT = {
    _S.ACKED: STANZA_ACKED,
    _S.HIBERNATED: STANZA_HIBERNATED,
    _S.RESENT: STANZA_RESENT,
    _S.FAILED: STANZA_FAILED,
}


class Event(NamedTuple):
    """One event to emit: ``message:*`` carries a TrackedMessage, ``stanza:*`` the stanza.

    A named tuple: several are made per message, and a tuple is the cheapest to build.
    """

    name: str
    payload: object


class OutgoingMessage(NamedTuple):
    """What the adapter read off a message stanza that is to be tracked (one per message:
    a named tuple, the cheapest immutable value to build)."""

    id: str
    origin_id: str
    to: str
    type: str
    body: str
    xml: str
    via_carbon: bool = False


@dataclass(slots=True)
class SessionFacts:
    """What we know about the managed session (XEP-0198 §3, §5)."""

    sm_id: str | None = None
    resumable: bool = False
    location: str | None = None
    max: int | None = None
    #: Inbound stanzas handled, mod 2**32; survives resumption, reset by ``<enabled/>``.
    handled: int = 0
    #: The session comes from a saved state (another process); not resumed yet, so the
    #: server may have handled stanzas the state does not know about.
    restored: bool = False
    #: The full JID the session was bound to (a resumed session keeps it).
    jid: str | None = None

    @property
    def can_resume(self) -> bool:
        """True when a dropped connection may be resumed."""
        return self.resumable and self.sm_id is not None


class Tracker(Generic[P]):
    """Sans-I/O bookkeeping of one client's outgoing stanzas and tracked messages."""

    def __init__(self, clock: Callable[[], float]) -> None:
        #: The caller's clock (the core reads none): record timestamps come from it.
        self.clock = clock
        self.session = SessionFacts()
        self._sm = PhaseMachine(SM_TRANSITIONS, SMPhase.NONE)
        self.ledger: Ledger[P] = Ledger()
        #: Tracked messages that can still change, by id.
        self.records: dict[str, TrackedMessage] = {}
        #: Messages that failed (or settled while a copy still waited) since the last
        #: session ended: a copy of them that reaches the filter is dropped, but for one
        #: copy per explicit resend (:meth:`should_drop`, :meth:`copies_gone`).
        self.withheld: set[str] = set()
        #: Withheld messages resent explicitly: one copy of each may go out.
        self._passes: set[str] = set()
        #: In-flight records taken over from a previous process, not settled yet.
        self._adopted: set[str] = set()
        #: Failed by their attempt timeout while a copy is still on the wire: kept
        #: until the stream answers for that copy, so a late ack still counts.
        self._late_ack_possible: set[str] = set()
        #: Occupancy of the current session (our nick per room, pending joins), and the
        #: rooms an ended session was in, which the app has to join again.
        self.rooms = Rooms()
        #: Groupchat records no room has reflected yet, indexed to match reflections.
        self.reflections = ReflectionIndex()
        #: What the last ``<resumed h>`` meant (for logging gaps in a restored state).
        self.last_resume: ResumeResult[P] | None = None
        #: With a policy, a retryable failure of the last attempt reads "retries-exhausted".
        self.retry_policy: RetryPolicy | None = None

    # ------------------------------------------------------------------ phase

    @property
    def sm_phase(self) -> SMPhase:
        """Where the XEP-0198 session stands (see :mod:`.phases`)."""
        return self._sm.phase

    @property
    def counting_out(self) -> bool:
        """Stanzas we write are counted (``<enable/>`` or ``<resume/>`` went out)."""
        return self._sm.phase in COUNTING_OUT

    @property
    def counting_in(self) -> bool:
        """Stanzas we receive are counted (``<enabled/>`` or ``<resumed/>`` came in)."""
        return self._sm.phase in COUNTING_IN

    # ------------------------------------------------------------------ records

    def get(self, message_id: str) -> TrackedMessage | None:
        """The current snapshot of a record the tracker still holds."""
        return self.records.get(message_id)

    def _move(
        self,
        message_id: str | None,
        signal: DeliveryState,
        *,
        attempts: int | None = None,
        reason: str | Keep | None = KEEP,
        seq: int | Keep | None = KEEP,
    ) -> Event | None:
        """Apply ``signal`` to a record through the transition table; the event, if any.

        ``reason`` is cleared on any move but to FAILED unless given; a move to
        RESENT counts one more attempt unless ``attempts`` is given.
        """
        if message_id is None:
            return None
        record = self.records.get(message_id)
        if record is None:
            return None
        state = next_state(record.state, signal)
        if state is None:
            if self._settled(record) and message_id not in self._late_ack_possible:
                self._forget(message_id)  # a reinstated record goes back out
            return None
        if state is _S.RESENT and attempts is None:
            attempts = record.attempts + 1
        if state is not _S.FAILED and isinstance(reason, Keep):
            reason = None
        moved = record.moved(state, self.clock(), attempts=attempts, reason=reason, seq=seq)
        policy = self.retry_policy
        if state is _S.FAILED:
            if policy is not None and policy.exhausted(moved):
                moved = moved.moved(state, moved.updated_at, reason=FailureReason.RETRIES_EXHAUSTED)
            if record.state is _S.FAILED and (
                moved.reason == record.reason or not record.retryable
            ):
                # FAILED -> FAILED moves only when a failure without an answer (retryable)
                # gets one: the same failure again, or after a refusal, is no news.
                if message_id not in self._late_ack_possible:
                    self._forget(message_id)
                return None
        else:
            self._late_ack_possible.discard(message_id)
        if state is _S.FAILED or (record.seq is None and record.in_flight and not moved.in_flight):
            # A failed message goes out again only through an explicit resend, and one
            # that settled while its copy still waits in the client's queue needs that
            # copy no more: any copy of it that reaches the filter is dropped.
            self.withheld.add(message_id)
        if self._passes and not moved.in_flight:
            self._passes.discard(message_id)  # the resend's attempt is over
        if self._settled(moved) and message_id not in self._late_ack_possible:
            self._forget(message_id)
        else:
            self.records[message_id] = moved
        if record.type == "groupchat" and (state in REFLECTED or message_id not in self.records):
            self.reflections.discard(message_id)  # the room has it, or it left memory
        return Event(MESSAGE_EVENT[state], moved)

    def _forget(self, message_id: str) -> None:
        """A settled record leaves memory (the store keeps it)."""
        record = self.records.pop(message_id)
        if record.type == "groupchat":
            self.reflections.discard(message_id)
        if self._adopted:
            self._adopted.discard(message_id)

    @staticmethod
    def _settled(record: TrackedMessage) -> bool:
        """A record leaves memory once nothing on this stream can change it.

        Groupchat messages stay until the room reflects them.
        """
        if record.state in IN_FLIGHT:
            return False
        return not (record.state is _S.ACKED and record.type == "groupchat")

    def _fate(
        self, entries: Iterable[Entry[P]], state: DeliveryState, reason: str | Keep | None = KEEP
    ) -> list[Event]:
        """Events for ledger entries that all met the same fate, stanza event first."""
        stanza_event = _STANZA_EVENT[state]
        events: list[Event] = []
        records = self.records
        for entry in entries:
            events.append(Event(stanza_event, entry.payload))
            message_id = entry.message_id
            if message_id is None:
                continue
            record = records.get(message_id)
            if record is None or record.seq != entry.seq:
                continue  # not the copy its record waits on (any more)
            if not record.in_flight:
                message_event = self._late_fate(record, state)
            else:
                message_event = self._move(message_id, state, reason=reason)
            if message_event is not None:
                events.append(message_event)
        return events

    def _late_fate(self, record: TrackedMessage, state: DeliveryState) -> Event | None:
        """The fate of the copy on the wire of a record that is no longer in flight.

        Failed by its attempt timeout, a record stays failed while that copy may still
        be acked: an ack upgrades it, a drop leaves it failed (never moved backwards),
        and once the stream gives the copy up nothing can change the record any more.
        Any other settled record (acked groupchat waiting for the room) keeps its state.
        """
        message_id = record.id
        if record.state is not _S.FAILED or message_id not in self._late_ack_possible:
            return None
        if state is _S.ACKED:
            return self._move(message_id, _S.ACKED)
        if state is _S.FAILED:
            self._late_ack_possible.discard(message_id)
            self._forget(message_id)
        return None

    # ------------------------------------------------------------------ outbound

    def track(self, message: OutgoingMessage, *, link_up: bool) -> list[Event]:
        """A message with a body was handed to the client: ``message:sent`` at once.

        When the link is down and the session can be resumed, it is also
        ``hibernated``: it will go out after resumption.
        """
        now = self.clock()
        record = self._new_record(message, _S.SENT, now)
        if message.via_carbon:  # the server sent the carbon: it has the message
            acked = record.moved(_S.ACKED, now)
            return [Event(MESSAGE_EVENT[_S.SENT], record), Event(MESSAGE_EVENT[_S.ACKED], acked)]
        self.records[record.id] = record
        if record.type == "groupchat":
            self.reflections.add(record)
        events = [Event(MESSAGE_EVENT[_S.SENT], record)]
        if not link_up and self.session.can_resume:
            hibernated = self._move(record.id, _S.HIBERNATED)
            if hibernated is not None:
                events.append(hibernated)
        return events

    @staticmethod
    def _new_record(message: OutgoingMessage, state: DeliveryState, now: float) -> TrackedMessage:
        return build_record(
            message.id,
            message.origin_id,
            message.to,
            message.type,
            message.body,
            state,
            message.xml,
            now,
            now,
            message.via_carbon,
        )

    def copies_gone(self, keep: Iterable[str] = ()) -> None:
        """The session ended and took the client's copies of withheld messages with it,
        but for ``keep``: ``withheld`` forgets every other id.

        slixmpp purges its send queue when a session ends with its connection (and
        drains it through the filter, where :meth:`should_drop` answers, when the link
        just drops). ``keep`` names what the plugin still holds a copy of: parked in
        slixmpp for the next session start, held for a room rejoin, or held behind a
        resend. So ``withheld`` holds at most what failed since the last session ended,
        instead of every id that ever failed unsent.
        """
        self.withheld.intersection_update(keep)
        self._passes.intersection_update(self.withheld)

    def should_drop(self, message_id: str | None) -> bool:
        """True for a failed (or otherwise settled) message that slixmpp still wants to
        write from its queue.

        A failed record goes out again only through an explicit resend, which moves
        it to RESENT first and lets one copy pass (the first one counted): copies of
        earlier attempts may still be queued, and only one goes out. Anything else
        would be an unasked resend. Every message that failed since the last session
        ended is withheld (:meth:`copies_gone`).
        """
        return (
            message_id is not None
            and message_id in self.withheld
            and message_id not in self._passes
        )

    def counted(
        self,
        payload: P,
        message_id: str | None,
        *,
        link_up: bool,
        same_as_record: bool = False,
        xml: str | None = None,
    ) -> list[Event]:
        """A stanza passed the outgoing filter: count it when SM is on.

        ``same_as_record``: the stanza is still what the record's XML says, so a saved
        state can reuse that text instead of serializing it again. ``xml``: the stanza
        as it is written now, for a record tracked before it was serialized.

        With the link down it is counted all the same (the server will tell us with
        ``<resumed h>`` that it never got it) and hibernated.
        """
        if self._sm.phase not in COUNTING_OUT:
            return []
        record = self.records.get(message_id) if message_id is not None else None
        if record is not None and (not record.in_flight or record.seq is not None):
            # A second copy of a message that is settled (acked groupchat waiting for its
            # reflection) or already on the wire (a parked copy going out after an explicit
            # resend): a plain stanza. One ledger entry per record, or a drop or ack of the
            # copy would move the record backwards or give it the wrong seq.
            record, message_id = None, None
        entry = self.ledger.record(payload, message_id)
        events: list[Event] = []
        if record is not None:
            if self._passes:
                self._passes.discard(record.id)  # the one copy its resend lets out
            if xml is not None:
                entry.serialized = xml
            elif same_as_record:
                entry.serialized = record.xml  # the caller knows nothing rewrote it since
            if record.state is _S.HIBERNATED and link_up:
                # Hibernated before it was ever written: this is its first attempt.
                if xml is not None:
                    record = record.moved(record.state, record.updated_at, xml=xml)
                    self.records[record.id] = record
                first = record.seq is None
                attempts = record.attempts if first else record.attempts + 1
                moved = self._move(message_id, _S.RESENT, seq=entry.seq, attempts=attempts)
                if moved is not None:
                    events.append(moved)
            else:
                self.records[record.id] = record.moved(
                    record.state, record.updated_at, seq=entry.seq, xml=xml
                )
        if not link_up and self.session.can_resume:
            events.extend(self._fate([entry], _S.HIBERNATED))
        return events

    def newest_text(self, message_id: str | None) -> str | None:
        """The text of the stanza counted last, when it is ``message_id``'s copy."""
        newest = self.ledger.newest
        if newest is None or message_id is None or newest.message_id != message_id:
            return None
        return newest.serialized

    def written(self, message_id: str, xml: str) -> TrackedMessage | None:
        """The stanza of a record tracked before it was serialized has its text now
        (it was parked, held back, or is failing before it was written). No event:
        the state did not change. Returns the new snapshot, if the record is held."""
        record = self.records.get(message_id)
        if record is None:
            return None
        record = self.records[message_id] = record.moved(record.state, record.updated_at, xml=xml)
        return record

    def resend(self, record: TrackedMessage, xml: str | None = None) -> list[Event]:
        """The user sends a failed message again (same id, same origin-id): RESENT.

        ``xml`` is the stanza as it goes out this time (with its ``<delay/>``), when it
        differs from the first attempt. Raises ValueError for a message that has not failed.
        """
        if record.state is not _S.FAILED:
            raise ValueError(f"message {record.id} is {record.state.name}, only FAILED is resent")
        if record.id in self.withheld:
            self._passes.add(record.id)  # one copy, whichever the client writes first
        for entry in self.ledger:
            if entry.message_id == record.id:
                # A copy of an earlier attempt still unacked on the wire: it no longer
                # speaks for the record (one ledger entry per record, its current copy).
                entry.message_id = None
        if xml is not None:
            record = replace(record, xml=xml)
        self.records[record.id] = record
        if record.type == "groupchat":
            self.reflections.add(record)
        moved = self._move(record.id, _S.RESENT, seq=None)
        return [moved] if moved is not None else []

    def ack(self, h: int) -> list[Event]:
        """``<a h>`` came in. Raises :class:`SMProtocolError` on a bad ``h``."""
        return self._fate(self.ledger.ack(h), _S.ACKED)

    # ------------------------------------------------------------------ proofs from peers

    def reinstate(self, record: TrackedMessage) -> None:
        """Bring a settled record (from the store) back for one late signal."""
        if self.records.setdefault(record.id, record) is record and record.type == "groupchat":
            self.reflections.add(record)

    def retire(self, message_id: str) -> None:
        """Let a reinstated record go again when the signal was not for it after all."""
        record = self.records.get(message_id)
        if record is not None and self._settled(record):
            del self.records[message_id]
            self.reflections.discard(message_id)

    def find_reflected(
        self,
        room: str,
        origin_id: str | None,
        stanza_id: str | None,
        body: str | None,
        *,
        history: bool = False,
    ) -> str | None:
        """Which of our groupchat messages to ``room`` a reflection is: by origin-id,
        then id, then (for rooms that rewrite both) the oldest unreflected one with
        the same body.

        Not by body when the reflection carries an origin-id of somebody else (our
        nick on another client) or is the room's ``history`` (an old equal body).
        """
        return self.reflections.find(room, origin_id, stanza_id, body, history=history)

    def room_received(self, message_id: str) -> list[Event]:
        """The room reflected our message: it has it (and so has our server)."""
        moved = self._move(message_id, _S.ROOM_RECEIVED)
        return [moved] if moved is not None else []

    def delivered(self, message_id: str) -> list[Event]:
        """An XEP-0184 receipt came back from the recipient."""
        moved = self._move(message_id, _S.DELIVERED)
        return [moved] if moved is not None else []

    def displayed(self, message_id: str) -> list[Event]:
        """An XEP-0333 displayed marker came back from the recipient."""
        moved = self._move(message_id, _S.DISPLAYED)
        return [moved] if moved is not None else []

    def bounced(self, message_id: str, reason: str) -> list[Event]:
        """An error bounce: the server, the recipient or the room refused the message.

        It fails even after ``acked`` (the server had it, somebody refused it), and a
        message that already failed without an answer (an attempt timeout, a failed
        resumption: a retryable reason) fails again with the refusal as its reason, so
        that it is not retried. A late ack of the refused copy does not undo it.
        """
        self._late_ack_possible.discard(message_id)
        moved = self._move(message_id, _S.FAILED, reason=reason)
        return [moved] if moved is not None else []

    def found_in_archive(self, message_id: str) -> list[Event]:
        """A failed message turned up in our server's archive: it has it after all."""
        moved = self._move(message_id, _S.ACKED, reason=FailureReason.FOUND_IN_ARCHIVE)
        return [moved] if moved is not None else []

    def abandon(self, message_id: str, reason: str) -> list[Event]:
        """A tracked message that will not be handed to the client after all: FAILED,
        and withheld should a copy of it still reach the outgoing filter."""
        moved = self._move(message_id, _S.FAILED, reason=reason)
        if moved is None:
            return []
        self.withheld.add(message_id)
        return [moved]

    def timed_out(self, message_id: str) -> list[Event]:
        """An attempt stayed unacked past the retry policy's timeout.

        A copy the client still queues is withheld; a copy already on the wire may
        still be acked later, which upgrades the record again.
        """
        record = self.records.get(message_id)
        if record is None or not record.in_flight:
            return []
        if record.seq is not None and (
            message_id not in self._adopted or any(e.message_id == message_id for e in self.ledger)
        ):
            self._late_ack_possible.add(message_id)  # kept by _move
        moved = self._move(message_id, _S.FAILED, reason=FailureReason.ACK_TIMEOUT)
        if moved is None:
            return []
        if record.seq is None:
            self.withheld.add(message_id)
        return [moved]

    # ------------------------------------------------------------------ rooms

    @property
    def rejoining(self) -> Mapping[str, str]:
        """Rooms an ended session was in, with our nick there (a read-only view): the
        current session is in none of them until the app joins again, and a message sent
        there before that would bounce. Emptied room by room as the app rejoins.

        Assigning a mapping replaces the rooms waited for (a copy is kept); the view
        itself cannot be changed.
        """
        return self.rooms.rejoining

    @rejoining.setter
    def rejoining(self, rooms: Mapping[str, str]) -> None:
        self.rooms.expect_rejoins(rooms)

    def join_sent(self, room: str, nick: str) -> None:
        """Our join presence to ``room`` went out: if this session ends before the room
        answers, the next one has to join it again as well."""
        self.rooms.join_sent(room, nick)

    def joined_room(self, room: str, nick: str) -> None:
        """Our own occupant presence in ``room`` (joined, or nick changed)."""
        self.rooms.joined(room, nick)

    def join_refused(self, room: str) -> bool:
        """An error presence from ``room``: if our join there is pending, it was refused
        and messages waiting for it stop waiting (True). Otherwise it is about something
        else (a bounced presence) and changes nothing."""
        return self.rooms.join_refused(room)

    def nick_in(self, room: str) -> str | None:
        """Our nick in ``room``, or None when this session is not in it."""
        return self.rooms.nick_in(room)

    def left_room(self, room: str, reason: str, *, rejoin: bool = False) -> list[Event]:
        """We left (or were removed from) ``room``: what it has not reflected fails.

        ``rejoin``: the app is expected back (the service is shutting down), so the
        next session holds messages to the room until it is in it again.
        """
        self.rooms.left(room, rejoin=rejoin)
        events: list[Event] = []
        for message_id in self.reflections.in_room(room):
            record = self.records.get(message_id)
            if record is not None and (record.in_flight or record.state is _S.ACKED):
                moved = self._move(message_id, _S.FAILED, reason=reason)
                if moved is not None:
                    events.append(moved)
        return events

    def stop_waiting_for_rooms(self) -> None:
        """Messages to the ended session's rooms stop waiting for the app to rejoin."""
        self.rooms.stop_waiting()

    # ------------------------------------------------------------------ inbound

    def inbound(self) -> None:
        """One inbound stanza was handled."""
        if self._sm.phase in COUNTING_IN:
            self.session.handled = (self.session.handled + 1) % 2**32

    # ------------------------------------------------------------------ session

    def sm_offered(self) -> None:
        """This connection offers ``<sm/>`` and we will not resume over it: a fresh
        session is to be enabled after bind."""
        self._sm.handle(SMEvent.OFFERED)

    def enable_queued(self) -> None:
        """``<enable/>`` is on its way to the wire (nothing counts until it is written)."""
        self._sm.handle(SMEvent.ENABLE_QUEUED)

    def enable_sent(self) -> list[Event]:
        """``<enable/>`` went out: count from zero. Leftovers cannot be confirmed any more."""
        self._sm.handle(SMEvent.ENABLE_SENT)
        left = self.ledger.reset()
        session = self.session
        reason = self._lost(FailureReason.SESSION_ENDED)
        # The old stream is abandoned: until <enabled/> there is nothing to resume.
        session.sm_id = None
        session.resumable = False
        session.restored = False
        self.rooms.session_ended()  # a new session is in no room yet
        self._stop_waiting_for_reflections()
        return self._fate(left, _S.FAILED, reason=reason)

    def enabled(
        self,
        sm_id: str | None,
        *,
        resumable: bool,
        location: str | None,
        max: int | None,
        jid: str | None = None,
    ) -> list[Event]:
        """``<enabled/>`` came in: start counting inbound stanzas.

        Records adopted from a previous process cannot ride this new stream: they fail.
        """
        self._sm.handle(SMEvent.ENABLED)
        session = self.session
        session.jid = jid
        session.restored = False
        session.sm_id = sm_id
        session.resumable = resumable and sm_id is not None
        session.location = location
        session.max = max
        session.handled = 0
        return self._settle_adopted()

    def enable_failed(self) -> list[Event]:
        """``<failed/>`` answered ``<enable/>``: nothing on this stream can be confirmed."""
        self._sm.handle(SMEvent.REFUSED)
        left = self.ledger.reset()
        return self._fate(left, _S.FAILED, reason=FailureReason.SM_UNAVAILABLE)

    def resume_sent(self) -> None:
        """``<resume/>`` went out: outbound counting goes on from the old stream."""
        self._sm.handle(SMEvent.RESUME_SENT)

    def resumed(self, h: int) -> tuple[list[Event], list[Entry[P]]]:
        """``<resumed h>`` came in: (events, entries to resend now, in order).

        Raises :class:`SMProtocolError` on a bad ``h``; the caller then drops the session.
        """
        # The copies their records wait on, told apart before the resends are renumbered.
        records = self.records
        current = {
            id(entry)
            for entry in self.ledger
            if entry.message_id is not None
            and (record := records.get(entry.message_id)) is not None
            and record.seq == entry.seq
            and (record.in_flight or entry.message_id in self._late_ack_possible)
        }
        result = self.ledger.resume(h, allow_ahead=self.session.restored)
        self._sm.handle(SMEvent.RESUMED)
        self.session.restored = False
        self.last_resume = result
        events = self._fate(result.acked, _S.ACKED)
        for entry in result.resend:
            events.append(Event(STANZA_RESENT, entry.payload))
            if id(entry) not in current:
                continue
            moved = self._move(entry.message_id, _S.RESENT, seq=entry.seq)
            if moved is not None:
                events.append(moved)
        events += self._settle_adopted()
        return events, result.resend

    def resume_failed(self, h: int | None) -> list[Event]:
        """``<failed h>`` answered ``<resume/>``: ack what ``h`` covers, fail the rest.

        The connection still offers stream management: a fresh session may follow."""
        self._sm.handle(SMEvent.RESUME_FAILED)
        acked, failed = self.ledger.fail(h)
        events = self._fate(acked, _S.ACKED)
        events += self._fate(failed, _S.FAILED, reason=FailureReason.RESUME_FAILED)
        events += self._settle_adopted()
        self._forget_session()
        return events

    def link_lost(self) -> list[Event]:
        """The connection dropped. If the session can be resumed, everything unacked
        (on the wire or still queued in the client) is hibernated."""
        resumable = self.session.can_resume
        self._sm.handle(SMEvent.LINK_LOST_RESUMABLE if resumable else SMEvent.LINK_LOST)
        if not resumable:
            return []
        events = self._fate(list(self.ledger), _S.HIBERNATED)
        for record in list(self.records.values()):
            if record.seq is None and record.state is not _S.HIBERNATED:
                moved = self._move(record.id, _S.HIBERNATED)
                if moved is not None:
                    events.append(moved)
        return events

    def session_ended(
        self, reason: str = FailureReason.SESSION_ENDED, *, unsent: Iterable[str] = ()
    ) -> list[Event]:
        """The session is over: everything on the wire and unacked fails with ``reason``.

        ``unsent`` names tracked messages that never reached the wire and will not
        any more (the client discarded them, or the user closed the session).
        """
        self._sm.handle(SMEvent.ENDED)
        reason = self._lost(reason)
        events = self._fate(self.ledger.reset(), _S.FAILED, reason=reason)
        for message_id in unsent:
            record = self.records.get(message_id)
            if record is not None and record.in_flight:
                failure = reason
                if message_id in self._adopted and reason == FailureReason.SESSION_ENDED:
                    failure = FailureReason.RESUME_FAILED  # a previous process's stream
                moved = self._move(message_id, _S.FAILED, reason=failure)
                if moved is not None:
                    self.withheld.add(message_id)
                    events.append(moved)
        events += self._settle_adopted()  # no stream of this session can carry them now
        self._forget_session()
        return events

    def protocol_error(self, error: SMProtocolError) -> list[Event]:
        """The server broke the counting rules: the session cannot be trusted or resumed."""
        return self.session_ended(FailureReason.PROTOCOL_ERROR)

    def unsent_ids(self) -> list[str]:
        """Tracked messages in flight that have not reached the wire yet, oldest first."""
        return [r.id for r in self.records.values() if r.in_flight and r.seq is None]

    # ------------------------------------------------------------------ restarts

    def adopt(self, records: Iterable[TrackedMessage]) -> None:
        """Take over in-flight records a previous process left in the store.

        They settle with the first session: resent and acked if the restored stream
        resumes and still lists them, otherwise failed with ``resume-failed``.
        """
        for record in records:
            if record.in_flight and record.id not in self.records:
                self.records[record.id] = record
                self._adopted.add(record.id)
                if record.type == "groupchat":
                    self.reflections.add(record)
        self._align_adopted()

    def restore(self, state: RestoredState, payloads: list[P]) -> None:
        """Install a checked saved state; ``payloads`` match ``state.unacked`` one to one."""
        if len(payloads) != len(state.unacked):
            raise ValueError("restore: one payload per unacked entry is required")
        self._sm.handle(SMEvent.RESTORED)
        self.session = SessionFacts(
            sm_id=state.stream_id,
            resumable=True,
            location=state.location,
            max=state.max,
            handled=state.handled,
            restored=True,
            jid=state.jid,
        )
        self.rooms.restore(state.rooms)
        self.ledger = Ledger(seq=state.seq, last_ack=state.last_ack)
        for saved, payload in zip(state.unacked, payloads, strict=True):
            self.ledger.restore(Entry(saved.seq, payload, saved.message_id))
        self._align_adopted()

    def _align_adopted(self) -> None:
        """An adopted record carried by the restored ledger takes its entry's seq: the
        store may hold a snapshot from before the stanza was counted (counting emits no
        event), and only the record's current copy moves it."""
        if not self._adopted:
            return
        for entry in self.ledger:
            message_id = entry.message_id
            if message_id in self._adopted:
                record = self.records[message_id]
                if record.seq != entry.seq:
                    self.records[message_id] = record.moved(
                        record.state, record.updated_at, seq=entry.seq
                    )

    def export_state(
        self, serialize: Callable[[Entry[P]], str], *, now: float
    ) -> dict[str, Any] | None:
        """The JSON-safe state ``sm.cache`` hands out; None when nothing can be resumed."""
        session = self.session
        if not session.can_resume or session.jid is None:
            return None
        return {
            "version": STATE_VERSION,
            "jid": session.jid,
            "stream_id": session.sm_id,
            "location": session.location,
            "max": session.max,
            "handled": session.handled,
            "seq": self.ledger.seq,
            "last_ack": self.ledger.last_ack,
            "unacked": [
                {"seq": entry.seq, "xml": serialize(entry), "id": entry.message_id}
                for entry in self.ledger
            ],
            "rooms": self.rooms.export(),
            "saved_at": now,
        }

    def _settle_adopted(self) -> list[Event]:
        """Fail adopted records that the current stream does not carry."""
        if not self._adopted:
            return []
        carried = {entry.message_id for entry in self.ledger}
        events: list[Event] = []
        for message_id in sorted(self._adopted, key=self._created_at):
            record = self.records.get(message_id)
            if message_id in carried or record is None:
                continue
            if record.in_flight:
                moved = self._move(message_id, _S.FAILED, reason=FailureReason.RESUME_FAILED)
                if moved is not None:
                    events.append(moved)
            elif message_id in self._late_ack_possible:  # no stream carries its copy
                self._late_ack_possible.discard(message_id)
                self._forget(message_id)
        self._adopted.clear()
        return events

    def _lost(self, reason: str) -> str:
        """The reason a stream's in-flight messages fail with when it ends: a stream
        restored from a saved state and never resumed failed its resumption."""
        if self.session.restored and reason == FailureReason.SESSION_ENDED:
            return FailureReason.RESUME_FAILED
        return reason

    def _created_at(self, message_id: str) -> float:
        record = self.records.get(message_id)
        return record.created_at if record is not None else 0.0

    def _forget_session(self) -> None:
        self.rooms.session_ended()  # the app joins its rooms again
        self._stop_waiting_for_reflections()
        self.session = SessionFacts()

    def _stop_waiting_for_reflections(self) -> None:
        """The session's rooms end with it: an acked groupchat message stays ``acked``
        (the server has it; failing it would invite a duplicate in the room) and leaves
        memory. A reflection that still comes (the room's history after a rejoin) finds
        it in the store by its origin-id, as for any record that left memory."""
        waiting = [
            message_id
            for message_id, record in self.records.items()
            if record.state is _S.ACKED and record.type == "groupchat"
        ]
        for message_id in waiting:
            self._forget(message_id)

"""Outgoing stanzas: tracking a message, counting what is written, acks, resends.

The ledger numbers what we write on a managed stream (XEP-0198 §4); an ``<a h>``
acknowledges a prefix of it. A message's record follows its current copy only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TypeVar

from .counters import distance
from .events import MESSAGE_EVENT, Event, OutgoingMessage
from .facts import SessionFacts, SessionView
from .ledger import Entry, Ledger
from .phases import COUNTING_OUT, SM_TRANSITIONS, PhaseMachine, SMPhase
from .proofs import PeerProofs
from .records import FailureReason, TrackedMessage, build_record
from .states import DeliveryState

__all__ = ["Outgoing"]

P = TypeVar("P")
_S = DeliveryState
#: RFC 6120 §13.12: every server accepts stanzas of at least this many bytes.
MIN_STANZA_LIMIT = 10_000


class Outgoing(PeerProofs[P]):
    """Tracks outgoing messages and counts the stanzas written on the stream."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        #: The managed session's facts (its id, resumability, inbound count, ...); read
        #: them through :attr:`session`.
        self._session = SessionFacts()
        self._sm = PhaseMachine(SM_TRANSITIONS, SMPhase.NONE)
        self.ledger: Ledger[P] = Ledger()
        #: What the ledger keeps of a tracked message once its text is known, given the
        #: payload and that text (None: the payload itself). The caller's stanza object
        #: may weigh far more than the text a resend or a saved state needs.
        self.compact: Callable[[P, str], P] | None = None

    @property
    def session(self) -> SessionView:
        """The managed session's facts, a read-only snapshot."""
        return self._session.view()

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
        self._records[record.id] = record
        if record.type == "groupchat":
            self.reflections.add(record)
        events = [Event(MESSAGE_EVENT[_S.SENT], record)]
        if not link_up and self._session.can_resume:
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
        self._withheld.intersection_update(keep)
        self._passes.intersection_update(self._withheld)

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
            and message_id in self._withheld
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
        record = self._records.get(message_id) if message_id is not None else None
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
            if entry.serialized and self.compact is not None:
                entry.payload = self.compact(payload, entry.serialized)
            if record.state is _S.HIBERNATED and link_up:
                # Hibernated before it was ever written: this is its first attempt.
                if xml is not None:
                    record = record.moved(record.state, record.updated_at, xml=xml)
                    self._records[record.id] = record
                first = record.seq is None
                attempts = record.attempts if first else record.attempts + 1
                moved = self._move(message_id, _S.RESENT, seq=entry.seq, attempts=attempts)
                if moved is not None:
                    events.append(moved)
            else:
                self._records[record.id] = record.moved(
                    record.state, record.updated_at, seq=entry.seq, xml=xml
                )
        if not link_up and self._session.can_resume:
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
        record = self._records.get(message_id)
        if record is None:
            return None
        record = self._records[message_id] = record.moved(record.state, record.updated_at, xml=xml)
        return record

    def resend(self, record: TrackedMessage, xml: str | None = None) -> list[Event]:
        """The user sends a failed message again (same id, same origin-id): RESENT.

        ``xml`` is the stanza as it goes out this time (with its ``<delay/>``), when it
        differs from the first attempt. Raises ValueError for a message that has not failed.
        """
        if record.state is not _S.FAILED:
            raise ValueError(f"message {record.id} is {record.state.name}, only FAILED is resent")
        if record.id in self._withheld:
            self._passes.add(record.id)  # one copy, whichever the client writes first
        for entry in self.ledger:
            if entry.message_id == record.id:
                # A copy of an earlier attempt still unacked on the wire: it no longer
                # speaks for the record (one ledger entry per record, its current copy).
                entry.message_id = None
        if xml is not None:
            record = replace(record, xml=xml)
        self._records[record.id] = record
        if record.type == "groupchat":
            self.reflections.add(record)
        moved = self._move(record.id, _S.RESENT, seq=None)
        return [moved] if moved is not None else []

    def ack_is_news(self, h: int) -> bool:
        """Whether ``<a h>`` tells something: it acknowledges more, or nothing waits.
        A server that answers every ``<r/>`` without moving ``h`` while stanzas wait
        is not a live link (the ack clock keeps waiting, and times it out)."""
        ledger = self.ledger
        return not len(ledger) or 0 < distance(ledger.last_ack, h) <= ledger.in_flight

    def ack(self, h: int) -> list[Event]:
        """``<a h>`` came in. Raises :class:`SMProtocolError` on a bad ``h``."""
        return self._fate(self.ledger.ack(h), _S.ACKED)

    def abandon(self, message_id: str, reason: str) -> list[Event]:
        """A tracked message that will not be handed to the client after all: FAILED,
        and withheld should a copy of it still reach the outgoing filter."""
        moved = self._move(message_id, _S.FAILED, reason=reason)
        if moved is None:
            return []
        self._withheld.add(message_id)
        return [moved]

    def stanza_too_big(
        self, size: Callable[[Entry[P]], int], *, right_after_ack: bool
    ) -> list[Event]:
        """The server closed the stream: a stanza we wrote was larger than it accepts.

        The culprit is withdrawn from the ledger (a resumption would resend it and meet
        the same error), and its message fails ``stanza-too-big``, not retryable; the
        rest stays unacked, to be resumed or resent without it. With an ``<a h>`` right
        before the error, the culprit is the first stanza past ``h``; otherwise the
        largest one unacked: something no larger closed the stream, so it is too big
        as well (were it not the one, the next error finds the next). Nothing under
        RFC 6120's 10 000 bytes every server must accept is ever blamed.
        """
        entries = list(self.ledger)
        if not entries:
            return []
        culprit = entries[0] if right_after_ack else max(entries, key=size)
        if size(culprit) < MIN_STANZA_LIMIT and right_after_ack:
            culprit = max(entries, key=size)
        if size(culprit) < MIN_STANZA_LIMIT:
            return []
        self.ledger.withdraw(culprit)
        message_id = culprit.message_id
        record = self._records.get(message_id) if message_id is not None else None
        if message_id is None or record is None or record.seq != culprit.seq:
            return []
        moved = self._move(message_id, _S.FAILED, reason=FailureReason.STANZA_TOO_BIG)
        if moved is None:
            return []
        return [moved]  # (failed: withheld, no copy of it goes out by itself)

    def timed_out(self, message_id: str) -> list[Event]:
        """An attempt stayed unacked past the retry policy's timeout.

        A copy the client still queues is withheld; a copy already on the wire may
        still be acked later, which upgrades the record again.
        """
        record = self._records.get(message_id)
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
            self._withheld.add(message_id)
        return [moved]

    def unsent_ids(self) -> list[str]:
        """Tracked messages in flight that have not reached the wire yet, oldest first."""
        return [r.id for r in self._records.values() if r.in_flight and r.seq is None]

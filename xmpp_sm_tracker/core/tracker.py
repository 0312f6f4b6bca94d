"""The tracker: turns stream-management facts into record changes and events.

It holds the ledger of counted stanzas, the records of tracked messages that can
still change, and the facts of the current managed session. Every method takes a
protocol fact (``<enable/>`` went out, ``<a h>`` came in, the link dropped, ...)
and returns the events it causes, in order. It does no I/O: the plugin writes
stanzas, runs timers and emits the events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .events import STANZA_RESENT, Event, OutgoingMessage
from .facts import SessionFacts
from .ledger import Entry, Ledger, ResumeResult, SMProtocolError
from .outgoing import Outgoing
from .phases import COUNTING_IN, COUNTING_OUT, SMEvent, SMPhase
from .records import FailureReason, TrackedMessage
from .smstate import STATE_VERSION, RestoredState
from .states import DeliveryState

__all__ = ["Event", "OutgoingMessage", "Resumption", "SessionFacts", "Tracker"]

P = TypeVar("P")
_S = DeliveryState
#: The saved state keeps only stanzas a next process may resend (see smstate.RESTORABLE).
_RESTORABLE_PREFIXES = ("<message", "<presence")


@dataclass(frozen=True, slots=True)
class Resumption(Generic[P]):
    """Between the two halves of ``<resumed h>``: what the ledger decided, and which
    entries were their records' current copies before the resends were renumbered."""

    result: ResumeResult[P]
    current: set[int]


class Tracker(Outgoing[P]):
    """Sans-I/O bookkeeping of one client's outgoing stanzas and tracked messages.

    Layered by concern: :class:`~.book.RecordBook` (records and their moves),
    :class:`~.proofs.PeerProofs` (rooms, receipts, bounces), :class:`~.outgoing.Outgoing`
    (tracking, counting, acks, resends), and here the session and restarts.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        #: What the last ``<resumed h>`` meant (for logging gaps in a restored state).
        self.last_resume: ResumeResult[P] | None = None
        #: Resumptions since start: accepted by the server, refused by it.
        self.resumptions = 0
        self.resumptions_failed = 0

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

    def inbound(self) -> None:
        """One inbound stanza was handled."""
        if self._sm.phase in COUNTING_IN:
            self._session.handled = (self._session.handled + 1) % 2**32

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
        session = self._session
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
        session = self._session
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
        The two halves, :meth:`resume_counted` then :meth:`resume_records`, let the
        caller write the resends before the records move (10 000 records take a while).
        """
        resumption = self.resume_counted(h)
        return self.resume_records(resumption), resumption.result.resend

    def resume_counted(self, h: int) -> Resumption[P]:
        """The counters' half of ``<resumed h>``: the ledger acks what ``h`` covers and
        renumbers the rest, to be resent now (``.result.resend``) and handed to
        :meth:`resume_records` right after. Raises :class:`SMProtocolError` on a bad ``h``.
        """
        # The copies their records wait on, told apart before the resends are renumbered.
        records = self._records
        late = self._late_ack_possible
        current = {
            id(entry)
            for entry in self.ledger
            if entry.message_id is not None
            and (record := records.get(entry.message_id)) is not None
            and record.seq == entry.seq
            and (record.in_flight or entry.message_id in late)
        }
        result = self.ledger.resume(h, allow_ahead=self._session.restored)
        self._sm.handle(SMEvent.RESUMED)
        self.resumptions += 1
        self._session.restored = False
        self.last_resume = result
        return Resumption(result, current)

    def resume_records(self, resumption: Resumption[P]) -> list[Event]:
        """The records' half of ``<resumed h>``: acked what it covers, RESENT the rest."""
        result, current = resumption.result, resumption.current
        events = self._fate(result.acked, _S.ACKED)
        move = self._move
        for entry in result.resend:
            events.append(Event(STANZA_RESENT, entry.payload))
            if id(entry) not in current:
                continue
            moved = move(entry.message_id, _S.RESENT, seq=entry.seq)
            if moved is not None:
                events.append(moved)
        events += self._settle_adopted()
        return events

    def resume_failed(self, h: int | None) -> list[Event]:
        """``<failed h>`` answered ``<resume/>``: ack what ``h`` covers, fail the rest.

        The connection still offers stream management: a fresh session may follow."""
        self._sm.handle(SMEvent.RESUME_FAILED)
        self.resumptions_failed += 1
        acked, failed = self.ledger.fail(h)
        events = self._fate(acked, _S.ACKED)
        events += self._fate(failed, _S.FAILED, reason=FailureReason.RESUME_FAILED)
        events += self._settle_adopted()
        self._forget_session()
        return events

    def link_lost(self) -> list[Event]:
        """The connection dropped. If the session can be resumed, everything unacked
        (on the wire or still queued in the client) is hibernated."""
        resumable = self._session.can_resume
        self._sm.handle(SMEvent.LINK_LOST_RESUMABLE if resumable else SMEvent.LINK_LOST)
        if not resumable:
            return []
        events = self._fate(list(self.ledger), _S.HIBERNATED)
        for record in list(self._records.values()):
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
            record = self._records.get(message_id)
            if record is not None and record.in_flight:
                failure = reason
                if message_id in self._adopted and reason == FailureReason.SESSION_ENDED:
                    failure = FailureReason.RESUME_FAILED  # a previous process's stream
                moved = self._move(message_id, _S.FAILED, reason=failure)
                if moved is not None:
                    self._withheld.add(message_id)
                    events.append(moved)
        events += self._settle_adopted()  # no stream of this session can carry them now
        self._forget_session()
        return events

    def protocol_error(self, error: SMProtocolError) -> list[Event]:
        """The server broke the counting rules: the session cannot be trusted or resumed."""
        return self.session_ended(FailureReason.PROTOCOL_ERROR)

    def adopt(self, records: Iterable[TrackedMessage]) -> None:
        """Take over in-flight records a previous process left in the store.

        They settle with the first session: resent and acked if the restored stream
        resumes and still lists them, otherwise failed with ``resume-failed``.
        """
        for record in records:
            if record.in_flight and record.id not in self._records:
                self._records[record.id] = record
                self._adopted.add(record.id)
                if record.type == "groupchat":
                    self.reflections.add(record)
        self._align_adopted()

    def restore(self, state: RestoredState, payloads: list[P]) -> None:
        """Install a checked saved state; ``payloads`` match ``state.unacked`` one to one."""
        if len(payloads) != len(state.unacked):
            raise ValueError("restore: one payload per unacked entry is required")
        self._sm.handle(SMEvent.RESTORED)
        self._session = SessionFacts(
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
                record = self._records[message_id]
                if record.seq != entry.seq:
                    self._records[message_id] = record.moved(
                        record.state, record.updated_at, seq=entry.seq
                    )

    def export_state(
        self, serialize: Callable[[Entry[P]], str], *, now: float
    ) -> dict[str, Any] | None:
        """The JSON-safe state ``sm.cache`` hands out; None when nothing can be resumed."""
        session = self._session
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
            # Only what a next process may resend: messages and presences (an iq's
            # answer would reach nobody; on resumption it counts as not resent). The
            # text, once made, is kept: this runs for every unacked stanza at every
            # hand-over, and a call per entry was a fifth of it.
            "unacked": [
                {"seq": entry.seq, "xml": xml, "id": entry.message_id}
                for entry in self.ledger
                if (xml := entry.serialized or serialize(entry)).startswith(_RESTORABLE_PREFIXES)
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
            record = self._records.get(message_id)
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
        if self._session.restored and reason == FailureReason.SESSION_ENDED:
            return FailureReason.RESUME_FAILED
        return reason

    def _forget_session(self) -> None:
        self.rooms.session_ended()  # the app joins its rooms again
        self._stop_waiting_for_reflections()
        self._session = SessionFacts()

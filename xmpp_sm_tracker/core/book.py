"""The record book: tracked messages that can still change, and how each one moves.

Every change of a record goes through :meth:`RecordBook._move`, which asks the one
transition table (:mod:`.states`) and returns the event to emit. A record leaves
memory once nothing on the stream can change it (the store keeps it); a late signal
brings it back for a moment (:meth:`RecordBook.reinstate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

from .events import MESSAGE_EVENT, STANZA_EVENT, Event, new_event
from .ledger import Entry
from .records import KEEP, FailureReason, Keep, TrackedMessage, build_record
from .retry import RetryPolicy
from .rooms import REFLECTED, ReflectionIndex
from .states import IN_FLIGHT, DeliveryState, next_state

__all__ = ["RecordBook"]

P = TypeVar("P")
_S = DeliveryState


class RecordBook(Generic[P]):
    """Records by id, their moves through the transition table, and their indexes."""

    def __init__(self, clock: Callable[[], float]) -> None:
        #: The caller's clock (the core reads none): record timestamps come from it.
        self.clock = clock
        #: Tracked messages that can still change, by id (read: :attr:`records`).
        self._records: dict[str, TrackedMessage] = {}
        #: Messages that failed (or settled while a copy still waited) since the last
        #: session ended: a copy of them that reaches the filter is dropped, but for one
        #: copy per explicit resend (``should_drop``, ``copies_gone``).
        self._withheld: set[str] = set()
        #: Withheld messages resent explicitly: one copy of each may go out.
        self._passes: set[str] = set()
        #: In-flight records taken over from a previous process, not settled yet.
        self._adopted: set[str] = set()
        #: Failed by their attempt timeout while a copy is still on the wire: kept
        #: until the stream answers for that copy, so a late ack still counts.
        self._late_ack_possible: set[str] = set()
        #: Groupchat records no room has reflected yet, indexed to match reflections.
        self.reflections = ReflectionIndex()
        #: With a policy, a retryable failure of the last attempt reads "retries-exhausted".
        self.retry_policy: RetryPolicy | None = None

    @property
    def withheld(self) -> frozenset[str]:
        """Messages whose copies must not go out unasked (read-only)."""
        return frozenset(self._withheld)

    @property
    def records(self) -> Mapping[str, TrackedMessage]:
        """The records the core holds, read-only (a live view)."""
        return MappingProxyType(self._records)

    def get(self, message_id: str) -> TrackedMessage | None:
        """The current snapshot of a record the tracker still holds."""
        return self._records.get(message_id)

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
        records = self._records
        record = records.get(message_id)
        if record is None:
            return None
        current = record.state
        state = next_state(current, signal)
        if state is None:
            if self._settled(record) and message_id not in self._late_ack_possible:
                self._forget(message_id)  # a reinstated record goes back out
            return None
        if state is _S.RESENT and attempts is None:
            attempts = record.attempts + 1
        if isinstance(reason, Keep):
            reason = record.reason if state is _S.FAILED else None
        # record.moved(...) spelled out: this runs for every record at every change.
        moved = build_record(
            message_id,
            record.origin_id,
            record.to,
            record.type,
            record.body,
            state,
            record.xml,
            record.created_at,
            self.clock(),
            record.via_carbon,
            record.attempts if attempts is None else attempts,
            reason,
            record.seq if isinstance(seq, Keep) else seq,
        )
        moved_in_flight = state in IN_FLIGHT
        if state is _S.FAILED:
            policy = self.retry_policy
            if policy is not None and policy.exhausted(moved):
                moved = moved.moved(state, moved.updated_at, reason=FailureReason.RETRIES_EXHAUSTED)
            if current is _S.FAILED and (moved.reason == record.reason or not record.retryable):
                # FAILED -> FAILED moves only when a failure without an answer (retryable)
                # gets one: the same failure again, or after a refusal, is no news.
                if message_id not in self._late_ack_possible:
                    self._forget(message_id)
                return None
        else:
            late = self._late_ack_possible
            if late:
                late.discard(message_id)
        if state is _S.FAILED or (
            record.seq is None and current in IN_FLIGHT and not moved_in_flight
        ):
            # A failed message goes out again only through an explicit resend, and one
            # that settled while its copy still waits in the client's queue needs that
            # copy no more: any copy of it that reaches the filter is dropped.
            self._withheld.add(message_id)
        if self._passes and not moved_in_flight:
            self._passes.discard(message_id)  # the resend's attempt is over
        if self._settled(moved) and message_id not in self._late_ack_possible:
            self._forget(message_id)
        else:
            records[message_id] = moved
        if record.type == "groupchat" and (state in REFLECTED or message_id not in records):
            self.reflections.discard(message_id)  # the room has it, or it left memory
        return new_event((MESSAGE_EVENT[state], moved))

    def _forget(self, message_id: str) -> None:
        """A settled record leaves memory (the store keeps it)."""
        record = self._records.pop(message_id)
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
        stanza_event = STANZA_EVENT[state]
        events: list[Event] = []
        append = events.append
        records = self._records
        move = self._move
        for entry in entries:
            append(new_event((stanza_event, entry.payload)))
            message_id = entry.message_id
            if message_id is None:
                continue
            record = records.get(message_id)
            if record is None or record.seq != entry.seq:
                continue  # not the copy its record waits on (any more)
            if record.state not in IN_FLIGHT:
                message_event = self._late_fate(record, state)
            else:
                message_event = move(message_id, state, reason=reason)
            if message_event is not None:
                append(message_event)
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

    def reinstate(self, record: TrackedMessage) -> None:
        """Bring a settled record (from the store) back for one late signal."""
        if self._records.setdefault(record.id, record) is record and record.type == "groupchat":
            self.reflections.add(record)

    def retire(self, message_id: str) -> None:
        """Let a reinstated record go again when the signal was not for it after all."""
        record = self._records.get(message_id)
        if record is not None and self._settled(record):
            del self._records[message_id]
            self.reflections.discard(message_id)

    def _created_at(self, message_id: str) -> float:
        record = self._records.get(message_id)
        return record.created_at if record is not None else 0.0

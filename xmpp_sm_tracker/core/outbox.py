"""The outbox: the verdict for every outgoing stanza, and everything held back.

Before this, four structures in the plugin held messages back (copies slixmpp
parks until the session starts, messages waiting for a room rejoin, messages
waiting behind a resend of their conversation, parked copies of messages that
failed meanwhile), each with its own rules. Here they are one object with one
decision, :meth:`Outbox.verdict`, taken for every stanza at the moment it would be
written. Payloads are opaque (the plugin's stanza objects); a copy is recognised
by identity, since a resent message may be queued twice under the same id.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from enum import Enum
from typing import Generic, TypeVar

__all__ = ["Outbox", "Verdict"]

P = TypeVar("P")


class Verdict(Enum):
    """What to do with a stanza that is about to be written."""

    #: A copy of a message that failed meanwhile: only an explicit resend sends it.
    DROP = "drop"
    #: Give it back to the client: it goes out when the session (re)starts, after any
    #: resends (written between ``<resume/>`` and ``<resumed/>`` it would count twice).
    PARK = "park"
    #: A message to a room the ended session was in: it waits for the app's rejoin
    #: (the room would bounce it before).
    HOLD_FOR_ROOM = "hold_for_room"
    #: Write it as it is: no stream management counts on this connection.
    WRITE = "write"
    #: Count it in the ledger, then write it.
    COUNT = "count"

    __hash__ = object.__hash__


class Outbox(Generic[P]):
    """Outgoing stanzas held back, and the verdict for each one about to be written."""

    __slots__ = (
        "_doomed",
        "_doomed_queued",
        "_gates",
        "_resend_held",
        "_room_held",
        "_waiting",
        "_window",
    )

    def __init__(self) -> None:
        #: Tracked messages whose copies wait outside the wire: parked by the client
        #: until the session starts, or held for a room. By id, every copy (a message
        #: resent while offline is parked twice).
        self._waiting: dict[str, list[P]] = {}
        #: Waiting copies of messages that failed meanwhile: dropped when they surface.
        self._doomed: dict[str, list[P]] = {}
        #: Doomed copies the client moved into its send queue at a session start: they
        #: surface in this session, or the queue is purged when it ends.
        self._doomed_queued: dict[str, list[P]] = {}
        #: Messages held for a room rejoin, by room, oldest first, with their ids.
        self._room_held: dict[str, list[tuple[str, P]]] = {}
        #: Conversations with resends under way (a count: resends may overlap).
        self._gates: dict[str, int] = {}
        #: New messages held behind those resends, by conversation, oldest first.
        self._resend_held: dict[str, list[tuple[str, P]]] = {}
        #: New stanzas the app handed over while the unacked window was full, oldest
        #: first (a tracked message's id, or None): released as acks open the window.
        self._window: deque[tuple[str | None, P]] = deque()

    # ---------------------------------------------------------------- read-only views

    def __len__(self) -> int:
        """How many payloads the outbox holds (a room-held one is also waiting)."""
        kinds = (self._waiting, self._doomed, self._doomed_queued, self._resend_held)
        return sum(len(copies) for kind in kinds for copies in kind.values()) + len(self._window)

    @property
    def empty(self) -> bool:
        """Nothing held, nothing waiting, no resend under way."""
        held = self._waiting or self._doomed or self._doomed_queued or self._room_held
        return not (held or self._gates or self._window) and not any(self._resend_held.values())

    def waiting_ids(self) -> frozenset[str]:
        """Tracked messages whose copy waits to go out (parked, held for a room or
        behind a resend): not lost when the client purges its send queue."""
        if not self._resend_held and not self._window:
            return frozenset(self._waiting)
        return frozenset(self._waiting).union(self._behind())

    def _behind(self) -> Iterator[str]:
        """Tracked messages held behind a resend or the window (ours, not the client's)."""
        for held in self._resend_held.values():
            yield from (message_id for message_id, _ in held)
        yield from (message_id for message_id, _ in self._window if message_id is not None)

    def held_ids(self) -> frozenset[str]:
        """Every tracked message whose copy the outbox holds: waiting or behind a resend."""
        return frozenset(self._waiting).union(self._doomed, self._doomed_queued, self._behind())

    def is_waiting(self, message_id: str) -> bool:
        """True when a copy of ``message_id`` waits to go out (see :meth:`waiting_ids`)."""
        if message_id in self._waiting:
            return True
        return any(i == message_id for i in self._behind())

    @property
    def window_held(self) -> int:
        """How many stanzas wait for the unacked window to open."""
        return len(self._window)

    def held_rooms(self) -> frozenset[str]:
        """Rooms with messages held for a rejoin."""
        return frozenset(self._room_held)

    def resending(self, conversation: str) -> bool:
        """True while older messages of ``conversation`` are being resent."""
        return conversation in self._gates

    # ---------------------------------------------------------------- at send time

    def close_gates(self, conversations: Iterable[str]) -> None:
        """Resends of these conversations start: new messages to them wait."""
        for conversation in conversations:
            self._gates[conversation] = self._gates.get(conversation, 0) + 1

    def open_gates(self, conversations: Iterable[str]) -> list[P]:
        """Resends of these conversations are out: what waited behind them, in order."""
        released: list[P] = []
        for conversation in conversations:
            left = self._gates.get(conversation, 0) - 1
            if left > 0:
                self._gates[conversation] = left
                continue
            self._gates.pop(conversation, None)
            released += [payload for _, payload in self._resend_held.pop(conversation, [])]
        return released

    def hold_behind_resend(self, conversation: str, message_id: str, payload: P) -> bool:
        """Keep a new message back while older ones to the same peer are resent.

        The gate is for messages handed over while it is closed: a copy its room held
        (doomed or not) passed it when it was handed over, as did any copy still in the
        client's queue, and goes to its verdict at once."""
        if not self._gates or conversation not in self._gates:
            return False  # the usual case, checked first: nothing is being resent
        if _has(self._waiting, message_id, payload) or _has(self._doomed, message_id, payload):
            return False
        self._resend_held.setdefault(conversation, []).append((message_id, payload))
        return True

    # ---------------------------------------------------------------- the unacked window

    def hold_for_window(
        self, message_id: str | None, payload: P, *, in_flight: int, limit: int | None
    ) -> bool:
        """Keep a new stanza back while ``in_flight`` (unacked, plus queued in the client)
        has reached ``limit``, and behind any held before it: the ledger and the saved
        SM state stay bounded while a server leaves stanzas unacked. Nothing is dropped."""
        if not self._window and (limit is None or in_flight < limit):
            return False  # the usual case, checked first
        self._window.append((message_id, payload))
        return True

    def release_window(self, room: int) -> list[P]:
        """Up to ``room`` held stanzas, oldest first: the window has space for them."""
        released: list[P] = []
        while self._window and len(released) < room:
            released.append(self._window.popleft()[1])
        return released

    # ---------------------------------------------------------------- parked by the client

    def parked(self, message_id: str, payload: P) -> None:
        """The client holds this tracked message until the next session start."""
        self._waiting.setdefault(message_id, []).append(payload)

    def doom(self, message_id: str) -> None:
        """The message failed (or settled): its waiting copies must never go out by
        themselves, and a copy held behind a resend is let go at once (it is ours: no
        client queue will hand it back)."""
        copies = self._waiting.pop(message_id, None)
        if copies:
            self._doomed.setdefault(message_id, []).extend(copies)
        if self._window:
            self._window = deque(pair for pair in self._window if pair[0] != message_id)
        if self._resend_held:
            for conversation, held in list(self._resend_held.items()):
                kept = [pair for pair in held if pair[0] != message_id]
                if len(kept) == len(held):
                    continue
                if kept:
                    self._resend_held[conversation] = kept
                else:
                    del self._resend_held[conversation]

    def session_started(self) -> None:
        """The client moved what it parked into its send queue: those copies are the
        queue's now (the filter sees them, or the queue is purged with the session),
        and only copies held for a room still wait here."""
        held = {id(p) for copies in self._room_held.values() for _, p in copies}
        for message_id in list(self._waiting):
            kept = [p for p in self._waiting[message_id] if id(p) in held]
            if kept:
                self._waiting[message_id] = kept
            else:
                del self._waiting[message_id]
        for message_id in list(self._doomed):
            queued = [p for p in self._doomed[message_id] if id(p) not in held]
            if queued:
                self._doomed_queued.setdefault(message_id, []).extend(queued)
                left = [p for p in self._doomed[message_id] if id(p) in held]
                if left:
                    self._doomed[message_id] = left
                else:
                    del self._doomed[message_id]

    def session_ended(self) -> None:
        """The client purged its send queue with the session: doomed copies that were in
        it cannot surface any more (those it still parks can, at the next start)."""
        self._doomed_queued.clear()

    # ---------------------------------------------------------------- at write time

    def verdict(
        self,
        payload: P,
        message_id: str | None,
        *,
        tracked: bool = False,
        withheld: bool = False,
        resuming: bool = False,
        link_down: bool = False,
        room: str | None = None,
        rooms_waited_for: AbstractSet[str] = frozenset(),
        counting: bool = False,
    ) -> Verdict:
        """The verdict for ``payload``, about to be written.

        ``message_id``: the message's id (None for other stanzas); ``tracked``: it is a
        message the core tracks. ``withheld``: the core says it failed and must not go
        out unasked.
        ``resuming``: ``<resume/>`` is out, ``<resumed/>`` not in. ``link_down``: the
        link dropped while it sat in the client's queue. ``room``: the room a groupchat
        message goes to; ``rooms_waited_for``: rooms whose rejoin is awaited.
        ``counting``: stream management counts what we write.
        """
        if message_id is not None:
            if self._doomed and _take(self._doomed, message_id, payload):
                return Verdict.DROP
            if self._doomed_queued and _take(self._doomed_queued, message_id, payload):
                return Verdict.DROP
            if self._waiting:
                _take(self._waiting, message_id, payload)
            if withheld:
                return Verdict.DROP
        if resuming or (tracked and link_down):
            return Verdict.PARK
        if tracked and message_id is not None and room is not None and room in rooms_waited_for:
            self._room_held.setdefault(room, []).append((message_id, payload))
            self.parked(message_id, payload)  # it goes out later, like a parked one
            return Verdict.HOLD_FOR_ROOM
        return Verdict.COUNT if counting else Verdict.WRITE

    # ---------------------------------------------------------------- rooms

    def release_room(self, room: str) -> list[P]:
        """The app is back in ``room`` (or stopped waiting): its held messages, in order.
        They stay waiting until written (a verdict takes them out)."""
        return [payload for _, payload in self._room_held.pop(room, [])]

    def drop_room(self, room: str) -> None:
        """We left ``room`` for good: its held messages failed with it and their copies
        are gone (an explicit resend sends them again)."""
        for message_id, payload in self._room_held.pop(room, []):
            _take(self._waiting, message_id, payload) or _take(self._doomed, message_id, payload)

    # ---------------------------------------------------------------- the end

    def take_all(self) -> Iterator[P]:
        """Everything held back that is not doomed, oldest first per kind (plugin_end:
        the client sends it, untracked, rather than nobody)."""
        doomed = {
            id(p)
            for kind in (self._doomed, self._doomed_queued)
            for ps in kind.values()
            for p in ps
        }
        held = [p for ps in self._room_held.values() for _, p in ps]
        held += [p for ps in self._resend_held.values() for _, p in ps]
        held += [p for _, p in self._window]
        self._window.clear()
        self._room_held.clear()
        self._resend_held.clear()
        self._gates.clear()
        self._waiting.clear()
        self._doomed.clear()
        self._doomed_queued.clear()
        return (p for p in held if id(p) not in doomed)


def _has(where: dict[str, list[P]], message_id: str, payload: P) -> bool:
    """True when this very copy (by identity) is in ``where``."""
    return any(copy is payload for copy in where.get(message_id, ()))


def _take(where: dict[str, list[P]], message_id: str, payload: P) -> bool:
    """Remove this very copy (by identity) from ``where``; True when it was there."""
    copies = where.get(message_id)
    if not copies:
        return False
    for index, copy in enumerate(copies):
        if copy is payload:
            del copies[index]
            if not copies:
                del where[message_id]
            return True
    return False

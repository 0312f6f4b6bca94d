"""Proofs from peers and rooms: reflections, receipts, markers, bounces, archives.

What the room, the recipient or an archive says about a message we sent, and the
rooms we are in (occupancy and rejoin waits live in :mod:`.rooms`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from .book import RecordBook
from .events import Event
from .records import FailureReason
from .rooms import Rooms
from .states import DeliveryState

__all__ = ["PeerProofs", "may_answer"]

P = TypeVar("P")
_S = DeliveryState


def _bare(jid: str) -> str:
    return jid.partition("/")[0].lower()


def _domain(jid: str) -> str:
    bare = _bare(jid)
    return bare.rpartition("@")[2]


def may_answer(to: str, sender: str, *, bounce: bool = False, own: str = "") -> bool:
    """Whether ``sender`` can answer for a message sent ``to`` someone.

    A receipt or a marker comes from the recipient (any of its resources; for a room,
    the room's occupants, whose JIDs are the room's). A bounce may also come from
    the recipient's server, or from ours: no ``from``, our own JID or domain. Anyone
    else could only forge it (a peer cannot settle a message it was never sent).
    """
    if _bare(sender) == _bare(to):
        return True
    if not bounce:
        return False
    return sender == "" or sender.lower() in {_domain(to), _bare(own), _domain(own)}


class PeerProofs(RecordBook[P]):
    """What peers and rooms prove about our messages."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        #: Occupancy of the current session (our nick per room, pending joins), and the
        #: rooms an ended session was in, which the app has to join again.
        self.rooms = Rooms()
        #: Receipts, markers and bounces ignored: from a party that cannot give them.
        self.rejected_proofs = 0

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

    def delivered(self, message_id: str, *, sender: str) -> list[Event]:
        """An XEP-0184 receipt came back from ``sender`` (only the recipient counts)."""
        if not self._answered_by(message_id, sender):
            return []
        moved = self._move(message_id, _S.DELIVERED)
        return [moved] if moved is not None else []

    def displayed(self, message_id: str, *, sender: str) -> list[Event]:
        """An XEP-0333 displayed marker came back from ``sender`` (only the recipient
        counts)."""
        if not self._answered_by(message_id, sender):
            return []
        moved = self._move(message_id, _S.DISPLAYED)
        return [moved] if moved is not None else []

    def _answered_by(self, message_id: str, sender: str, own: str | None = None) -> bool:
        record = self.get(message_id)
        if record is None:
            return False
        if may_answer(record.to, sender, bounce=own is not None, own=own or ""):
            return True
        self.rejected_proofs += 1
        return False

    def bounced(self, message_id: str, reason: str, *, sender: str, own: str) -> list[Event]:
        """An error bounce from ``sender``: the server (ours, ``own`` is our JID, or the
        recipient's), the recipient or the room refused the message.

        It fails even after ``acked`` (the server had it, somebody refused it), and a
        message that already failed without an answer (an attempt timeout, a failed
        resumption: a retryable reason) fails again with the refusal as its reason, so
        that it is not retried. A late ack of the refused copy does not undo it.
        """
        if not self._answered_by(message_id, sender, own):
            return []
        self._late_ack_possible.discard(message_id)
        moved = self._move(message_id, _S.FAILED, reason=reason)
        return [moved] if moved is not None else []

    def found_in_archive(self, message_id: str) -> list[Event]:
        """A failed message turned up in our server's archive: it has it after all."""
        moved = self._move(message_id, _S.ACKED, reason=FailureReason.FOUND_IN_ARCHIVE)
        return [moved] if moved is not None else []

    @property
    def rejoining(self) -> Mapping[str, str]:
        """Rooms an ended session was in, with our nick there (a read-only view): the
        current session is in none of them until the app joins again, and a message sent
        there before that would bounce. Emptied room by room as the app rejoins.
        """
        return self.rooms.rejoining

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
            record = self._records.get(message_id)
            if record is not None and (record.in_flight or record.state is _S.ACKED):
                moved = self._move(message_id, _S.FAILED, reason=reason)
                if moved is not None:
                    events.append(moved)
        return events

    def stop_waiting_for_rooms(self) -> None:
        """Messages to the ended session's rooms stop waiting for the app to rejoin."""
        self.rooms.stop_waiting()

    def _stop_waiting_for_reflections(self) -> None:
        """The session's rooms end with it: an acked groupchat message stays ``acked``
        (the server has it; failing it would invite a duplicate in the room) and leaves
        memory. A reflection that still comes (the room's history after a rejoin) finds
        it in the store by its origin-id, as for any record that left memory."""
        waiting = [
            message_id
            for message_id, record in self._records.items()
            if record.state is _S.ACKED and record.type == "groupchat"
        ]
        for message_id in waiting:
            self._forget(message_id)

"""Rooms: occupancy, MUC status codes, and matching reflections by index.

Three pieces, all sans-I/O:

- :func:`own_presence` reads the facts of our own occupant presence (status codes,
  presence type, nicks) and decides what it means: joined, nick changed, left or
  removed (and whether the app is expected back), or nothing for us.
- :class:`Rooms` holds the occupancy of the current session (our nick per room, joins
  not answered yet) and the rooms an ended session was in, which the next session has
  to join again before messages to them can go out.
- :class:`ReflectionIndex` holds our groupchat messages that no room has reflected yet,
  by (room, origin-id), (room, id) and (room, body), so a reflection is matched without
  looking at any other record.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias

from .records import FailureReason, TrackedMessage
from .states import DeliveryState

__all__ = [
    "IGNORE",
    "REFLECTED",
    "Ignore",
    "Joined",
    "Left",
    "NickChanged",
    "OwnPresence",
    "ReflectionIndex",
    "Rooms",
    "own_presence",
]

_S = DeliveryState

# ---------------------------------------------------------------------- status codes

#: XEP-0045 status codes that matter for our own occupant presence.
SELF = "110"  # the presence is about us
ROOM_CREATED = "201"  # we created the room by joining it
BANNED = "301"
NICK_CHANGED = "303"  # unavailable under the old nick; the new one is in <item nick>
KICKED = "307"
AFFILIATION_CHANGED = "321"  # removed because our affiliation changed
MEMBERS_ONLY = "322"  # removed because the room became members-only
SHUTDOWN = "332"  # removed because the service is shutting down
TECHNICAL_ERROR = "333"  # removed because of a technical problem

#: Codes that say the room removed us rather than us leaving.
_REMOVED = frozenset({BANNED, KICKED, AFFILIATION_CHANGED, MEMBERS_ONLY, SHUTDOWN, TECHNICAL_ERROR})
#: Removals that are not about us: the app joins again once it can (unlike a kick or a ban).
_REJOIN = frozenset({SHUTDOWN, TECHNICAL_ERROR})


@dataclass(frozen=True, slots=True)
class Joined:
    """We are in the room as ``nick`` (a join answered; 201 when it created the room)."""

    nick: str


@dataclass(frozen=True, slots=True)
class NickChanged:
    """We are in the room under a new nick (303)."""

    nick: str


@dataclass(frozen=True, slots=True)
class Left:
    """We are out of the room: ``reason`` is ``left-room`` or ``removed-from-room``;
    ``rejoin`` when the app is expected back (332 shutdown, 333 technical error)."""

    reason: str
    rejoin: bool = False


@dataclass(frozen=True, slots=True)
class Ignore:
    """Not our own occupant presence: nothing changes."""


IGNORE = Ignore()
OwnPresence: TypeAlias = Joined | NickChanged | Left | Ignore


def own_presence(
    codes: Collection[str], presence_type: str | None, nick: str, new_nick: str | None = None
) -> OwnPresence:
    """What a presence from a room occupant means for us.

    ``codes``: the ``<status code>`` values of its MUC ``<x>``; ``presence_type``: its
    ``type`` (None for available); ``nick``: the resource of its ``from``; ``new_nick``:
    the ``nick`` of its ``<item>`` (set on a nick change). Only status 110 makes it ours.
    An error presence is no occupant presence (see :meth:`Rooms.join_refused`).
    """
    if SELF not in codes or presence_type == "error":
        return IGNORE
    if presence_type != "unavailable":
        return Joined(nick)
    if NICK_CHANGED in codes and new_nick:
        return NickChanged(new_nick)
    removed = not _REMOVED.isdisjoint(codes)
    return Left(
        FailureReason.REMOVED_FROM_ROOM if removed else FailureReason.LEFT_ROOM,
        rejoin=not _REJOIN.isdisjoint(codes),
    )


# ---------------------------------------------------------------------- occupancy


class Rooms:
    """Our nick per room in the current session, joins not answered yet, and the rooms
    an ended session was in that the next one must join again.

    Occupancy lives and dies with the session: resumption keeps it (no new
    self-presence comes), a session that ends has left every room. Its state is
    read-only from outside: the properties are views, the methods are the facts.
    """

    __slots__ = ("_joining", "_nicks", "_rejoining")

    def __init__(self) -> None:
        self._nicks: dict[str, str] = {}
        self._joining: dict[str, str] = {}
        self._rejoining: dict[str, str] = {}

    @property
    def nicks(self) -> Mapping[str, str]:
        """Our nick in each room this session is in."""
        return MappingProxyType(self._nicks)

    @property
    def joining(self) -> Mapping[str, str]:
        """Rooms whose join went out on this session with no answer yet, with the nick."""
        return MappingProxyType(self._joining)

    @property
    def rejoining(self) -> Mapping[str, str]:
        """Rooms an ended session was in, with our nick there: the current session is in
        none of them until the app joins again, and a message sent there before that
        would bounce. Emptied room by room as the app rejoins."""
        return MappingProxyType(self._rejoining)

    def nick_in(self, room: str) -> str | None:
        """Our nick in ``room``, or None when this session is not in it."""
        return self._nicks.get(room)

    def join_sent(self, room: str, nick: str) -> None:
        """Our join presence went out: if the session ends before the room answers,
        the next one has to join it again as well."""
        self._joining[room] = nick

    def joined(self, room: str, nick: str) -> None:
        """Our own occupant presence: joined (or nick changed) as ``nick``."""
        self._nicks[room] = nick
        self._joining.pop(room, None)
        self._rejoining.pop(room, None)

    def join_refused(self, room: str) -> bool:
        """An error presence from ``room``: True if it refused our pending join (then
        nothing waits for the room any more); False when no join is pending there."""
        if self._joining.pop(room, None) is None:
            return False
        self._rejoining.pop(room, None)
        return True

    def left(self, room: str, *, rejoin: bool = False) -> str | None:
        """We are out of ``room``; our nick there, if we were in it. ``rejoin``: the app
        is expected back, so the next session waits for it like for an ended session's."""
        nick = self._nicks.pop(room, None)
        self._joining.pop(room, None)
        self._rejoining.pop(room, None)
        if rejoin and nick is not None:
            self._rejoining[room] = nick
        return nick

    def session_ended(self) -> None:
        """The session is over: its rooms (and pending joins) are to be joined again."""
        self._rejoining.update(self._joining)
        self._rejoining.update(self._nicks)
        self._nicks, self._joining = {}, {}

    def stop_waiting(self) -> None:
        """Messages no longer wait for the ended session's rooms."""
        self._rejoining.clear()

    def export(self) -> dict[str, str]:
        """The rooms for a saved SM state (a copy)."""
        return dict(self._nicks)

    def restore(self, rooms: Mapping[str, str]) -> None:
        """A saved session is back: it is in its saved rooms, with no join pending."""
        self._nicks = dict(rooms)
        self._joining = {}


# ---------------------------------------------------------------------- reflections

#: States in which a room has nothing more to tell about a message.
REFLECTED = frozenset({_S.ROOM_RECEIVED, _S.DELIVERED, _S.DISPLAYED})


#: What the index knows of a record: room, (room, origin-id), (room, body), created_at.
_Held: TypeAlias = tuple[str, tuple[str, str] | None, tuple[str, str] | None, float]
#: The ids under one key: most keys have one, kept as the bare id (no container).
_Bucket: TypeAlias = str | OrderedDict[str, None]


class ReflectionIndex:
    """Our groupchat messages no room has reflected yet, to match reflections in O(1).

    It holds ids, in the order the records entered the tracker: per room (for the
    (room, id) match and for leaving a room), per (room, origin-id), and per (room, body)
    ordered by creation time (the oldest first, ties in entry order). The tracker adds a
    record when it enters and discards it when it leaves or is reflected; a record's
    room, ids and body never change.
    """

    __slots__ = ("_by_body", "_by_origin", "_by_room", "_held")

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._by_room: dict[str, dict[str, None]] = {}
        self._by_origin: dict[tuple[str, str], _Bucket] = {}
        self._by_body: dict[tuple[str, str], _Bucket] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._held

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def sizes(self) -> dict[str, int]:
        """How many ids and keys each part holds (all 0 when nothing waits)."""
        return {
            "ids": len(self._held),
            "rooms": len(self._by_room),
            "origin_ids": len(self._by_origin),
            "bodies": len(self._by_body),
        }

    def in_room(self, room: str) -> tuple[str, ...]:
        """The unreflected messages to ``room``, in the order they entered."""
        return tuple(self._by_room.get(room, ()))

    def add(self, record: TrackedMessage) -> None:
        """A groupchat record entered the tracker (or changed): index it unless reflected."""
        message_id = record.id
        if record.state in REFLECTED:
            self.discard(message_id)
            return
        room = record.conversation
        origin = (room, record.origin_id) if record.origin_id else None
        body = (room, record.body) if record.body else None
        held: _Held = (room, origin, body, record.created_at)
        known = self._held.get(message_id)
        if known is not None:
            if known == held:
                return
            self.discard(message_id)
        self._held[message_id] = held
        in_room = self._by_room.get(room)
        if in_room is None:
            self._by_room[room] = {message_id: None}
        else:
            in_room[message_id] = None
        # Most keys are new: the bare id goes in without a call.
        if origin is not None:
            if origin in self._by_origin:
                self._push(self._by_origin, origin, message_id, by_time=False)
            else:
                self._by_origin[origin] = message_id
        if body is not None:
            if body in self._by_body:
                self._push(self._by_body, body, message_id, by_time=True)
            else:
                self._by_body[body] = message_id

    def discard(self, message_id: str) -> None:
        """The record left the tracker or was reflected."""
        held = self._held.pop(message_id, None)
        if held is None:
            return
        room, origin, body, _ = held
        in_room = self._by_room[room]
        del in_room[message_id]
        if not in_room:
            del self._by_room[room]
        if origin is not None:
            _pop(self._by_origin, origin, message_id)
        if body is not None:
            _pop(self._by_body, body, message_id)

    def find(
        self,
        room: str,
        origin_id: str | None,
        stanza_id: str | None,
        body: str | None,
        *,
        history: bool = False,
    ) -> str | None:
        """Which unreflected message to ``room`` a reflection is: by origin-id, then id,
        then (only when the reflection has no origin-id and is not history) the oldest
        one with the same body."""
        if origin_id:
            same_origin = self._by_origin.get((room, origin_id))
            if same_origin is not None:
                return _first(same_origin)
        if stanza_id and stanza_id in self._by_room.get(room, ()):
            return stanza_id
        if body and origin_id is None and not history:
            same_body = self._by_body.get((room, body))
            if same_body is not None:
                return _first(same_body)
        return None

    def _push(
        self,
        index: dict[tuple[str, str], _Bucket],
        key: tuple[str, str],
        message_id: str,
        *,
        by_time: bool,
    ) -> None:
        """Add to a key that holds other ids already."""
        bucket = index[key]
        if isinstance(bucket, str):
            index[key] = bucket = OrderedDict.fromkeys((bucket,))
        held = self._held
        last = next(reversed(bucket))
        bucket[message_id] = None
        if by_time and held[message_id][3] < held[last][3]:
            # An older record came back (reinstated, resent, adopted): keep the bucket
            # oldest first, equal times in entry order (a stable sort, it being last).
            index[key] = OrderedDict.fromkeys(sorted(bucket, key=lambda i: held[i][3]))


def _first(bucket: _Bucket) -> str:
    return bucket if isinstance(bucket, str) else next(iter(bucket))


def _pop(index: dict[tuple[str, str], _Bucket], key: tuple[str, str], message_id: str) -> None:
    bucket = index[key]
    if isinstance(bucket, str):
        del index[key]
        return
    del bucket[message_id]
    if not bucket:
        del index[key]

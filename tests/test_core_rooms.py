"""Rooms in the core: status codes, occupancy, and reflections matched by index."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xmpp_sm_tracker.core.records import FailureReason, TrackedMessage
from xmpp_sm_tracker.core.rooms import (
    IGNORE,
    REFLECTED,
    Joined,
    Left,
    NickChanged,
    OwnPresence,
    Rooms,
    own_presence,
)
from xmpp_sm_tracker.core.states import DeliveryState
from xmpp_sm_tracker.core.tracker import Event, OutgoingMessage, Tracker

from .test_core_tracker import Clock, Stanza, enable, send_enable

S = DeliveryState
ROOM = "room@muc.example"
OTHER = "other@muc.example"
LEFT = FailureReason.LEFT_ROOM
REMOVED = FailureReason.REMOVED_FROM_ROOM

# ---------------------------------------------------------------- status codes

#: Every code the core reads, with what it means for our own unavailable presence.
UNAVAILABLE_WITH = {
    "201": Left(LEFT),  # (only sent with a join; unavailable it is a plain leave)
    "301": Left(REMOVED),  # banned
    "303": NickChanged("new"),  # nick change, the new nick in <item>
    "307": Left(REMOVED),  # kicked
    "321": Left(REMOVED),  # affiliation changed
    "322": Left(REMOVED),  # room became members-only
    "332": Left(REMOVED, rejoin=True),  # service shutting down: the app comes back
    "333": Left(REMOVED, rejoin=True),  # technical error: the app comes back
}


@pytest.mark.parametrize(("code", "expected"), sorted(UNAVAILABLE_WITH.items()))
def test_each_code_on_our_unavailable_presence(code: str, expected: OwnPresence) -> None:
    assert own_presence({"110", code}, "unavailable", "me", "new") == expected
    # Without 110 it is somebody else's presence, whatever the code says.
    assert own_presence({code}, "unavailable", "me", "new") is IGNORE


@pytest.mark.parametrize("code", ["110", *sorted(UNAVAILABLE_WITH)])
@pytest.mark.parametrize("kind", [None, "available"])
def test_each_code_on_our_available_presence_is_a_join(code: str, kind: str | None) -> None:
    # 110 alone, 201 (we created the room), or anything else: we are in as ``nick``.
    assert own_presence({"110", code}, kind, "me", "new") == Joined("me")
    if code != "110":
        assert own_presence({code}, kind, "me", "new") is IGNORE


@pytest.mark.parametrize(
    ("codes", "kind", "new_nick", "expected"),
    [
        ({"110"}, "unavailable", None, Left(LEFT)),  # we left
        ({"110", "303"}, "unavailable", None, Left(LEFT)),  # 303 without the new nick
        ({"110", "303"}, "unavailable", "", Left(LEFT)),
        ({"110", "303", "307"}, "unavailable", "new", NickChanged("new")),
        ({"110", "307", "332"}, "unavailable", None, Left(REMOVED, rejoin=True)),
        ({"110", "170"}, "unavailable", None, Left(LEFT)),  # a code we do not read
        ({"110"}, "error", None, IGNORE),  # no occupant presence (a refused join)
        (set(), None, None, IGNORE),
        (set(), "unavailable", None, IGNORE),
        ({"110", "201"}, None, None, Joined("me")),
    ],
)
def test_own_presence_combinations(
    codes: set[str], kind: str | None, new_nick: str | None, expected: OwnPresence
) -> None:
    assert own_presence(codes, kind, "me", new_nick) == expected


# ---------------------------------------------------------------- occupancy


def test_rooms_join_answer_leave_and_rejoin_waits() -> None:
    rooms = Rooms()
    rooms.join_sent("r@muc", "Alice")
    assert (dict(rooms.joining), rooms.nick_in("r@muc")) == ({"r@muc": "Alice"}, None)
    rooms.joined("r@muc", "Alice")
    assert (dict(rooms.joining), dict(rooms.nicks)) == ({}, {"r@muc": "Alice"})
    rooms.joined("r@muc", "Alicia")  # 303: the new nick
    assert rooms.nick_in("r@muc") == "Alicia"
    rooms.join_sent("s@muc", "Al")
    rooms.session_ended()
    assert (dict(rooms.nicks), dict(rooms.joining)) == ({}, {})
    assert rooms.rejoining == {"r@muc": "Alicia", "s@muc": "Al"}
    rooms.joined("r@muc", "Alicia")
    assert rooms.rejoining == {"s@muc": "Al"}
    rooms.stop_waiting()
    assert rooms.rejoining == {}


def test_rooms_refused_join_and_removals() -> None:
    rooms = Rooms()
    assert not rooms.join_refused("r@muc")  # nothing pending: a bounced presence
    rooms.join_sent("r@muc", "Alice")
    assert rooms.join_refused("r@muc")
    assert not rooms.join_refused("r@muc")
    rooms.joined("r@muc", "Alice")
    rooms.joined("s@muc", "Al")
    assert rooms.left("r@muc", rejoin=True) == "Alice"  # 332: expected back
    assert rooms.left("s@muc") == "Al"  # kicked: not waited for
    assert rooms.left("t@muc", rejoin=True) is None  # never in it: nothing to wait for
    assert (dict(rooms.nicks), dict(rooms.rejoining)) == ({}, {"r@muc": "Alice"})


def test_rooms_state_is_read_only_and_exported_as_a_copy() -> None:
    rooms = Rooms()
    rooms.joined("r@muc", "Alice")
    views: list[Mapping[str, str]] = [rooms.nicks, rooms.joining, rooms.rejoining]
    for view in views:
        with pytest.raises(TypeError):
            view["x@muc"] = "X"  # type: ignore[index]
    exported = rooms.export()
    exported["x@muc"] = "X"
    assert rooms.export() == {"r@muc": "Alice"}
    rooms.join_sent("s@muc", "Al")
    rooms.restore({"t@muc": "T"})  # a saved session: its rooms, no pending join
    assert (dict(rooms.nicks), dict(rooms.joining)) == ({"t@muc": "T"}, {})


def test_tracker_rejoining_is_a_read_only_view() -> None:
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    tracker.joined_room("r@muc", "Alice")
    tracker.session_ended()
    view = tracker.rejoining
    assert view == {"r@muc": "Alice"}
    assert not hasattr(view, "clear")
    tracker.stop_waiting_for_rooms()
    assert view == {} and tracker.rejoining == {}
    tracker.joined_room("s@muc", "Al")
    tracker.session_ended()
    assert tracker.rejoining == {"s@muc": "Al"}
    tracker.joined_room("s@muc", "Al")  # back in: no more waiting
    assert tracker.rejoining == {}


# ---------------------------------------------------------------- reflections


def message(
    mid: str, *, room: str = ROOM, body: str | None = None, origin: str | None = None
) -> OutgoingMessage:
    return OutgoingMessage(
        id=mid,
        origin_id=f"o-{mid}" if origin is None else origin,
        to=f"{room}/me",
        type="groupchat",
        body=f"body of {mid}" if body is None else body,
        xml=f"<message id='{mid}'/>",
    )


def room_tracker() -> tuple[Tracker[Stanza], Clock]:
    clock = Clock()
    tracker: Tracker[Stanza] = Tracker(clock=clock)
    enable(tracker)
    return tracker, clock


def put(tracker: Tracker[Stanza], out: OutgoingMessage) -> list[Event]:
    events = tracker.track(out, link_up=True)
    return events + tracker.counted(Stanza(out.id), out.id, link_up=True)


def nothing_indexed(tracker: Tracker[Any]) -> bool:
    return set(tracker.reflections.sizes().values()) == {0}


def test_origin_id_then_id_then_body() -> None:
    tracker, _ = room_tracker()
    for mid in ("g1", "g2", "g3"):
        put(tracker, message(mid))
    assert tracker.find_reflected(ROOM, "o-g2", "g3", "body of g1") == "g2"
    assert tracker.find_reflected(ROOM, "unknown", "g3", "body of g1") == "g3"
    assert tracker.find_reflected(ROOM, None, "rewritten", "body of g3") == "g3"
    assert tracker.find_reflected(ROOM, "", "", "body of g1") is None  # empty origin-id
    assert tracker.find_reflected(ROOM, None, None, None) is None
    assert tracker.find_reflected(OTHER, "o-g1", "g1", "body of g1") is None


def test_someone_elses_origin_id_or_history_never_match_by_body() -> None:
    tracker, _ = room_tracker()
    put(tracker, message("g1"))
    assert tracker.find_reflected(ROOM, "theirs", None, "body of g1") is None
    assert tracker.find_reflected(ROOM, None, None, "body of g1", history=True) is None
    assert tracker.find_reflected(ROOM, None, "g1", "x", history=True) == "g1"  # ids do
    assert tracker.find_reflected(ROOM, "o-g1", None, "x", history=True) == "g1"


def test_equal_bodies_are_matched_oldest_first() -> None:
    tracker, clock = room_tracker()
    for mid in ("a", "b", "c"):
        put(tracker, message(mid, body="ok"))
        clock.tick()
    put(tracker, message("x", body="ok", room=OTHER))
    order = []
    for _ in range(3):
        found = tracker.find_reflected(ROOM, None, None, "ok")
        assert found is not None
        order.append(found)
        tracker.room_received(found)
    assert order == ["a", "b", "c"]
    assert tracker.find_reflected(ROOM, None, None, "ok") is None
    assert tracker.find_reflected(OTHER, None, None, "ok") == "x"


def test_equal_bodies_with_equal_times_go_in_the_order_they_came() -> None:
    tracker, _ = room_tracker()  # the clock stands still
    for mid in ("b", "a", "c"):
        put(tracker, message(mid, body="ok"))
    tracker.room_received("b")
    assert tracker.find_reflected(ROOM, None, None, "ok") == "a"


def test_an_older_record_coming_back_is_matched_first_by_body() -> None:
    tracker, clock = room_tracker()
    [old] = [e.payload for e in put(tracker, message("old", body="ok"))]
    assert isinstance(old, TrackedMessage)
    [failed] = tracker.bounced(
        "old", FailureReason.bounce("wait", "resource-constraint"), sender=ROOM, own=""
    )
    assert "old" not in tracker.records and nothing_indexed(tracker)
    clock.tick()
    put(tracker, message("new", body="ok"))
    assert tracker.find_reflected(ROOM, None, None, "ok") == "new"
    assert isinstance(failed.payload, TrackedMessage)
    tracker.resend(failed.payload)  # created earlier: the oldest again
    assert tracker.find_reflected(ROOM, None, None, "ok") == "old"


def test_a_reflected_or_reinstated_reflected_record_is_not_matched() -> None:
    tracker, _ = room_tracker()
    put(tracker, message("g1"))
    tracker.ack(1)
    [event] = tracker.room_received("g1")
    assert tracker.find_reflected(ROOM, "o-g1", "g1", "body of g1") is None
    assert isinstance(event.payload, TrackedMessage)
    tracker.reinstate(event.payload)  # back for a late marker: never a reflection again
    assert "g1" in tracker.records
    assert tracker.find_reflected(ROOM, "o-g1", "g1", "body of g1") is None
    assert nothing_indexed(tracker)


def test_chat_messages_are_never_indexed() -> None:
    tracker, _ = room_tracker()
    chat = message("c1")._replace(type="chat", to="bob@example.org")
    put(tracker, chat)
    assert "c1" in tracker.records
    assert nothing_indexed(tracker)
    assert tracker.find_reflected("bob@example.org", "o-c1", "c1", "body of c1") is None


def test_leaving_a_room_fails_only_its_unreflected_messages_in_order() -> None:
    tracker, _ = room_tracker()
    for mid in ("g1", "g2", "g3"):
        put(tracker, message(mid))
    put(tracker, message("h1", room=OTHER))
    tracker.ack(2)  # g1, g2 acked; g3 on the wire
    tracker.room_received("g1")
    tracker.joined_room(ROOM, "me")
    events = tracker.left_room(ROOM, REMOVED)
    assert [(e.name, e.payload.id) for e in events] == [  # type: ignore[attr-defined]
        ("message:failed", "g2"),
        ("message:failed", "g3"),
    ]
    assert tracker.reflections.in_room(ROOM) == ()
    assert tracker.reflections.in_room(OTHER) == ("h1",)
    assert tracker.left_room(ROOM, REMOVED) == []  # a failed one fails once


def test_the_index_empties_as_everything_settles() -> None:
    tracker, clock = room_tracker()
    for i in range(6):
        put(tracker, message(f"g{i}", body="same" if i % 2 else None))
        clock.tick()
    put(tracker, message("h1", room=OTHER))
    assert tracker.reflections.sizes() == {"ids": 7, "rooms": 2, "origin_ids": 7, "bodies": 5}
    tracker.ack(4)
    tracker.room_received("g0")  # reflected after its ack
    tracker.room_received("g5")  # reflected before its ack
    tracker.bounced(  # acked, refused
        "g1", FailureReason.bounce("cancel", "forbidden"), sender=ROOM, own=""
    )
    tracker.left_room(OTHER, LEFT)
    tracker.link_lost()
    tracker.resume_sent()
    # g4 fails (g5 was reflected); g2 and g3 stay acked and leave memory with the
    # session (we are in no room any more: only the room's history could reflect them,
    # and a late reflection finds them in the store by origin-id).
    tracker.resume_failed(None)
    assert tracker.records == {}
    assert nothing_indexed(tracker)


def test_adopted_reinstated_and_retired_records_enter_and_leave_the_index() -> None:
    tracker, _ = room_tracker()
    [sent] = [e.payload for e in put(tracker, message("g1"))]
    assert isinstance(sent, TrackedMessage)
    tracker.session_ended()  # it fails and leaves memory
    assert nothing_indexed(tracker)
    fresh: Tracker[Stanza] = Tracker(clock=Clock())
    fresh.adopt([sent])  # a restart takes it over
    assert fresh.find_reflected(ROOM, "o-g1", None, None) == "g1"
    send_enable(fresh)
    [failed] = fresh.enabled("sm-2", resumable=True, location=None, max=None)
    assert nothing_indexed(fresh)
    assert isinstance(failed.payload, TrackedMessage)
    fresh.reinstate(failed.payload)  # fetched for a late reflection ...
    assert fresh.find_reflected(ROOM, None, "g1", None) == "g1"
    fresh.retire("g1")  # ... that was not for it
    assert fresh.records == {} and nothing_indexed(fresh)


# ---------------------------------------------------------------- against the old scan


def scan(
    records: Mapping[str, TrackedMessage],
    room: str,
    origin_id: str | None,
    stanza_id: str | None,
    body: str | None,
    *,
    history: bool = False,
) -> str | None:
    """The matching as it was before the index: a scan of every record."""
    candidates = [
        r
        for r in records.values()
        if r.type == "groupchat"
        and r.conversation == room
        and r.state not in (S.ROOM_RECEIVED, S.DELIVERED, S.DISPLAYED)
    ]
    for wanted, key in ((origin_id, "origin_id"), (stanza_id, "id")):
        if wanted:
            for record in candidates:
                if getattr(record, key) == wanted:
                    return record.id
    if body and origin_id is None and not history:
        same_body = [r for r in candidates if r.body == body]
        if same_body:
            return min(same_body, key=lambda r: r.created_at).id
    return None


ROOMS = [ROOM, OTHER]
BODIES = ["ok", "yes"]


class ReflectionMachine(RuleBasedStateMachine):
    """Random sends, acks, drops, bounces, reflections, leaves, resends and late proofs
    (not timed_out: a link drop after it raises FAILED -> HIBERNATED, a bug of its own):
    the index always holds exactly the unreflected groupchat records, in their order,
    and finds what the old scan found."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.tracker: Tracker[Stanza] = Tracker(clock=self.clock)
        self.store: dict[str, TrackedMessage] = {}  # the last snapshot of every message
        self.serial = 0
        self.up = True
        enable(self.tracker)

    def apply(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event.payload, TrackedMessage):
                self.store[event.payload.id] = event.payload

    def known(self) -> list[str]:
        return sorted(self.store)

    @precondition(lambda self: self.up)
    @rule(
        batch=st.lists(
            st.tuples(
                st.sampled_from(["groupchat", "groupchat", "groupchat", "chat"]),
                st.sampled_from(ROOMS),
                st.sampled_from(BODIES),
                st.sampled_from([False, False, False, True]),  # a shared origin-id
                st.booleans(),  # the clock moves
            ),
            min_size=1,
            max_size=6,
        )
    )
    def send(self, batch: list[tuple[str, str, str, bool, bool]]) -> None:
        for kind, room, body, shared_origin, tick in batch:
            self.serial += 1
            mid = f"m{self.serial}"
            origin = "shared" if shared_origin else None
            out = message(mid, room=room, body=body, origin=origin)
            if kind == "chat":
                out = out._replace(type="chat", to="bob@example.org")
            self.apply(put(self.tracker, out))
            if tick:
                self.clock.tick()

    @precondition(lambda self: self.up)
    @rule()
    def ack_all(self) -> None:
        self.apply(self.tracker.ack(self.tracker.ledger.seq))

    @precondition(lambda self: self.up)
    @rule(resumed=st.sampled_from([True, True, False]))
    def link_drops(self, resumed: bool) -> None:
        tracker = self.tracker
        self.apply(tracker.link_lost())
        tracker.resume_sent()
        if resumed:
            events, _ = tracker.resumed(tracker.ledger.last_ack)
            self.apply(events)
        else:
            self.apply(tracker.resume_failed(None))
            self.apply(send_enable(tracker))
            self.apply(tracker.enabled("sm-2", resumable=True, location=None, max=None))

    @rule(data=st.data(), history=st.booleans())
    def reflection(self, data: st.DataObject, history: bool) -> None:
        """A reflection made from one of our messages (its ids or body kept, rewritten
        or dropped), or from nothing of ours."""
        tracker = self.tracker
        held = sorted(tracker.records.values(), key=lambda r: r.id)
        known = held or [self.store[mid] for mid in self.known()]  # held ones mostly
        if known and data.draw(st.sampled_from([True, True, True, False]), label="ours"):
            of = data.draw(st.sampled_from(known), label="of")
            room = of.conversation
            ours: tuple[str | None, ...] = (of.origin_id, of.id, of.body)
        else:
            room, ours = data.draw(st.sampled_from(ROOMS), label="room"), (None, None, None)
        origin = data.draw(st.sampled_from([ours[0], None, None, None, "", "shared", "theirs"]))
        stanza_id = data.draw(st.sampled_from([ours[1], None, "rewritten", "rewritten"]))
        body = data.draw(st.sampled_from([ours[2], ours[2], None, *BODIES]), label="body")
        expected = scan(tracker.records, room, origin, stanza_id, body, history=history)
        found = tracker.find_reflected(room, origin, stanza_id, body, history=history)
        assert found == expected, (room, origin, stanza_id, body, history)
        if found is not None:
            self.apply(tracker.room_received(found))

    @rule(data=st.data())
    def late_signal(self, data: st.DataObject) -> None:
        """A bounce, receipt or reflection for a message that may have left memory: the
        plugin reinstates it from the store, applies the signal, or retires it."""
        if not self.store:
            return
        record = self.store[data.draw(st.sampled_from(self.known()), label="late")]
        tracker = self.tracker
        signal = data.draw(st.sampled_from(["bounce", "reflection", "nothing"]))
        tracker.reinstate(record)
        if signal == "bounce":
            self.apply(tracker.bounced(record.id, "cancel:forbidden", sender=ROOM, own=""))
        elif signal == "reflection" and record.type == "groupchat":
            self.apply(tracker.room_received(record.id))
        else:
            tracker.retire(record.id)

    @rule(room=st.sampled_from(ROOMS), rejoin=st.booleans(), now=st.integers(0, 4))
    def leave(self, room: str, rejoin: bool, now: int) -> None:
        if now == 0:  # rarely: it fails everything unreflected in the room
            self.apply(self.tracker.left_room(room, REMOVED, rejoin=rejoin))

    @precondition(lambda self: self.up)
    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        failed = [r for r in self.store.values() if r.state is S.FAILED]
        if not failed:
            return
        record = data.draw(st.sampled_from(sorted(failed, key=lambda r: r.id)), label="resend")
        self.apply(self.tracker.resend(record))
        self.apply(self.tracker.counted(Stanza(record.id), record.id, link_up=True))

    @invariant()
    def index_is_the_unreflected_groupchat_records_in_order(self) -> None:
        records = self.tracker.records
        index = self.tracker.reflections
        waiting = [
            r for r in records.values() if r.type == "groupchat" and r.state not in REFLECTED
        ]
        assert list(index) == [r.id for r in waiting]
        for room in ROOMS:
            in_room = tuple(r.id for r in waiting if r.conversation == room)
            assert index.in_room(room) == in_room
        sizes = index.sizes()
        assert sizes["ids"] == len(waiting)
        assert sizes["rooms"] == len({r.conversation for r in waiting})
        assert sizes["origin_ids"] == len({(r.conversation, r.origin_id) for r in waiting})
        assert sizes["bodies"] == len({(r.conversation, r.body) for r in waiting})


TestReflectionMachine = ReflectionMachine.TestCase
TestReflectionMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------- no scans


class NoScan(dict[str, TrackedMessage]):
    """Records that refuse to be iterated, and count every lookup or write."""

    touches = 0

    def _touch(self) -> None:
        NoScan.touches += 1

    def __iter__(self) -> Any:
        raise AssertionError("the records were scanned")

    def values(self) -> Any:
        raise AssertionError("the records were scanned")

    def items(self) -> Any:
        raise AssertionError("the records were scanned")

    def keys(self) -> Any:
        raise AssertionError("the records were scanned")

    def get(self, key: str, default: Any = None) -> Any:
        self._touch()
        return super().get(key, default)

    def __getitem__(self, key: str) -> TrackedMessage:
        self._touch()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._touch()
        return super().__contains__(key)

    def __setitem__(self, key: str, value: TrackedMessage) -> None:
        self._touch()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._touch()
        super().__delitem__(key)


def touches_to_reflect(n: int) -> int:
    """Record lookups and writes to match and settle 2n reflections and leave a room of n.

    Half of them match by origin-id, half by body alone (all bodies equal, the worst
    case for the body match); then a room with n acked messages is left.
    """
    tracker, clock = room_tracker()
    for i in range(n):
        put(tracker, message(f"o{i}"))
        put(tracker, message(f"b{i}", body="same"))
        put(tracker, message(f"x{i}", room=OTHER))
        clock.tick()
    tracker.ack(tracker.ledger.seq)
    tracker.joined_room(OTHER, "me")
    tracker._records = NoScan(tracker._records)  # white box: the core's own dict
    NoScan.touches = 0
    for i in range(n):
        found = tracker.find_reflected(ROOM, f"o-o{i}", "rewritten", f"body of o{i}")
        assert found == f"o{i}"
        tracker.room_received(found)
        found = tracker.find_reflected(ROOM, None, "rewritten", "same")
        assert found == f"b{i}"
        tracker.room_received(found)
    assert len(tracker.left_room(OTHER, LEFT)) == n
    assert dict.__len__(tracker._records) == 0 and nothing_indexed(tracker)
    return NoScan.touches


def test_matching_reflections_never_scans_the_records() -> None:
    small, large = touches_to_reflect(100), touches_to_reflect(400)
    assert large == 4 * small  # linear: each reflection touches a few records
    assert small <= 4 * 300  # a few per record (300 of them)

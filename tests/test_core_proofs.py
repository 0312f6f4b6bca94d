"""Proofs from peers in the core: room reflections, receipts, markers, bounces, rooms left."""

from __future__ import annotations

from xmpp_sm_tracker.core.proofs import may_answer
from xmpp_sm_tracker.core.records import FailureReason, TrackedMessage
from xmpp_sm_tracker.core.states import DeliveryState
from xmpp_sm_tracker.core.tracker import Tracker

from .test_core_tracker import Clock, Stanza, enable, outgoing, send, show

S = DeliveryState
ROOM = "room@muc.example"
BOB = "bob@example.org/laptop"  # any resource of the recipient may answer
ALICE = "alice@example.org"


def tracker_with_room_messages(*mids: str) -> Tracker[Stanza]:
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    enable(tracker)
    for mid in mids:
        send(tracker, mid, "groupchat")
    return tracker


def test_reflection_before_the_ack_keeps_room_received_when_the_ack_comes() -> None:
    tracker = tracker_with_room_messages("g1")
    assert show(tracker.room_received("g1")) == [("message:room_received", "g1", None, 1, 1)]
    events = tracker.ack(1)
    assert show(events) == [("stanza:acked", "g1")]  # no message event backwards
    assert "g1" not in tracker.records


def test_reflection_after_the_ack_moves_acked_to_room_received() -> None:
    tracker = tracker_with_room_messages("g1")
    tracker.ack(1)
    assert tracker.records["g1"].state is S.ACKED
    assert [e.name for e in tracker.room_received("g1")] == ["message:room_received"]


def test_reflection_is_found_by_origin_id_then_id_then_body() -> None:
    tracker = tracker_with_room_messages("g1", "g2", "g3")
    assert tracker.find_reflected(ROOM, "o-g2", "rewritten", "x") == "g2"
    assert tracker.find_reflected(ROOM, None, "g3", None) == "g3"
    # A room that rewrote both ids: the oldest unreflected message with that body.
    assert tracker.find_reflected(ROOM, None, "rewritten", "body of g1") == "g1"
    assert tracker.find_reflected(ROOM, None, None, "unknown body") is None
    assert tracker.find_reflected("other@muc.example", "o-g1", "g1", "body of g1") is None


def test_a_foreign_origin_id_or_a_history_copy_is_never_matched_by_body() -> None:
    # profanity #1544, Conversations #3905: our nick can be another client of ours (the
    # same nick on another device), or the room's history: an equal body proves nothing.
    tracker = tracker_with_room_messages("g1")
    assert tracker.find_reflected(ROOM, "someone-elses", "other-id", "body of g1") is None
    assert tracker.find_reflected(ROOM, None, "other-id", "body of g1", history=True) is None
    assert tracker.find_reflected(ROOM, "o-g1", "other-id", "body of g1", history=True) == "g1"


def test_a_record_reinstated_for_nothing_is_retired_but_one_in_flight_stays() -> None:
    tracker = tracker_with_room_messages("g1")
    send(tracker, "c1")
    [acked] = [e for e in tracker.ack(2) if e.name == "message:acked" and e.payload.id == "c1"]  # type: ignore[union-attr]
    assert "c1" not in tracker.records  # settled: it left memory
    tracker.reinstate(acked.payload)  # type: ignore[arg-type]
    tracker.retire("c1")
    tracker.retire("g1")  # in flight: not ours to drop
    assert set(tracker.records) == {"g1"}


def test_a_reflected_message_is_not_matched_twice() -> None:
    tracker = tracker_with_room_messages("g1")
    tracker.room_received("g1")
    assert tracker.find_reflected(ROOM, "o-g1", "g1", "body of g1") is None


def test_receipt_then_marker_then_a_late_ack_never_go_backwards() -> None:
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    enable(tracker)
    send(tracker, "c1")
    [delivered] = tracker.delivered("c1", sender=BOB)
    assert delivered.name == "message:delivered"
    assert "c1" not in tracker.records  # settled: the plugin fetches it back for late proofs
    assert tracker.displayed("c1", sender=BOB) == []
    tracker.reinstate(delivered.payload)  # type: ignore[arg-type]
    assert [e.name for e in tracker.displayed("c1", sender=BOB)] == ["message:displayed"]
    tracker.reinstate(delivered.payload)  # type: ignore[arg-type]
    assert [e.name for e in tracker.delivered("c1", sender=BOB)] == []  # DELIVERED keeps, no event
    assert show(tracker.ack(1)) == [("stanza:acked", "c1")]


def test_a_bounce_fails_even_an_acked_message_with_its_condition() -> None:
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    enable(tracker)
    send(tracker, "c1")
    tracker.ack(1)
    record = tracker.records.get("c1")
    assert record is None  # acked chat messages leave memory ...
    settled = TrackedMessage(
        **{**_fields(outgoing("c1")), "state": S.ACKED, "created_at": 1.0, "updated_at": 1.0}
    )
    tracker.reinstate(settled)  # ... and come back from the store for a late bounce
    reason = FailureReason.bounce("cancel", "service-unavailable", "gone")
    events = tracker.bounced("c1", reason, sender=BOB, own=ALICE)
    assert [(e.name, e.payload.reason) for e in events] == [  # type: ignore[attr-defined]
        ("message:failed", "cancel:service-unavailable (gone)")
    ]
    assert not events[0].payload.retryable  # type: ignore[attr-defined]


def test_a_wait_bounce_is_retryable() -> None:
    tracker = tracker_with_room_messages("g1")
    [event] = tracker.bounced(
        "g1", FailureReason.bounce("wait", "resource-constraint"), sender=ROOM, own=ALICE
    )
    assert event.payload.retryable  # type: ignore[attr-defined]


def test_leaving_a_room_fails_unreflected_and_keeps_reflected() -> None:
    tracker = tracker_with_room_messages("g1", "g2", "g3")
    tracker.ack(3)
    tracker.room_received("g1")
    events = tracker.left_room(ROOM, FailureReason.REMOVED_FROM_ROOM)
    assert [(e.name, e.payload.id) for e in events] == [  # type: ignore[attr-defined]
        ("message:failed", "g2"),
        ("message:failed", "g3"),
    ]
    assert all(
        e.payload.reason == "removed-from-room"  # type: ignore[attr-defined]
        for e in events
    )


def _fields(message: object) -> dict[str, object]:
    return {
        "id": message.id,  # type: ignore[attr-defined]
        "origin_id": message.origin_id,  # type: ignore[attr-defined]
        "to": message.to,  # type: ignore[attr-defined]
        "type": message.type,  # type: ignore[attr-defined]
        "body": message.body,  # type: ignore[attr-defined]
        "xml": message.xml,  # type: ignore[attr-defined]
    }


def test_only_the_recipient_or_a_server_on_the_way_may_answer_for_a_message() -> None:
    to = "bob@example.org/phone"
    assert may_answer(to, "bob@example.org/laptop")  # any of bob's resources
    assert may_answer(to, "Bob@Example.org")  # JIDs compare without case
    assert not may_answer(to, "carol@example.org/phone")
    assert not may_answer(to, "example.org")  # a server sends bounces, not receipts
    assert may_answer(to, "example.org", bounce=True)  # bob's server
    assert may_answer(to, "", bounce=True, own="alice@home.example")  # ours, no from
    assert may_answer(to, "home.example", bounce=True, own="alice@home.example")
    assert not may_answer(to, "carol@example.org", bounce=True, own="alice@home.example")
    assert not may_answer(to, "evil.example", bounce=True, own="alice@home.example")
    # a room's occupants answer for the room
    assert may_answer(f"{ROOM}/nick", f"{ROOM}/someone")
    assert not may_answer(ROOM, "other@muc.example/someone")


def test_a_proof_from_the_wrong_party_changes_nothing_and_is_counted() -> None:
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    enable(tracker)
    send(tracker, "c1")
    assert tracker.delivered("c1", sender="carol@example.org/x") == []
    assert tracker.displayed("c1", sender="carol@example.org/x") == []
    refused = FailureReason.bounce("cancel", "forbidden")
    assert tracker.bounced("c1", refused, sender="evil.example", own=ALICE) == []
    assert tracker.rejected_proofs == 3
    record = tracker.get("c1")
    assert record is not None and record.state is S.SENT
    [failed] = tracker.bounced("c1", refused, sender="", own=ALICE)  # our server's
    assert failed.name == "message:failed"

"""The tracker, driven through whole stories with a fake clock and plain payloads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xmpp_sm_tracker.core.counters import MAX_SEQ, seq_add
from xmpp_sm_tracker.core.ledger import Entry, HBackwards, HTooHigh
from xmpp_sm_tracker.core.phases import SMPhase
from xmpp_sm_tracker.core.records import FailureReason, TrackedMessage
from xmpp_sm_tracker.core.smstate import RestoredEntry, RestoredState, SMStateError, parse_state
from xmpp_sm_tracker.core.states import DeliveryState, IllegalTransition, next_state
from xmpp_sm_tracker.core.tracker import Event, OutgoingMessage, Tracker

S = DeliveryState
RESUME_FAILED = FailureReason.RESUME_FAILED
SESSION_ENDED = FailureReason.SESSION_ENDED


class Clock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Stanza:
    """A stand-in for a slixmpp stanza: the core never looks inside."""

    name: str


def outgoing(mid: str, kind: str = "chat", *, via_carbon: bool = False) -> OutgoingMessage:
    return OutgoingMessage(
        id=mid,
        origin_id=f"o-{mid}",
        to="room@muc.example/nick" if kind == "groupchat" else "bob@example.org/phone",
        type=kind,
        body=f"body of {mid}",
        xml=f"<message id='{mid}'/>",
        via_carbon=via_carbon,
    )


Shown = tuple[object, ...]


def show(events: list[Event]) -> list[Shown]:
    """Events as comparable tuples: the stanza's name, or the record's id/state/reason/..."""
    shown: list[Shown] = []
    for event in events:
        payload = event.payload
        if isinstance(payload, TrackedMessage):
            assert event.name == f"message:{payload.state.value}"
            shown.append((event.name, payload.id, payload.reason, payload.attempts, payload.seq))
        else:
            assert isinstance(payload, Stanza)
            assert event.name.startswith("stanza:")
            shown.append((event.name, payload.name))
    return shown


#: ``<resumed h='1'>`` after m1, m2, m3 went out: m1 acked, m2 and m3 resent.
RESUMED_H1_OF_3: list[Shown] = [
    ("stanza:acked", "m1"),
    ("message:acked", "m1", None, 1, 1),
    ("stanza:resent", "m2"),
    ("message:resent", "m2", None, 2, 2),
    ("stanza:resent", "m3"),
    ("message:resent", "m3", None, 2, 3),
]


def new_tracker(clock: Clock | None = None) -> Tracker[Stanza]:
    return Tracker(clock=clock or Clock())


def send_enable(tracker: Tracker[Stanza]) -> list[Event]:
    """The connection offers <sm/> and our <enable/> is written."""
    tracker.sm_offered()
    tracker.enable_queued()
    return tracker.enable_sent()


def enable(tracker: Tracker[Stanza], *, resumable: bool = True, sm_id: str = "sm-1") -> None:
    """<enable/> out, <enabled/> in (nothing left over from before)."""
    assert send_enable(tracker) == []
    assert tracker.enabled(sm_id, resumable=resumable, location=None, max=None) == []


def send(tracker: Tracker[Stanza], mid: str, kind: str = "chat") -> list[Event]:
    """A message tracked and written with the link up."""
    events = tracker.track(outgoing(mid, kind), link_up=True)
    events += tracker.counted(Stanza(mid), mid, link_up=True)
    return events


def send_all(tracker: Tracker[Stanza], *mids: str) -> None:
    for mid in mids:
        send(tracker, mid)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tracker(clock: Clock) -> Tracker[Stanza]:
    t = new_tracker(clock)
    enable(t)
    return t


# ---------------------------------------------------------------- the happy path


def test_track_count_ack(tracker: Tracker[Stanza], clock: Clock) -> None:
    events = tracker.track(outgoing("m1"), link_up=True)
    assert show(events) == [("message:sent", "m1", None, 1, None)]
    sent = events[0].payload
    assert isinstance(sent, TrackedMessage)
    assert sent.state is S.SENT
    assert (sent.origin_id, sent.to, sent.body, sent.xml) == (
        "o-m1",
        "bob@example.org/phone",
        "body of m1",
        "<message id='m1'/>",
    )
    assert sent.created_at == sent.updated_at == 1000.0
    assert sent.in_flight
    assert sent.conversation == "bob@example.org"

    assert tracker.counted(Stanza("m1"), "m1", link_up=True) == []
    record = tracker.get("m1")
    assert record is not None
    assert (record.state, record.seq) == (S.SENT, 1)
    assert tracker.unsent_ids() == []

    clock.tick(2.5)
    events = tracker.ack(1)
    assert show(events) == [("stanza:acked", "m1"), ("message:acked", "m1", None, 1, 1)]
    acked = events[1].payload
    assert isinstance(acked, TrackedMessage)
    assert acked.state is S.ACKED
    assert (acked.created_at, acked.updated_at) == (1000.0, 1002.5)
    assert tracker.records == {}  # a chat message leaves memory once acked


def test_ack_covers_several_and_interleaved_stanzas(tracker: Tracker[Stanza]) -> None:
    send(tracker, "m1")
    assert tracker.counted(Stanza("iq1"), None, link_up=True) == []
    send(tracker, "m2")
    send(tracker, "m3")
    assert show(tracker.ack(3)) == [
        ("stanza:acked", "m1"),
        ("message:acked", "m1", None, 1, 1),
        ("stanza:acked", "iq1"),
        ("stanza:acked", "m2"),
        ("message:acked", "m2", None, 1, 3),
    ]
    assert tracker.ack(3) == []
    assert show(tracker.ack(4)) == [("stanza:acked", "m3"), ("message:acked", "m3", None, 1, 4)]


def test_bad_ack_raises_and_changes_nothing(tracker: Tracker[Stanza]) -> None:
    send_all(tracker, "m1", "m2")
    tracker.ack(1)
    before = dict(tracker.records)
    with pytest.raises(HTooHigh):
        tracker.ack(3)
    with pytest.raises(HBackwards):
        tracker.ack(0)
    assert tracker.records == before
    assert [e.payload.name for e in tracker.ledger] == ["m2"]
    assert show(tracker.ack(2)) == [("stanza:acked", "m2"), ("message:acked", "m2", None, 1, 2)]


def test_groupchat_record_stays_after_acked_chat_leaves(tracker: Tracker[Stanza]) -> None:
    send(tracker, "g1", "groupchat")
    send(tracker, "c1", "chat")
    events = tracker.ack(2)
    assert [e.name for e in events] == [
        "stanza:acked",
        "message:acked",
        "stanza:acked",
        "message:acked",
    ]
    assert set(tracker.records) == {"g1"}
    kept = tracker.records["g1"]
    assert kept.state is S.ACKED
    assert not kept.in_flight
    assert kept.conversation == "room@muc.example"
    # Stream trouble after the ack does not touch it.
    assert tracker.link_lost() == []
    assert tracker.records["g1"] is kept
    assert tracker.unsent_ids() == []


def test_bodyless_stanzas_only_give_stanza_events(tracker: Tracker[Stanza]) -> None:
    for name in ("iq1", "presence1", "chatstate1"):
        assert tracker.counted(Stanza(name), None, link_up=True) == []
    assert show(tracker.ack(1)) == [("stanza:acked", "iq1")]
    assert show(tracker.link_lost()) == [
        ("stanza:hibernated", "presence1"),
        ("stanza:hibernated", "chatstate1"),
    ]
    tracker.resume_sent()
    events, resend = tracker.resumed(2)
    assert show(events) == [("stanza:acked", "presence1"), ("stanza:resent", "chatstate1")]
    assert [(e.payload.name, e.seq) for e in resend] == [("chatstate1", 3)]
    assert show(tracker.session_ended()) == [("stanza:failed", "chatstate1")]
    assert tracker.records == {}


def test_counted_ignores_untracked_message_ids(tracker: Tracker[Stanza]) -> None:
    # An id the tracker does not know (never tracked) is counted as a plain stanza.
    assert tracker.counted(Stanza("x"), "unknown", link_up=True) == []
    assert show(tracker.ack(1)) == [("stanza:acked", "x")]


def test_nothing_counted_before_enable() -> None:
    tracker = new_tracker()
    events = tracker.track(outgoing("m1"), link_up=True)
    assert show(events) == [("message:sent", "m1", None, 1, None)]
    assert tracker.counted(Stanza("m1"), "m1", link_up=True) == []
    assert len(tracker.ledger) == 0
    assert tracker.ledger.seq == 0
    assert tracker.records["m1"].seq is None
    assert tracker.unsent_ids() == ["m1"]


def test_stanzas_between_enable_and_enabled_count(clock: Clock) -> None:
    tracker = new_tracker(clock)
    send_enable(tracker)
    send(tracker, "early")
    tracker.enabled("sm-1", resumable=True, location=None, max=None)
    send(tracker, "late")
    assert [e.seq for e in tracker.ledger] == [1, 2]
    assert [e.name for e in tracker.ack(2)].count("message:acked") == 2


def test_via_carbon_is_sent_then_acked_at_once_and_not_kept(tracker: Tracker[Stanza]) -> None:
    # The server sent the carbon, so it has the message: it settles ACKED like any other
    # 1:1 message, and an app listening for message:acked sees it too.
    events = tracker.track(outgoing("c1", via_carbon=True), link_up=True)
    assert [e.name for e in events] == ["message:sent", "message:acked"]
    sent, acked = (event.payload for event in events)
    assert isinstance(sent, TrackedMessage) and isinstance(acked, TrackedMessage)
    assert sent.via_carbon and acked.via_carbon
    assert (sent.state, acked.state) == (S.SENT, S.ACKED)
    assert "c1" not in tracker.records


# ---------------------------------------------------------------- a new <enable/>


def test_enable_sent_fails_leftovers_with_session_ended(tracker: Tracker[Stanza]) -> None:
    send_all(tracker, "m1", "m2")
    tracker.counted(Stanza("iq1"), None, link_up=True)
    tracker.ack(1)
    assert tracker.link_lost() != []
    events = send_enable(tracker)
    assert show(events) == [
        ("stanza:failed", "m2"),
        ("message:failed", "m2", SESSION_ENDED, 1, 2),
        ("stanza:failed", "iq1"),
    ]
    assert tracker.records == {}
    assert (tracker.ledger.seq, tracker.ledger.last_ack, len(tracker.ledger)) == (0, 0, 0)
    assert tracker.counting_out
    # Counting starts again from one.
    send(tracker, "m3")
    assert tracker.records["m3"].seq == 1


def test_enable_failed_fails_everything_with_sm_unavailable() -> None:
    # What went out between <enable/> and the <failed/> answering it was counted.
    tracker = new_tracker()
    send_enable(tracker)
    send_all(tracker, "m1")
    events = tracker.enable_failed()
    assert show(events) == [
        ("stanza:failed", "m1"),
        ("message:failed", "m1", FailureReason.SM_UNAVAILABLE, 1, 1),
    ]
    assert not tracker.counting_out
    assert not tracker.counting_in
    assert tracker.counted(Stanza("m2"), None, link_up=True) == []
    assert len(tracker.ledger) == 0


def test_enabled_records_the_session_facts(clock: Clock) -> None:
    tracker = new_tracker(clock)
    send_enable(tracker)
    tracker.enabled("abc", resumable=True, location="[::1]:5222", max=300, jid="a@b/c")
    session = tracker.session
    assert (session.sm_id, session.location, session.max, session.jid) == (
        "abc",
        "[::1]:5222",
        300,
        "a@b/c",
    )
    assert session.can_resume and tracker.counting_in and tracker.counting_out
    tracker.link_lost()
    send_enable(tracker)
    tracker.enabled(None, resumable=True, location=None, max=None)
    assert not tracker.session.resumable  # no id: nothing to resume
    assert not tracker.session.can_resume
    tracker.link_lost()
    send_enable(tracker)
    tracker.enabled("abc", resumable=False, location=None, max=None)
    assert not tracker.session.can_resume


# ---------------------------------------------------------------- link lost


def test_link_lost_resumable_hibernates_everything_unacked(tracker: Tracker[Stanza]) -> None:
    send_all(tracker, "m1", "m2")
    tracker.counted(Stanza("iq1"), None, link_up=True)
    tracker.ack(1)
    # Tracked but still queued in the client: never counted.
    tracker.track(outgoing("q1"), link_up=True)
    events = tracker.link_lost()
    assert show(events) == [
        ("stanza:hibernated", "m2"),
        ("message:hibernated", "m2", None, 1, 2),
        ("stanza:hibernated", "iq1"),
        ("message:hibernated", "q1", None, 1, None),
    ]
    assert {mid: r.state for mid, r in tracker.records.items()} == {
        "m2": S.HIBERNATED,
        "q1": S.HIBERNATED,
    }
    assert not tracker.counting_in
    assert not tracker.counting_out
    assert tracker.session.can_resume  # the session itself is not forgotten
    # A second drop (the resumption attempt's connection died too) moves nothing again.
    assert show(tracker.link_lost()) == [
        ("stanza:hibernated", "m2"),
        ("stanza:hibernated", "iq1"),
    ]


def test_link_lost_without_resumable_session_emits_nothing(clock: Clock) -> None:
    tracker = new_tracker(clock)
    enable(tracker, resumable=False)
    send_all(tracker, "m1")
    tracker.track(outgoing("q1"), link_up=True)
    assert tracker.link_lost() == []
    assert {mid: r.state for mid, r in tracker.records.items()} == {"m1": S.SENT, "q1": S.SENT}
    assert not tracker.counting_out
    # They settle when the session is known to be over.
    events = tracker.session_ended(unsent=tracker.unsent_ids())
    assert show(events) == [
        ("stanza:failed", "m1"),
        ("message:failed", "m1", SESSION_ENDED, 1, 1),
        ("message:failed", "q1", SESSION_ENDED, 1, None),
    ]
    assert tracker.records == {}


def test_tracked_while_down_is_hibernated_then_resent_once_counted(
    tracker: Tracker[Stanza],
) -> None:
    send_all(tracker, "m1")
    tracker.link_lost()
    events = tracker.track(outgoing("d1"), link_up=False)
    assert show(events) == [
        ("message:sent", "d1", None, 1, None),
        ("message:hibernated", "d1", None, 1, None),
    ]
    tracker.resume_sent()
    events, resend = tracker.resumed(0)
    assert show(events) == [("stanza:resent", "m1"), ("message:resent", "m1", None, 2, 1)]
    assert [e.payload.name for e in resend] == ["m1"]
    # The message parked in the client goes out after the session restarts: its first write.
    events = tracker.counted(Stanza("d1"), "d1", link_up=True)
    assert show(events) == [("message:resent", "d1", None, 1, 2)]
    assert show(tracker.ack(2)) == [
        ("stanza:acked", "m1"),
        ("message:acked", "m1", None, 2, 1),
        ("stanza:acked", "d1"),
        ("message:acked", "d1", None, 1, 2),
    ]


def test_resumed_in_two_halves_knows_the_resends_before_any_record_moves(
    tracker: Tracker[Stanza],
) -> None:
    """The plugin writes the resends between the halves: the records move after."""
    send_all(tracker, "m1", "m2", "m3")
    tracker.link_lost()
    tracker.resume_sent()
    resumption = tracker.resume_counted(1)
    assert tracker.sm_phase is SMPhase.ON
    assert [(e.payload.name, e.seq) for e in resumption.result.resend] == [("m2", 2), ("m3", 3)]
    assert {r.id: r.state for r in tracker.records.values()} == {
        "m1": S.HIBERNATED,
        "m2": S.HIBERNATED,
        "m3": S.HIBERNATED,
    }
    events = tracker.resume_records(resumption)
    assert show(events) == RESUMED_H1_OF_3


def test_tracked_while_down_without_resumable_session_stays_sent(clock: Clock) -> None:
    tracker = new_tracker(clock)
    enable(tracker, resumable=False)
    tracker.link_lost()
    events = tracker.track(outgoing("d1"), link_up=False)
    assert show(events) == [("message:sent", "d1", None, 1, None)]
    assert tracker.records["d1"].state is S.SENT


def test_counted_with_the_link_down_is_hibernated(tracker: Tracker[Stanza]) -> None:
    # The transport is gone but the disconnect has not been processed yet.
    tracker.track(outgoing("m1"), link_up=True)
    events = tracker.counted(Stanza("m1"), "m1", link_up=False)
    assert show(events) == [("stanza:hibernated", "m1"), ("message:hibernated", "m1", None, 1, 1)]
    assert show(tracker.counted(Stanza("iq"), None, link_up=False)) == [("stanza:hibernated", "iq")]


# ---------------------------------------------------------------- resumption


def test_resumed_acks_covered_and_resends_the_rest(tracker: Tracker[Stanza]) -> None:
    send_all(tracker, "m1", "m2", "m3")
    for _ in range(5):
        tracker.inbound()
    tracker.link_lost()
    tracker.resume_sent()
    assert tracker.sm_phase is SMPhase.RESUMING
    events, resend = tracker.resumed(1)
    assert show(events) == RESUMED_H1_OF_3
    assert [(e.payload.name, e.seq, e.message_id) for e in resend] == [
        ("m2", 2, "m2"),
        ("m3", 3, "m3"),
    ]
    session = tracker.session
    assert tracker.counting_in and tracker.sm_phase is SMPhase.ON
    assert session.handled == 5  # inbound "handled" survives resumption
    assert tracker.ledger.seq == 3
    assert show(tracker.ack(3))[-1] == ("message:acked", "m3", None, 2, 3)
    assert tracker.records == {}


def test_resumed_with_bad_h_raises_and_loses_nothing(tracker: Tracker[Stanza]) -> None:
    send_all(tracker, "m1", "m2")
    tracker.link_lost()
    tracker.resume_sent()
    before = dict(tracker.records)
    with pytest.raises(HTooHigh):
        tracker.resumed(5)
    assert tracker.records == before
    assert [e.payload.name for e in tracker.ledger] == ["m1", "m2"]
    events = tracker.protocol_error(HTooHigh("too high", 5, 0, 2))
    assert show(events) == [
        ("stanza:failed", "m1"),
        ("message:failed", "m1", FailureReason.PROTOCOL_ERROR, 1, 1),
        ("stanza:failed", "m2"),
        ("message:failed", "m2", FailureReason.PROTOCOL_ERROR, 1, 2),
    ]
    assert not tracker.session.can_resume
    assert tracker.records == {}


def test_resume_failed_acks_what_h_covers_and_fails_the_rest(tracker: Tracker[Stanza]) -> None:
    send_all(tracker, "m1", "m2", "m3")
    tracker.link_lost()
    tracker.resume_sent()
    events = tracker.resume_failed(2)
    assert show(events) == [
        ("stanza:acked", "m1"),
        ("message:acked", "m1", None, 1, 1),
        ("stanza:acked", "m2"),
        ("message:acked", "m2", None, 1, 2),
        ("stanza:failed", "m3"),
        ("message:failed", "m3", RESUME_FAILED, 1, 3),
    ]
    assert tracker.records == {}
    assert len(tracker.ledger) == 0
    session = tracker.session
    assert not session.can_resume and tracker.sm_phase is SMPhase.OFFERED
    assert session.sm_id is None


@pytest.mark.parametrize("h", [None, 7, MAX_SEQ - 1], ids=["no-h", "too-high", "backwards"])
def test_resume_failed_without_usable_h_fails_all(tracker: Tracker[Stanza], h: int | None) -> None:
    send_all(tracker, "m1", "m2")
    tracker.link_lost()
    tracker.resume_sent()
    events = tracker.resume_failed(h)
    assert show(events) == [
        ("stanza:failed", "m1"),
        ("message:failed", "m1", RESUME_FAILED, 1, 1),
        ("stanza:failed", "m2"),
        ("message:failed", "m2", RESUME_FAILED, 1, 2),
    ]


def test_failed_record_can_be_resent_explicitly(tracker: Tracker[Stanza], clock: Clock) -> None:
    send_all(tracker, "m1")
    tracker.link_lost()
    tracker.resume_sent()
    failed = tracker.resume_failed(None)[-1].payload
    assert isinstance(failed, TrackedMessage)
    enable(tracker)
    clock.tick()
    events = tracker.resend(failed)
    assert show(events) == [("message:resent", "m1", None, 2, None)]
    assert tracker.counted(Stanza("m1"), "m1", link_up=True) == []
    assert tracker.records["m1"].seq == 1
    assert show(tracker.ack(1)) == [("stanza:acked", "m1"), ("message:acked", "m1", None, 2, 1)]
    with pytest.raises(ValueError, match="only FAILED"):
        tracker.resend(events[0].payload)  # type: ignore[arg-type]


def test_a_late_ack_upgrades_a_message_its_attempt_timeout_failed(
    tracker: Tracker[Stanza],
) -> None:
    # The retry policy gave up waiting, but the copy on the wire can still be acked:
    # then it is ACKED (FAILED -> ACKED is in the table), and is not retried twice.
    send_all(tracker, "m1", "m2")
    assert show(tracker.timed_out("m1")) == [("message:failed", "m1", "ack-timeout", 1, 1)]
    assert show(tracker.ack(1)) == [
        ("stanza:acked", "m1"),
        ("message:acked", "m1", None, 1, 1),
    ]
    assert "m1" not in tracker.records


def test_a_message_failed_by_its_attempt_timeout_offline_is_acked_by_resumed_h(
    tracker: Tracker[Stanza],
) -> None:
    send_all(tracker, "m1", "m2")
    tracker.link_lost()
    assert [e.name for e in tracker.timed_out("m1")] == ["message:failed"]
    assert [e.name for e in tracker.timed_out("m2")] == ["message:failed"]
    tracker.resume_sent()
    events, resend = tracker.resumed(1)  # the server had m1, not m2
    assert show(events) == [
        ("stanza:acked", "m1"),
        ("message:acked", "m1", None, 1, 1),
        ("stanza:resent", "m2"),
        ("message:resent", "m2", None, 2, 2),
    ]
    assert [entry.message_id for entry in resend] == ["m2"]
    assert show(tracker.ack(2)) == [("stanza:acked", "m2"), ("message:acked", "m2", None, 2, 2)]


def test_a_message_failed_by_its_attempt_timeout_leaves_memory_when_the_session_ends(
    tracker: Tracker[Stanza],
) -> None:
    send_all(tracker, "m1")
    tracker.timed_out("m1")
    assert show(tracker.session_ended()) == [("stanza:failed", "m1")]  # no second failure
    assert tracker.records == {}


# ---------------------------------------------------------------- session end


def test_session_ended_fails_ledger_and_unsent_records(tracker: Tracker[Stanza]) -> None:
    send_all(tracker, "m1")
    tracker.track(outgoing("q1"), link_up=True)
    tracker.track(outgoing("q2"), link_up=True)
    assert tracker.unsent_ids() == ["q1", "q2"]
    events = tracker.session_ended(unsent=["q2", "nope", "m1"])
    assert show(events) == [
        ("stanza:failed", "m1"),
        ("message:failed", "m1", SESSION_ENDED, 1, 1),
        ("message:failed", "q2", SESSION_ENDED, 1, None),
    ]
    # q1 is still queued in the client (it goes out with the next session): in flight.
    assert set(tracker.records) == {"q1"}
    assert tracker.session.sm_id is None
    assert not tracker.counting_out


def test_should_drop_a_failed_message_still_queued_in_the_client(tracker: Tracker[Stanza]) -> None:
    tracker.track(outgoing("q1"), link_up=True)
    assert not tracker.should_drop("q1")
    failed = tracker.session_ended(unsent=["q1"])[0].payload
    assert isinstance(failed, TrackedMessage)
    assert failed.state is S.FAILED
    assert tracker.should_drop("q1")
    assert not tracker.should_drop("other")
    assert not tracker.should_drop(None)
    # An explicit resend lets it out again.
    tracker.resend(failed)
    assert not tracker.should_drop("q1")


def test_protocol_error_fails_with_protocol_error(tracker: Tracker[Stanza]) -> None:
    send_all(tracker, "m1")
    try:
        tracker.ack(9)
    except HTooHigh as exc:
        events = tracker.protocol_error(exc)
    else:
        pytest.fail("h=9 beyond seq=1 must raise")
    assert show(events) == [
        ("stanza:failed", "m1"),
        ("message:failed", "m1", FailureReason.PROTOCOL_ERROR, 1, 1),
    ]
    assert not tracker.session.can_resume


# ---------------------------------------------------------------- inbound


def test_inbound_counts_only_when_enabled_in() -> None:
    tracker = new_tracker()
    tracker.inbound()
    assert tracker.session.handled == 0
    send_enable(tracker)
    tracker.inbound()
    assert tracker.session.handled == 0  # <enabled/> not in yet
    tracker.enabled("sm", resumable=True, location=None, max=None)
    for _ in range(3):
        tracker.inbound()
    assert tracker.session.handled == 3
    tracker.link_lost()
    tracker.inbound()
    assert tracker.session.handled == 3
    tracker.resume_sent()
    tracker.inbound()
    assert tracker.session.handled == 3  # <resumed/> not in yet
    tracker.resumed(0)
    tracker.inbound()
    assert tracker.session.handled == 4  # not reset by resumption
    tracker.link_lost()
    send_enable(tracker)
    tracker.enabled("sm2", resumable=True, location=None, max=None)
    assert tracker.session.handled == 0  # reset by a new <enabled/>


def test_inbound_wraps_at_2_32() -> None:
    tracker = new_tracker()  # a stream restored with handled near 2**32, then resumed
    tracker.restore(restored_state(handled=MAX_SEQ - 2), [Stanza("a"), Stanza("iq")])
    tracker.resume_sent()
    tracker.resumed(14)
    assert tracker.session.handled == MAX_SEQ - 2
    tracker.inbound()
    assert tracker.session.handled == MAX_SEQ - 1
    tracker.inbound()
    assert tracker.session.handled == 0
    tracker.inbound()
    assert tracker.session.handled == 1


def test_outbound_seq_wraps_at_2_32(tracker: Tracker[Stanza]) -> None:
    tracker.ledger.seq = tracker.ledger.last_ack = MAX_SEQ - 1
    send_all(tracker, "m1", "m2")
    assert [tracker.records[m].seq for m in ("m1", "m2")] == [0, 1]
    tracker.link_lost()
    tracker.resume_sent()
    events, resend = tracker.resumed(0)
    assert show(events) == [
        ("stanza:acked", "m1"),
        ("message:acked", "m1", None, 1, 0),
        ("stanza:resent", "m2"),
        ("message:resent", "m2", None, 2, 1),
    ]
    assert [(e.payload.name, e.seq) for e in resend] == [("m2", 1)]
    assert show(tracker.ack(1))[-1] == ("message:acked", "m2", None, 2, 1)


# ---------------------------------------------------------------- restarts


def restored_state(**changes: object) -> RestoredState:
    fields: dict[str, object] = {
        "jid": "alice@example.org/r",
        "stream_id": "old-stream",
        "location": None,
        "max": None,
        "handled": 7,
        "seq": 14,
        "last_ack": 10,
        "unacked": (
            RestoredEntry(12, "<message id='a'/>", "a"),
            RestoredEntry(14, "<iq id='q'/>", None),
        ),
        "saved_at": 1.0,
    }
    fields.update(changes)
    return RestoredState(**fields)  # type: ignore[arg-type]


def adopted_record(mid: str, seq: int | None, created_at: float) -> TrackedMessage:
    return TrackedMessage(
        id=mid,
        origin_id=mid,
        to="bob@example.org",
        type="chat",
        body="b",
        state=S.HIBERNATED,
        xml=f"<message id='{mid}'/>",
        created_at=created_at,
        updated_at=created_at,
        seq=seq,
    )


def test_restored_state_resumes_with_gaps_and_settles_adopted_records() -> None:
    tracker = new_tracker()
    tracker.adopt(
        [adopted_record("a", 12, 2.0), adopted_record("lost", 13, 1.0), adopted_record("b", 11, 3)]
    )
    tracker.restore(restored_state(), [Stanza("a"), Stanza("iq")])
    assert tracker.session.can_resume and tracker.session.handled == 7
    tracker.resume_sent()
    events, resend = tracker.resumed(11)
    assert show(events) == [
        ("stanza:resent", "a"),
        ("message:resent", "a", None, 2, 12),
        ("stanza:resent", "iq"),
        ("message:failed", "lost", RESUME_FAILED, 1, 13),  # oldest first
        ("message:failed", "b", RESUME_FAILED, 1, 11),
    ]
    assert [(e.payload.name, e.seq) for e in resend] == [("a", 12), ("iq", 13)]
    assert tracker.last_resume is not None
    assert tracker.last_resume.missing == 1  # seq 13 was never saved
    assert tracker.ledger.seq == 13


def test_restored_state_refused_fails_adopted_records() -> None:
    tracker = new_tracker()
    tracker.adopt([adopted_record("a", 12, 2.0)])
    tracker.restore(restored_state(), [Stanza("a"), Stanza("iq")])
    tracker.resume_sent()
    events = tracker.resume_failed(12)
    assert show(events) == [
        ("stanza:acked", "a"),
        ("message:acked", "a", None, 1, 12),
        ("stanza:failed", "iq"),
    ]
    assert tracker.records == {}


def test_restored_state_accepts_an_h_ahead_of_the_saved_counter() -> None:
    # The process crashed after writing stanzas it had not saved yet.
    tracker = new_tracker()
    tracker.restore(restored_state(), [Stanza("a"), Stanza("iq")])
    tracker.resume_sent()
    events, resend = tracker.resumed(16)
    assert show(events) == [("stanza:acked", "a"), ("stanza:acked", "iq")]
    assert resend == []
    assert tracker.last_resume is not None and tracker.last_resume.ahead == 2
    assert (tracker.ledger.seq, tracker.ledger.last_ack) == (16, 16)
    # Live sessions never accept that.
    tracker.link_lost()
    tracker.resume_sent()
    with pytest.raises(HTooHigh):
        tracker.resumed(17)


def test_restore_needs_one_payload_per_entry() -> None:
    with pytest.raises(ValueError, match="one payload"):
        new_tracker().restore(restored_state(), [Stanza("a")])


def test_export_state_round_trips_the_counters() -> None:
    tracker = new_tracker()
    assert tracker.export_state(lambda e: "<x/>", now=5.0) is None  # no jid: nothing to save
    send_enable(tracker)
    tracker.enabled("sm-9", resumable=True, location="h:1", max=60, jid="a@b/c")
    send_all(tracker, "m1", "m2")
    tracker.ack(1)
    state = tracker.export_state(lambda e: f"<message id='{e.message_id}'/>", now=5.0)
    assert state is not None
    assert {k: state[k] for k in ("jid", "stream_id", "location", "max", "seq", "last_ack")} == {
        "jid": "a@b/c",
        "stream_id": "sm-9",
        "location": "h:1",
        "max": 60,
        "seq": 2,
        "last_ack": 1,
    }
    assert state["unacked"] == [{"seq": 2, "xml": "<message id='m2'/>", "id": "m2"}]
    tracker.link_lost()
    send_enable(tracker)
    tracker.enabled("sm-9", resumable=False, location=None, max=None, jid="a@b/c")
    assert tracker.export_state(lambda e: "", now=5.0) is None


def test_the_saved_state_keeps_only_what_a_next_process_may_resend() -> None:
    # Issue 20: an <iq> among the unacked stanzas of a saved state is refused on load
    # (a forged roster-remove would be resent verbatim), so our own export leaves iqs
    # out: a dead process's iq has nobody waiting for its answer.
    tracker = new_tracker()
    send_enable(tracker)
    tracker.enabled("sm-9", resumable=True, location=None, max=None, jid="a@b/c")
    send(tracker, "m1")
    tracker.counted(Stanza("iq"), None, link_up=True)
    tracker.counted(Stanza("presence"), None, link_up=True)
    texts = {"m1": "<message id='m1'/>", None: "<iq type='get' id='x'/>"}

    def serialize(entry: Entry[Stanza]) -> str:
        if entry.payload.name == "presence":
            return "<presence/>"
        return texts[entry.message_id]

    state = tracker.export_state(serialize, now=5.0)
    assert state is not None and state["seq"] == 3
    assert [(e["seq"], e["xml"]) for e in state["unacked"]] == [
        (1, "<message id='m1'/>"),
        (3, "<presence/>"),
    ]
    assert parse_state(state, bare_jid="a@b").unacked[1].seq == 3  # and it loads


def test_rooms_live_and_die_with_the_session() -> None:
    # Occupancy belongs to the session: a resumed stream is still in its rooms (the
    # server never saw it leave), a session that ends has left them all.
    tracker = new_tracker()
    send_enable(tracker)
    tracker.enabled("sm-1", resumable=True, location=None, max=None, jid="a@b/c")
    tracker.joined_room("r@muc", "Alice")
    tracker.joined_room("s@muc", "Al")
    tracker.link_lost()
    tracker.resume_sent()
    tracker.resumed(0)
    assert tracker.nick_in("r@muc") == "Alice"
    state = tracker.export_state(lambda e: "", now=1.0)
    assert state is not None and state["rooms"] == {"r@muc": "Alice", "s@muc": "Al"}
    tracker.left_room("s@muc", FailureReason.LEFT_ROOM)
    assert tracker.nick_in("s@muc") is None
    tracker.session_ended()
    assert tracker.nick_in("r@muc") is None


@pytest.mark.parametrize("how", ["resume-failed", "enable-sent", "protocol-error"])
def test_rooms_are_forgotten_when_the_session_is_not_resumed(
    tracker: Tracker[Stanza], how: str
) -> None:
    tracker.joined_room("r@muc", "Alice")
    tracker.link_lost()
    if how == "resume-failed":
        tracker.resume_sent()
        tracker.resume_failed(None)
    elif how == "enable-sent":
        send_enable(tracker)
    else:
        tracker.protocol_error(HTooHigh("too high", 5, 0, 0))
    assert tracker.nick_in("r@muc") is None


def test_rooms_of_an_ended_session_wait_for_the_app_to_rejoin(tracker: Tracker[Stanza]) -> None:
    tracker.joined_room("r@muc", "Alice")
    tracker.joined_room("s@muc", "Al")
    tracker.session_ended()
    assert tracker.rejoining == {"r@muc": "Alice", "s@muc": "Al"}
    send_enable(tracker)  # the next session: still in neither
    tracker.enabled("sm-2", resumable=True, location=None, max=None)
    assert tracker.rejoining == {"r@muc": "Alice", "s@muc": "Al"}
    tracker.joined_room("r@muc", "Alice2")
    assert tracker.rejoining == {"s@muc": "Al"}
    tracker.left_room("s@muc", FailureReason.LEFT_ROOM)
    assert tracker.rejoining == {}


def test_a_join_the_ended_session_never_saw_answered_is_to_be_done_again(
    tracker: Tracker[Stanza],
) -> None:
    tracker.join_sent("r@muc", "Alice")
    tracker.join_sent("s@muc", "Al")
    tracker.joined_room("s@muc", "Al")
    tracker.session_ended()
    assert tracker.rejoining == {"r@muc": "Alice", "s@muc": "Al"}
    tracker.join_sent("r@muc", "Alice")
    tracker.left_room("r@muc", FailureReason.LEFT_ROOM)
    assert tracker.rejoining == {"s@muc": "Al"}
    assert not tracker.join_refused("s@muc")  # no join pending: about something else
    assert tracker.rejoining == {"s@muc": "Al"}
    tracker.join_sent("s@muc", "Al")
    assert tracker.join_refused("s@muc")  # the room said no: stop waiting for it
    assert tracker.rejoining == {}


def test_a_room_that_shuts_down_is_to_be_rejoined_a_kick_is_not(
    tracker: Tracker[Stanza],
) -> None:
    tracker.joined_room("r@muc", "Alice")
    tracker.joined_room("s@muc", "Al")
    tracker.left_room("r@muc", FailureReason.REMOVED_FROM_ROOM, rejoin=True)
    tracker.left_room("s@muc", FailureReason.REMOVED_FROM_ROOM)
    tracker.session_ended()
    assert tracker.rejoining == {"r@muc": "Alice"}


def test_a_resumed_session_has_no_room_to_rejoin() -> None:
    tracker = new_tracker()
    send_enable(tracker)
    tracker.enabled("sm-1", resumable=True, location=None, max=None, jid="a@b/c")
    tracker.joined_room("r@muc", "Alice")
    tracker.link_lost()
    tracker.resume_sent()
    tracker.resumed(0)
    assert tracker.rejoining == {}


def test_a_restored_state_brings_its_rooms_back() -> None:
    tracker = new_tracker()
    tracker.restore(restored_state(rooms={"r@muc": "Alice"}), [Stanza("a"), Stanza("iq")])
    assert tracker.nick_in("r@muc") == "Alice"
    tracker.resume_sent()
    tracker.resumed(14)
    assert tracker.nick_in("r@muc") == "Alice"


def test_rooms_in_a_saved_state_are_checked_and_optional() -> None:
    state = {
        "version": 1,
        "jid": "a@b/c",
        "stream_id": "sm-1",
        "handled": 0,
        "seq": 0,
        "last_ack": 0,
        "unacked": [],
    }
    assert parse_state(state, bare_jid="a@b").rooms == {}  # states saved before rooms
    with_rooms = {**state, "rooms": {"r@muc": "Alice"}}
    assert parse_state(with_rooms, bare_jid="a@b").rooms == {"r@muc": "Alice"}
    for bad in (["r@muc"], {"r@muc": ""}, {"r@muc": 3}, {"": "Alice"}):
        with pytest.raises(SMStateError, match="rooms"):
            parse_state({**state, "rooms": bad}, bare_jid="a@b")


def test_illegal_transition_is_raised_not_swallowed(tracker: Tracker[Stanza]) -> None:
    # The table guards the tracker: an ACKED groupchat record cannot be hibernated.
    send(tracker, "g1", "groupchat")
    tracker.ack(1)
    with pytest.raises(IllegalTransition):
        tracker._move("g1", S.HIBERNATED)


def test_entry_payload_is_what_was_counted(tracker: Tracker[Stanza]) -> None:
    stanza = Stanza("m1")
    tracker.track(outgoing("m1"), link_up=True)
    tracker.counted(stanza, "m1", link_up=True)
    entries: list[Entry[Stanza]] = list(tracker.ledger)
    assert entries[0].payload is stanza
    assert tracker.ack(1)[0].payload is stanza


# ---------------------------------------------------------------- regressions


def test_enable_abandons_the_old_stream(tracker: Tracker[Stanza]) -> None:
    # Regression: <enable/> reset the ledger but kept the old stream's id, so a drop
    # before <enabled/> hibernated the new stream's stanzas under the old id, and
    # resuming the old stream then acked them with the old stream's h (false acks).
    send_all(tracker, "m1")
    tracker.ack(1)
    tracker.link_lost()
    assert send_enable(tracker) == []
    assert not tracker.session.can_resume
    assert tracker.session.sm_id is None
    send_all(tracker, "n1", "n2")
    assert tracker.link_lost() == []  # nothing can be resumed: nothing hibernates
    assert {mid: r.state for mid, r in tracker.records.items()} == {"n1": S.SENT, "n2": S.SENT}
    events = send_enable(tracker)
    assert [e.name for e in events].count("message:failed") == 2


def test_enable_after_a_restored_state_does_not_resume_it() -> None:
    tracker = new_tracker()
    tracker.restore(restored_state(), [Stanza("a"), Stanza("iq")])
    events = send_enable(tracker)
    assert show(events) == [("stanza:failed", "a"), ("stanza:failed", "iq")]
    assert not tracker.session.can_resume
    assert not tracker.session.restored


def test_a_second_copy_of_a_settled_message_is_a_plain_stanza(tracker: Tracker[Stanza]) -> None:
    # Regression: the app writes an acked groupchat message again (same id) while the
    # record waits for the room's reflection. The copy was tied to the ACKED record, so
    # the next drop or resumption raised IllegalTransition (ACKED -> HIBERNATED/RESENT)
    # in the middle of the event list.
    send(tracker, "g1", "groupchat")
    tracker.ack(1)
    kept = tracker.records["g1"]
    assert tracker.counted(Stanza("g1-copy"), "g1", link_up=True) == []
    assert tracker.records["g1"] is kept
    send(tracker, "m2")
    assert show(tracker.link_lost()) == [
        ("stanza:hibernated", "g1-copy"),
        ("stanza:hibernated", "m2"),
        ("message:hibernated", "m2", None, 1, 3),
    ]
    tracker.resume_sent()
    events, _ = tracker.resumed(1)
    assert show(events) == [
        ("stanza:resent", "g1-copy"),
        ("stanza:resent", "m2"),
        ("message:resent", "m2", None, 2, 3),
    ]
    assert show(tracker.ack(3)) == [
        ("stanza:acked", "g1-copy"),
        ("stanza:acked", "m2"),
        ("message:acked", "m2", None, 2, 3),
    ]
    assert tracker.records["g1"] is kept


def test_a_parked_copy_after_an_explicit_resend_is_a_plain_stanza(
    tracker: Tracker[Stanza],
) -> None:
    # Regression: a message failed while parked in the client's queue, the user resent
    # it, and both copies went out. Both were tied to the record: the record's seq
    # pointed at the second copy while the first one acked it, and once acked (a
    # groupchat record stays) the next drop raised IllegalTransition.
    tracker.track(outgoing("g1", "groupchat"), link_up=True)
    failed = tracker.session_ended(unsent=["g1"])[0].payload
    assert isinstance(failed, TrackedMessage)
    enable(tracker)
    tracker.resend(failed)
    assert tracker.counted(Stanza("parked-copy"), "g1", link_up=True) == []
    assert tracker.counted(Stanza("resent-copy"), "g1", link_up=True) == []
    assert tracker.records["g1"].seq == 1
    assert show(tracker.ack(1)) == [
        ("stanza:acked", "parked-copy"),
        ("message:acked", "g1", None, 2, 1),
    ]
    assert show(tracker.link_lost()) == [("stanza:hibernated", "resent-copy")]
    assert tracker.records["g1"].state is S.ACKED


# ---------------------------------------------------------------- stateful


TERMINAL = {"message:acked", "message:failed"}
STARTS = {"message:sent", "message:resent"}


class TrackerMachine(RuleBasedStateMachine):
    """Random interleavings of the facts the plugin feeds the tracker, against a model
    of the server that knows which stanzas each stream really received.

    The client side keeps its send queue (tracked but not written yet, including what
    is parked while the link is down); the wire loses what is on it when the link
    drops; the server answers ``<a h>``, ``<resumed h>`` and ``<failed h>`` truthfully.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.tracker: Tracker[Stanza] = Tracker(clock=self.clock)
        self.phase = "down"  # "down", "negotiating" (<enable/> out), "up"
        self.queue: list[tuple[str, str | None]] = []  # (stanza name, message id)
        self.history: dict[str, list[TrackedMessage]] = {}
        self.events: dict[str, list[str]] = {}
        self.serial = 0
        # The server: what each stream received, which ones it would resume, the
        # stream on the current connection, what is still on the wire, the last h sent.
        self.received: dict[str, list[str]] = {}
        self.resumable_streams: set[str] = set()
        self.stream: str | None = None
        self.wire: list[str] = []
        self.last_h: dict[str, int] = {}
        self.enable()
        self.enabled_arrives(resumable=True)

    # ------------------------------------------------------------ bookkeeping

    def new_name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def apply(self, events: list[Event], *, acked_on: str | None = None) -> None:
        """Check and record events; ``acked_on`` is the stream whose h acks them."""
        for event in events:
            payload = event.payload
            if not isinstance(payload, TrackedMessage):
                assert isinstance(payload, Stanza)
                if event.name == "stanza:acked":
                    # Never a false ack: the stream acking it really received it.
                    assert acked_on is not None
                    assert payload.name in self.received[acked_on], (payload, acked_on)
                continue
            assert event.name == f"message:{payload.state.value}"
            history = self.history.setdefault(payload.id, [])
            if history:
                previous = history[-1].state
                # No event without a move, and only moves the table allows.
                assert next_state(previous, payload.state) is payload.state, (
                    previous,
                    payload.state,
                )
            else:
                assert event.name == "message:sent"
            history.append(payload)
            self.events.setdefault(payload.id, []).append(event.name)
            self.clock.tick(0.001)

    def last_state(self, message_id: str) -> DeliveryState:
        return self.history[message_id][-1].state

    def write(self, count: int) -> None:
        """The client writes the first ``count`` queued stanzas (the plugin's filter)."""
        tracker = self.tracker
        for _ in range(min(count, len(self.queue))):
            name, message_id = self.queue.pop(0)
            if message_id is not None and self.last_state(message_id) is S.FAILED:
                # Failed while queued: only an explicit resend may send it.
                assert tracker.should_drop(message_id), message_id
                continue
            assert not tracker.should_drop(message_id)
            if message_id not in tracker.records:
                message_id = None  # no record to tie it to (the plugin does the same)
            self.apply(tracker.counted(Stanza(name), message_id, link_up=True))
            self.wire.append(name)

    def enable(self) -> None:
        """A new connection sends <enable/>: the server opens a new stream for it."""
        self.stream = self.new_name("stream-")
        self.received[self.stream] = []
        self.last_h[self.stream] = 0
        self.apply(send_enable(self.tracker))
        self.phase = "negotiating"

    def connection_gone(self) -> None:
        self.wire.clear()
        self.phase = "down"

    # ------------------------------------------------------------ rules: client

    @rule(kind=st.sampled_from(["chat", "chat", "groupchat", "iq"]), now=st.booleans())
    def track(self, kind: str, now: bool) -> None:
        """The app sends a message (or a body-less stanza): it joins the client's queue."""
        if kind == "iq":
            self.queue.append((self.new_name("iq"), None))
        else:
            mid = self.new_name("m")
            self.apply(self.tracker.track(outgoing(mid, kind), link_up=self.phase != "down"))
            self.queue.append((mid, mid))
        if now and self.phase != "down":
            self.write(len(self.queue))

    @precondition(lambda self: self.phase != "down" and bool(self.queue))
    @rule(count=st.integers(min_value=1, max_value=4))
    def send_queued(self, count: int) -> None:
        self.write(count)

    def resendable(self) -> list[TrackedMessage]:
        queued = {mid for _, mid in self.queue}
        return [
            h[-1]
            for mid, h in self.history.items()
            if h[-1].state is S.FAILED and mid not in queued
        ]

    @precondition(lambda self: self.phase != "down" and bool(self.resendable()))
    @rule(data=st.data())
    def resend_failed(self, data: st.DataObject) -> None:
        record = data.draw(st.sampled_from(self.resendable()), label="resend")
        self.apply(self.tracker.resend(record))
        self.queue.append((self.new_name(f"{record.id}.copy"), record.id))

    @precondition(lambda self: self.phase == "up")
    @rule()
    def close(self) -> None:
        """The user disconnects: the session ends, nothing queued goes out."""
        self.apply(self.tracker.session_ended(unsent=self.tracker.unsent_ids()))
        self.resumable_streams.discard(self.stream or "")
        self.connection_gone()
        for mid in self.tracker.unsent_ids():
            raise AssertionError(f"{mid} still unsent after the session was closed")

    # ------------------------------------------------------------ rules: server

    @precondition(lambda self: self.phase == "negotiating")
    @rule(resumable=st.booleans())
    def enabled_arrives(self, resumable: bool) -> None:
        assert self.stream is not None
        self.apply(self.tracker.enabled(self.stream, resumable=resumable, location=None, max=None))
        if resumable:
            self.resumable_streams.add(self.stream)
        self.phase = "up"

    @precondition(lambda self: self.phase != "down" and bool(self.wire))
    @rule(count=st.integers(min_value=1, max_value=4))
    def server_receives(self, count: int) -> None:
        assert self.stream is not None
        self.received[self.stream] += self.wire[:count]
        del self.wire[:count]

    @precondition(lambda self: self.phase == "up")
    @rule(data=st.data())
    def server_acks(self, data: st.DataObject) -> None:
        assert self.stream is not None
        stream, tracker = self.stream, self.tracker
        if data.draw(st.sampled_from([False] * 9 + [True]), label="broken server"):
            before = [(e.seq, e.message_id) for e in tracker.ledger]
            extra = data.draw(st.integers(min_value=1, max_value=5), label="extra")
            with pytest.raises(HTooHigh) as exc:
                tracker.ack(seq_add(tracker.ledger.seq, extra))
            assert [(e.seq, e.message_id) for e in tracker.ledger] == before
            self.apply(tracker.protocol_error(exc.value))
            # The plugin aborts the stream; the session is gone for both sides.
            self.resumable_streams.discard(stream)
            self.apply(tracker.link_lost())
            self.connection_gone()
            return
        h = data.draw(st.integers(self.last_h[stream], len(self.received[stream])), label="h")
        self.last_h[stream] = h
        self.apply(tracker.ack(h), acked_on=stream)
        assert tracker.ledger.last_ack == h

    @precondition(lambda self: self.phase != "down")
    @rule()
    def link_drops(self) -> None:
        tracker = self.tracker
        resumable = tracker.session.can_resume
        self.apply(tracker.link_lost())
        self.connection_gone()
        if resumable:
            unsettled = [r for r in tracker.records.values() if r.in_flight]
            assert all(r.state is S.HIBERNATED for r in unsettled)
        else:
            # slixmpp ends the session; what it parked goes out with the next one.
            self.apply(tracker.session_ended(unsent=[]))

    @precondition(lambda self: self.phase == "down" and bool(self.resumable_streams))
    @rule(data=st.data())
    def server_forgets(self, data: st.DataObject) -> None:
        """The hibernation timeout ran out on the server."""
        stream = data.draw(st.sampled_from(sorted(self.resumable_streams)), label="forget")
        self.resumable_streams.discard(stream)

    @precondition(lambda self: self.phase == "down")
    @rule(data=st.data())
    def reconnect(self, data: st.DataObject) -> None:
        tracker = self.tracker
        previd = tracker.session.sm_id
        if not tracker.session.can_resume or not data.draw(st.booleans(), label="resume"):
            self.enable()
            return
        assert previd is not None
        tracker.resume_sent()
        received = self.received.get(previd)
        assert received is not None, f"resuming {previd}, a stream the server never opened"
        h = len(received)
        if previd in self.resumable_streams:
            events, resend = tracker.resumed(h)
            self.apply(events, acked_on=previd)
            # Nothing resent twice: none of them reached the server on that stream.
            assert not {e.payload.name for e in resend} & set(received)
            assert [e.seq for e in resend] == [seq_add(h, i) for i in range(1, len(resend) + 1)]
            assert tracker.ledger.seq == seq_add(h, len(resend))
            self.stream, self.phase = previd, "up"
            self.last_h[previd] = h
            self.wire += [e.payload.name for e in resend]
        else:
            failed_h = data.draw(st.sampled_from([h, None]), label="<failed h>")
            self.apply(tracker.resume_failed(failed_h), acked_on=previd)
            assert len(tracker.ledger) == 0
            self.apply(tracker.session_ended(unsent=[]))
            self.enable()

    # ------------------------------------------------------------ invariants

    @invariant()
    def every_message_is_in_flight_or_settled_once(self) -> None:
        records = self.tracker.records
        for mid, names in self.events.items():
            last_start = max(i for i, n in enumerate(names) if n in STARTS)
            terminal = sum(1 for n in names[last_start:] if n in TERMINAL)
            record = records.get(mid)
            in_flight = record is not None and record.in_flight
            assert terminal <= 1, (mid, names)
            assert in_flight != (terminal == 1), (mid, names, record)
            if record is not None:
                assert record.state is self.last_state(mid)
                if not record.in_flight:
                    assert (record.state, record.type) == (S.ACKED, "groupchat")

    @invariant()
    def ledger_and_records_agree(self) -> None:
        records = self.tracker.records
        carried: dict[str, int] = {}
        for entry in self.tracker.ledger:
            if entry.message_id is not None:
                record = records[entry.message_id]
                assert record.in_flight
                assert record.seq == entry.seq
                assert entry.message_id not in carried  # one entry per record
                carried[entry.message_id] = entry.seq
        queued = {mid for _, mid in self.queue if mid is not None}
        for mid, record in records.items():
            if not record.in_flight:
                continue
            if record.seq is None:
                assert mid in queued, mid  # still waiting in the client's queue
            else:
                assert carried.get(mid) == record.seq, mid
        ledger = self.tracker.ledger
        assert ledger.in_flight == len(ledger)  # nothing restored: no gaps

    def teardown(self) -> None:
        # Closing the session settles everything: nothing is ever left in flight.
        self.close()
        assert all(not r.in_flight for r in self.tracker.records.values())
        self.every_message_is_in_flight_or_settled_once()


TrackerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_tracker_machine = TrackerMachine.TestCase


def test_a_resend_keeps_the_text_it_goes_out_with_and_the_newest_entry_carries_it(
    tracker: Tracker[Stanza],
) -> None:
    # The record's xml is "the stanza as sent": after a resend that added <delay/>,
    # a saved state and the wire must both carry the new text, not the first one.
    tracker.track(outgoing("m1"), link_up=True)
    failed = tracker.session_ended(unsent=["m1"])[0].payload
    assert isinstance(failed, TrackedMessage)
    enable(tracker)
    with_delay = failed.xml.replace("</message>", "<delay xmlns='urn:xmpp:delay'/></message>")
    [resent] = tracker.resend(failed, with_delay)
    assert isinstance(resent.payload, TrackedMessage)
    assert resent.payload.xml == with_delay
    tracker.counted(Stanza("m1-again"), "m1", link_up=True, same_as_record=True)
    newest = tracker.ledger.newest
    assert newest is not None
    assert (newest.message_id, newest.serialized) == ("m1", with_delay)


def test_only_the_copy_tied_to_its_record_carries_the_record_text(
    tracker: Tracker[Stanza],
) -> None:
    tracker.track(outgoing("m1"), link_up=True)
    tracker.counted(Stanza("m1"), "m1", link_up=True, same_as_record=True)
    first = tracker.ledger.newest
    assert first is not None and first.serialized == tracker.records["m1"].xml
    # another stanza reusing the id: counted, but not tied, so never written as m1's text
    tracker.counted(Stanza("same id, other text"), "m1", link_up=True, same_as_record=True)
    second = tracker.ledger.newest
    assert second is not None and second is not first
    assert (second.message_id, second.serialized) == (None, None)
    tracker.ack(2)
    assert tracker.ledger.newest is None


def _sizes(big: set[str]) -> Callable[[Entry[Stanza]], int]:
    return lambda entry: 400_000 if entry.payload.name in big else 200


def test_a_stanza_too_big_fails_for_good_and_is_never_resent() -> None:
    # Issue 20: the server closed the stream on one stanza; with its last <a h> right
    # before the error the culprit is the first stanza past h.
    tracker = new_tracker()
    send_enable(tracker)
    tracker.enabled("sm-1", resumable=True, location=None, max=None, jid="a@b/c")
    send_all(tracker, "m1", "m2", "m3")
    tracker.ack(1)
    [failed] = tracker.stanza_too_big(_sizes({"m2"}), right_after_ack=True)
    assert (failed.payload.id, failed.payload.reason) == ("m2", "stanza-too-big")
    assert not failed.payload.retryable
    tracker.link_lost()
    tracker.resume_sent()
    _, resend = tracker.resumed(1)
    assert [(e.payload.name, e.seq) for e in resend] == [("m3", 2)]  # the server's next
    assert tracker.last_resume is not None and tracker.last_resume.missing == 0
    assert [e.name for e in tracker.ack(2)] == ["stanza:acked", "message:acked"]
    assert tracker.get("m3") is None  # settled


def test_without_a_last_ack_the_largest_unacked_stanza_is_the_culprit() -> None:
    tracker = new_tracker()
    send_enable(tracker)
    tracker.enabled("sm-1", resumable=True, location=None, max=None, jid="a@b/c")
    send_all(tracker, "m1", "m2", "m3")
    [failed] = tracker.stanza_too_big(_sizes({"m3"}), right_after_ack=False)
    assert failed.payload.id == "m3"
    # a last ack whose next stanza is small does not blame it: the largest is taken
    tracker2 = new_tracker()
    send_enable(tracker2)
    tracker2.enabled("sm-1", resumable=True, location=None, max=None, jid="a@b/c")
    send_all(tracker2, "m1", "m2")
    [failed2] = tracker2.stanza_too_big(_sizes({"m2"}), right_after_ack=True)
    assert failed2.payload.id == "m2"


def test_nothing_under_the_10000_bytes_every_server_accepts_is_blamed() -> None:
    tracker = new_tracker()
    send_enable(tracker)
    tracker.enabled("sm-1", resumable=True, location=None, max=None, jid="a@b/c")
    send_all(tracker, "m1", "m2")
    assert tracker.stanza_too_big(_sizes(set()), right_after_ack=True) == []
    assert len(tracker.ledger) == 2  # nothing withdrawn

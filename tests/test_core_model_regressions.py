"""Failures the protocol model (tests/test_core_model.py) found, pinned one by one.

Each test is the shortest story that showed the failure, told with the facts the
plugin feeds the core, in the order it feeds them. The last ones pin failures of the
glue around the core (the Resender, the plugin's dispatch and session end), told
through the real plugin.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest_asyncio
from slixmpp.stanza import Message, Presence
from slixmpp.xmlstream import ET

from xmpp_sm_tracker.core.outbox import Outbox
from xmpp_sm_tracker.core.records import FailureReason, TrackedMessage
from xmpp_sm_tracker.core.retry import RetryPolicy
from xmpp_sm_tracker.core.smstate import RestoredEntry, RestoredState
from xmpp_sm_tracker.core.states import DeliveryState
from xmpp_sm_tracker.core.tracker import Event, OutgoingMessage, Tracker
from xmpp_sm_tracker.resend import Resender

from .helpers.wire import WiredClient

S = DeliveryState
ACK_TIMEOUT = FailureReason.ACK_TIMEOUT
RESUME_FAILED = FailureReason.RESUME_FAILED
REFUSED = FailureReason.bounce("cancel", "service-unavailable")
WAIT = FailureReason.bounce("wait", "resource-constraint")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


@dataclass(frozen=True)
class Stanza:
    name: str


BOB = "bob@example.org"  #: answers for chat messages (sent to one of his resources)
OWN = "alice@example.org"


def outgoing(mid: str, kind: str = "chat") -> OutgoingMessage:
    return OutgoingMessage(
        id=mid,
        origin_id=mid,
        to="room@muc.example.org" if kind == "groupchat" else "bob@example.org/phone",
        type=kind,
        body=f"body of {mid}",
        xml=f"<message id='{mid}'/>",
    )


def show(events: list[Event]) -> list[tuple[object, ...]]:
    shown: list[tuple[object, ...]] = []
    for event in events:
        payload = event.payload
        if isinstance(payload, TrackedMessage):
            shown.append((event.name, payload.id, payload.reason))
        else:
            assert isinstance(payload, Stanza)
            shown.append((event.name, payload.name))
    return shown


def live(*, policy: RetryPolicy | None = None) -> Tracker[Stanza]:
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    tracker.retry_policy = policy
    _send_enable(tracker)
    tracker.enabled("sm-1", resumable=True, location=None, max=None, jid="alice@example.org/r")
    return tracker


def send(tracker: Tracker[Stanza], mid: str, kind: str = "chat", copy: str = "") -> None:
    tracker.track(outgoing(mid, kind), link_up=True)
    tracker.counted(Stanza(copy or mid), mid, link_up=True)


def holds_nothing(tracker: Tracker[Stanza]) -> None:
    """Once the session is over (plugin._on_session_end), the core holds nothing."""
    assert [e for e in tracker.session_ended() if e.name.startswith("message:")] == []
    tracker.copies_gone()
    assert tracker.records == {}
    assert len(tracker.ledger) == 0
    assert tracker.withheld == set()
    assert tracker._passes == set()
    assert tracker._late_ack_possible == set()
    assert tracker._adopted == set()


# ---------------------------------------------------------------- 1


def adopted_record(
    mid: str, seq: int | None, state: DeliveryState = S.HIBERNATED, created_at: float = 1.0
) -> TrackedMessage:
    return TrackedMessage(
        id=mid,
        origin_id=mid,
        to="bob@example.org",
        type="chat",
        body="b",
        state=state,
        xml=f"<message id='{mid}'/>",
        created_at=created_at,
        updated_at=created_at,
        seq=seq,
    )


def saved_state(*entries: tuple[int, str], last_ack: int = 10) -> RestoredState:
    return RestoredState(
        jid="alice@example.org/r",
        stream_id="old",
        location=None,
        max=None,
        handled=0,
        seq=12,
        last_ack=last_ack,
        unacked=tuple(RestoredEntry(seq, f"<message id='{mid}'/>", mid) for seq, mid in entries),
        saved_at=0.0,
    )


def test_a_message_failed_by_its_attempt_timeout_stays_failed_when_the_link_drops() -> None:
    # Was: IllegalTransition FAILED -> HIBERNATED raised inside link_lost(), with m2
    # (after m1 in the ledger) left unhibernated.
    tracker = live()
    send(tracker, "m1")
    send(tracker, "m2")
    assert show(tracker.timed_out("m1")) == [("message:failed", "m1", ACK_TIMEOUT)]
    assert show(tracker.link_lost()) == [
        ("stanza:hibernated", "m1"),
        ("stanza:hibernated", "m2"),
        ("message:hibernated", "m2", None),
    ]
    assert tracker.records["m1"].state is S.FAILED  # its copy may still be acked
    tracker.resume_sent()
    events, resend = tracker.resumed(1)  # the server had m1 after all
    assert show(events) == [
        ("stanza:acked", "m1"),
        ("message:acked", "m1", None),
        ("stanza:resent", "m2"),
        ("message:resent", "m2", None),
    ]
    assert [e.payload.name for e in resend] == ["m2"]
    tracker.ack(2)
    holds_nothing(tracker)


# ---------------------------------------------------------------- 2


def test_a_message_resent_while_its_first_copy_is_unacked_follows_its_new_copy() -> None:
    # Was: one record, two ledger entries; the first copy's ack settled the resent
    # record (ACKED, a groupchat record stays), then link_lost() raised ACKED ->
    # HIBERNATED (and <resumed/> ACKED -> RESENT).
    tracker = live()
    send(tracker, "g1", "groupchat", copy="first")
    [failed] = tracker.bounced("g1", WAIT, sender="room@muc.example.org", own=OWN)
    assert isinstance(failed.payload, TrackedMessage)
    assert show(tracker.resend(failed.payload)) == [("message:resent", "g1", None)]
    tracker.counted(Stanza("second"), "g1", link_up=True)
    assert [e.message_id for e in tracker.ledger] == [None, "g1"]  # one entry per record
    assert show(tracker.ack(1)) == [("stanza:acked", "first")]  # the refused copy
    assert tracker.records["g1"].state is S.RESENT
    assert show(tracker.link_lost()) == [
        ("stanza:hibernated", "second"),
        ("message:hibernated", "g1", None),
    ]
    tracker.resume_sent()
    events, _ = tracker.resumed(1)
    assert show(events) == [("stanza:resent", "second"), ("message:resent", "g1", None)]
    assert show(tracker.ack(2)) == [("stanza:acked", "second"), ("message:acked", "g1", None)]
    assert show(tracker.room_received("g1")) == [("message:room_received", "g1", None)]
    holds_nothing(tracker)


# ---------------------------------------------------------------- 3


def test_a_bounce_after_the_attempt_timeout_reaches_the_app_and_is_not_retried() -> None:
    # Was: FAILED + FAILED was KEEP: the refusal was dropped, the record kept
    # reason="ack-timeout", stayed retryable, and the retry policy resent a message
    # the recipient had refused.
    policy = RetryPolicy(max_attempts=3, attempt_timeout=30.0)
    tracker = live(policy=policy)
    send(tracker, "m1")
    [timed_out] = tracker.timed_out("m1")
    assert isinstance(timed_out.payload, TrackedMessage)
    assert policy.should_retry(timed_out.payload)
    events = tracker.bounced("m1", REFUSED, sender=BOB, own=OWN)
    assert show(events) == [("message:failed", "m1", REFUSED)]
    refused = events[0].payload
    assert isinstance(refused, TrackedMessage)
    assert not refused.retryable and not policy.should_retry(refused)
    # a refusal is final: the late ack of the copy does not turn it into "acked"
    assert tracker.bounced("m1", WAIT, sender=BOB, own=OWN) == []
    assert show(tracker.ack(1)) == [("stanza:acked", "m1")]
    holds_nothing(tracker)


def test_a_bounce_for_a_failed_message_fetched_from_the_store_updates_its_reason() -> None:
    tracker = live()
    tracker.track(outgoing("m1"), link_up=True)
    [failed] = tracker.session_ended(unsent=["m1"])
    assert isinstance(failed.payload, TrackedMessage) and failed.payload.retryable
    tracker.reinstate(failed.payload)  # plugin._late_signal
    assert show(tracker.bounced("m1", REFUSED, sender=BOB, own=OWN)) == [
        ("message:failed", "m1", REFUSED)
    ]
    tracker.reinstate(failed.payload.moved(S.FAILED, 2000.0, reason=REFUSED))
    assert (
        tracker.bounced("m1", REFUSED, sender=BOB, own=OWN) == []
    )  # the same refusal again: no news
    assert tracker.bounced("m1", WAIT, sender=BOB, own=OWN) == []  # nor another one after a refusal
    tracker.copies_gone()
    holds_nothing(tracker)


# ---------------------------------------------------------------- 4


def test_withheld_ids_do_not_pile_up_across_sessions() -> None:
    # Was: Tracker.withheld only shrank in resend(): 100 sessions that each ended with
    # 1000 unsent messages left 100 000 ids in it for good.
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    for session in range(100):
        _send_enable(tracker)
        tracker.enabled(f"sm-{session}", resumable=True, location=None, max=None, jid="a@b/c")
        ids = [f"s{session}-m{i}" for i in range(1000)]
        for mid in ids:
            tracker.track(outgoing(mid), link_up=True)
        tracker.session_ended(unsent=ids)
        assert tracker.should_drop(ids[0])  # until slixmpp's queue is gone
        tracker.copies_gone(keep=ids[:1])  # plugin._on_session_end: one copy still parked
        assert tracker.withheld == {ids[0]}
        assert tracker.should_drop(ids[0])
        assert not tracker.should_drop(ids[1])
    tracker.copies_gone()
    holds_nothing(tracker)


# ---------------------------------------------------------------- 5


def test_adopted_records_fail_resume_failed_when_the_server_enables_afresh() -> None:
    # Was: enable_sent() failed the restored ledger's entries with "session-ended",
    # so an adopted record it carried failed "session-ended" instead of "resume-failed".
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    tracker.adopt(
        [
            adopted_record("carried", 12, created_at=1.0),
            adopted_record("queued", None, created_at=2.0),
        ]
    )
    tracker.restore(saved_state((12, "carried"), last_ack=11), [Stanza("carried")])
    events = _send_enable(tracker) + tracker.enabled(
        "new", resumable=True, location=None, max=None, jid="alice@example.org/r"
    )
    assert show(events) == [
        ("stanza:failed", "carried"),
        ("message:failed", "carried", RESUME_FAILED),
        ("message:failed", "queued", RESUME_FAILED),
    ]
    tracker.copies_gone()
    holds_nothing(tracker)


# ---------------------------------------------------------------- found by the model


def test_an_acked_groupchat_message_leaves_memory_when_the_session_ends() -> None:
    # Was: an ACKED groupchat record waits in memory for its reflection, and stayed
    # there for good once the session (and so the room occupancy) ended.
    tracker = live()
    send(tracker, "g1", "groupchat")
    tracker.ack(1)
    assert tracker.records["g1"].state is S.ACKED  # waiting for the room
    tracker.link_lost()
    assert "g1" in tracker.records  # a resumption keeps the rooms: it may still come
    assert tracker.session_ended() == []  # it stays acked (the server has it) ...
    holds_nothing(tracker)  # ... and leaves memory


def test_an_adopted_record_acked_by_resumed_h_though_its_stored_seq_lags() -> None:
    # The store had the record's snapshot from before it was counted (seq None, as
    # counting emits no event), the saved state has its entry: the entry speaks for it.
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    tracker.adopt([adopted_record("a", None, S.SENT)])
    tracker.restore(saved_state((11, "a")), [Stanza("a")])
    tracker.resume_sent()
    events, _ = tracker.resumed(11)
    assert show(events) == [("stanza:acked", "a"), ("message:acked", "a", None)]
    holds_nothing(tracker)


def test_adopted_records_settle_when_the_session_ends_before_any_stream_started() -> None:
    # Was: adopted records settle with the first session start; a session that ended
    # before one (close() while offline) left them in flight for good.
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    tracker.adopt([adopted_record("written", 9), adopted_record("unsent", None, S.SENT, 2.0)])
    assert show(tracker.session_ended()) == [
        ("message:failed", "written", RESUME_FAILED),
        ("message:failed", "unsent", RESUME_FAILED),
    ]
    tracker.copies_gone()
    holds_nothing(tracker)


def test_an_adopted_record_not_in_the_saved_state_is_no_late_ack_candidate() -> None:
    # Was: its attempt timed out, and as it had a seq it waited in memory for a late
    # ack that no stream could bring (its entry is not in the restored ledger).
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    tracker.adopt([adopted_record("gone", 9)])
    tracker.restore(saved_state((11, "other")), [Stanza("other")])
    assert show(tracker.timed_out("gone")) == [("message:failed", "gone", ACK_TIMEOUT)]
    assert "gone" not in tracker.records
    tracker.resume_sent()
    tracker.resumed(12)
    holds_nothing(tracker)


def test_a_queued_copy_of_a_message_that_settled_meanwhile_is_withheld() -> None:
    # Was: a resent message was refused (the bounce of its earlier copy) or proven
    # delivered while its new copy still waited in the client's queue: that copy then
    # went out, unasked, as a plain stanza.
    for settle in (
        lambda t: t.bounced("m1", REFUSED, sender=BOB, own=OWN),
        lambda t: t.delivered("m1", sender=BOB),
    ):
        tracker = live()
        tracker.track(outgoing("m1"), link_up=True)
        [failed] = tracker.session_ended(unsent=["m1"])
        tracker.copies_gone()
        _send_enable(tracker)
        assert isinstance(failed.payload, TrackedMessage)
        tracker.resend(failed.payload)  # its new copy waits in the client's queue
        assert not tracker.should_drop("m1")
        settle(tracker)
        assert tracker.should_drop("m1")  # plugin._count_outgoing drops the copy
        tracker.session_ended()
        tracker.copies_gone()
        holds_nothing(tracker)
    # a left room: its queued message fails and its copy is withheld
    tracker = live()
    tracker.joined_room("room@muc.example.org", "me")
    tracker.track(outgoing("g1", "groupchat"), link_up=True)
    tracker.left_room("room@muc.example.org", FailureReason.LEFT_ROOM)
    assert tracker.should_drop("g1")


def test_queued_copies_of_a_message_that_failed_for_good_stay_withheld() -> None:
    # Was: an explicit resend lifts the withholding of the message, so a copy of an
    # earlier attempt still queued in the client went out with the resend's; when the
    # last attempt then timed out with one copy on the wire, the other queued copy was
    # no longer withheld and went out after the message had failed (retries exhausted).
    policy = RetryPolicy(max_attempts=2, attempt_timeout=30.0)
    tracker = live(policy=policy)
    tracker.track(outgoing("m1"), link_up=True)  # copy 0 waits in slixmpp's queue
    [failed] = tracker.timed_out("m1")
    assert tracker.should_drop("m1")
    assert isinstance(failed.payload, TrackedMessage)
    tracker.resend(failed.payload)  # copy 1 queued behind copy 0, both may go now
    assert not tracker.should_drop("m1")
    tracker.counted(Stanza("copy 0"), "m1", link_up=True)  # the resend's attempt
    assert show(tracker.timed_out("m1")) == [
        ("message:failed", "m1", FailureReason.RETRIES_EXHAUSTED)
    ]
    assert tracker.should_drop("m1")  # copy 1 must not go out now
    assert show(tracker.ack(1)) == [("stanza:acked", "copy 0"), ("message:acked", "m1", None)]
    tracker.session_ended()
    tracker.copies_gone()
    holds_nothing(tracker)


def test_an_explicit_resend_lets_one_copy_out_not_every_copy_still_queued() -> None:
    # Was: resend() lifted the withholding of the message: every copy of earlier
    # attempts still queued in the client went out with the new one, and once the
    # session ended the plugin could no longer tell them apart (it keeps one parked
    # copy per id), so after copies_gone() an old copy went out after a later failure.
    tracker = live()
    tracker.track(outgoing("m1"), link_up=True)  # copy 0 queued
    [failed] = tracker.timed_out("m1")
    assert isinstance(failed.payload, TrackedMessage)
    tracker.resend(failed.payload)  # copy 1 queued behind it
    # while resuming (or offline) the plugin parks what passes, and asks again later
    assert not tracker.should_drop("m1")
    assert not tracker.should_drop("m1")
    tracker.counted(Stanza("copy 0"), "m1", link_up=True)  # the resend's one copy
    assert tracker.should_drop("m1")  # copy 1 is dropped
    assert show(tracker.ack(1)) == [("stanza:acked", "copy 0"), ("message:acked", "m1", None)]
    assert tracker.should_drop("m1")
    holds_nothing(tracker)


def test_adopted_records_passed_as_unsent_fail_resume_failed() -> None:
    # Was: a process restarted without a saved state (or its session not resumable)
    # and closed before connecting: plugin._on_session_end passes the adopted records
    # as unsent, and they failed "session-ended" instead of "resume-failed".
    tracker: Tracker[Stanza] = Tracker(clock=Clock())
    tracker.adopt([adopted_record("m1", None, S.SENT)])
    assert show(tracker.session_ended(unsent=tracker.unsent_ids())) == [
        ("message:failed", "m1", RESUME_FAILED)
    ]
    holds_nothing(tracker)


def _send_enable(tracker: Tracker[Any]) -> list[Event]:
    """The connection offers <sm/>, our <enable/> is queued and then written."""
    tracker.sm_offered()
    tracker.enable_queued()
    return tracker.enable_sent()


# ---------------------------------------------------------------- the glue


ROOM = "room@muc.localhost"


def own_presence(room: str) -> Presence:
    """Our own occupant presence (status 110) from ``room``: we are back in it."""
    return Presence(
        xml=ET.fromstring(
            f"<presence xmlns='jabber:client' from='{room}/Alice' to='alice@localhost/r'>"
            "<x xmlns='http://jabber.org/protocol/muc#user'>"
            "<item affiliation='none' role='participant'/><status code='110'/></x>"
            "</presence>"
        )
    )


def room_bounce(room: str, message_id: str) -> Message:
    """The room refuses one of our messages."""
    return Message(
        xml=ET.fromstring(
            f"<message xmlns='jabber:client' type='error' from='{room}' id='{message_id}'>"
            "<error type='cancel'><forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
            "</error></message>"
        )
    )


@pytest_asyncio.fixture
async def wired() -> AsyncIterator[list[WiredClient]]:
    made: list[WiredClient] = []
    yield made
    for client in made:
        sender = getattr(client, "sender", None)
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        client.tracker._cancel_timers()
        client.tracker.resender.cancel()


class _ArchiveHost:
    """A ResendHost whose archive check waits until the test lets it answer (nothing
    found): what happens to the record meanwhile is up to the test."""

    def __init__(self, core: Tracker[Any]) -> None:
        self.core = core
        self.outbox: Outbox[Any] = Outbox()
        self.config = {
            "keep_order": True,
            "reconcile_with_archive": True,
            "reconcile_slack": 60.0,
            "reconcile_timeout": 10.0,
            "reconcile_limit": 100,
        }
        self.session_live = True
        self.answer = asyncio.Event()
        self.written: list[Any] = []
        self.events: list[Event] = []
        self.store: dict[str, TrackedMessage] = {}
        answer = self.answer

        async def iterate(**_: Any) -> Any:
            await answer.wait()
            for nothing in ():
                yield nothing

        self.xmpp = SimpleNamespace(
            plugin={"xep_0313": SimpleNamespace(iterate=iterate)},
            boundjid=SimpleNamespace(bare="alice@example.org"),
            default_ns="jabber:client",
        )

    def apply(self, events: list[Event]) -> None:
        """plugin._dispatch: the store keeps every snapshot."""
        self.events += events
        for event in events:
            if isinstance(event.payload, TrackedMessage):
                self.store[event.payload.id] = event.payload

    def write(self, message: Any) -> None:
        self.written.append(message)

    def release(self, message: Any) -> None:
        self.written.append(message)

    async def get(self, message_id: str) -> TrackedMessage | None:
        """plugin.get: from memory, else from the store."""
        return self.core.get(message_id) or self.store.get(message_id)


async def test_a_message_acked_during_its_archive_check_is_not_resent() -> None:
    # Found by the protocol model once its resends wait for their archive check: a
    # message failed by its attempt timeout (its copy still on the wire) is resent; while
    # the archive is asked, the server acks that copy. The Resender then resent the
    # snapshot it started with: message:resent after message:acked (ACKED -> RESENT,
    # which the transition table forbids) and a duplicate to the peer.
    core = live(policy=RetryPolicy(attempt_timeout=30.0))
    send(core, "m1")
    host = _ArchiveHost(core)
    host.apply(core.timed_out("m1"))
    resender = Resender(host)  # type: ignore[arg-type]
    task = asyncio.ensure_future(resender.resend([host.store["m1"]]))
    await asyncio.sleep(0)  # the archive check is under way
    acked = core.ack(1)
    assert show(acked) == [("stanza:acked", "m1"), ("message:acked", "m1", None)]
    host.apply(acked)
    host.answer.set()
    [result] = await task
    assert result.state is S.ACKED
    assert host.written == []  # no duplicate for the peer
    assert [e.name for e in host.events] == ["message:failed", "stanza:acked", "message:acked"]


async def test_a_held_copy_of_a_message_refused_meanwhile_is_doomed(
    wired: list[WiredClient],
) -> None:
    # Found by the protocol model (the outbox never holds a copy of a settled message
    # unless doomed): a groupchat message failed with its session; the app resent it
    # while the next session waited for the room, so the new copy was held for the
    # rejoin; then the room's bounce of the first copy came in. The message failed for
    # good, but the outbox went on holding its copy as one still to be written (only
    # the core's withheld id kept it from going out, and a later resend's pass could
    # let that old copy out instead of the new one).
    alice = WiredClient()
    wired.append(alice)
    alice.start_writing()
    alice.tracker.core.joined_room(ROOM, "Alice")
    message = alice.xmpp.make_message(mto=ROOM, mbody="hi", mtype="groupchat")
    message.send()
    mid = str(message["id"])
    await alice.turns()
    assert alice.transport.bodies() == ["hi"]
    alice.xmpp.event("session_end")  # the session ends before the room reflected it
    alice.xmpp.event("session_start")  # the next one waits for the room
    assert ROOM in alice.tracker.core.rejoining
    await alice.tracker.resend(mid)
    await alice.turns()
    assert alice.tracker.outbox.held_rooms() == {ROOM}  # the new copy waits for it
    alice.tracker._inbound.on_incoming(room_bounce(ROOM, mid))
    record = await alice.tracker.get(mid)
    assert record is not None and record.state is S.FAILED
    assert not alice.tracker.outbox.is_waiting(mid)


async def test_a_resent_copy_held_for_the_room_is_not_held_behind_its_own_retry(
    wired: list[WiredClient],
) -> None:
    # Found by the protocol model: a groupchat message failed with its session, so its
    # retry was scheduled (the room's new messages wait for it); the app resent it by
    # hand meanwhile, and the new copy waited for the room's rejoin (its attempt timer
    # stopped). Back in the room, _send_held put the copy behind the resend gate: the
    # gate its own scheduled retry kept closed (a retry the hand resend had called off:
    # its timer replaced by the attempt timer) until the message settles, which it
    # cannot do unwritten. The copy, and every later message to the room, never went out.
    alice = WiredClient(retry_policy=RetryPolicy(delay=60.0, attempt_timeout=60.0))
    wired.append(alice)
    alice.start_writing()
    alice.tracker.core.joined_room(ROOM, "Alice")
    message = alice.xmpp.make_message(mto=ROOM, mbody="hi", mtype="groupchat")
    message.send()
    mid = str(message["id"])
    await alice.turns()
    alice.xmpp.event("session_end")  # fails it: its retry waits a minute
    alice.xmpp.event("session_start")  # the next session waits for the room
    await alice.tracker.resend(mid)  # the app does not wait for the retry
    await alice.turns()
    assert alice.tracker.outbox.held_rooms() == {ROOM}
    later = alice.xmpp.make_message(mto=ROOM, mbody="later", mtype="groupchat")
    later.send()
    await alice.turns()
    alice.tracker._inbound.on_incoming(own_presence(ROOM))
    await alice.turns()
    assert alice.transport.bodies() == ["hi", "hi", "later"]  # all out, in order


async def test_a_doomed_copy_still_queued_when_the_app_closes_offline_stays_doomed(
    wired: list[WiredClient],
) -> None:
    # Found by the protocol model: a message failed while slixmpp parked it; the next
    # session start moved that doomed copy into slixmpp's send queue, and the link
    # dropped before the send loop got to it. The app closed at once: the session ended
    # with the queue as it was (disconnect() purges nothing when the link is down), yet
    # the outbox forgot its doomed copies "purged with the queue" and the core their
    # withheld ids. Resent meanwhile, the message then went out twice: the old copy as
    # well as the new one.
    alice = WiredClient(retry_policy=RetryPolicy(delay=60.0, attempt_timeout=60.0))
    wired.append(alice)
    xmpp, transport = alice.xmpp, alice.transport
    xmpp.end_session_on_disconnect = False  # a resumable session
    alice.start_writing()
    xmpp.connection_lost(None)  # the link drops
    await alice.turns()
    message = xmpp.make_message(mto="bob@localhost", mbody="hi", mtype="chat")
    message.send()  # parked by slixmpp
    mid = str(message["id"])
    alice.tracker.resender._attempt_expired(mid)  # it fails while parked
    assert alice.tracker.outbox.held_ids() == {mid}  # its copy is doomed
    alice.sender.cancel()  # the send loop is busy elsewhere for a while
    await asyncio.gather(alice.sender, return_exceptions=True)
    xmpp.transport = transport  # back: the doomed copy moves into the send queue
    xmpp.event("connected")
    xmpp.event("session_start")
    xmpp.transport = None  # and the link drops again before the loop gets to it
    xmpp.event("disconnected")
    xmpp.disconnect()  # the app closes at once
    await alice.tracker.resend(mid)  # and resends it (parked by slixmpp)
    alice.start_writing()  # the loop gets to the old copy now
    await alice.turns()
    xmpp.transport = transport  # the app connects again later
    xmpp.event("connected")
    xmpp.event("session_start")
    await alice.turns()
    assert transport.bodies() == ["hi"]  # once, not twice

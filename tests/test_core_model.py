"""A Hypothesis stateful model of the whole protocol, over the sans-I/O core.

The machine plays four parts and feeds the core exactly the facts the plugin would:

* the app: sends chat and groupchat messages (and plain stanzas), resends failed ones
  by hand, joins and leaves rooms, restarts the process;
* slixmpp: its send queue (``waiting``, purged when a session ends with the
  connection), the stanzas it parks until the next session start (``queued``), its
  ``session_started`` flag and ``end_session_on_disconnect``;
* the plugin and its Resender, call for call: ``_count_outgoing`` (withheld copies,
  ``should_drop``, parking while resuming or offline, ``counted``), ``_on_ack``
  (``HBackwards`` ignored, any other ``SMProtocolError`` -> ``protocol_error`` and the
  link dropped), ``_on_resumed`` (resends written first), ``_on_failed`` /
  ``_on_stream_error`` (``resume_failed`` then ``session_end``), ``_on_disconnected``,
  ``_on_session_end`` (``session_ended`` with the unsent ids, parked copies withheld),
  ``_late_signal`` (a record fetched from the store for a late proof),
  ``_attempt_expired`` / ``_retry`` / ``_send_again`` / ``_found``;
* the server: one stream per ``<enable/>``, counting what it received, answering
  ``<a h>``, ``<resumed h>``, ``<failed h>`` / ``<failed/>`` / a stream error
  truthfully (and, now and then, an ``h`` backwards or beyond what we sent); bounces,
  reflections, receipts and markers only for messages it received.

Time is the model's clock, passed to the core; nothing reads the system time.

Invariants: the core raises nothing but the ``SMProtocolError`` subclasses the plugin
handles; each message's events follow ``states.TRANSITIONS``; nothing is acked that the
stream did not receive; nothing is counted for a message after it settled unless it
was resent; one ledger entry per message, the record's current copy; resends keep
their order; and when the model ends the session, every message has settled and the
core holds nothing (records, ledger, withheld ids, late-ack and adopted sets).

Profiles: ``model-ci`` by default; ``XMPP_SM_MODEL_LONG=1`` (``scripts/test
--model-long``) selects ``model-long``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from xmpp_sm_tracker.core.counters import MAX_SEQ, seq_add
from xmpp_sm_tracker.core.ledger import HBackwards, HTooHigh, SMProtocolError
from xmpp_sm_tracker.core.phases import SMPhase
from xmpp_sm_tracker.core.records import FailureReason, TrackedMessage
from xmpp_sm_tracker.core.retry import RetryPolicy
from xmpp_sm_tracker.core.smstate import parse_state
from xmpp_sm_tracker.core.states import IN_FLIGHT, DeliveryState, IllegalTransition, next_state
from xmpp_sm_tracker.core.tracker import Event, OutgoingMessage, Tracker
from xmpp_sm_tracker.resend import UNANSWERED

S = DeliveryState
BARE = "alice@example.org"
FULL = f"{BARE}/model"
NICK = "alice"
CHATS = ("bob@example.org", "carol@example.org")
ROOMS = ("room1@muc.example.org", "room2@muc.example.org")
BOUNCES = {
    "cancel": "service-unavailable",
    "modify": "not-acceptable",
    "auth": "forbidden",
    "wait": "resource-constraint",
}
STANZA_EVENTS = {"stanza:acked", "stanza:hibernated", "stanza:resent", "stanza:failed"}
POLICY = RetryPolicy(max_attempts=3, delay=1.0, backoff=2.0, max_delay=10.0, attempt_timeout=30.0)


class Clock:
    """The model's clock: it moves only when the model says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 0.01) -> None:
        self.now += seconds


@dataclass(eq=False, slots=True)
class Copy:
    """One stanza object handed to slixmpp: the core's payload. Compared by identity,
    as the plugin withholds parked copies by object."""

    name: str
    message_id: str | None

    def xml(self) -> str:
        return f"<message id='{self.message_id or ''}' name='{self.name}'/>"

    @staticmethod
    def from_xml(xml: str) -> Copy:
        match = re.fullmatch(r"<message id='([^']*)' name='([^']*)'/>", xml)
        assert match is not None, xml
        return Copy(match[2], match[1] or None)


@dataclass
class Stream:
    """The server's side of one managed stream."""

    sid: str
    h0: int
    received: list[str] = field(default_factory=list)
    resumable: bool = False
    #: The server still holds it (live, or hibernating after a drop).
    held: bool = True
    #: How many of ``received`` the server has acknowledged.
    acked: int = 0

    @property
    def h(self) -> int:
        return seq_add(self.h0, len(self.received))


def settle_states() -> frozenset[DeliveryState]:
    return frozenset(set(S) - IN_FLIGHT)


class ProtocolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.tracker: Tracker[Copy] = self.new_tracker()
        self.serial = 0
        # the app's store: the latest snapshot of every message, and each one's events
        self.store: dict[str, TrackedMessage] = {}
        self.log: dict[str, list[str]] = {}
        # slixmpp and the plugin
        self.transport = False
        self.session_live = False
        self.closing = False
        self.end_session_on_disconnect = True
        self.waiting: list[Copy] = []
        self.queued: list[Copy] = []
        #: plugin._parked, by message id: every parked copy (the plugin keeps one per id,
        #: and loses track of an older copy when a resend parks a new one).
        self.parked: dict[str, list[Copy]] = {}
        self.withheld_copies: set[Copy] = set()
        self.phase = "down"  # down, resuming, enabling, live
        # the server
        self.streams: dict[str, Stream] = {}
        self.current: str | None = None
        self.wire: list[Copy] = []
        self.server_got: set[str] = set()
        #: Messages a restarted process adopted, until the restored stream resumes.
        self.adopted: set[str] = set()

    # ------------------------------------------------------------ helpers

    def new_tracker(self) -> Tracker[Copy]:
        tracker: Tracker[Copy] = Tracker(clock=self.clock)
        tracker.retry_policy = POLICY
        return tracker

    def name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def apply(self, events: list[Event], *, acked_on: str | None = None) -> None:
        """Check events as the app receives them, and keep the store up to date."""
        for event in events:
            payload = event.payload
            if isinstance(payload, Copy):
                assert event.name in STANZA_EVENTS, event
                if event.name == "stanza:acked":
                    # never a false ack: the stream that acks it received it
                    assert acked_on is not None, event
                    assert payload.name in self.streams[acked_on].received, (payload, acked_on)
                continue
            assert isinstance(payload, TrackedMessage), event
            assert event.name == f"message:{payload.state.value}", event
            previous = self.store.get(payload.id)
            log = self.log.setdefault(payload.id, [])
            if previous is None:
                assert event.name == "message:sent", (event.name, payload.id)
            else:
                assert event.name != "message:sent", (payload.id, log)
                try:
                    moved = next_state(previous.state, payload.state)
                except IllegalTransition as exc:  # pragma: no cover - a failure report
                    raise AssertionError(f"{payload.id}: {exc}; events so far {log}") from exc
                assert moved is payload.state, (payload.id, previous.state, payload.state, log)
            if payload.id in self.adopted and not payload.in_flight:
                # what a restored stream carried fails "resume-failed" when it is not
                # resumed, never "session-ended" (the contract)
                assert payload.reason != FailureReason.SESSION_ENDED, (payload.id, log)
                self.adopted.discard(payload.id)
            self.store[payload.id] = payload
            log.append(f"{event.name}:{payload.reason}" if payload.reason else event.name)
        self.clock.tick()

    def state_of(self, message_id: str) -> DeliveryState:
        return self.store[message_id].state

    # ------------------------------------------------------------ slixmpp + plugin

    def slix_send(self, copy: Copy) -> None:
        """``xmpp.send``: into the send queue once the session started, else parked
        (``stanza_not_sent``: the plugin remembers tracked ones in ``_parked``)."""
        if self.session_live:
            self.waiting.append(copy)
            return
        self.queued.append(copy)
        if copy.message_id is not None and copy.message_id in self.tracker.records:
            self.parked.setdefault(copy.message_id, []).append(copy)

    def withhold_parked(self, message_id: str) -> None:
        """plugin._withhold_parked."""
        self.withheld_copies.update(self.parked.pop(message_id, ()))

    def count_outgoing(self, copy: Copy) -> None:
        """run_filters -> plugin._on_outgoing -> _count_outgoing, then onto the wire."""
        tracker = self.tracker
        if copy in self.withheld_copies:
            self.withheld_copies.discard(copy)
            return
        message_id = copy.message_id
        if message_id is not None:
            parked = self.parked.get(message_id, [])
            if copy in parked:
                parked.remove(copy)
                if not parked:
                    del self.parked[message_id]
            if tracker.should_drop(message_id):
                assert self.withholdable(message_id), self.log[message_id]
                return
            if message_id not in tracker.records:
                message_id = None
        if tracker.sm_phase is SMPhase.RESUMING or (
            message_id is not None and not self.transport and not self.session_live
        ):
            self.slix_send(copy)
            return
        if not tracker.counting_out:
            assert not self.transport, "a stanza written uncounted on a managed stream"
            return  # written into nothing
        before = self.store.get(copy.message_id or "")
        # nothing goes out for a message after it settled, unless it was resent (RESENT)
        assert before is None or before.state in IN_FLIGHT, (copy, self.log[before.id])
        self.apply(tracker.counted(copy, message_id, link_up=self.transport))
        if self.transport:
            self.wire.append(copy)

    def drain(self, count: int | None = None) -> None:
        """slixmpp's run_filters takes stanzas off its send queue."""
        n = len(self.waiting) if count is None else min(count, len(self.waiting))
        for _ in range(n):
            self.count_outgoing(self.waiting.pop(0))

    def session_start(self) -> None:
        """session_start / session_resumed: slixmpp queues what it parked."""
        self.session_live = True
        self.waiting.extend(self.queued)
        self.queued.clear()
        # New in plugin._on_session_live: what slixmpp moved into its send queue is no
        # longer parked (else a purge of that queue leaves it in flight for good).
        self.parked.clear()

    def on_session_end(self) -> None:
        """plugin._on_session_end."""
        tracker = self.tracker
        if self.closing:
            unsent = tracker.unsent_ids()
        else:
            unsent = [i for i in tracker.unsent_ids() if i not in self.parked]
        self.apply(tracker.session_ended(FailureReason.SESSION_ENDED, unsent=unsent))
        for message_id in unsent:
            self.withhold_parked(message_id)
        # New in plugin._on_session_end: parked copies of withheld messages are withheld
        # by object, and the core forgets the ids of copies slixmpp purged (nothing is
        # held behind a resend here, so nothing is kept).
        for message_id in list(self.parked):
            if tracker.should_drop(message_id):
                self.withhold_parked(message_id)
        tracker.copies_gone(keep=())

    def connection_lost(self) -> None:
        """slixmpp's connection_lost, then plugin._on_disconnected."""
        tracker = self.tracker
        self.wire.clear()
        stream = self.streams.get(self.current or "")
        if stream is not None:
            stream.held = stream.held and stream.resumable
        self.current = None
        self.transport = False
        self.phase = "down"
        if self.end_session_on_disconnect:
            self.waiting.clear()  # _reset_sendq
            self.on_session_end()
        self.session_live = False
        if not self.closing:
            self.apply(tracker.link_lost())
            if tracker.session.can_resume:
                for record in tracker.records.values():
                    assert not record.in_flight or record.state is S.HIBERNATED, record
        self.drain()  # run_filters goes on: stanzas still queued pass the filter now

    def protocol_error(self, exc: SMProtocolError) -> None:
        """plugin._protocol_error -> _drop_session: fail, never resume, abort."""
        self.apply(self.tracker.protocol_error(exc))
        stream = self.streams.get(self.current or "")
        if stream is not None:
            stream.held = False  # our stream error ends it on the server too
        self.end_session_on_disconnect = True
        self.connection_lost()

    def bind_and_enable(self) -> None:
        """session_bind -> <enable/> passes out_sync; session_start follows at once."""
        sid = self.name("stream-")
        self.streams[sid] = Stream(sid, 0)
        self.current = sid
        self.apply(_send_enable(self.tracker))
        self.phase = "enabling"
        self.session_start()

    def late_signal(self, message_id: str, signal: Callable[[str], list[Event]]) -> None:
        """plugin._late_signal: a proof for a record that left memory fetches it."""
        tracker = self.tracker
        if message_id in tracker.records:
            self.apply(signal(message_id))
            return
        record = self.store.get(message_id)
        if record is None:
            return
        tracker.reinstate(record)
        self.apply(signal(message_id))

    def resend_record(self, message_id: str, archive_answers: bool) -> None:
        """Resender.resend([record]): the archive check, then _found or _send_again."""
        tracker = self.tracker
        record = tracker.get(message_id) or self.store[message_id]  # plugin.get
        if record.state is not S.FAILED:
            return
        unanswered = record.reason in UNANSWERED and (
            record.seq is not None or record.reason == FailureReason.RESUME_FAILED
        )
        if unanswered and self.session_live and archive_answers and message_id in self.server_got:
            tracker.reinstate(record)
            if record.type == "groupchat":
                self.apply(tracker.room_received(message_id))
            else:
                self.apply(tracker.found_in_archive(message_id))
            return
        with_delay = record.xml.replace("/>", " delay='1'/>", 1)
        self.apply(tracker.resend(record, with_delay))
        self.slix_send(Copy(self.name(f"{message_id}#"), message_id))

    # ------------------------------------------------------------ start

    @initialize(near_wrap=st.booleans(), offset=st.integers(min_value=1, max_value=6))
    def start(self, near_wrap: bool, offset: int) -> None:
        """Fresh, or a saved state (a previous process) whose counters are about to wrap."""
        if not near_wrap:
            return
        h0 = MAX_SEQ - offset
        self.streams["stream-0"] = Stream("stream-0", h0, resumable=True)
        state = {
            "version": 1,
            "jid": FULL,
            "stream_id": "stream-0",
            "location": None,
            "max": None,
            "handled": MAX_SEQ - 1,
            "seq": h0,
            "last_ack": h0,
            "unacked": [],
            "rooms": {},
            "saved_at": 0.0,
        }
        self.tracker.restore(parse_state(json.loads(json.dumps(state)), bare_jid=BARE), [])

    # ------------------------------------------------------------ the app

    @rule(
        kind=st.sampled_from(["chat", "chat", "groupchat", "groupchat", "plain", "no-body"]),
        to=st.integers(min_value=0, max_value=1),
        flow=st.sampled_from(["queued", "written", "received", "received"]),
    )
    def app_sends(self, kind: str, to: int, flow: str) -> None:
        """xmpp.send(message): plugin._send tracks it (messages with a body), then hands
        it to slixmpp; ``flow``: slixmpp writes its queue at once, and the server reads
        what is on the wire."""
        self.send_one(kind, to)
        if flow != "queued" and self.transport:
            self.drain()
            if flow == "received" and self.wire:
                self.server_receives(len(self.wire))

    def send_one(self, kind: str, to: int) -> None:
        if kind == "plain":
            self.slix_send(Copy(self.name("iq"), None))
            return
        if kind == "no-body":  # a chat state: has an id, is not tracked
            self.slix_send(Copy(self.name("cs"), self.name("cs-id")))
            return
        message_id = self.name("m")
        target = ROOMS[to] if kind == "groupchat" else f"{CHATS[to]}/phone"
        if kind == "groupchat" and self.session_live and self.transport:
            tracker = self.tracker
            if tracker.nick_in(target) is None and target not in tracker.rooms.joining:
                self.join(target, answered=True)  # apps join a room before sending to it
        message = OutgoingMessage(
            id=message_id,
            origin_id=f"o-{message_id}",
            to=target,
            type=kind,
            body=f"body of {message_id}",
            xml=f"<message id='{message_id}' name='{message_id}#0'/>",
        )
        self.apply(self.tracker.track(message, link_up=self.session_live))
        self.slix_send(Copy(f"{message_id}#0", message_id))

    @precondition(lambda self: self.transport and bool(self.waiting))
    @rule(count=st.integers(min_value=1, max_value=5))
    def write(self, count: int) -> None:
        """slixmpp writes what is queued: each stanza passes the plugin's filter."""
        self.drain(count)

    @precondition(lambda self: self.session_live)
    @rule(to=st.integers(min_value=0, max_value=1))
    def sent_carbon(self, to: int) -> None:
        """A carbon of a message our other client sent (plugin._read_sent_carbon)."""
        message_id = self.name("carbon")
        message = OutgoingMessage(
            id=message_id,
            origin_id=message_id,
            to=CHATS[to],
            type="chat",
            body=f"body of {message_id}",
            xml=f"<message id='{message_id}'/>",
            via_carbon=True,
        )
        self.apply(self.tracker.track(message, link_up=True))
        assert self.state_of(message_id) is S.ACKED

    def failed_ids(self) -> list[str]:
        return sorted(mid for mid, r in self.store.items() if r.state is S.FAILED)

    @precondition(lambda self: bool(self.failed_ids()))
    @rule(data=st.data(), automatic=st.booleans(), archive_answers=st.booleans())
    def resend(self, data: st.DataObject, automatic: bool, archive_answers: bool) -> None:
        """tracker.resend(id) by hand, or the retry policy's _retry."""
        message_id = data.draw(st.sampled_from(self.failed_ids()), label="resend")
        record = self.tracker.get(message_id) or self.store[message_id]
        if automatic and not POLICY.should_retry(record):
            return  # the policy would not retry it
        self.clock.tick(POLICY.delay_before(record))
        self.resend_record(message_id, archive_answers)

    @precondition(lambda self: bool(self.failed_ids()))
    @rule(data=st.data())
    def resend_failed(self, data: st.DataObject) -> None:
        """tracker.resend_failed(conversation): oldest first, each after the archive check."""
        conversations = sorted({self.store[mid].conversation for mid in self.failed_ids()})
        conversation = data.draw(st.sampled_from(conversations), label="conversation")
        records = sorted(
            (
                r
                for r in self.store.values()
                if r.state is S.FAILED and r.conversation == conversation
            ),
            key=lambda r: r.created_at,
        )
        before = len(self.waiting) + len(self.queued)
        for record in records:
            self.resend_record(record.id, archive_answers=False)
        # resends keep the conversation's order
        handed = [c.message_id for c in (self.waiting + self.queued)[before:]]
        assert handed == [r.id for r in records], (handed, [r.id for r in records])

    @precondition(lambda self: any(r.in_flight for r in self.tracker.records.values()))
    @rule(data=st.data())
    def attempt_times_out(self, data: st.DataObject) -> None:
        """The retry policy's attempt timeout (Resender._attempt_expired)."""
        in_flight = sorted(mid for mid, r in self.tracker.records.items() if r.in_flight)
        message_id = data.draw(st.sampled_from(in_flight), label="timed out")
        self.clock.tick(POLICY.attempt_timeout or 30.0)
        events = self.tracker.timed_out(message_id)
        if events:
            self.withhold_parked(message_id)
            self.apply(events)

    @precondition(lambda self: self.session_live and self.transport)
    @rule(room=st.sampled_from(ROOMS), answered=st.booleans())
    def join(self, room: str, answered: bool) -> None:
        """Our join presence passes the out filter (join_sent), counted like any stanza."""
        self.tracker.join_sent(room, NICK)
        self.waiting.append(Copy(self.name("join"), None))
        if answered:
            self.tracker.joined_room(room, NICK)

    @precondition(lambda self: bool(self.tracker.rooms.joining))
    @rule(data=st.data())
    def room_answers_join(self, data: st.DataObject) -> None:
        room = data.draw(st.sampled_from(sorted(self.tracker.rooms.joining)), label="room")
        self.tracker.joined_room(room, NICK)

    @precondition(lambda self: bool(self.tracker.rooms.nicks))
    @rule(
        data=st.data(),
        reason=st.sampled_from([FailureReason.LEFT_ROOM, FailureReason.REMOVED_FROM_ROOM]),
        rejoin=st.booleans(),
    )
    def leave_or_kicked(self, data: st.DataObject, reason: str, rejoin: bool) -> None:
        room = data.draw(st.sampled_from(sorted(self.tracker.rooms.nicks)), label="room")
        self.apply(self.tracker.left_room(room, reason, rejoin=rejoin))

    @rule(
        trouble=st.sampled_from(["link drops"] * 4 + ["close", "restart"]),
        data=st.data(),
    )
    def trouble(self, trouble: str, data: st.DataObject) -> None:
        """The link drops (most often), the app disconnects, or the process restarts."""
        if trouble == "close":
            self.close()
        elif trouble == "restart":
            self.restart(data)
        elif self.transport:
            self.connection_lost()

    def close(self) -> None:
        """xmpp.disconnect(): plugin._disconnect, then slixmpp closes."""
        self.closing = True
        if not self.transport:
            self.on_session_end()
            return
        self.end_session_on_disconnect = True
        self.drain()  # disconnect() lets the send queue drain first
        self.connection_lost()

    def restart(self, data: st.DataObject) -> None:
        """The process dies and starts again: a new Tracker adopts what the store has in
        flight and restores the saved SM state (export -> JSON -> parse_state)."""
        old = self.tracker
        state = old.export_state(lambda entry: entry.payload.xml(), now=self.clock())
        # the server sees the connection drop
        self.wire.clear()
        stream = self.streams.get(self.current or "")
        if stream is not None:
            stream.held = stream.held and stream.resumable
        in_flight = [r for r in self.store.values() if r.in_flight]
        tracker = self.tracker = self.new_tracker()
        restore_first = data.draw(st.booleans(), label="sm.load before attach")
        restored = None
        if state is not None:
            restored = parse_state(json.loads(json.dumps(state)), bare_jid=BARE)
        if restored is not None and restore_first:
            tracker.restore(restored, [Copy.from_xml(e.xml) for e in restored.unacked])
        tracker.adopt(in_flight)
        self.adopted = {r.id for r in in_flight}
        if restored is not None and not restore_first:
            tracker.restore(restored, [Copy.from_xml(e.xml) for e in restored.unacked])
        # a new process: nothing of the old one's queues or connection is left
        self.transport = self.session_live = self.closing = False
        self.end_session_on_disconnect = True
        self.waiting, self.queued, self.parked = [], [], {}
        self.withheld_copies = set()
        self.current, self.phase = None, "down"

    # ------------------------------------------------------------ connection

    @precondition(lambda self: not self.transport)
    @rule(
        resume=st.booleans(),
        answer=st.sampled_from(["later", "resumable", "resumable", "not resumable"]),
    )
    def connect(self, resume: bool, answer: str) -> None:
        """A connection: <resume/> when the session can be resumed (and the server
        offers it), else bind and <enable/>; ``answer``: the server's answer comes at
        once (<enabled resume>, or what it says to <resume/>)."""
        self.transport = True
        self.closing = False
        if self.tracker.session.can_resume and resume:
            self.tracker.resume_sent()
            self.phase = "resuming"
            if answer != "later":
                self.resume_answered("failed-h" if answer == "resumable" else "failed")
        else:
            self.bind_and_enable()
            if answer != "later":
                self.enabled(resumable=answer == "resumable")

    @precondition(lambda self: self.phase == "enabling")
    @rule(resumable=st.booleans())
    def enabled(self, resumable: bool) -> None:
        assert self.current is not None
        self.streams[self.current].resumable = resumable
        self.apply(
            self.tracker.enabled(
                self.current, resumable=resumable, location=None, max=None, jid=FULL
            )
        )
        self.end_session_on_disconnect = not self.tracker.session.can_resume
        self.phase = "live"

    @precondition(lambda self: self.phase == "resuming")
    @rule(answer=st.sampled_from(["failed-h", "failed", "stream-error"]))
    def resume_answered(self, answer: str) -> None:
        """<resumed h> when the server still holds the stream; else <failed h> (Prosody
        remembers h), <failed/>, or a stream error."""
        tracker = self.tracker
        previd = tracker.session.sm_id
        assert previd is not None
        stream = self.streams[previd]
        if stream.held:
            self.resumed(stream)
            return
        h = stream.h if answer == "failed-h" else None
        self.apply(tracker.resume_failed(h), acked_on=previd)
        stream.acked = len(stream.received)
        if answer == "stream-error":
            self.on_session_end()  # plugin._on_stream_error fires session_end
            self.connection_lost()
        else:
            self.on_session_end()  # plugin._resume fires session_end
            self.bind_and_enable()

    def resumed(self, stream: Stream) -> None:
        """plugin._on_resumed: the resends are written at once, before anything new."""
        tracker = self.tracker
        order = [e.payload for e in tracker.ledger]
        events, resend = tracker.resumed(stream.h)
        stream.acked = len(stream.received)
        # resent in the order they were first counted, renumbered from h + 1
        positions = [order.index(e.payload) for e in resend]
        assert positions == sorted(positions), positions
        assert [e.seq for e in resend] == [seq_add(stream.h, i) for i in range(1, len(resend) + 1)]
        assert not self.wire
        for entry in resend:
            assert entry.payload.name not in stream.received  # nothing resent twice
            self.wire.append(entry.payload)
        self.adopted.clear()  # they settle with the resumed stream from now on
        self.apply(events, acked_on=stream.sid)
        self.current = stream.sid
        self.end_session_on_disconnect = not tracker.session.can_resume
        self.phase = "live"
        self.session_start()

    @precondition(lambda self: any(s.held and s.sid != self.current for s in self.streams.values()))
    @rule(data=st.data())
    def server_forgets(self, data: st.DataObject) -> None:
        """The hibernation timeout runs out on the server."""
        held = sorted(s.sid for s in self.streams.values() if s.held and s.sid != self.current)
        self.streams[data.draw(st.sampled_from(held), label="forget")].held = False

    # ------------------------------------------------------------ the server

    @precondition(lambda self: bool(self.wire))
    @rule(count=st.integers(min_value=1, max_value=5))
    def server_receives(self, count: int) -> None:
        assert self.current is not None
        stream = self.streams[self.current]
        for copy in self.wire[:count]:
            stream.received.append(copy.name)
            if copy.message_id is not None:
                self.server_got.add(copy.message_id)
        del self.wire[:count]

    @precondition(lambda self: self.phase == "live" and self.tracker.counting_in)
    @rule(
        kind=st.sampled_from(["fresh"] * 6 + ["duplicate", "backwards", "too-high"]),
        data=st.data(),
    )
    def server_acks(self, kind: str, data: st.DataObject) -> None:
        """<a h> in: plugin._on_ack."""
        assert self.current is not None
        stream, tracker = self.streams[self.current], self.tracker
        ledger = tracker.ledger
        if kind == "fresh":
            everything = st.just(len(stream.received))
            k = data.draw(everything | st.integers(stream.acked, len(stream.received)), label="n")
            stream.acked = k
            h = seq_add(stream.h0, k)
        elif kind == "duplicate":
            h = ledger.last_ack
        elif kind == "backwards":
            h = (ledger.last_ack - data.draw(st.integers(1, 3), label="back")) % MAX_SEQ
        else:
            h = seq_add(ledger.seq, data.draw(st.integers(1, 3), label="extra"))
        before = [(e.seq, e.payload) for e in ledger]
        try:
            events = tracker.ack(h)
        except HBackwards:
            assert kind == "backwards", kind
            assert [(e.seq, e.payload) for e in ledger] == before
            return  # logged and ignored
        except SMProtocolError as exc:
            assert kind == "too-high" and isinstance(exc, HTooHigh), (kind, exc)
            assert [(e.seq, e.payload) for e in ledger] == before
            self.protocol_error(exc)
            return
        assert kind in ("fresh", "duplicate"), kind
        self.apply(events, acked_on=stream.sid)
        assert ledger.last_ack == h

    @precondition(lambda self: self.tracker.counting_in)
    @rule()
    def inbound(self) -> None:
        self.tracker.inbound()

    def tracked_received(self) -> list[str]:
        return sorted(mid for mid in self.server_got if mid in self.store)

    @precondition(lambda self: bool(self.tracked_received()))
    @rule(data=st.data(), error_type=st.sampled_from(sorted(BOUNCES)))
    def bounce(self, data: st.DataObject, error_type: str) -> None:
        """An error bounce from the recipient or the room (plugin._read_bounce)."""
        message_id = data.draw(st.sampled_from(self.tracked_received()), label="bounced")
        reason = FailureReason.bounce(error_type, BOUNCES[error_type])
        before = self.store[message_id]
        self.late_signal(message_id, lambda mid: self.tracker.bounced(mid, reason))
        after = self.store[message_id]
        if before.state is S.FAILED and not before.retryable:
            assert after == before, (message_id, self.log[message_id])  # it stands
        elif before.state in (S.SENT, S.HIBERNATED, S.RESENT, S.ACKED, S.FAILED):
            # the refusal reaches the app: failed with the bounce's reason
            assert after.state is S.FAILED, (message_id, self.log[message_id])
            assert after.reason in (reason, FailureReason.RETRIES_EXHAUSTED), (
                message_id,
                self.log[message_id],
            )
            assert after.retryable == (error_type == "wait" and after.reason == reason)

    def reflectable(self) -> list[str]:
        """Our groupchat messages the server got, to rooms this session is in (a room
        reflects to its occupants; the plugin ignores the rest)."""
        nick_in = self.tracker.nick_in
        return sorted(
            mid
            for mid in self.server_got
            if mid in self.store
            and self.store[mid].type == "groupchat"
            and nick_in(self.store[mid].conversation) == NICK
        )

    @precondition(lambda self: bool(self.reflectable()))
    @rule(data=st.data(), by=st.sampled_from(["origin-id", "id", "body"]))
    def reflection(self, data: st.DataObject, by: str) -> None:
        """The room reflects one of our messages (plugin._read_reflection)."""
        message_id = data.draw(st.sampled_from(self.reflectable()), label="reflected")
        record = self.store[message_id]
        room = record.conversation
        if self.tracker.nick_in(room) != NICK:
            return  # not from our nick in a room this session is in: ignored
        origin = record.origin_id if by == "origin-id" else None
        stanza_id = message_id if by == "id" else "rewritten-by-the-room"
        found = self.tracker.find_reflected(room, origin, stanza_id, record.body)
        if found is not None:
            assert found == message_id, (found, message_id)
            self.apply(self.tracker.room_received(found))
            return
        wanted = origin or stanza_id

        def reflected_late(mid: str) -> list[Event]:
            late = self.tracker.get(mid)
            if late is None or late.type != "groupchat" or late.conversation != room:
                self.tracker.retire(mid)
                return []
            return self.tracker.room_received(mid)

        self.late_signal(wanted, reflected_late)

    def chats_received(self) -> list[str]:
        return sorted(
            mid for mid in self.server_got if mid in self.store and self.store[mid].type == "chat"
        )

    @precondition(lambda self: bool(self.chats_received()))
    @rule(data=st.data(), marker=st.booleans())
    def receipt_or_marker(self, data: st.DataObject, marker: bool) -> None:
        message_id = data.draw(st.sampled_from(self.chats_received()), label="peer proof")
        signal = self.tracker.displayed if marker else self.tracker.delivered
        self.late_signal(message_id, signal)

    # ------------------------------------------------------------ invariants

    @invariant()
    def core_agrees_with_the_world(self) -> None:
        tracker = self.tracker
        records, ledger = tracker.records, tracker.ledger
        tied: dict[str, int] = {}
        for entry in ledger:
            message_id = entry.message_id
            if message_id is None:
                continue
            assert message_id not in tied, f"two ledger entries for {message_id}"
            tied[message_id] = entry.seq
            record = records.get(message_id)
            if record is not None:
                assert record.seq == entry.seq, (message_id, record.seq, entry.seq)
        queued = {c.message_id for c in self.waiting + self.queued if c not in self.withheld_copies}
        for message_id, record in records.items():
            assert record.state is self.state_of(message_id), (message_id, self.log[message_id])
            if record.in_flight:
                if record.seq is None:
                    assert message_id in queued or message_id in tracker._adopted, message_id
                else:
                    assert tied.get(message_id) == record.seq or message_id in tracker._adopted, (
                        message_id,
                        record.seq,
                    )
            elif record.state is S.FAILED:
                assert message_id in tracker._late_ack_possible, (message_id, self.log[message_id])
                assert tied.get(message_id) == record.seq, message_id
            else:
                assert (record.state, record.type) == (S.ACKED, "groupchat"), record
        # only messages that failed, or settled, are withheld
        assert all(self.withholdable(mid) for mid in tracker.withheld), tracker.withheld
        assert tracker._passes <= tracker.withheld

    def withholdable(self, message_id: str) -> bool:
        log = self.log.get(message_id, [])
        failed = any(name.startswith("message:failed") for name in log)
        return failed or self.state_of(message_id) not in IN_FLIGHT

    def teardown(self) -> None:
        """Drive the session to its end, then everything has settled and the core
        holds nothing."""
        if self.phase == "resuming":
            self.resume_answered("failed-h")
        if self.phase == "enabling":
            self.enabled(resumable=True)
        if self.transport:
            self.drain()
            if self.wire:
                self.server_receives(len(self.wire))
            if self.phase == "live":
                self.server_acks("fresh", _Fixed(len(self.streams[self.current or ""].received)))
        self.close()
        unsettled = {
            mid: self.log[mid] for mid, r in self.store.items() if r.state not in settle_states()
        }
        assert not unsettled, unsettled
        tracker = self.tracker
        assert tracker.records == {}, tracker.records
        assert len(tracker.ledger) == 0, list(tracker.ledger)
        assert tracker.withheld == set(), tracker.withheld
        assert tracker._passes == set(), tracker._passes
        assert tracker._late_ack_possible == set(), tracker._late_ack_possible
        assert tracker._adopted == set(), tracker._adopted


class _Fixed:
    """Stands in for ``st.data()`` in teardown: every draw gives the same value."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def draw(self, strategy: Any, label: str | None = None) -> Any:
        return self.value


settings.register_profile(
    "model-ci",
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "model-long",
    max_examples=20_000,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PROFILE = "model-long" if os.environ.get("XMPP_SM_MODEL_LONG") == "1" else "model-ci"
ProtocolModel.TestCase.settings = settings.get_profile(PROFILE)
test_protocol_model = ProtocolModel.TestCase


def _send_enable(tracker: Tracker[Any]) -> list[Event]:
    """The connection offers <sm/>, our <enable/> is queued and then written."""
    tracker.sm_offered()
    tracker.enable_queued()
    return tracker.enable_sent()

"""A Hypothesis stateful model of the whole protocol, over the sans-I/O core.

The machine plays four parts and feeds the core exactly the facts the plugin would:

* the app: sends chat and groupchat messages (and plain stanzas), to rooms it is in or
  still has to rejoin, resends failed ones by hand (one, or a conversation's), joins
  and leaves rooms, closes, restarts the process;
* slixmpp: its send queue (``waiting``, purged when a session ends with the
  connection), the stanzas it parks until the next session start (``queued``, each
  one reported by ``stanza_not_sent``), its ``session_started`` flag and
  ``end_session_on_disconnect``;
* the plugin and its Resender, over the real :class:`~xmpp_sm_tracker.core.outbox.Outbox`,
  call for call: ``Outbound.send`` (track, then hold behind a resend of the
  conversation or hand to slixmpp), ``Outbound._judge`` (the outbox's verdict for every
  stanza slixmpp writes, with the arguments the glue passes, carried out: DROP, PARK
  back into slixmpp, HOLD_FOR_ROOM, WRITE, COUNT), ``on_stanza_not_sent``
  (``outbox.parked``), ``on_session_live`` (``outbox.session_started``, then the wait for
  room rejoins), ``release_room`` / ``_send_held`` / ``drop_room``, ``on_session_end``
  (``session_ended`` with the unsent ids, whose failures doom their copies,
  ``outbox.session_ended``, ``core.copies_gone(keep=outbox.held_ids())``), the ack and
  resumption handlers, ``_late_signal``; the Resender's gates (``close_gates`` /
  ``open_gates`` around each resend, whose archive check may keep it under way while
  other things happen, and around each scheduled retry, as ``on_record`` does for every
  snapshot), ``_attempt_expired``, ``_retry``, ``_send_again``,
  ``_found``;
* the server: one stream per ``<enable/>`` (all forgotten when it restarts), counting
  what it received, answering
  ``<a h>``, ``<resumed h>``, ``<failed h>`` / ``<failed/>`` / a stream error
  truthfully (and, now and then, an ``h`` backwards or beyond what we sent); bounces,
  reflections, receipts and markers only for messages it received.

Time is the model's clock, passed to the core; nothing reads the system time.

Glue changes the model found necessary are pinned by tests through the real plugin in
``tests/test_core_model_regressions.py``: ``plugin._dispatch`` dooms the held copies of
every message that settles (``Outbound.withhold_parked``); ``Resender.resend`` re-reads
each record once its archive check is over, resending only those still failed;
``Resender.on_record`` calls a scheduled retry off, and opens its gate, when the message
is resent by hand before it.

Invariants: the core raises nothing but the ``SMProtocolError`` subclasses the plugin
handles; each message's events follow ``states.TRANSITIONS``; nothing is acked that the
stream did not receive; nothing is counted for a message after it settled unless it
was resent; one ledger entry per message, the record's current copy; the outbox agrees
with slixmpp (what it thinks slixmpp parks or queues, slixmpp does) and never holds a
copy of a settled message unless doomed; per conversation, what is written keeps its
order across parking, resends and room holds (new messages in the order they were
sent, anything in the order it was handed over, nothing sent during a resend of its
conversation before that resend is out); and when the model ends (every resend and
retry done, the rooms' wait over, everything acked, the session closed) every message
has settled, and the core, the outbox and slixmpp hold nothing.

Left out: the app sending while slixmpp's send loop is still working through what a
link drop left in its queue (with an async outgoing filter, such as XEP-0115's, that
takes a loop turn per stanza, slixmpp parks the new message ahead of the older ones
still queued: an order the glue cannot restore; see ``loop_idle``), and private
messages to room occupants (they share the room's conversation but not its hold).

Profiles: ``model-ci`` by default; ``XMPP_SM_MODEL_LONG=1`` (``scripts/test
--model-long``) selects ``model-long``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from xmpp_sm_tracker.core.counters import MAX_SEQ, seq_add
from xmpp_sm_tracker.core.ledger import HBackwards, HTooHigh, SMProtocolError
from xmpp_sm_tracker.core.outbox import Outbox, Verdict
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
OWN = "alice@example.org"
#: Parties who were sent none of our messages (no recipient, no room of ours).
FORGERS = ("mallory@example.org/phone", "room3@muc.example.org/alice", "evil.example")
CHATS = ("bob@example.org", "carol@example.org")
ROOMS = ("room1@muc.example.org", "room2@muc.example.org")
BOUNCES = {
    "cancel": "service-unavailable",
    "modify": "not-acceptable",
    "auth": "forbidden",
    "wait": "resource-constraint",
}
STANZA_EVENTS = {"stanza:acked", "stanza:hibernated", "stanza:resent", "stanza:failed"}
#: max_unacked, small: the window fills in most runs (the plugin's default is 5 000).
WINDOW = 4
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
    """One stanza object handed to slixmpp: the core's and the outbox's payload.
    Compared by identity, as the outbox tells copies apart."""

    name: str
    message_id: str | None
    #: The bare JID a message goes to (None: a stanza of no conversation).
    conversation: str | None = None
    #: A groupchat message's room (the glue reads the stanza's type and ``to``).
    room: str | None = None
    #: The order its message was created in (0: not a new message, e.g. a resend).
    created: int = 0
    #: When it was last handed to slixmpp by the app, a resend or a released gate.
    handed: int = 0
    #: Resends (and scheduled retries) of its conversation under way when the app sent
    #: it: it must not be written before they are out.
    follows: frozenset[int] = frozenset()

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


@dataclass(eq=False)
class Resend:
    """One ``Resender.resend(records)`` under way: its gates are closed, its archive
    check not answered yet."""

    token: int
    records: list[TrackedMessage]
    conversations: list[str]
    #: The archive is asked first (the call awaits it); else it goes through at once.
    archive: bool
    #: Resender._retry: the scheduled retry's (conversation, token), opened at the end.
    retry: tuple[str, int] | None = None


def statistic(name: str) -> None:
    """Count a path taken (``--hypothesis-show-statistics``); nothing outside a test."""
    with contextlib.suppress(InvalidArgument):  # replayed by hand
        event(name)


def settle_states() -> frozenset[DeliveryState]:
    return frozenset(set(S) - IN_FLIGHT)


def identities(copies: Iterable[object]) -> set[int]:
    return {id(copy) for copy in copies}


class ProtocolModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.tracker: Tracker[Copy] = self.new_tracker()
        self.serial = 0
        # the app's store: the latest snapshot of every message, and each one's events
        self.store: dict[str, TrackedMessage] = {}
        self.log: dict[str, list[str]] = {}
        # slixmpp
        self.transport = False
        self.session_live = False
        self.closing = False
        self.end_session_on_disconnect = True
        self.waiting: list[Copy] = []
        self.queued: list[Copy] = []
        # the plugin: its outbox, the rooms' rejoin wait, the Resender
        self.outbox: Outbox[Copy] = Outbox()
        self.rejoin_wait = True  # config room_rejoin_wait > 0
        self.rejoin_timer = False
        #: Resender._scheduled: message id -> (conversation, token) of its retry's gate.
        self.scheduled: dict[str, tuple[str, int]] = {}
        #: Resends whose archive check is not answered yet.
        self.resends: list[Resend] = []
        self.phase = "down"  # down, resuming, enabling, live
        # the server
        self.streams: dict[str, Stream] = {}
        self.current: str | None = None
        self.wire: list[Copy] = []
        self.server_got: set[str] = set()
        #: Messages a restarted process adopted, until the restored stream resumes.
        self.adopted: set[str] = set()
        # order: per conversation, the newest message and hand-over written so far, and
        # the resends (and scheduled retries) under way, by token, with their conversations
        self.created = 0
        self.handed = 0
        self.newest_written: dict[str, int] = {}
        self.handed_written: dict[str, int] = {}
        self.tokens = 0
        self.under_way: dict[int, frozenset[str]] = {}

    # ------------------------------------------------------------ helpers

    def new_tracker(self) -> Tracker[Copy]:
        tracker: Tracker[Copy] = Tracker(clock=self.clock)
        tracker.retry_policy = POLICY
        return tracker

    def name(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def apply(self, events: list[Event], *, acked_on: str | None = None) -> None:
        """plugin._dispatch: check events as the app receives them, keep the store up to
        date, and let the Resender see every snapshot (``on_record``)."""
        for ev in events:
            payload = ev.payload
            if isinstance(payload, Copy):
                assert ev.name in STANZA_EVENTS, ev
                if ev.name == "stanza:acked":
                    # never a false ack: the stream that acks it received it
                    assert acked_on is not None, ev
                    assert payload.name in self.streams[acked_on].received, (payload, acked_on)
                continue
            assert isinstance(payload, TrackedMessage), ev
            assert ev.name == f"message:{payload.state.value}", ev
            previous = self.store.get(payload.id)
            log = self.log.setdefault(payload.id, [])
            if previous is None:
                assert ev.name == "message:sent", (ev.name, payload.id)
            else:
                assert ev.name != "message:sent", (payload.id, log)
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
            log.append(f"{ev.name}:{payload.reason}" if payload.reason else ev.name)
            if not payload.in_flight:
                # plugin._dispatch: a settled message's held copies never go out by
                # themselves (Outbound.withhold_parked).
                self.outbox.doom(payload.id)
            self.on_record(payload)
        self.clock.tick()

    def state_of(self, message_id: str) -> DeliveryState:
        return self.store[message_id].state

    def new_token(self, conversations: Iterable[str]) -> int:
        self.tokens += 1
        self.under_way[self.tokens] = frozenset(conversations)
        return self.tokens

    def resends_under_way(self, conversation: str) -> frozenset[int]:
        return frozenset(t for t, convs in self.under_way.items() if conversation in convs)

    # ------------------------------------------------------------ slixmpp

    def slix_send(self, copy: Copy) -> None:
        """slixmpp's ``send``: into the send queue once the session started, else parked
        until the next session start, and ``stanza_not_sent`` fires
        (``Outbound.on_stanza_not_sent``: the outbox learns of tracked messages)."""
        if self.session_live:
            self.waiting.append(copy)
            return
        self.queued.append(copy)
        message_id = copy.message_id
        if message_id is not None and self.tracker.get(message_id) is not None:
            self.outbox.parked(message_id, copy)

    def hand_over(self, copy: Copy) -> None:
        """The app, a resend or an opened gate hands a copy to slixmpp: from here on it
        keeps its place among the conversation's copies."""
        self.handed += 1
        copy.handed = self.handed
        self.slix_send(copy)

    def drain(self, count: int | None = None) -> None:
        """slixmpp's run_filters takes stanzas off its send queue; each one passes the
        plugin's out_sync filter, and what it returns is written."""
        n = len(self.waiting) if count is None else min(count, len(self.waiting))
        for _ in range(n):
            copy = self.waiting.pop(0)
            if self.judge(copy):
                self.wire.append(copy)

    def session_start(self) -> None:
        """session_start / session_resumed: slixmpp queues what it parked, then
        SessionDriver.on_session_live."""
        self.session_live = True
        self.waiting.extend(self.queued)
        self.queued.clear()
        self.outbox.session_started()
        self.release_window()
        self.wait_for_rejoins()

    # ------------------------------------------------------------ the plugin: outgoing

    def app_send(self, copy: Copy, record: TrackedMessage | None) -> None:
        """Outbound.send after tracking: behind a resend of its conversation, or to
        slixmpp."""
        if record is not None:
            copy.follows = self.resends_under_way(record.conversation)
            if self.outbox.hold_behind_resend(record.conversation, record.id, copy):
                statistic("a new message waits behind a resend")
                return
        self.past_the_gate(copy, record.id if record is not None else None)

    def past_the_gate(self, copy: Copy, message_id: str | None) -> None:
        """Outbound.past_the_gate: to slixmpp, unless the unacked window is full (the
        ledger plus slixmpp's send queue at max_unacked) or others wait for it."""
        in_flight = len(self.tracker.ledger) + len(self.waiting)
        if self.outbox.hold_for_window(message_id, copy, in_flight=in_flight, limit=WINDOW):
            statistic("a new stanza waits for the unacked window")
            return
        self.hand_over(copy)

    def release_window(self) -> None:
        """Outbound.release_window: after each <a/> and at each session start."""
        in_flight = len(self.tracker.ledger) + len(self.waiting)
        for copy in self.outbox.release_window(max(0, WINDOW - in_flight)):
            statistic("the window opens for a held stanza")
            self.hand_over(copy)

    def judge(self, copy: Copy) -> bool:
        """Outbound._judge: the outbox's verdict, carried out. True: written now."""
        tracker, outbox = self.tracker, self.outbox
        raw_id = copy.message_id
        message_id = raw_id if raw_id is not None and tracker.get(raw_id) is not None else None
        room = None
        if message_id is not None and self.rejoin_timer and copy.room is not None:
            room = copy.room
        verdict = outbox.verdict(
            copy,
            raw_id,
            tracked=message_id is not None,
            withheld=tracker.should_drop(raw_id),
            resuming=tracker.sm_phase is SMPhase.RESUMING,
            link_down=not self.transport and not self.session_live,
            room=room,
            rooms_waited_for=tracker.rejoining.keys() if room is not None else frozenset(),
            counting=tracker.counting_out,
        )
        if message_id is not None:
            statistic(f"verdict for a tracked message: {verdict.name}")
        if verdict is Verdict.DROP:
            return False
        if verdict is Verdict.PARK:
            self.slix_send(copy)  # slixmpp parks it again for the session start
            return False
        if verdict is Verdict.HOLD_FOR_ROOM:
            return False
        self.written(copy)
        if verdict is Verdict.WRITE:
            assert not self.transport, "a stanza written uncounted on a managed stream"
            return False  # written into nothing
        assert verdict is Verdict.COUNT, verdict
        before = self.store.get(copy.message_id or "")
        # nothing goes out for a message after it settled, unless it was resent (RESENT)
        assert before is None or before.state in IN_FLIGHT, (copy, self.log[before.id])
        self.apply(tracker.counted(copy, message_id, link_up=self.transport))
        return self.transport

    def written(self, copy: Copy) -> None:
        """A copy passes the filter onto the wire: per conversation, in order."""
        conversation = copy.conversation
        if conversation is None or copy.message_id is None:
            return
        if copy.created:
            # a new message: after every older one of its conversation ...
            newest = self.newest_written.get(conversation, 0)
            assert copy.created > newest, ("new messages out of order", copy, newest)
            self.newest_written[conversation] = copy.created
            # ... and after the resends of its conversation under way when it was sent
            open_ = copy.follows & self.under_way.keys()
            assert not open_, ("written before a resend it waits for", copy, open_)
        # and anything in the order it was handed over
        handed = self.handed_written.get(conversation, 0)
        assert copy.handed > handed, ("copies out of order", copy, handed)
        self.handed_written[conversation] = copy.handed

    def on_session_end(self) -> None:
        """SessionDriver.on_session_end."""
        tracker, outbox = self.tracker, self.outbox
        if not outbox.empty:
            statistic("a session ends with copies held in the outbox")
        if self.closing:
            unsent = tracker.unsent_ids()
        else:
            unsent = [i for i in tracker.unsent_ids() if i not in outbox.waiting_ids()]
            # only what the purge took fails unsent: a copy still parked or held goes out
            doomed = identities(_all(outbox._doomed))
            held = [p for _, p in _pairs(outbox._room_held) + _pairs(outbox._resend_held)]
            held += [p for _, p in outbox._window]
            copies = [c for c in self.queued + held if id(c) not in doomed]
            alive = {c.message_id for c in copies if c.message_id in tracker.records}
            assert not alive.intersection(unsent), ("fails, yet goes out", alive, unsent)
        self.apply(tracker.session_ended(FailureReason.SESSION_ENDED, unsent=unsent))
        if not self.waiting:  # purged with the session, or drained; not disconnect()'s
            outbox.session_ended()
        tracker.copies_gone(keep=outbox.held_ids())

    # ------------------------------------------------------------ the plugin: rooms

    def wait_for_rejoins(self) -> None:
        """Outbound.wait_for_rejoins: a session is live."""
        self.rejoin_timer = False
        if self.tracker.rejoining and self.rejoin_wait:
            self.rejoin_timer = True
        else:
            self.stop_waiting_for_rooms()

    def stop_waiting_for_rooms(self) -> None:
        """Outbound._stop_waiting_for_rooms: the wait is over (or there is none)."""
        self.rejoin_timer = False
        self.tracker.stop_waiting_for_rooms()
        for room in self.outbox.held_rooms():
            self.release_room(room)

    def release_room(self, room: str) -> None:
        """Outbound.release_room: what waited for ``room`` goes out, in order."""
        held = self.outbox.release_room(room)
        if held:
            statistic("copies held for a room are released")
        if not self.tracker.rejoining:
            self.rejoin_timer = False
        for copy in held:
            self.send_held(copy)

    def send_held(self, copy: Copy) -> None:
        """Outbound._send_held: written now, unless a resend of its conversation holds it
        back or the link is down."""
        message_id = copy.message_id or ""
        record = self.tracker.get(message_id)
        if record is not None and self.outbox.resending(record.conversation):
            statistic("a room releases a copy while a resend of the room is under way")
        if record is not None and self.outbox.hold_behind_resend(
            record.conversation, record.id, copy
        ):
            return  # (not a copy its room held: it passed the gate when handed over)
        if not self.transport:
            self.slix_send(copy)
            return
        if self.judge(copy):
            self.wire.append(copy)  # send_raw: straight onto the wire
            record = self.tracker.get(message_id)
            if record is not None:
                self.on_record(record)  # its attempt starts now

    def joined(self, room: str) -> None:
        """Inbound._joined: our own occupant presence from ``room``."""
        if self.tracker.nick_in(room) != NICK:
            self.tracker.joined_room(room, NICK)
        if room in self.outbox.held_rooms():
            self.release_room(room)

    # ------------------------------------------------------------ the plugin: Resender

    def open_gates(self, conversations: Iterable[str]) -> None:
        """Resender._open_gate: what waited behind the resends goes to slixmpp."""
        for copy in self.outbox.open_gates(conversations):
            statistic("a gate opens on held messages")
            message_id = copy.message_id
            tracked = message_id is not None and self.tracker.get(message_id) is not None
            self.past_the_gate(copy, message_id if tracked else None)

    def on_record(self, record: TrackedMessage) -> None:
        """Resender.on_record (a retry policy is on): a retryable failure holds its
        conversation's new messages until its retry; anything settled lets them go."""
        if record.in_flight and record.id in self.scheduled:
            # Resent by hand before its retry: the retry is off, and so is its gate.
            self.settle_schedule(record.id)
        if record.in_flight:
            return  # its attempt timer (the model's attempt_times_out)
        if record.state is S.FAILED and POLICY.should_retry(record):
            if record.id not in self.scheduled:
                token = self.new_token([record.conversation])
                self.scheduled[record.id] = (record.conversation, token)
                self.outbox.close_gates([record.conversation])
            return
        if record.id in self.scheduled:
            self.settle_schedule(record.id)

    def settle_schedule(self, message_id: str) -> None:
        """Resender._disarm: a scheduled retry is off, its gate opens."""
        conversation, token = self.scheduled.pop(message_id)
        del self.under_way[token]
        self.open_gates([conversation])

    def start_resend(
        self,
        records: list[TrackedMessage],
        *,
        retry: tuple[str, int] | None = None,
        defer: bool = False,
        archive_answers: bool = False,
    ) -> None:
        """Resender.resend(records): gates closed, then the archive check (which keeps
        it under way when it has to ask the server: ``defer``), then each record."""
        conversations = sorted({record.conversation for record in records})
        self.outbox.close_gates(conversations)
        unanswered = [
            record
            for record in records
            if record.reason in UNANSWERED
            and (record.seq is not None or record.reason == FailureReason.RESUME_FAILED)
        ]
        resend = Resend(
            self.new_token(conversations),
            records,
            conversations,
            archive=bool(unanswered) and self.session_live,
            retry=retry,
        )
        if resend.archive and defer:
            statistic("a resend waits for its archive check")
            if len(self.resends) > 0:
                statistic("resends overlap")
            self.resends.append(resend)
            return
        self.finish_resend(resend, archive_answers)

    def finish_resend(self, resend: Resend, archive_answers: bool) -> None:
        """The archive answered (or was not asked): ``_found`` or ``_send_again`` for
        each record, then the gates open (and a scheduled retry's gate after them)."""
        tracker = self.tracker
        found: set[str] = set()
        if resend.archive and archive_answers and self.session_live:
            found = {
                record.id
                for record in resend.records
                if record.reason in UNANSWERED
                and (record.seq is not None or record.reason == FailureReason.RESUME_FAILED)
                and record.id in self.server_got
            }
        for record in resend.records:
            # Resender.resend: the record as it stands now, and none that settled or was
            # resent while the archive was asked.
            record = tracker.get(record.id) or self.store[record.id]
            if record.state is not S.FAILED:
                statistic("a record moved on during its resend's archive check")
                continue
            if record.id in found:  # Resender._found
                tracker.reinstate(record)
                if record.type == "groupchat":
                    self.apply(tracker.room_received(record.id))
                else:
                    self.apply(tracker.found_in_archive(record.id))
                continue
            # Resender._send_again: same id, a <delay/>, handed to slixmpp past the gate
            with_delay = record.xml.replace("/>", " delay='1'/>", 1)
            self.apply(tracker.resend(record, with_delay))
            room = record.conversation if record.type == "groupchat" else None
            copy = Copy(self.name(f"{record.id}#"), record.id, record.conversation, room)
            self.hand_over(copy)
        del self.under_way[resend.token]
        self.open_gates(resend.conversations)
        if resend.retry is not None:
            conversation, token = resend.retry
            del self.under_way[token]
            self.open_gates([conversation])

    def fire_retry(self, message_id: str, *, defer: bool, archive_answers: bool) -> None:
        """Resender._retry_due -> _retry: the scheduled retry of a failed message."""
        conversation, token = self.scheduled.pop(message_id)
        record = self.tracker.get(message_id) or self.store[message_id]  # host.get
        if record.state is S.FAILED:
            retry = (conversation, token)
            self.start_resend([record], retry=retry, defer=defer, archive_answers=archive_answers)
        else:
            del self.under_way[token]
            self.open_gates([conversation])

    # ------------------------------------------------------------ the plugin: the link

    def connection_lost(self) -> None:
        """slixmpp's connection_lost, then SessionDriver.on_disconnected."""
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
        self.rejoin_timer = False  # cancel_rejoin_wait: it starts again with the session
        if not self.closing:
            self.apply(tracker.link_lost())
            if tracker.session.can_resume:
                for record in tracker.records.values():
                    assert not record.in_flight or record.state is S.HIBERNATED, record
        # run_filters goes on: what is still queued passes the filter when it gets to it
        # (an async outgoing filter, such as slixmpp's XEP-0115 one, takes a loop turn
        # per stanza: the app may send meanwhile)

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
        events = signal(message_id)
        if not events:
            tracker.retire(message_id)  # nothing changed: it leaves memory again
        self.apply(events)

    # ------------------------------------------------------------ start

    @initialize(
        near_wrap=st.booleans(),
        offset=st.integers(min_value=1, max_value=6),
        rejoin_wait=st.sampled_from([True, True, False]),
        in_room=st.booleans(),
    )
    def start(self, near_wrap: bool, offset: int, rejoin_wait: bool, in_room: bool) -> None:
        """Fresh, or a saved state (a previous process, in a room or not) whose counters
        are about to wrap; ``rejoin_wait``: room_rejoin_wait is more than 0."""
        self.rejoin_wait = rejoin_wait
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
            "rooms": {ROOMS[0]: NICK} if in_room else {},
            "saved_at": 0.0,
        }
        self.tracker.restore(parse_state(json.loads(json.dumps(state)), bare_jid=BARE), [])

    # ------------------------------------------------------------ the app

    def loop_idle(self) -> bool:
        """slixmpp's send loop is through what a link drop left in its queue.

        With synchronous outgoing filters it gets there before anything else runs; the
        app may close (or the process die) first, and then the rest passes the filter
        with the session over. (With an async filter, such as XEP-0115's, the app may
        also send in between, and slixmpp parks what it sends ahead of what was still
        queued: an order the glue cannot restore, left out of the model.)"""
        return self.transport or not self.waiting

    @precondition(lambda self: self.loop_idle())
    @rule(
        kind=st.sampled_from(
            ["chat", "chat", "groupchat", "groupchat", "to a room to rejoin", "plain", "no-body"]
        ),
        to=st.integers(min_value=0, max_value=1),
        flow=st.sampled_from(["queued", "written", "received", "received"]),
        join_first=st.booleans(),
    )
    def app_sends(self, kind: str, to: int, flow: str, join_first: bool) -> None:
        """xmpp.send(message): Outbound.send tracks it (messages with a body), then hands
        it to slixmpp; ``flow``: slixmpp writes its queue at once, and the server reads
        what is on the wire; ``join_first``: the app joins a room before sending to it
        (or sends while the room's rejoin is awaited, as "to a room to rejoin" does)."""
        if kind == "to a room to rejoin":
            rejoining = sorted(self.tracker.rejoining)
            kind, join_first = "groupchat", False
            if rejoining:
                to = ROOMS.index(rejoining[to % len(rejoining)])
        self.send_one(kind, to, join_first)
        if flow != "queued" and self.transport:
            self.drain()
            if flow == "received" and self.wire:
                self.server_receives(len(self.wire))

    def send_one(self, kind: str, to: int, join_first: bool = True) -> None:
        if kind == "plain":
            self.slix_send(Copy(self.name("iq"), None))
            return
        if kind == "no-body":  # a chat state: has an id, is not tracked
            self.app_send(Copy(self.name("cs"), self.name("cs-id")), None)
            return
        message_id = self.name("m")
        conversation = ROOMS[to] if kind == "groupchat" else CHATS[to]
        target = conversation if kind == "groupchat" else f"{conversation}/phone"
        if kind == "groupchat" and join_first and self.session_live and self.transport:
            tracker = self.tracker
            if tracker.nick_in(target) is None and target not in tracker.rooms.joining:
                self.join(target, answered=True)
        message = OutgoingMessage(
            id=message_id,
            origin_id=f"o-{message_id}",
            to=target,
            type=kind,
            body=f"body of {message_id}",
            xml=f"<message id='{message_id}' name='{message_id}#0'/>",
        )
        self.apply(self.tracker.track(message, link_up=self.session_live))
        self.created += 1
        room = conversation if kind == "groupchat" else None
        copy = Copy(f"{message_id}#0", message_id, conversation, room, created=self.created)
        self.app_send(copy, self.tracker.get(message_id))

    @precondition(lambda self: bool(self.waiting))
    @rule(count=st.integers(min_value=1, max_value=5))
    def write(self, count: int) -> None:
        """slixmpp's send loop takes what is queued: each stanza passes the plugin's
        filter (the link may be down by now)."""
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

    @precondition(lambda self: self.loop_idle() and bool(self.failed_ids()))
    @rule(data=st.data(), defer=st.booleans(), archive_answers=st.booleans())
    def resend(self, data: st.DataObject, defer: bool, archive_answers: bool) -> None:
        """tracker.resend(id): ``defer``: its archive check keeps it under way."""
        message_id = data.draw(st.sampled_from(self.failed_ids()), label="resend")
        record = self.tracker.get(message_id) or self.store[message_id]  # plugin.get
        self.start_resend([record], defer=defer, archive_answers=archive_answers)

    @precondition(lambda self: self.loop_idle() and bool(self.failed_ids()))
    @rule(data=st.data(), defer=st.booleans(), archive_answers=st.booleans())
    def resend_failed(self, data: st.DataObject, defer: bool, archive_answers: bool) -> None:
        """tracker.resend_failed(conversation): oldest first, each after the archive check."""
        failed = self.failed_ids()
        conversations = sorted({self.store[mid].conversation for mid in failed})
        conversation = data.draw(st.sampled_from(conversations), label="conversation")
        records = sorted(
            (self.store[mid] for mid in failed if self.store[mid].conversation == conversation),
            key=lambda r: r.created_at,
        )
        self.start_resend(records, defer=defer, archive_answers=archive_answers)

    def due_retries(self) -> list[str]:
        return sorted(mid for mid in self.scheduled if self.state_of(mid) is S.FAILED)

    @precondition(lambda self: self.loop_idle() and bool(self.due_retries()))
    @rule(data=st.data(), defer=st.booleans(), archive_answers=st.booleans())
    def retry_due(self, data: st.DataObject, defer: bool, archive_answers: bool) -> None:
        """The retry policy's timer for a failed message fires (Resender._retry)."""
        message_id = data.draw(st.sampled_from(self.due_retries()), label="retry")
        self.clock.tick(POLICY.delay_before(self.store[message_id]))
        self.fire_retry(message_id, defer=defer, archive_answers=archive_answers)

    @precondition(lambda self: self.loop_idle() and bool(self.resends))
    @rule(data=st.data(), archive_answers=st.booleans())
    def archive_answers(self, data: st.DataObject, archive_answers: bool) -> None:
        """The archive answers a resend's check (or the query fails: none found)."""
        index = data.draw(st.integers(0, len(self.resends) - 1), label="resend done")
        self.finish_resend(self.resends.pop(index), archive_answers)

    @precondition(
        lambda self: self.loop_idle() and any(r.in_flight for r in self.tracker.records.values())
    )
    @rule(data=st.data())
    def attempt_times_out(self, data: st.DataObject) -> None:
        """The retry policy's attempt timeout (Resender._attempt_expired)."""
        in_flight = sorted(mid for mid, r in self.tracker.records.items() if r.in_flight)
        message_id = data.draw(st.sampled_from(in_flight), label="timed out")
        self.clock.tick(POLICY.attempt_timeout or 30.0)
        events = self.tracker.timed_out(message_id)
        if events:
            self.apply(events)  # failed: its queued copy is doomed with it

    @precondition(lambda self: self.session_live and self.transport)
    @rule(room=st.sampled_from(ROOMS), answered=st.booleans())
    def join(self, room: str, answered: bool) -> None:
        """Our join presence passes the out filter (join_sent), counted like any stanza."""
        self.tracker.join_sent(room, NICK)
        self.waiting.append(Copy(self.name("join"), None))
        if answered:
            self.joined(room)

    @precondition(lambda self: bool(self.tracker.rooms.joining) and self.session_live)
    @rule(data=st.data(), refused=st.sampled_from([False, False, True]))
    def room_answers_join(self, data: st.DataObject, refused: bool) -> None:
        """Our own occupant presence from the room, or its error (Inbound._read_presence)."""
        room = data.draw(st.sampled_from(sorted(self.tracker.rooms.joining)), label="room")
        if not refused:
            self.joined(room)
        elif self.tracker.join_refused(room) and room in self.outbox.held_rooms():
            self.release_room(room)  # they bounce with the room's own condition

    @precondition(lambda self: bool(self.tracker.rooms.nicks) and self.session_live)
    @rule(
        data=st.data(),
        reason=st.sampled_from([FailureReason.LEFT_ROOM, FailureReason.REMOVED_FROM_ROOM]),
        rejoin=st.booleans(),
    )
    def leave_or_kicked(self, data: st.DataObject, reason: str, rejoin: bool) -> None:
        """Our unavailable self-presence from a room (Inbound._read_presence)."""
        room = data.draw(st.sampled_from(sorted(self.tracker.rooms.nicks)), label="room")
        self.apply(self.tracker.left_room(room, reason, rejoin=rejoin))
        self.outbox.drop_room(room)

    @precondition(lambda self: self.rejoin_timer)
    @rule()
    def rejoin_wait_ends(self) -> None:
        """room_rejoin_wait seconds passed: what waited for the rooms goes out anyway."""
        self.stop_waiting_for_rooms()

    @rule(
        trouble=st.sampled_from(["link drops"] * 4 + ["close", "restart", "server restarts"]),
        data=st.data(),
    )
    def trouble(self, trouble: str, data: st.DataObject) -> None:
        """The link drops (most often), the app disconnects, the process restarts, or
        the server does (it forgets every stream: the next resumption fails)."""
        if trouble == "close":
            self.close()
        elif trouble == "restart":
            self.restart(data)
        else:
            if trouble == "server restarts":
                for stream in self.streams.values():
                    stream.held = False
            if self.transport:
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
        # a new process: nothing of the old one's queues, plugin or connection is left
        self.transport = self.session_live = self.closing = False
        self.end_session_on_disconnect = True
        self.waiting, self.queued = [], []
        self.outbox = Outbox()
        self.rejoin_timer = False
        self.scheduled, self.resends, self.under_way = {}, [], {}
        self.current, self.phase = None, "down"

    # ------------------------------------------------------------ connection

    # The send loop is through its queue long before a new connection gets as far as
    # a session (a connection, <resume/> or auth, bind): slixmpp's queue is empty then.
    @precondition(lambda self: not self.transport and not self.waiting)
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
        """<a h> in: AckDriver.on_ack, then Outbound.open_window (every <a/>)."""
        try:
            self.ack_in(kind, data)
        finally:
            self.release_window()

    def ack_in(self, kind: str, data: st.DataObject) -> None:
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

    @precondition(lambda self: self.loop_idle() and bool(self.tracked_received()))
    @rule(data=st.data(), error_type=st.sampled_from(sorted(BOUNCES)))
    def bounce(self, data: st.DataObject, error_type: str) -> None:
        """An error bounce from the recipient or the room (plugin._read_bounce)."""
        message_id = data.draw(st.sampled_from(self.tracked_received()), label="bounced")
        reason = FailureReason.bounce(error_type, BOUNCES[error_type])
        before = self.store[message_id]
        sender = self.store[message_id].to  # the recipient (or the room) itself
        self.late_signal(
            message_id, lambda mid: self.tracker.bounced(mid, reason, sender=sender, own=OWN)
        )
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

    @precondition(lambda self: self.loop_idle() and bool(self.reflectable()))
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

    @precondition(lambda self: self.loop_idle() and bool(self.chats_received()))
    @rule(data=st.data(), marker=st.booleans())
    def receipt_or_marker(self, data: st.DataObject, marker: bool) -> None:
        message_id = data.draw(st.sampled_from(self.chats_received()), label="peer proof")
        signal = self.tracker.displayed if marker else self.tracker.delivered
        sender = self.store[message_id].to.split("/")[0] + "/another-device"
        self.late_signal(message_id, lambda mid: signal(mid, sender=sender))

    @precondition(lambda self: self.loop_idle() and bool(self.store))
    @rule(data=st.data(), kind=st.sampled_from(["receipt", "marker", "bounce"]))
    def forged_proof(self, data: st.DataObject, kind: str) -> None:
        """A receipt, marker or bounce for one of our messages from somebody it was not
        sent to (another contact, another room): nothing changes, nothing is emitted."""
        message_id = data.draw(st.sampled_from(sorted(self.store)), label="forged for")
        tracker, before = self.tracker, self.store[message_id]
        events_before = len(self.log.get(message_id, []))
        forger = data.draw(st.sampled_from(FORGERS), label="forger")
        if kind == "bounce":
            signal = lambda mid: tracker.bounced(mid, "cancel:forbidden", sender=forger, own=OWN)  # noqa: E731
        elif kind == "marker":
            signal = lambda mid: tracker.displayed(mid, sender=forger)  # noqa: E731
        else:
            signal = lambda mid: tracker.delivered(mid, sender=forger)  # noqa: E731
        self.late_signal(message_id, signal)
        assert self.store[message_id] == before, (message_id, kind, forger)
        assert len(self.log.get(message_id, [])) == events_before, (message_id, kind, forger)

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
        # a message not on the wire yet has a copy that can still go out
        outbox = self.outbox
        doomed = identities(
            p for kind in (outbox._doomed, outbox._doomed_queued) for p in _all(kind)
        )
        held = [p for _, p in _pairs(outbox._room_held)] + [
            p for _, p in _pairs(outbox._resend_held)
        ]
        held += [p for _, p in outbox._window]
        alive = {c.message_id for c in self.waiting + self.queued + held if id(c) not in doomed}
        for message_id, record in records.items():
            assert record.state is self.state_of(message_id), (message_id, self.log[message_id])
            if record.in_flight:
                if record.seq is None:
                    assert message_id in alive or message_id in tracker._adopted, message_id
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

    @invariant()
    def outbox_agrees_with_slixmpp(self) -> None:
        """What the outbox believes slixmpp parks or queues, slixmpp does; what it holds
        itself is nowhere else; a held copy of a settled message is doomed."""
        outbox = self.outbox
        parked, queued = identities(self.queued), identities(self.waiting)
        room_held = identities(p for _, p in _pairs(outbox._room_held))
        resend_held = [(mid, p) for mid, p in _pairs(outbox._resend_held)]
        resend_held += [(mid, p) for mid, p in outbox._window if mid is not None]
        windowed = [p for _, p in outbox._window]
        for p in windowed:
            assert id(p) not in parked | queued | room_held, ("held twice", p)
        for p in _all(outbox._waiting):
            assert id(p) in parked or id(p) in room_held, ("waits nowhere", p)
        for p in _all(outbox._doomed):
            assert id(p) in parked or id(p) in room_held, ("doomed, waits nowhere", p)
        for p in _all(outbox._doomed_queued):
            assert id(p) in queued, ("doomed in a queue it is not in", p)
        waiting_or_doomed = identities(_all(outbox._waiting)) | identities(_all(outbox._doomed))
        assert room_held <= waiting_or_doomed, "held for a room, yet not waiting"
        for _, p in resend_held:
            assert id(p) not in parked | queued | room_held, ("held twice", p)
        # never a copy of a settled message, unless it is doomed
        for message_id in list(outbox._waiting) + [mid for mid, _ in resend_held]:
            record = self.store[message_id]
            assert record.in_flight, ("holds a copy of a settled message", record, self.log)
        # the gates: one per resend and scheduled retry under way
        gates: dict[str, int] = {}
        for conversations in self.under_way.values():
            for conversation in conversations:
                gates[conversation] = gates.get(conversation, 0) + 1
        assert outbox._gates == gates, (outbox._gates, gates)

    def teardown(self) -> None:
        """Let every resend and retry run, the rooms' wait end, the session come up and
        everything be acked, then close: every message has settled, and the core, the
        outbox and slixmpp hold nothing."""
        if sys.exc_info()[0] is not None:
            return  # a step failed: report that, not what its half-done state leads to
        for _ in range(30):
            self.drain()  # the send loop first (see loop_idle)
            while self.resends:
                self.finish_resend(self.resends.pop(0), archive_answers=False)
            self.come_up()
            for message_id in self.due_retries():
                self.fire_retry(message_id, defer=False, archive_answers=False)
            if self.rejoin_timer:
                self.stop_waiting_for_rooms()
            self.drain()
            if self.wire:
                self.server_receives(len(self.wire))
            if self.phase == "live":
                self.server_acks("fresh", _Fixed(len(self.streams[self.current or ""].received)))
            if self.quiet():
                break
        else:  # pragma: no cover - a failure report
            raise AssertionError(("never quiet", self.scheduled, self.resends, self.outbox))
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
        assert self.outbox.empty, vars(self.outbox)
        assert not (self.waiting or self.queued), (self.waiting, self.queued)
        assert not (self.scheduled or self.resends or self.under_way), self.scheduled

    def come_up(self) -> None:
        """Connect if need be, and let the server answer until the session is live."""
        if not self.transport:
            self.drain()
            self.connect(resume=True, answer="resumable")
        if self.phase == "resuming":
            self.resume_answered("failed-h")
        if self.phase == "enabling":
            self.enabled(resumable=True)

    def quiet(self) -> bool:
        """Nothing left to do: no resend, retry or rejoin wait, nothing queued or
        unacked."""
        busy = self.resends or self.due_retries() or self.rejoin_timer
        queues = self.waiting or self.queued or self.wire
        in_flight = any(r.in_flight for r in self.tracker.records.values())
        return not (busy or queues or in_flight)


def _all(kind: dict[str, list[Copy]]) -> list[Copy]:
    return [p for copies in kind.values() for p in copies]


def _pairs(kind: dict[str, list[tuple[str, Copy]]]) -> list[tuple[str, Copy]]:
    return [pair for pairs in kind.values() for pair in pairs]


class _Fixed:
    """Stands in for ``st.data()`` in teardown: every draw gives the same value."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def draw(self, strategy: Any, label: str | None = None) -> Any:
        return self.value


settings.register_profile(
    "model-ci",
    max_examples=1000,
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

"""Sending failed messages again: by hand, by a retry policy, in order, never twice.

Before a message that failed without an answer (a failed resumption, an ended
session, an ack timeout) goes out again, our own XEP-0313 archive is asked
whether the server stored it after all: those end ``acked`` with
``reason="found-in-archive"`` instead of reaching the peer twice. While older
messages of a conversation are being resent, newer ones to it wait behind them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol
from xml.etree import ElementTree as ET

from slixmpp import JID
from slixmpp.stanza import Message
from slixmpp.xmlstream import tostring

from .core.outbox import Outbox
from .core.records import FailureReason, TrackedMessage
from .core.states import DeliveryState
from .core.tracker import Event, Tracker
from .stanzas import archived_ids, with_delay

__all__ = ["ResendHost", "Resender"]

log = logging.getLogger(__name__)

#: Failures after which the server may still have the message: worth an archive look.
UNANSWERED = frozenset(
    {
        FailureReason.RESUME_FAILED,
        FailureReason.SESSION_ENDED,
        FailureReason.ACK_TIMEOUT,
        FailureReason.PROTOCOL_ERROR,
        FailureReason.RETRIES_EXHAUSTED,
    }
)


class ResendHost(Protocol):
    """All the resender needs from the plugin: the client, the core, the settings, and
    two ways to act. Nothing else of the plugin is reachable from here."""

    @property
    def xmpp(self) -> Any:
        """The slixmpp client: builds stanzas, runs archive queries."""

    @property
    def core(self) -> Tracker[Any]:
        """The sans-I/O tracker that decides what each fact does to a record."""

    @property
    def outbox(self) -> Outbox[Any]:
        """Where new messages wait behind a resend of their conversation."""

    @property
    def config(self) -> dict[str, Any]:
        """The plugin's settings (keep_order, reconcile_*)."""

    @property
    def session_live(self) -> bool:
        """True while a session is up."""

    def apply(self, events: list[Event]) -> None:
        """Store and emit what the core decided."""

    def write(self, message: Message) -> None:
        """Hand a resent message to slixmpp, past the resend gate."""

    def release(self, message: Message) -> None:
        """A new message the resend gate held: on, behind a full unacked window."""

    async def get(self, message_id: str) -> TrackedMessage | None:
        """The latest record of a message, from memory or the store."""


class Resender:
    """The plugin's resend path: manual resends, the retry policy, order, reconciliation."""

    def __init__(self, host: ResendHost) -> None:
        self.host = host
        self._timers: dict[str, asyncio.TimerHandle] = {}
        #: Scheduled automatic retries: message id -> the conversation they hold back.
        self._scheduled: dict[str, str] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    # ---------------------------------------------------------------- ordering

    def _close_gate(self, conversations: Iterable[str]) -> None:
        """New messages to these conversations wait until the resends are out."""
        self.host.outbox.close_gates(conversations)

    def _open_gate(self, conversations: Iterable[str]) -> None:
        for message in self.host.outbox.open_gates(conversations):
            self.host.release(message)

    # ---------------------------------------------------------------- resending

    async def resend(self, records: list[TrackedMessage]) -> list[TrackedMessage]:
        """Send failed records again in their order, after the archive check (never one
        the server closed the stream on for its size: it would do so again)."""
        too_big = [r for r in records if r.reason == FailureReason.STANZA_TOO_BIG]
        if too_big:
            log.warning("not resending %d messages too big for the server", len(too_big))
            records = [r for r in records if r.reason != FailureReason.STANZA_TOO_BIG]
        conversations = {record.conversation for record in records}
        self._close_gate(conversations)
        try:
            found = await self._reconcile(records)
            results = []
            for record in records:
                # The check took a while: the server may have acked the old copy, or
                # the room reflected it, meanwhile. Only what is still failed goes again.
                current = await self.host.get(record.id) or record
                if current.state is not DeliveryState.FAILED:
                    results.append(current)
                elif current.id in found:
                    results.append(self._found(current))
                else:
                    results.append(self._send_again(current))
            return results
        finally:
            self._open_gate(conversations)

    def _found(self, record: TrackedMessage) -> TrackedMessage:
        core = self.host.core
        core.reinstate(record)
        if record.type == "groupchat":  # in the room's archive: the room has it
            events = core.room_received(record.id)
        else:
            events = core.found_in_archive(record.id)
        self.host.apply(events)
        return _latest(record, events)

    def _send_again(self, record: TrackedMessage) -> TrackedMessage:
        """Same id, same origin-id, plus ``<delay/>`` with the original time (XEP-0198 §4)."""
        host = self.host
        message = Message(host.xmpp, xml=ET.fromstring(record.xml))
        xml = None
        if with_delay(message.xml, record.created_at):
            xml = tostring(message.xml, top_level=True)  # the record keeps what is sent
        events = host.core.resend(record, xml)
        host.apply(events)
        host.write(message)
        return _latest(record, events)

    async def _reconcile(self, records: list[TrackedMessage]) -> set[str]:
        """Ids of records an archive shows arrived (XEP-0313): ours for 1:1 messages,
        the room's for groupchat (its reflection may have been lost with the link)."""
        host = self.host
        # Only what reached the wire unanswered can be on the server: a seq says so, and
        # a record a dead process left behind may have gone out before its seq was saved.
        unanswered = [
            record
            for record in records
            if record.reason in UNANSWERED
            and (record.seq is not None or record.reason == FailureReason.RESUME_FAILED)
        ]
        if not unanswered or not host.config["reconcile_with_archive"]:
            return set()
        if not host.session_live:
            log.info("offline: resending %d messages without the archive check", len(unanswered))
            return set()
        if "xep_0313" not in host.xmpp.plugin:
            host.xmpp.register_plugin("xep_0313")
        by_archive: dict[str | None, list[TrackedMessage]] = defaultdict(list)
        for record in unanswered:
            by_archive[record.conversation if record.type == "groupchat" else None].append(record)
        found: set[str] = set()
        for room, wanted in by_archive.items():
            found |= await self._search_archive(room, wanted)
        if found:
            log.info("%d failed messages were found in an archive: not resent", len(found))
        return found

    async def _search_archive(self, room: str | None, records: list[TrackedMessage]) -> set[str]:
        """Which of ``records`` the archive of ``room`` (None: our own) holds, by
        origin-id or id; an error or a timeout finds none (they are resent)."""
        config = self.host.config
        xmpp = self.host.xmpp
        wanted = {record.origin_id: record.id for record in records}
        wanted.update((record.id, record.id) for record in records)
        oldest = min(record.created_at for record in records)
        start = datetime.fromtimestamp(oldest - config["reconcile_slack"], UTC)
        ours = xmpp.boundjid.bare
        found: set[str] = set()
        try:
            async with asyncio.timeout(config["reconcile_timeout"]):
                async for result in xmpp.plugin["xep_0313"].iterate(
                    jid=JID(room) if room else None,
                    start=start,
                    rsm={"max": 100},
                    total=config["reconcile_limit"],
                ):
                    # In a room's archive the sender is a nick: the ids decide.
                    for key in archived_ids(result.xml, None if room else ours):
                        if key in wanted:
                            found.add(wanted[key])
        except Exception as exc:  # no archive, an error, a timeout: resend as usual
            where = room or "our archive"
            # (the exception's type only: its text may quote a stanza, bodies included)
            log.warning(
                "archive check of %s before resending failed (%s): resending",
                where,
                type(exc).__name__,
            )
        return found

    # ---------------------------------------------------------------- retry policy

    def on_record(self, record: TrackedMessage) -> None:
        """Every snapshot passes here when a retry policy is on."""
        policy = self.host.core.retry_policy
        if policy is None:
            return
        if record.in_flight:
            if self._scheduled:
                # Sent again before its retry was due (by hand): the retry is off, and
                # the gate it kept closed opens (the resend keeps its own meanwhile).
                conversation = self._scheduled.pop(record.id, None)
                if conversation is not None:
                    self.cancel_timer(record.id)
                    self._open_gate([conversation])
            if policy.attempt_timeout is not None:
                self._arm(record.id, policy.attempt_timeout, self._attempt_expired)
        elif record.state is DeliveryState.FAILED and policy.should_retry(record):
            if record.id not in self._scheduled:
                self._scheduled[record.id] = record.conversation
                self._close_gate([record.conversation])
            self._arm(record.id, policy.delay_before(record), self._retry_due)
        else:
            self._disarm(record.id)

    def retry_pending(self, message_id: str) -> bool:
        """True while an automatic retry of the (failed) message is scheduled."""
        return message_id in self._scheduled

    def cancel_timer(self, message_id: str) -> None:
        """Stop the message's attempt timeout or retry timer (a message held before
        the wire starts its attempt when it is written)."""
        handle = self._timers.pop(message_id, None)
        if handle is not None:
            handle.cancel()

    def _disarm(self, message_id: str) -> None:
        """No timer for a settled record; a retry it held a gate for lets it go."""
        self.cancel_timer(message_id)
        conversation = self._scheduled.pop(message_id, None)
        if conversation is not None:
            self._open_gate([conversation])

    def _arm(self, message_id: str, delay: float, action: Callable[[str], None]) -> None:
        old = self._timers.pop(message_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[message_id] = loop.call_later(delay, action, message_id)

    def _attempt_expired(self, message_id: str) -> None:
        self._timers.pop(message_id, None)
        events = self.host.core.timed_out(message_id)
        if events:
            self.host.apply(events)  # failed: a copy still queued is doomed with it

    def _retry_due(self, message_id: str) -> None:
        self._timers.pop(message_id, None)
        task = asyncio.ensure_future(self._retry(message_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry(self, message_id: str) -> None:
        conversation = self._scheduled.pop(message_id, None)
        try:
            record = await self.host.get(message_id)
            if record is not None and record.state is DeliveryState.FAILED:
                await self.resend([record])
        except Exception:
            log.exception("automatic resend of %s failed", message_id)
        finally:
            if conversation is not None:
                self._open_gate([conversation])

    def cancel(self) -> None:
        """Stop every timer (plugin_end)."""
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._scheduled.clear()


def _latest(record: TrackedMessage, events: Iterable[Any]) -> TrackedMessage:
    """The newest snapshot of ``record`` among ``events`` (or the record itself)."""
    for event in events:
        if isinstance(event.payload, TrackedMessage) and event.payload.id == record.id:
            record = event.payload
    return record

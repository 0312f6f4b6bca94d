"""The inbound side: counting what we handle, and reading the proofs peers send back.

slixmpp glue: the ``in`` filter counts each stanza for XEP-0198 and reads what
concerns our messages (error bounces, room reflections, sent carbons, receipts,
markers, our own occupant presence) as facts through :mod:`.stanzas`; the core
decides what each one does to a record, and to our rooms.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

from slixmpp.stanza import Iq, Message, Presence
from slixmpp.xmlstream import StanzaBase

from . import stanzas
from .acking import AckDriver
from .context import Context
from .core.records import FailureReason, TrackedMessage
from .core.rooms import Joined, Left, NickChanged, own_presence
from .core.tracker import Event, OutgoingMessage
from .lateproofs import LateProofs
from .outbound import Outbound

__all__ = ["Inbound"]

log = logging.getLogger(__name__)


class Inbound:
    """Counts inbound stanzas and turns peers' proofs into facts for the core."""

    def __init__(
        self,
        ctx: Context,
        acks: AckDriver,
        outbound: Outbound,
        fetch: Callable[[str], Awaitable[TrackedMessage | None]],
    ) -> None:
        self._ctx = ctx
        self.xmpp = ctx.xmpp
        self.core = ctx.core
        self._acks = acks
        self._outbound = outbound
        self._late = LateProofs(fetch)

    def on_incoming(self, stanza: StanzaBase) -> StanzaBase:
        """in filter: count handled stanzas, and read the proofs peers send back."""
        if not isinstance(stanza, (Message, Presence, Iq)):
            return stanza
        if self.core.counting_in:
            self.core.inbound()
            self._ctx.state_changed()
            self._acks.clock.heard(self._ctx.now)
        try:
            if isinstance(stanza, Message):
                self._read_message(stanza)
            elif isinstance(stanza, Presence):
                self._read_presence(stanza)
        except Exception:  # a malformed stanza must never break the inbound path
            log.exception("could not read an inbound stanza for delivery proofs")
        return stanza

    def _read_message(self, message: Message) -> None:
        xml = message.xml
        kind = xml.get("type")
        if kind == "error":
            bounce = stanzas.read_bounce(xml)
            if bounce is not None:
                reason = FailureReason.bounce(bounce.error_type, bounce.condition, bounce.text)
                own, sender = self.xmpp.boundjid.bare, bounce.sender
                self._late_signal(
                    bounce.id, lambda mid: self.core.bounced(mid, reason, sender=sender, own=own)
                )
            return
        if kind == "groupchat":
            reflection = stanzas.read_reflection(xml)
            if reflection is not None:
                self._read_reflection(reflection)
            return
        carbon = stanzas.read_sent_carbon(xml, self.xmpp.boundjid.bare)
        if carbon is not None:
            if self.core.get(carbon.fields.id) is None:
                outgoing = OutgoingMessage(*carbon.fields, xml=carbon.xml, via_carbon=True)
                self._ctx.emit(self.core.track(outgoing, link_up=True))
            return
        for proof in stanzas.read_peer_proofs(xml):
            signal = self.core.delivered if proof.kind == "delivered" else self.core.displayed
            self._late_signal(proof.id, partial(signal, sender=proof.sender))

    def _read_reflection(self, reflection: stanzas.Reflection) -> None:
        room = reflection.room
        if self.core.nick_in(room) != reflection.nick:
            return
        message_id = self.core.find_reflected(
            room,
            reflection.origin_id,
            reflection.id,
            reflection.body,
            history=reflection.history,
        )
        if message_id is not None:
            self._ctx.emit(self.core.room_received(message_id))
            return
        # Not one in memory: perhaps one that failed (its reflection was lost, the
        # resumption refused) and that the room's history now shows. By its stable id
        # only: the store is asked for it, so a resend does not duplicate it in the room.
        wanted = reflection.origin_id or reflection.id
        if wanted:
            self._late_signal(wanted, lambda mid: self._reflected_late(mid, room))

    def _reflected_late(self, message_id: str, room: str) -> list[Event]:
        record = self.core.get(message_id)
        if record is None or record.type != "groupchat" or record.conversation != room:
            self.core.retire(message_id)  # fetched for nothing
            return []
        return self.core.room_received(message_id)

    def _read_presence(self, presence: Presence) -> None:
        """Our own occupant presence (status 110): which nick is ours in which room.
        stanzas reads the facts; the core decides what its status codes mean."""
        fact = stanzas.read_room_presence(presence.xml)
        if fact is None:
            return
        room = fact.room
        if fact.error:
            if self.core.join_refused(room) and room in self._outbound.outbox.held_rooms():
                self._outbound.release_room(room)  # they bounce with the room's own condition
            return
        kind = "unavailable" if fact.unavailable else None
        decision = own_presence(fact.codes, kind, fact.nick, fact.new_nick)
        if isinstance(decision, Joined | NickChanged):
            self._joined(room, decision.nick)
        elif isinstance(decision, Left):
            self._ctx.emit(self.core.left_room(room, decision.reason, rejoin=decision.rejoin))
            self._ctx.state_changed()  # the saved state must not bring this room back
            self._outbound.drop_room(room)

    def _joined(self, room: str, nick: str) -> None:
        """We are ``nick`` in ``room``; the saved state learns it too, since a resumed
        stream gets no new self-presence (the room never saw it leave)."""
        if nick and self.core.nick_in(room) != nick:
            self.core.joined_room(room, nick)
            self._ctx.state_changed()
        if room in self._outbound.outbox.held_rooms():
            self._outbound.release_room(room)

    def _checked(self, message_id: str, signal: Callable[[str], list[Event]]) -> list[Event]:
        """The signal's events; a proof the core refused (wrong party) is logged."""
        refused = self.core.rejected_proofs
        events = signal(message_id)
        if self.core.rejected_proofs != refused:
            log.warning(
                "ignored a receipt, marker or bounce for %s from a party that cannot give it",
                message_id,
            )
        return events

    def _late_signal(self, message_id: str, signal: Callable[[str], list[Event]]) -> None:
        """Apply a peer's proof to a record, fetching it from the store if it was retired."""
        if self.core.get(message_id) is not None:
            self._ctx.emit(self._checked(message_id, signal))
            return

        def apply(record: TrackedMessage) -> None:
            self.core.reinstate(record)
            events = self._checked(message_id, signal)
            if not events:
                self.core.retire(message_id)  # nothing changed: it leaves memory again
            self._ctx.emit(events)

        self._late.look_up(message_id, apply)

    def close(self) -> None:
        """The plugin ends: late lookups still waiting are dropped."""
        self._late.close()

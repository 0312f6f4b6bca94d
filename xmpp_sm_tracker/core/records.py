"""The record of one tracked message, as users see it in events and in the store."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .states import IN_FLIGHT, DeliveryState

__all__ = ["KEEP", "FailureReason", "Keep", "TrackedMessage", "build_record"]


class Keep:
    """Marks "leave this field as it is" where None is a meaningful new value."""


KEEP = Keep()


class FailureReason:
    """The ``reason`` strings the tracker itself produces (error bounces add their own)."""

    #: Resumption was refused or impossible; the server may still have some of them.
    RESUME_FAILED = "resume-failed"
    #: The session ended (clean disconnect, or a drop without a resumable session).
    SESSION_ENDED = "session-ended"
    #: The server broke XEP-0198 (``h`` beyond what we sent); the session was dropped.
    PROTOCOL_ERROR = "protocol-error"
    #: The server refused ``<enable/>``; nothing on this stream can be confirmed.
    SM_UNAVAILABLE = "sm-unavailable"
    #: We left the room before it reflected the message.
    LEFT_ROOM = "left-room"
    #: The room removed us (kick 307, ban 301, ...) before it reflected the message.
    REMOVED_FROM_ROOM = "removed-from-room"

    @staticmethod
    def bounce(error_type: str, condition: str, text: str = "") -> str:
        """The reason for an error bounce: ``"<type>:<condition>"``, then the text."""
        reason = f"{error_type or 'cancel'}:{condition or 'undefined-condition'}"
        return f"{reason} ({text})" if text else reason

    #: It was never sent: the store refused the record of a durable send.
    STORE_FAILED = "store-failed"
    #: The server did not ack it within the retry policy's attempt timeout.
    ACK_TIMEOUT = "ack-timeout"
    #: A retry policy gave up after its last attempt.
    RETRIES_EXHAUSTED = "retries-exhausted"
    #: The server closed the stream on it: larger than it accepts. Never retried nor
    #: resent by resend_failed(): it would close the stream again.
    STANZA_TOO_BIG = "stanza-too-big"
    #: Not a failure: after a failed resumption the server's archive showed it has it.
    FOUND_IN_ARCHIVE = "found-in-archive"

    #: Failures worth retrying: nothing refused the message itself.
    RETRYABLE = frozenset(
        {RESUME_FAILED, SESSION_ENDED, PROTOCOL_ERROR, SM_UNAVAILABLE, ACK_TIMEOUT, STORE_FAILED}
    )


@dataclass(frozen=True, slots=True)
class TrackedMessage:
    """An immutable snapshot of a tracked message after a change.

    ``seq`` is our XEP-0198 sequence number for the stanza (None until it reaches
    the wire); ``xml`` is the stanza as sent, so it can be sent again unchanged. It is
    serialized when the stanza is written, so the ``message:sent`` snapshot of a
    message sent on a live session has ``xml == ""``; every later snapshot, and every
    record in a store, carries it.
    """

    id: str
    origin_id: str
    to: str
    type: str
    body: str
    state: DeliveryState
    xml: str
    created_at: float
    updated_at: float
    via_carbon: bool = False
    attempts: int = 1
    reason: str | None = None
    seq: int | None = None

    @property
    def in_flight(self) -> bool:
        """True while the message still depends on the current stream."""
        return self.state in IN_FLIGHT

    @property
    def retryable(self) -> bool:
        """True for a failure that a later attempt may fix (never a refusal)."""
        if self.state is not DeliveryState.FAILED or self.reason is None:
            return False
        return self.reason in FailureReason.RETRYABLE or self.reason.startswith("wait:")

    @property
    def conversation(self) -> str:
        """The bare JID the message went to: the key for ordering and listing."""
        return self.to.split("/", 1)[0]

    def moved(
        self,
        state: DeliveryState,
        now: float,
        *,
        attempts: int | None = None,
        reason: str | Keep | None = KEEP,
        seq: int | Keep | None = KEEP,
        xml: str | None = None,
    ) -> TrackedMessage:
        """A copy in ``state``; the caller has checked the move against the table.

        Spelled out rather than ``dataclasses.replace``: it runs for every stanza.
        """
        return build_record(
            self.id,
            self.origin_id,
            self.to,
            self.type,
            self.body,
            state,
            self.xml if xml is None else xml,
            self.created_at,
            now,
            self.via_carbon,
            self.attempts if attempts is None else attempts,
            self.reason if isinstance(reason, Keep) else reason,
            self.seq if isinstance(seq, Keep) else seq,
        )


# A frozen dataclass's __init__ sets each field through object.__setattr__, and even
# its slots' own setters cost a C call each; the tracker makes two or three snapshots
# per message. So a snapshot is built as a plain slotted object of the same layout,
# whose attribute stores Python does inline, then becomes a TrackedMessage (assigning
# __class__ between classes of identical slots is what CPython allows): under half the
# cost. The layout is checked against the dataclass right here.
_FIELDS = (
    "id", "origin_id", "to", "type", "body", "state", "xml", "created_at", "updated_at",
    "via_carbon", "attempts", "reason", "seq",
)  # fmt: skip
_DATACLASS_FIELDS = tuple(f.name for f in fields(TrackedMessage))
if not TrackedMessage.__slots__ == _FIELDS == _DATACLASS_FIELDS:  # pragma: no cover
    raise ImportError("records._FIELDS no longer matches TrackedMessage's fields and slots")


class _Draft:
    """A TrackedMessage under construction: the same slots, settable."""

    __slots__ = _FIELDS


def build_record(
    id: str,
    origin_id: str,
    to: str,
    type: str,
    body: str,
    state: DeliveryState,
    xml: str,
    created_at: float,
    updated_at: float,
    via_carbon: bool = False,
    attempts: int = 1,
    reason: str | None = None,
    seq: int | None = None,
) -> TrackedMessage:
    """``TrackedMessage(...)`` with the same arguments, built faster (see above)."""
    draft: Any = _Draft()
    draft.id = id
    draft.origin_id = origin_id
    draft.to = to
    draft.type = type
    draft.body = body
    draft.state = state
    draft.xml = xml
    draft.created_at = created_at
    draft.updated_at = updated_at
    draft.via_carbon = via_carbon
    draft.attempts = attempts
    draft.reason = reason
    draft.seq = seq
    draft.__class__ = TrackedMessage
    record: TrackedMessage = draft
    return record

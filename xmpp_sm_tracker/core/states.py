"""Delivery states and the one table of legal moves between them.

The table answers, for a record in state X receiving signal Y: move to Y, keep X
(a late or weaker signal never moves a message backwards), or raise, because
the pair can only come from a bug in the tracker.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "IN_FLIGHT",
    "SETTLED",
    "TRANSITIONS",
    "DeliveryState",
    "IllegalTransition",
    "Step",
    "next_state",
]


class DeliveryState(Enum):
    """Where a tracked message stands, from our side of the stream."""

    SENT = "sent"
    HIBERNATED = "hibernated"
    RESENT = "resent"
    ACKED = "acked"
    ROOM_RECEIVED = "room_received"
    DELIVERED = "delivered"
    DISPLAYED = "displayed"
    FAILED = "failed"

    # Members are singletons: hash by identity (C) rather than Enum's hash of the name
    # (Python), since states are looked up in the table several times per message.
    __hash__ = object.__hash__


class Step(Enum):
    """What a signal does to a record: change state, or leave it as it is."""

    MOVE = "move"
    KEEP = "keep"


class IllegalTransition(RuntimeError):
    """A signal that cannot happen to a record in its state: a tracker bug."""


_S = DeliveryState
_M, _K = Step.MOVE, Step.KEEP

#: States in which the message still depends on the current stream.
IN_FLIGHT = frozenset({_S.SENT, _S.HIBERNATED, _S.RESENT})
#: States after which only receipts, markers or an error bounce can follow.
SETTLED = frozenset({_S.ACKED, _S.ROOM_RECEIVED, _S.DELIVERED, _S.DISPLAYED, _S.FAILED})

# fmt: off
#: current state -> {signal: step}. A pair that is absent is illegal.
TRANSITIONS: dict[DeliveryState, dict[DeliveryState, Step]] = {
    _S.SENT: {
        _S.HIBERNATED: _M, _S.RESENT: _M, _S.ACKED: _M, _S.ROOM_RECEIVED: _M,
        _S.DELIVERED: _M, _S.DISPLAYED: _M, _S.FAILED: _M,
    },
    _S.HIBERNATED: {
        _S.HIBERNATED: _K, _S.RESENT: _M, _S.ACKED: _M, _S.ROOM_RECEIVED: _M,
        _S.DELIVERED: _M, _S.DISPLAYED: _M, _S.FAILED: _M,
    },
    _S.RESENT: {
        _S.HIBERNATED: _M, _S.RESENT: _M, _S.ACKED: _M, _S.ROOM_RECEIVED: _M,
        _S.DELIVERED: _M, _S.DISPLAYED: _M, _S.FAILED: _M,
    },
    # The server has it. Only proof of more (room, receipt, marker) or a bounce moves it.
    _S.ACKED: {
        _S.ACKED: _K, _S.ROOM_RECEIVED: _M, _S.DELIVERED: _M, _S.DISPLAYED: _M, _S.FAILED: _M,
    },
    # The room has it: stream trouble after that changes nothing.
    _S.ROOM_RECEIVED: {
        _S.HIBERNATED: _K, _S.RESENT: _K, _S.ACKED: _K, _S.ROOM_RECEIVED: _K,
        _S.DELIVERED: _M, _S.DISPLAYED: _M, _S.FAILED: _K,
    },
    _S.DELIVERED: {
        _S.HIBERNATED: _K, _S.RESENT: _K, _S.ACKED: _K, _S.ROOM_RECEIVED: _K,
        _S.DELIVERED: _K, _S.DISPLAYED: _M, _S.FAILED: _K,
    },
    _S.DISPLAYED: {
        _S.HIBERNATED: _K, _S.RESENT: _K, _S.ACKED: _K, _S.ROOM_RECEIVED: _K,
        _S.DELIVERED: _K, _S.DISPLAYED: _K, _S.FAILED: _K,
    },
    # "Failed" means "not confirmed": a later confirmation upgrades it, a resend restarts it,
    # and a refusal after a failure without an answer (an attempt timeout) replaces it: the
    # tracker reports FAILED -> FAILED only when a retryable reason gets a new one.
    _S.FAILED: {
        _S.RESENT: _M, _S.ACKED: _M, _S.ROOM_RECEIVED: _M, _S.DELIVERED: _M,
        _S.DISPLAYED: _M, _S.FAILED: _M,
    },
}
# fmt: on


def next_state(current: DeliveryState, signal: DeliveryState) -> DeliveryState | None:
    """The state after ``signal``, or None when the record keeps its state.

    Raises :class:`IllegalTransition` for a pair the table does not allow.
    """
    step = TRANSITIONS[current].get(signal)
    if step is None:
        raise IllegalTransition(f"{current.name} -> {signal.name} is not a legal transition")
    return signal if step is Step.MOVE else None

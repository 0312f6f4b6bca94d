"""The stream-management state that ``sm.cache`` hands out and ``sm.load`` takes back.

A JSON-safe dict with a ``version`` key, so an app can keep it anywhere (a file,
SQLite, a key-value store) and a future version of this library can refuse or
migrate it knowingly. Parsing checks everything before anything is applied: a
corrupt, foreign or unknown state raises :class:`SMStateError` and changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from xml.etree import ElementTree as ET

from .counters import MAX_SEQ, distance

__all__ = [
    "STATE_VERSION",
    "RestoredEntry",
    "RestoredState",
    "SMStateError",
    "parse_state",
    "resume_point",
]

#: Bumped whenever the layout changes; older layouts get a migration, newer ones an error.
STATE_VERSION = 1

#: Sane limits: a state beyond them is not one this library wrote.
MAX_TEXT = 3071  # a full JID (RFC 7622: 1023 bytes per part), a stream id, a location
MAX_ROOMS = 10_000
MAX_UNACKED = 100_000
MAX_STANZA = 1 << 20  # servers refuse far smaller stanzas (Prosody 0.12: 256 KiB)
MAX_DEPTH = 32  # what we send nests a few levels; deeper breaks serializers later
#: What may be resent from a saved state: what the tracker writes there.
RESTORABLE = frozenset({"message", "presence"})


class SMStateError(ValueError):
    """A saved SM state that cannot be used: corrupt, from another account, or another version.

    The tracker stays on a fresh session when it is raised.
    """


@dataclass(frozen=True, slots=True)
class RestoredEntry:
    """One unacked stanza of a saved state."""

    seq: int
    xml: str
    message_id: str | None


@dataclass(frozen=True, slots=True)
class RestoredState:
    """A saved state that passed every check."""

    jid: str
    stream_id: str
    location: str | None
    max: int | None
    handled: int
    seq: int
    last_ack: int
    unacked: tuple[RestoredEntry, ...]
    saved_at: float
    #: Our nick per room the session is in (states saved by 0.1.0 have none).
    rooms: Mapping[str, str] = field(default_factory=dict)


def _bare(jid: str) -> str:
    return jid.split("/", 1)[0].lower()


def _counter(state: Mapping[str, Any], key: str) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_SEQ:
        raise SMStateError(f"SM state: {key!r} must be an integer in [0, 2**32), got {value!r}")
    return value


def _optional_str(state: Mapping[str, Any], key: str) -> str | None:
    value = state.get(key)
    if value is not None and not isinstance(value, str):
        raise SMStateError(f"SM state: {key!r} must be a string or null, got {value!r}")
    if value is not None and len(value) > MAX_TEXT:
        raise SMStateError(
            f"SM state: {key!r} is {len(value)} characters long (at most {MAX_TEXT})"
        )
    return value


def restorable(xml: str) -> str:
    """Why the text of a saved unacked stanza may not be resent ("" if it may): XML, a
    ``<message>`` or ``<presence>`` (an ``<iq>`` of a dead process has nobody waiting
    for its answer; anything else is not ours), of sane size and depth."""
    if len(xml) > MAX_STANZA:
        return f"is {len(xml)} characters long (at most {MAX_STANZA})"
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        return f"is not valid XML ({exc})"
    deepest, stack = 1, [(root, 1)]
    while stack:  # not recursive: the depth is what is being checked
        element, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return f"nests more than {MAX_DEPTH} levels deep"
        stack.extend((child, depth + 1) for child in element)
    kind = root.tag.rpartition("}")[2]
    if kind not in RESTORABLE:
        return f"is a <{kind}>, not a message or presence the tracker would resend"
    return ""


def resume_point(state: object) -> tuple[str, int] | None:
    """(stream id, handled) of a state this library exported, read without checking
    the rest (what a resumption from it would say); None for anything else."""
    if not isinstance(state, Mapping):
        return None
    stream_id, handled = state.get("stream_id"), state.get("handled")
    if isinstance(stream_id, str) and isinstance(handled, int):
        return stream_id, handled
    return None


def parse_state(state: object, *, bare_jid: str) -> RestoredState:
    """Check a saved state for the account ``bare_jid``; raises :class:`SMStateError`."""
    if not isinstance(state, Mapping):
        raise SMStateError(f"SM state must be a dict, got {type(state).__name__}")
    version = state.get("version")
    if version != STATE_VERSION:
        raise SMStateError(
            f"SM state version {version!r} is not supported (this library reads version "
            f"{STATE_VERSION}); starting a fresh session"
        )
    jid = state.get("jid")
    if not isinstance(jid, str) or "@" not in jid:
        raise SMStateError(f"SM state: 'jid' must be a JID, got {jid!r}")
    if _bare(jid) != _bare(bare_jid):
        raise SMStateError(
            f"SM state belongs to {_bare(jid)}, not to {_bare(bare_jid)}: refusing to resume "
            "another account's stream"
        )
    if len(jid) > MAX_TEXT:
        raise SMStateError(f"SM state: 'jid' is {len(jid)} characters long (at most {MAX_TEXT})")
    stream_id = _optional_str(state, "stream_id")
    if not stream_id:
        raise SMStateError(f"SM state: 'stream_id' must be a non-empty string, got {stream_id!r}")
    max_value = state.get("max")
    if max_value is not None and (
        isinstance(max_value, bool) or not isinstance(max_value, int) or max_value < 0
    ):
        raise SMStateError(f"SM state: 'max' must be a non-negative integer, got {max_value!r}")
    saved_at = state.get("saved_at", 0.0)
    if isinstance(saved_at, bool) or not isinstance(saved_at, int | float):
        raise SMStateError(f"SM state: 'saved_at' must be a number, got {saved_at!r}")
    if not (-1e12 < saved_at < 1e12 and math.isfinite(saved_at)):
        raise SMStateError("SM state: 'saved_at' is not a time this century could have")
    handled = _counter(state, "handled")
    seq = _counter(state, "seq")
    last_ack = _counter(state, "last_ack")
    unacked = _parse_unacked(state.get("unacked"), seq=seq, last_ack=last_ack)
    return RestoredState(
        jid=jid,
        stream_id=stream_id,
        location=_optional_str(state, "location"),
        max=max_value,
        handled=handled,
        seq=seq,
        last_ack=last_ack,
        unacked=unacked,
        saved_at=float(saved_at),
        rooms=_parse_rooms(state.get("rooms", {})),
    )


def _parse_rooms(raw: object) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise SMStateError(f"SM state: 'rooms' must be a dict of room JID to nick, got {raw!r}")
    if len(raw) > MAX_ROOMS:
        raise SMStateError(f"SM state: {len(raw)} rooms (at most {MAX_ROOMS})")
    for room, nick in raw.items():
        if not isinstance(room, str) or not room or not isinstance(nick, str) or not nick:
            raise SMStateError(
                f"SM state: 'rooms' maps room JIDs to nicks, both non-empty strings; "
                f"got {room!r}: {nick!r}"
            )
        if len(room) > MAX_TEXT or len(nick) > MAX_TEXT:
            raise SMStateError(f"SM state: a room JID or nick is over {MAX_TEXT} characters")
    return dict(raw)


def _parse_unacked(raw: object, *, seq: int, last_ack: int) -> tuple[RestoredEntry, ...]:
    if not isinstance(raw, list):
        raise SMStateError(f"SM state: 'unacked' must be a list, got {type(raw).__name__}")
    if len(raw) > MAX_UNACKED:
        raise SMStateError(f"SM state: {len(raw)} unacked stanzas (at most {MAX_UNACKED})")
    window = distance(last_ack, seq)
    entries: list[RestoredEntry] = []
    previous = 0
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise SMStateError(f"SM state: unacked[{index}] must be a dict")
        entry_seq = _counter(item, "seq")
        offset = distance(last_ack, entry_seq)
        if not 0 < offset <= window or offset <= previous:
            raise SMStateError(
                f"SM state: unacked[{index}] has seq {entry_seq}, outside the unacked window "
                f"({last_ack}, {seq}] or out of order"
            )
        previous = offset
        xml = item.get("xml")
        if not isinstance(xml, str) or not xml.startswith("<"):
            raise SMStateError(f"SM state: unacked[{index}].xml must be a stanza as XML text")
        refusal = restorable(xml)
        if refusal:
            raise SMStateError(f"SM state: unacked[{index}].xml {refusal}")
        message_id = _optional_str(item, "id")
        entries.append(RestoredEntry(entry_seq, xml, message_id))
    return tuple(entries)

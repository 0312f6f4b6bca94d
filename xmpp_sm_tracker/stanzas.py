"""XML in and out: the one place that knows namespaces and element shapes.

Parsers turn stanzas into plain facts (named tuples of strings) for the core;
builders turn the core's answers back into XML text. Nothing here decides what a
fact means, and nothing here does I/O: the plugin reads with these and writes
what they build.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

from slixmpp.xmlstream import tostring

__all__ = [
    "CARBONS_NS",
    "CLIENT_NS",
    "DELAY_NS",
    "FAILED_TAG",
    "FORWARD_NS",
    "HINTS_NS",
    "MARKERS_NS",
    "MUC_NS",
    "MUC_USER_NS",
    "RECEIPTS_NS",
    "REQUEST_ACK",
    "SID_NS",
    "SM_NS",
    "STANZAS_NS",
    "Bounce",
    "JoinSent",
    "PeerProof",
    "Reflection",
    "RoomPresence",
    "SentCarbon",
    "TrackedFields",
    "ack",
    "archived_ids",
    "complete_outgoing",
    "handled_count_too_high",
    "on_the_wire",
    "parse_counter",
    "parse_location",
    "read_bounce",
    "read_join",
    "read_peer_proofs",
    "read_reflection",
    "read_room_presence",
    "read_sent_carbon",
    "says_stanza_too_big",
    "stanza_kind",
    "stanza_size",
    "stream_error",
    "trackable_body",
    "with_delay",
]

CLIENT_NS = "jabber:client"
SM_NS = "urn:xmpp:sm:3"
SID_NS = "urn:xmpp:sid:0"
HINTS_NS = "urn:xmpp:hints"
CARBONS_NS = "urn:xmpp:carbons:2"
FORWARD_NS = "urn:xmpp:forward:0"
RECEIPTS_NS = "urn:xmpp:receipts"
MARKERS_NS = "urn:xmpp:chat-markers:0"
MUC_NS = "http://jabber.org/protocol/muc"
MUC_USER_NS = "http://jabber.org/protocol/muc#user"
STANZAS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
DELAY_NS = "urn:xmpp:delay"
_STREAMS_NS = "urn:ietf:params:xml:ns:xmpp-streams"

FAILED_TAG = f"{{{SM_NS}}}failed"
#: ``<r/>`` as text: queued as is, so no stanza is built every ``ack_every`` messages.
REQUEST_ACK = f"<r xmlns='{SM_NS}'/>"

_BODY = f"{{{CLIENT_NS}}}body"
_ERROR = f"{{{CLIENT_NS}}}error"
_MESSAGE = f"{{{CLIENT_NS}}}message"
_ORIGIN_ID = f"{{{SID_NS}}}origin-id"
_RECEIPT_REQUEST = f"{{{RECEIPTS_NS}}}request"
_RECEIPT = f"{{{RECEIPTS_NS}}}received"
_MARKABLE = f"{{{MARKERS_NS}}}markable"
_DISPLAYED = f"{{{MARKERS_NS}}}displayed"
_NO_STORE = f"{{{HINTS_NS}}}no-store"
_MUC_JOIN = f"{{{MUC_NS}}}x"
_MUC_USER = f"{{{MUC_USER_NS}}}x"
_DELAY = f"{{{DELAY_NS}}}delay"
_SENT_CARBON = f"{{{CARBONS_NS}}}sent/{{{FORWARD_NS}}}forwarded"
_FORWARDED_MESSAGE = f".//{{{FORWARD_NS}}}forwarded/{_MESSAGE}"

_UNSIGNED_INT = re.compile(r"[0-9]{1,10}")
_CLIENT_MESSAGE: Final = f'<message xmlns="{CLIENT_NS}"'


# ---------------------------------------------------------------- attributes


def parse_counter(value: str | None) -> int | None:
    """An ``h`` attribute as an int in [0, 2**32), or None when absent or malformed.

    Only ASCII digits: ``int()`` alone would take ``1_0`` or non-ASCII digits.
    """
    if value is None or not _UNSIGNED_INT.fullmatch(value):
        return None
    number = int(value)
    return number if number < 2**32 else None


def parse_location(location: str | None) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` from ``<enabled location>``; None if unusable."""
    if not location:
        return None
    host, sep, port = location.rpartition(":")
    if not sep or not _UNSIGNED_INT.fullmatch(port) or not 0 < int(port) < 65536:
        return None
    host = host.strip("[]")
    return (host, int(port)) if host else None


def _bare(jid: str) -> str:
    return jid.split("/", 1)[0]


# ---------------------------------------------------------------- outgoing messages


class TrackedFields(NamedTuple):
    """What the tracker keeps of an outgoing message (its text comes later)."""

    id: str
    origin_id: str
    to: str
    type: str
    body: str


def trackable_body(xml: ET.Element) -> str | None:
    """The body of an outgoing message that may be tracked; None for an error, a
    message without a body, or one with a ``<no-store/>`` hint."""
    if xml.get("type") == "error":
        return None
    body = xml.find(_BODY)
    text = body.text if body is not None else None
    if not text or xml.find(_NO_STORE) is not None:
        return None
    return text


def complete_outgoing(
    xml: ET.Element,
    body: str,
    new_id: str,
    *,
    add_origin_id: bool,
    request_receipts: bool,
    request_markers: bool,
) -> TrackedFields:
    """Complete a message to track, in place, and read what the tracker keeps of it:
    ``new_id`` when it has no id, an XEP-0359 origin-id equal to the id, and the
    XEP-0184 / XEP-0333 requests when asked for."""
    message_id = xml.get("id")
    if not message_id:
        message_id = new_id
        xml.set("id", message_id)
    origin = xml.find(_ORIGIN_ID)
    if origin is None and add_origin_id:
        origin = ET.SubElement(xml, _ORIGIN_ID, {"id": message_id})
    origin_id = origin.get("id", message_id) if origin is not None else message_id
    kind = xml.get("type", "normal")
    if kind in ("chat", "normal"):
        if request_receipts and xml.find(_RECEIPT_REQUEST) is None:
            ET.SubElement(xml, _RECEIPT_REQUEST)
        if request_markers and xml.find(_MARKABLE) is None:
            ET.SubElement(xml, _MARKABLE)
    return TrackedFields(message_id, origin_id, xml.get("to", ""), kind, body)


def on_the_wire(text: str) -> str:
    """A record's text as slixmpp writes a stanza: without the stream's default
    namespace, which the record keeps to be parsed on its own (a resend, a restart).
    The redundant declaration would cost the server time on every message."""
    if text.startswith(_CLIENT_MESSAGE):
        return "<message" + text[len(_CLIENT_MESSAGE) :]
    return text


def with_delay(xml: ET.Element, created_at: float) -> bool:
    """Stamp a message sent again with its original time (XEP-0203), in place; False
    when it already carries one."""
    if xml.find(_DELAY) is not None:
        return False
    stamp = datetime.fromtimestamp(created_at, UTC)
    text = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    ET.SubElement(xml, _DELAY, {"stamp": text})
    return True


def stanza_kind(xml: ET.Element) -> str:
    """``message``, ``presence``, ``iq`` (or another local name) of an element."""
    return xml.tag.rpartition("}")[2]


# ---------------------------------------------------------------- stream management


def ack(handled: int) -> str:
    """Our ``<a h>``."""
    return f"<a xmlns='{SM_NS}' h='{handled}'/>"


def says_stanza_too_big(error: ET.Element) -> bool:
    """A ``<stream:error>`` closing the stream on a stanza larger than the server
    accepts: ``<policy-violation/>`` with XEP-0205's ``<stanza-too-big/>`` (Prosody)
    or a text that says so (ejabberd: "XML stanza is too big")."""
    if error.find(f"{{{_STREAMS_NS}}}policy-violation") is None:
        return False
    if error.find("{urn:xmpp:errors}stanza-too-big") is not None:
        return True
    text = error.findtext(f"{{{_STREAMS_NS}}}text") or ""
    return "too big" in text.lower() or "too large" in text.lower()


def stanza_size(entry: Any) -> int:
    """Bytes of a counted stanza as written (a ledger entry's text, made once)."""
    if entry.serialized is None:
        entry.serialized = tostring(entry.payload.xml, top_level=True)
    return len(entry.serialized.encode())


def stream_error(condition: str, text: str) -> str:
    """A ``<stream:error>`` with a condition of RFC 6120 §4.9.3 and our reason."""
    return (
        f"<stream:error><{condition} xmlns='{_STREAMS_NS}'/>"
        f"<text xmlns='{_STREAMS_NS}'>{escape(text)}</text>"
        "</stream:error>"
    )


def handled_count_too_high(h: int, seq: int) -> str:
    """The stream error XEP-0198 §4 asks for when ``h`` acknowledges more than we sent."""
    return (
        "<stream:error><undefined-condition "
        "xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
        f"<handled-count-too-high xmlns='{SM_NS}' h='{h}' send-count='{seq}'/>"
        "</stream:error>"
    )


# ---------------------------------------------------------------- inbound facts


class Bounce(NamedTuple):
    """An error bounce of one of our messages (XEP-0198 does not cover refusals)."""

    id: str
    sender: str
    error_type: str
    condition: str
    text: str


class PeerProof(NamedTuple):
    """An XEP-0184 receipt or XEP-0333 marker: ``kind`` is delivered or displayed."""

    kind: str
    id: str
    sender: str


class Reflection(NamedTuple):
    """A groupchat message as the room sent it back, from ``nick``."""

    room: str
    nick: str
    id: str | None
    origin_id: str | None
    body: str | None
    history: bool


class SentCarbon(NamedTuple):
    """A message another client of ours sent (XEP-0280): the server already has it."""

    fields: TrackedFields
    xml: str


class RoomPresence(NamedTuple):
    """A presence from a room: ``error``, or our own occupant (status 110) with its codes."""

    room: str
    nick: str
    error: bool
    unavailable: bool
    codes: frozenset[str]
    new_nick: str | None


class JoinSent(NamedTuple):
    """Our join presence to a room on its way out."""

    room: str
    nick: str


def read_bounce(xml: ET.Element) -> Bounce | None:
    """A ``type="error"`` message answering one of ours (by id), or None."""
    message_id = xml.get("id")
    if xml.get("type") != "error" or not message_id:
        return None
    error = xml.find(_ERROR)
    error_type, condition, text = "cancel", "undefined-condition", ""
    if error is not None:
        error_type = error.get("type", "cancel")
        for child in error:
            if not child.tag.startswith(f"{{{STANZAS_NS}}}"):
                continue
            tag = child.tag.rpartition("}")[2]
            if tag == "text":
                text = child.text or ""
            else:
                condition = tag
    return Bounce(message_id, xml.get("from", ""), error_type, condition, text)


def read_reflection(xml: ET.Element) -> Reflection | None:
    """A groupchat message from an occupant (not the room itself), or None."""
    if xml.get("type") != "groupchat":
        return None
    room, _, nick = xml.get("from", "").partition("/")
    if not nick:
        return None
    body = xml.find(_BODY)
    origin = xml.find(_ORIGIN_ID)
    return Reflection(
        room,
        nick,
        xml.get("id"),
        origin.get("id") if origin is not None else None,
        body.text if body is not None else None,
        xml.find(_DELAY) is not None,
    )


def read_sent_carbon(xml: ET.Element, own_bare: str) -> SentCarbon | None:
    """A sent carbon from our own account with a body and an id, or None."""
    if _bare(xml.get("from", "")) != own_bare:
        return None
    forwarded = xml.find(_SENT_CARBON)
    if forwarded is None:
        return None
    inner = forwarded.find(_MESSAGE)
    if inner is None:
        return None
    body = inner.find(_BODY)
    message_id = inner.get("id")
    if body is None or not body.text or not message_id:
        return None
    origin = inner.find(_ORIGIN_ID)
    fields = TrackedFields(
        message_id,
        origin.get("id", message_id) if origin is not None else message_id,
        inner.get("to", ""),
        inner.get("type", "normal"),
        body.text,
    )
    return SentCarbon(fields, tostring(inner, top_level=True))


def read_peer_proofs(xml: ET.Element) -> list[PeerProof]:
    """Receipts and markers a chat message carries (usually none)."""
    proofs: list[PeerProof] = []
    sender = xml.get("from", "")
    for tag, kind in ((_RECEIPT, "delivered"), (_DISPLAYED, "displayed")):
        element = xml.find(tag)
        if element is not None and element.get("id"):
            proofs.append(PeerProof(kind, element.get("id", ""), sender))
    return proofs


def read_join(xml: ET.Element) -> JoinSent | None:
    """Our own outgoing presence, when it joins a room (MUC ``<x/>``, available)."""
    if xml.find(_MUC_JOIN) is None or xml.get("type") not in (None, "available"):
        return None
    room, _, nick = xml.get("to", "").partition("/")
    return JoinSent(room, nick) if nick else None


def read_room_presence(xml: ET.Element) -> RoomPresence | None:
    """An error presence from a room, or our own occupant presence (status 110)."""
    room, _, nick = xml.get("from", "").partition("/")
    if xml.get("type") == "error":
        return RoomPresence(room, nick, True, False, frozenset(), None)
    muc = xml.find(_MUC_USER)
    if muc is None:
        return None
    codes = frozenset(
        code for status in muc.findall(f"{{{MUC_USER_NS}}}status") if (code := status.get("code"))
    )
    if "110" not in codes:
        return None
    item = muc.find(f"{{{MUC_USER_NS}}}item")
    new_nick = item.get("nick") if item is not None else None
    return RoomPresence(room, nick, False, xml.get("type") == "unavailable", codes, new_nick)


def archived_ids(result: ET.Element, own_bare: str | None) -> tuple[str | None, str | None]:
    """(origin-id, id) of the message an XEP-0313 result carries; ``own_bare`` keeps
    only messages we sent (None: a room's archive, where the sender is a nick)."""
    inner = result.find(_FORWARDED_MESSAGE)
    if inner is None:
        return None, None
    if own_bare is not None and _bare(inner.get("from", "")) != own_bare:
        return None, None
    origin = inner.find(_ORIGIN_ID)
    return (origin.get("id") if origin is not None else None), inner.get("id")

"""What the ledger keeps of a stanza it counted, until the server acks it.

The slixmpp stanza object of a message weighs about 1.5 KB; what a resend and a saved
SM state need of a tracked message once it is written is its text, which the record
holds anyway. So a written tracked message stays in the ledger as :class:`SentText`
(the same string as the record's, no copy), and becomes a stanza again only for an
app that listens to stanza events (``stanza_acked``, ``stanza:*``), parsed when the
event goes out. Other stanzas (presences, iqs, messages another filter may rewrite)
keep their object.
"""

from __future__ import annotations

from typing import Any, TypeAlias
from xml.etree import ElementTree as ET

from slixmpp.stanza import Message
from slixmpp.xmlstream import StanzaBase, tostring

from . import stanzas
from .core.ledger import Entry

__all__ = ["Payload", "SentText", "as_stanza", "entry_text", "wire_text"]


class SentText:
    """A tracked message as it was written (with the stream's namespace declared).

    A plain slotted class, never changed once made: one is made per message, and a
    frozen dataclass's ``__init__`` goes through ``object.__setattr__``."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"SentText({self.text!r})"


#: A ledger entry's payload in the plugin.
Payload: TypeAlias = StanzaBase | SentText


def as_stanza(payload: Payload, xmpp: Any) -> StanzaBase:
    """The payload as a slixmpp stanza (a new one, parsed from the text, for SentText)."""
    if isinstance(payload, SentText):
        return Message(xmpp, xml=ET.fromstring(payload.text))
    return payload


def entry_text(entry: Entry[Payload]) -> str:
    """An entry's stanza as text on its own (stream namespace declared), made once."""
    if entry.serialized is None:
        payload = entry.payload
        if isinstance(payload, SentText):
            entry.serialized = payload.text
        else:
            entry.serialized = tostring(payload.xml, top_level=True)
    return entry.serialized


def wire_text(entry: Entry[Payload], xmpp: Any) -> str:
    """An entry's stanza as slixmpp writes it on the stream (a resend)."""
    payload = entry.payload
    if entry.serialized is not None or isinstance(payload, SentText):
        return stanzas.on_the_wire(entry_text(entry))
    text: str = tostring(payload.xml, xmlns=xmpp.default_ns, stream=xmpp, top_level=True)
    return text

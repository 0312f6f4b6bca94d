"""The SM state between the core and slixmpp: stanzas to text for ``sm.cache``, and a
saved state checked completely and back to stanzas for ``sm.load``."""

from __future__ import annotations

import logging
import time
from typing import Any
from xml.etree import ElementTree as ET

from slixmpp.jid import JID, InvalidJID
from slixmpp.stanza import Iq, Message, Presence
from slixmpp.xmlstream import StanzaBase, tostring

from . import stanzas
from .core.ledger import Entry
from .core.smstate import SMStateError, parse_state
from .core.tracker import Tracker

__all__ = ["StateBridge"]

log = logging.getLogger(__name__)


class StateBridge:
    """``export`` and ``load`` for :class:`~.smhooks.SMStateHooks`."""

    def __init__(self, xmpp: Any, core: Tracker[StanzaBase]) -> None:
        self.xmpp = xmpp
        self.core = core

    def export(self) -> dict[str, Any] | None:
        return self.core.export_state(_serialize_entry, now=time.time())

    def load(self, state: object) -> None:
        """Check a saved state completely, then install it; on error stay fresh."""
        if self.xmpp.transport is not None or self.core.counting_out:
            raise SMStateError("sm.load() must be called before connect()")
        try:
            restored = parse_state(state, bare_jid=self.xmpp.boundjid.bare)
            _check_jids(restored.jid, *restored.rooms)
            payloads = [self._stanza_from_xml(entry.xml) for entry in restored.unacked]
        except SMStateError as exc:
            log.warning("not resuming from the saved SM state: %s", exc)
            raise
        self.core.restore(restored, payloads)
        # Not the stream id: whoever reads the log could resume the stream with it.
        log.info("loaded a saved SM state: %d unacked stanzas to resume", len(payloads))

    def _stanza_from_xml(self, xml: str) -> StanzaBase:
        try:
            element = ET.fromstring(xml)
        except ET.ParseError as exc:
            raise SMStateError(f"SM state: an unacked stanza is not valid XML ({exc})") from exc
        kind = stanzas.stanza_kind(element)
        stanza_class = {"message": Message, "presence": Presence, "iq": Iq}.get(kind)
        if stanza_class is None:
            raise SMStateError(f"SM state: <{kind}> is not a stanza that can be resent")
        stanza: StanzaBase = stanza_class(self.xmpp, xml=element)
        return stanza


def _check_jids(*jids: str) -> None:
    """JIDs slixmpp would refuse later, half-way through a resumption, refused now."""
    for jid in jids:
        try:
            JID(jid)
        except InvalidJID as exc:
            raise SMStateError(f"SM state: {jid!r} is not a valid JID ({exc})") from exc


def _serialize_entry(entry: Entry[StanzaBase]) -> str:
    """A stanza's text, made once (the entry keeps it)."""
    if entry.serialized is None:
        entry.serialized = tostring(entry.payload.xml, top_level=True)
    return entry.serialized

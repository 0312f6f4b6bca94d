"""How the SQL stores keep the SM state: tracked stanzas by reference to their rows.

Every unacked tracked message is in the records table already, with its text. Saved
again in the state, that text was most of each hand-over: 5 000 unacked stanzas made
1.5 MB of JSON (7 ms to encode) written on every ``sm.cache`` call. So an entry whose
record row the store committed, in flight, with the very same text is left out, and
only its place, seq and id are kept; on load its text is read back from the row.
Everything else keeps its text: stanzas without a record (presences, chat states), a
message whose row is not written yet or holds another text, an entry with more or
less than ``seq``, ``xml`` and ``id``. :class:`~.sqlite.SQLiteStore` and
:class:`~.postgres.PostgresStore` both keep their states this way.

A state with references is kept as the JSON array ``[state, references]``, so nothing
an app saved can pass for one: a state is always a JSON object. A row rewritten after
the save (a resend, stamped with its first time) gives its newer text: the same
message, which receivers deduplicate by its ids. An in-flight row is only deleted on
purpose (``delete``): a reference whose row is gone by the next load loses that
stanza, and the load says so.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any, Final

from ..core.records import TrackedMessage
from ..core.states import IN_FLIGHT
from .base import ErrorFn, SMState, saved_json, sm_state_of_text, sm_state_text

__all__ = ["TEXTS_PER_QUERY", "compact_state_text", "remember_committed", "state_of_saved_text"]

log = logging.getLogger(__name__)

#: Ids looked up per query on load (well under SQLite's limit on parameters).
TEXTS_PER_QUERY: Final = 500


def remember_committed(rows: dict[str, TrackedMessage], records: Iterable[TrackedMessage]) -> None:
    """Keep in ``rows`` (id -> record) the in-flight snapshots of ``records`` just
    committed; forget the settled ones (an acked row may be deleted at any time)."""
    for record in records:
        if record.state in IN_FLIGHT:
            rows[record.id] = record
        else:
            rows.pop(record.id, None)


def compact_state_text(state: SMState, rows: Mapping[str, TrackedMessage], error: ErrorFn) -> str:
    """The text to keep for ``state``: the unacked stanzas that ``rows`` (id -> the
    in-flight record committed for it) holds word for word left out, their places,
    seqs and ids in three flat lists (one list per entry would cost as much to encode
    as the text it saves)."""
    unacked = state.get("unacked")
    if not rows or type(unacked) is not list:
        return sm_state_text(state, error)
    kept: list[Any] = []
    at: list[int] = []
    seqs: list[Any] = []
    ids: list[str] = []
    committed = rows.get
    for position, item in enumerate(unacked):
        if type(item) is dict and len(item) == 3:
            message_id = item.get("id")
            row = committed(message_id) if type(message_id) is str else None
            if row is not None and "seq" in item and item.get("xml") == row.xml:
                at.append(position)
                seqs.append(item["seq"])
                ids.append(row.id)  # the key it was found by
                continue
        kept.append(item)
    if not at:
        return sm_state_text(state, error)
    compact: SMState = {**state, "unacked": kept}
    return sm_state_text([compact, {"at": at, "seq": seqs, "id": ids}], error)


async def state_of_saved_text(
    text: str,
    texts_of: Callable[[Sequence[str]], Awaitable[Mapping[str, str]]],
    error: ErrorFn,
) -> SMState:
    """The state :func:`compact_state_text` kept, whole again: ``texts_of(ids)`` reads
    the rows' texts (at most :data:`TEXTS_PER_QUERY` ids a call). A state kept whole
    (or by an older version) comes back as it is."""
    if not text.startswith("["):
        return sm_state_of_text(text, error)
    state, at, seqs, ids = _checked(saved_json(text, error), error)
    texts: dict[str, str] = {}
    for start in range(0, len(ids), TEXTS_PER_QUERY):
        texts.update(await texts_of(ids[start : start + TEXTS_PER_QUERY]))
    kept: list[Any] = state["unacked"]
    whole: list[Any] = []
    taken = lost = 0
    for index, (place, seq, message_id) in enumerate(zip(at, seqs, ids, strict=True)):
        before = place - index  # kept entries that were before this one
        whole.extend(kept[taken:before])
        taken = before
        xml = texts.get(message_id)
        if xml is None:
            lost += 1
        else:
            whole.append({"seq": seq, "xml": xml, "id": message_id})
    whole.extend(kept[taken:])
    if lost:
        log.warning(
            "%d unacked stanza%s of the saved SM state cannot be resent: the record "
            "was deleted after the state was saved",
            lost,
            "" if lost == 1 else "s",
        )
    return {**state, "unacked": whole}


def _checked(saved: object, error: ErrorFn) -> tuple[SMState, list[int], list[Any], list[str]]:
    """(state, places, seqs, ids) as :func:`compact_state_text` writes them, or ``error``."""
    if type(saved) is list and len(saved) == 2:
        state, refs = saved
        if type(state) is dict and type(state.get("unacked")) is list and type(refs) is dict:
            at, seqs, ids = refs.get("at"), refs.get("seq"), refs.get("id")
            if (
                type(at) is list
                and type(seqs) is list
                and type(ids) is list
                and len(at) == len(seqs) == len(ids) > 0
                and all(type(p) is int for p in at)
                and all(a < b for a, b in pairwise(at))
                and at[0] >= 0
                and at[-1] < len(state["unacked"]) + len(at)
                and all(type(i) is str for i in ids)
            ):
                return state, at, seqs, ids
    raise error("the saved SM state is not one this store wrote", None)

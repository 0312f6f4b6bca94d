"""The SQL stores keep the SM state's tracked stanzas by reference to their record rows.

Every unacked tracked message is in the records table with its text; the state's copy
of that text is the bulk of each hand-over. What the store may leave out and read back
must come back exactly; what it cannot prove it has (no row, another text, an odd
entry) stays in the state as it was given. Each test runs on SQLiteStore and on
PostgresStore.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_sm_tracker import DeliveryState, SQLiteStore, StoreError
from xmpp_sm_tracker.stores.postgres import PostgresDatabase, PostgresStore
from xmpp_sm_tracker.stores.postgres_schema import SM_STATE
from xmpp_sm_tracker.stores.sqlite import SQLiteDatabase
from xmpp_sm_tracker.stores.state_refs import compact_state_text, state_of_saved_text

from .test_store_contract import record

S = DeliveryState
PRESENCE = "<presence xmlns='jabber:client'><show>away</show></presence>"
XMLS = ["<message id='a'/>", "<message id='b'><body>\"ü\"</body></message>", PRESENCE]


def state_of(*entries: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "jid": "alice@example.org/phone",
        "stream_id": "s1",
        "handled": 3,
        "seq": 40,
        "last_ack": 10,
        "unacked": list(entries),
        "rooms": {},
        "saved_at": 1.5,
    }


def entry(seq: int, xml: str, message_id: str | None) -> dict[str, Any]:
    return {"seq": seq, "xml": xml, "id": message_id}


class Kept:
    """One SQL store kind: a store of the test's account (a new one each call, as a new
    process opens it), its saved text read and overwritten behind its back, and a
    database shared by two accounts."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self.path = tmp_path / "t.sqlite"
        self.dsn = str(request.getfixturevalue("postgres_dsn")) if kind == "postgres" else ""
        self.account = f"{uuid.uuid4().hex}@example.org" if kind == "postgres" else ""

    def store(self) -> SQLiteStore | PostgresStore:
        if self.kind == "postgres":
            return PostgresStore(self.dsn, account=self.account)
        return SQLiteStore(self.path)

    @asynccontextmanager
    async def database(self) -> AsyncIterator[SQLiteDatabase | PostgresDatabase]:
        shared = PostgresDatabase(self.dsn) if self.kind == "postgres" else None
        async with shared or SQLiteDatabase(self.path) as database:
            yield database

    async def saved_text(self, account: str | None = None) -> str:
        account = self.account if account is None else account
        if self.kind == "postgres":
            conn = await asyncpg.connect(self.dsn)
            try:
                sql = f"SELECT state FROM {SM_STATE} WHERE account = $1"
                return str(await conn.fetchval(sql, account))
            finally:
                await conn.close()
        db = sqlite3.connect(self.path)
        try:
            rows = db.execute("SELECT state FROM sm_state WHERE account = ?", (account,))
            return str(rows.fetchall()[0][0])
        finally:
            db.close()

    async def overwrite(self, text: str) -> None:
        if self.kind == "postgres":
            conn = await asyncpg.connect(self.dsn)
            try:
                sql = f"UPDATE {SM_STATE} SET state = $2 WHERE account = $1"
                await conn.execute(sql, self.account, text)
            finally:
                await conn.close()
            return
        db = sqlite3.connect(self.path)
        with db:
            db.execute("UPDATE sm_state SET state = ?", (text,))
        db.close()


@pytest.fixture(params=["sqlite", "postgres"])
def kept(request: pytest.FixtureRequest, tmp_path: Path) -> Kept:
    return Kept(request.param, tmp_path, request)


async def test_tracked_stanzas_are_kept_once_and_come_back_whole(kept: Kept) -> None:
    records = [record(n) for n in range(3)]
    state = state_of(
        entry(11, records[0].xml, "m0"),
        entry(12, PRESENCE, None),
        entry(13, records[1].xml, "m1"),
        entry(14, records[2].xml, "m2"),
    )
    async with kept.store() as store:
        await store.upsert(records)
        await store.save_sm_state(state)
        assert await store.load_sm_state() == state
    text = await kept.saved_text()
    for r in records:
        assert json.dumps(r.xml)[1:-1] not in text  # by reference: the row has it
    assert json.dumps(PRESENCE)[1:-1] in text  # no row: the text itself
    async with kept.store() as again:
        assert await again.load_sm_state() == state  # a new process gets it whole


async def test_only_a_committed_row_with_the_same_text_stands_in(kept: Kept) -> None:
    written, unwritten = record(1), record(2)
    rewritten = written.moved(S.SENT, 5.0, xml="<message xmlns='jabber:client' id='m1'/>")
    state = state_of(
        entry(11, rewritten.xml, "m1"),  # the row holds another text
        entry(12, unwritten.xml, "m2"),  # no row yet
        entry(13, written.xml, "m3"),  # another message's id
    )
    async with kept.store() as store:
        await store.upsert([written])
        await store.save_sm_state(state)
        assert await store.load_sm_state() == state
    text = await kept.saved_text()
    assert json.dumps(rewritten.xml)[1:-1] in text
    assert json.dumps(unwritten.xml)[1:-1] in text


async def test_a_row_another_process_committed_keeps_its_text(kept: Kept) -> None:
    """A store points only at rows it committed itself: another process's are not known
    to be there (they may be rewritten or deleted by it)."""
    r = record(1)
    state = state_of(entry(11, r.xml, "m1"))
    async with kept.store() as first:
        await first.upsert([r])
    async with kept.store() as second:
        await second.save_sm_state(state)
        assert await second.load_sm_state() == state
    assert json.dumps(r.xml)[1:-1] in await kept.saved_text()


async def test_a_settled_record_is_not_referred_to(kept: Kept) -> None:
    """An acked or failed row may be deleted at any time: its stanza keeps its text."""
    sent = record(1)
    state = state_of(entry(11, sent.xml, "m1"))
    async with kept.store() as store:
        await store.upsert([sent])
        await store.upsert([sent.moved(S.FAILED, 6.0)])
        await store.save_sm_state(state)
        assert await store.delete_failed() == 1
        assert await store.load_sm_state() == state


async def test_odd_entries_are_kept_as_given(kept: Kept) -> None:
    r = record(1)
    odd: list[Any] = [
        {"seq": 11, "xml": r.xml, "id": "m1", "extra": True},  # more than we know
        {"seq": 12, "xml": r.xml},  # no id
        [13, "m1"],  # looks like a reference, given by the app
        "text",
        None,
    ]
    async with kept.store() as store:
        await store.upsert([r])
        for state in (state_of() | {"unacked": odd}, state_of() | {"unacked": "x"}, {"v": 1}):
            await store.save_sm_state(state)
            assert await store.load_sm_state() == state


async def test_a_row_deleted_since_drops_its_stanza_with_a_warning(
    kept: Kept, caplog: pytest.LogCaptureFixture
) -> None:
    records = [record(n) for n in range(3)]
    state = state_of(*(entry(11 + n, r.xml, r.id) for n, r in enumerate(records)))
    async with kept.store() as store:
        await store.upsert(records)
        await store.save_sm_state(state)
        assert await store.delete("m1")
        with caplog.at_level(logging.WARNING, logger="xmpp_sm_tracker"):
            loaded = await store.load_sm_state()
    assert loaded == state | {"unacked": [state["unacked"][0], state["unacked"][2]]}
    assert "1 unacked stanza" in caplog.text and "deleted" in caplog.text
    assert records[1].body not in caplog.text


async def test_a_deleted_row_is_not_referred_to_by_the_next_save(kept: Kept) -> None:
    r = record(1)
    state = state_of(entry(11, r.xml, "m1"))
    async with kept.store() as store:
        await store.upsert([r])
        assert await store.delete("m1")
        await store.save_sm_state(state)
        assert await store.load_sm_state() == state
    assert json.dumps(r.xml)[1:-1] in await kept.saved_text()


async def test_accounts_refer_only_to_their_own_rows(kept: Kept) -> None:
    names = [f"{who}-{uuid.uuid4().hex[:8]}@example.org" for who in ("alice", "bob")]
    async with kept.database() as database:
        alice, bob = (database.store(name) for name in names)
        try:
            r = record(1)
            await alice.upsert([r])
            state = state_of(entry(11, r.xml, "m1"))
            await bob.save_sm_state(state)  # bob has no row m1: the text stays
            await alice.save_sm_state(state)
            await alice.delete("m1")
            assert await bob.load_sm_state() == state
            assert json.dumps(r.xml)[1:-1] not in await kept.saved_text(names[0])
        finally:
            await alice.aclose()
            await bob.aclose()


async def test_a_saved_state_that_is_not_json_safe_is_still_refused(kept: Kept) -> None:
    r = record(1)
    async with kept.store() as store:
        await store.upsert([r])
        bad = state_of(entry(11, r.xml, "m1")) | {"ratio": float("nan")}
        with pytest.raises(Exception, match="not JSON-safe"):
            await store.save_sm_state(bad)


BAD_TEXTS = [
    '[{"unacked":[]},{"at":[1],"seq":[1],"id":["m1"]}]',  # a place beyond the list
    '[{"unacked":[]},{"at":[0,0],"seq":[1,2],"id":["m1","m2"]}]',  # a place twice
    '[{"unacked":[]},{"at":[0],"seq":[1],"id":[7]}]',  # an id that is not text
    '[{"unacked":[]},{"at":[0],"seq":[],"id":["m1"]}]',  # lists that do not match
    '[{"unacked":[]},{"at":[-1],"seq":[1],"id":["m1"]}]',
    '[{"unacked":{}},{"at":[0],"seq":[1],"id":["m1"]}]',
    '[{"unacked":[]},{"at":[],"seq":[],"id":[]}]',
    '[{"unacked":[]},[0]]',
    "[1,2]",
    "[]",
]


async def test_a_kept_state_this_store_did_not_write_is_a_clear_error(kept: Kept) -> None:
    async with kept.store() as store:
        await store.save_sm_state({"version": 1})
    for text in BAD_TEXTS:
        await kept.overwrite(text)
        async with kept.store() as store:
            with pytest.raises(StoreError, match="not one this store wrote"):
                await store.load_sm_state()


ENTRY_IDS = st.sampled_from(["m0", "m1", "m2", "m3"])
ENTRIES = st.one_of(
    st.fixed_dictionaries(
        {"seq": st.integers(0, 2**32 - 1), "xml": st.sampled_from(XMLS), "id": ENTRY_IDS}
    ),
    st.fixed_dictionaries(
        {"seq": st.integers(0, 9), "xml": st.sampled_from(XMLS), "id": st.none()}
    ),
    st.lists(st.one_of(st.integers(), ENTRY_IDS), max_size=3),
    st.dictionaries(st.sampled_from(["seq", "xml", "id", "x"]), st.sampled_from(XMLS), max_size=4),
)


@given(
    unacked=st.lists(ENTRIES, max_size=12),
    rows=st.dictionaries(ENTRY_IDS, st.sampled_from(XMLS), max_size=4),
)
def test_whatever_is_kept_comes_back_as_it_was(unacked: list[Any], rows: dict[str, str]) -> None:
    """Any unacked list, against any committed rows: what load gives is what was saved,
    and every entry a row holds word for word is kept by reference."""
    state = state_of() | {"unacked": unacked}
    records = {mid: replace(record(0), id=mid, xml=xml) for mid, xml in rows.items()}
    text = compact_state_text(state, records, _error)
    lookups: list[list[str]] = []

    async def texts_of(ids: Sequence[str]) -> dict[str, str]:
        lookups.append(list(ids))
        return {mid: rows[mid] for mid in ids if mid in rows}

    assert asyncio.run(state_of_saved_text(text, texts_of, _error)) == state
    referred = sum(
        1
        for item in unacked
        if type(item) is dict
        and set(item) == {"seq", "xml", "id"}
        and item["id"] in rows
        and rows[item["id"]] == item["xml"]
    )
    assert sum(map(len, lookups)) == referred


def _error(what: str, exc: BaseException | None = None) -> StoreError:
    return StoreError(what)

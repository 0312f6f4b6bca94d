"""One owner per account: leases in PostgreSQL, renewed while the owner lives.

XEP-0198 lets anyone holding the SM state resume a stream, so two processes holding one
account would fight over its stream and write over each other's records. A lease row per
account says who owns it and until when, by the database's clock. The owner renews all
its leases in one statement every third of ``lease_ttl``; a process killed outright (or
cut off from the database) loses them ``lease_ttl`` after its last renewal, and a standby
takes them over. Every write checks its lease in its own transaction (``FOR SHARE``, so a
takeover waits for it), so a process that lost an account never writes to it again.

An owner that cannot renew in time treats its leases as lost at its own deadline (counted
from the moment it sent the last renewal that succeeded, so always before the database
lets a standby in) and tells its stores, whose tracker then stops touching the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import AccountLeased, LeaseLost, StoreError
from .postgres_schema import LEASES

if TYPE_CHECKING:
    from .postgres_db import PostgresDatabase

__all__ = ["AccountLeased", "LeaseKeeper", "LeaseLost"]

log = logging.getLogger(__name__)

_TAKE = f"""
INSERT INTO {LEASES} AS lease (account, owner, token, expires_at)
VALUES ($1, $2, 1, now() + make_interval(secs => $3))
ON CONFLICT (account) DO UPDATE
    SET owner = excluded.owner, token = lease.token + 1, expires_at = excluded.expires_at
    WHERE lease.expires_at <= now() OR lease.owner = excluded.owner
RETURNING token
"""
_HOLDER = f"""
SELECT owner, GREATEST(EXTRACT(EPOCH FROM expires_at - now()), 0)::float8
FROM {LEASES} WHERE account = $1
"""
# Only the leases we hold, by token, that have not lapsed or been given back (checked
# when the row is reached: a give-back committed while this waited for the row stays).
_RENEW = f"""
UPDATE {LEASES} AS lease SET expires_at = now() + make_interval(secs => $2)
FROM unnest($3::text[], $4::bigint[]) AS mine (account, token)
WHERE lease.owner = $1 AND lease.account = mine.account AND lease.token = mine.token
    AND lease.expires_at > clock_timestamp()
RETURNING lease.account, lease.token
"""
_GIVE_BACK = f"""
UPDATE {LEASES} AS lease SET expires_at = now()
FROM unnest($2::text[], $3::bigint[]) AS mine (account, token)
WHERE lease.owner = $1 AND lease.account = mine.account AND lease.token = mine.token
"""
#: Run first in every write transaction: the lease must still be ours, and stays so
#: until the transaction ends.
FENCE = f"SELECT 1 FROM {LEASES} WHERE account = $1 AND owner = $2 AND token = $3 FOR SHARE"


class LeaseKeeper:
    """The leases of one database's stores: taking, renewing, giving back."""

    def __init__(self, database: PostgresDatabase, owner: str, ttl: float) -> None:
        self.database = database
        self.owner = owner
        self.ttl = ttl
        self._tokens: dict[str, int] = {}
        self._taking: set[str] = set()  # accounts whose take is on its way
        self._lost: dict[str, Callable[[LeaseLost], None]] = {}
        #: time.monotonic() by which each lease must be renewed: sent_at + ttl of the last
        #: take or renewal that worked, before the database's own expiry.
        self._deadlines: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    async def take(self, account: str, on_lost: Callable[[LeaseLost], None]) -> int:
        """Take ``account``'s lease, or raise :class:`AccountLeased` naming who has it."""
        if account in self._tokens or account in self._taking:
            # The database cannot tell two stores of one owner apart: the second take
            # would succeed and the two would give back and lose each other's lease.
            raise StoreError(f"{account} already has a store holding its lease in {self.owner}")
        sent_at = time.monotonic()
        self._taking.add(account)
        try:
            rows = await self.database.transaction(
                f"taking the lease of {account}",
                lambda conn: conn.fetch(_TAKE, account, self.owner, self.ttl),
            )
        finally:
            self._taking.discard(account)
        if not rows:
            holder = await self.database.read(_HOLDER, account)
            who, left = (holder[0][0], holder[0][1]) if holder else ("someone", 0.0)
            raise AccountLeased(
                f"{account} is owned by {who} (its lease runs {left:.1f} s more unless "
                "renewed): a store attaches only to an account no live process owns"
            )
        token = int(rows[0][0])
        self._tokens[account] = token
        self._deadlines[account] = sent_at + self.ttl
        self._lost[account] = on_lost
        if self._task is None or self._task.done():  # it ends when the last lease goes
            self._task = asyncio.get_running_loop().create_task(self._renew_forever())
        return token

    async def wait_and_take(
        self,
        account: str,
        on_lost: Callable[[LeaseLost], None],
        poll: float,
        stop: asyncio.Event,
    ) -> int | None:
        """Take the lease as soon as it is free or lapsed (a standby's wait); None once
        ``stop`` is set (the store closed while it waited)."""
        while not stop.is_set():
            try:
                return await self.take(account, on_lost)
            except AccountLeased:
                pass
            except StoreError as exc:  # the database away for a moment: keep waiting
                log.warning("a standby for %s keeps waiting: %s", account, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll)
        return None

    async def give_back(self, account: str, token: int) -> None:
        """Let the lease ``token`` of ``account`` go now, so a standby need not wait for
        it to lapse (a lease taken since, with a newer token, stays; one lost, or given
        back already with all the others, is not ours to give)."""
        if self._tokens.get(account) != token:
            return
        self.forget(account, token)
        await self._give_back(f"giving back the lease of {account}", {account: token})

    async def _give_back(self, what: str, leases: dict[str, int]) -> None:
        accounts, tokens = list(leases), list(leases.values())
        try:
            await self.database.transaction(
                what, lambda conn: conn.execute(_GIVE_BACK, self.owner, accounts, tokens)
            )
        except StoreError as exc:
            log.warning("%s; it lapses by itself in at most %.0f s", exc, self.ttl)

    def forget(self, account: str, token: int) -> None:
        """Stop renewing a lease another process has taken (a write was refused)."""
        if self._tokens.get(account) == token:
            del self._tokens[account]
            self._lost.pop(account, None)
            self._deadlines.pop(account, None)

    async def _renew_forever(self) -> None:
        while self._tokens:
            now = time.monotonic()
            wake = min(now + self.ttl / 3, *self._deadlines.values())
            await asyncio.sleep(max(0.0, wake - now))
            # A deadline that came while renewals failed: let go now, not at the next try.
            now = time.monotonic()
            overdue = [a for a, deadline in self._deadlines.items() if deadline <= now]
            self._lose(overdue, "could not renew the lease in time")
            if self._tokens:
                await self._renew()

    async def _renew(self) -> None:
        sent_at = time.monotonic()
        sent = dict(self._tokens)
        accounts, tokens = list(sent), list(sent.values())
        deadline = min(self._deadlines[account] for account in sent)
        renewing = asyncio.get_running_loop().create_task(
            self.database.transaction(
                "renewing leases",
                lambda conn: conn.fetch(_RENEW, self.owner, self.ttl, accounts, tokens),
            )
        )
        try:
            # Not wait_for: it waits for the cancelled renewal to end, and cancelling a
            # query the server cannot be reached for may take long past the deadline.
            await asyncio.wait({renewing}, timeout=max(0.0, deadline - sent_at))
        except asyncio.CancelledError:
            renewing.cancel()
            raise
        if not renewing.done():
            renewing.cancel()
            renewing.add_done_callback(_retrieve)
            log.warning("renewing leases: no answer by the deadline")
            return  # _renew_forever lets the overdue leases go at once
        failure = renewing.exception()
        if failure is not None:
            if not isinstance(failure, Exception):
                raise failure
            log.warning("renewing leases failed, trying again: %s", failure)
            return
        renewed = {(str(row[0]), int(row[1])) for row in renewing.result()}
        # A lease given back or taken again while this renewal was on its way is not the
        # one it renewed: only a lease still held by the token sent can be gone.
        gone = []
        for account, token in sent.items():
            if self._tokens.get(account) != token:
                continue
            if (account, token) in renewed:
                self._deadlines[account] = max(self._deadlines[account], sent_at + self.ttl)
            else:
                gone.append(account)
        self._lose(gone, "another process took it over")

    def _lose(self, accounts: list[str], why: str) -> None:
        for account in accounts:
            token = self._tokens.get(account)
            if token is None:
                continue
            on_lost = self._lost[account]
            self.forget(account, token)
            error = LeaseLost(f"lost the lease of {account}: {why}")
            log.error("%s; stopping its tracker", error)
            try:
                on_lost(error)
            except Exception:
                log.exception("a lease-lost callback for %s failed", account)

    async def aclose(self) -> None:
        """Stop renewing and give back every lease, all in one statement (a database
        that does not answer costs one command_timeout at exit, not one per account)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        leases, self._tokens = self._tokens, {}
        self._lost.clear()
        self._deadlines.clear()
        if leases:
            await self._give_back(f"giving back {len(leases)} leases", leases)


def _retrieve(task: asyncio.Task[object]) -> None:
    """Fetch the outcome of a renewal given up on, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()

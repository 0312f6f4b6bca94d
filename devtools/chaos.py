"""Randomized fault schedules on a real server, with the delivery invariants checked.

Run with ``./scripts/chaos --schedules N --seed S`` (or ``python -m
devtools.chaos`` from the repository root). For every seeded schedule, alice -- a separate process
using an :class:`~xmpp_sm_tracker.SQLiteStore`, so that she can be SIGKILLed and
restarted from her file -- sends a stream of messages to bob and to a room while
the harness cuts, stalls, blackholes and refuses her link, restarts the server under
her, and kills her. Then everything heals and settles, and the invariants are
checked against her SQLite file and what bob (a plain client) saw:

* every tracked message is ``acked``, ``room_received`` or ``failed``
  (``delivered``/``displayed`` count as more than acked);
* every message bob received, alone or through the room, is recorded as at least
  ``acked`` -- checked after one ``tracker.resend_failed()`` pass, whose archive
  check turns "failed but the server had it" into ``acked``;
* nothing reaches bob twice unless the resend pass sent it again (stream
  resumption must never duplicate; a resend may, and the receiver drops it by its
  origin-id);
* no record is lost: every message the sender was told was stored is in the file;
* what the tracker recorded as failed and never written (no sequence number) did
  not reach bob before it was resent (unless the sender was SIGKILLed, which may
  lose its last writes): such a message skips the archive check and arrives twice.

The faults, each for a drawn ``duration``:

* ``cut``: both ends of alice's link are reset;
* ``stall``: nothing moves either way, then everything held is delivered in order
  (a hung link);
* ``blackhole``: everything is swallowed, then the connection is reset (a dead
  route; TCP never delivers bytes past a gap, so the link is not healed as is);
* ``refuse``: the link drops and new connections are reset (the server is
  unreachable), sometimes for longer than the server's hibernation time;
* ``restart``: the server stops (SIGTERM, or SIGKILL when ``hard``) and starts again:
  sessions, archives (in memory in the test server) and rooms are gone;
* ``kill``: alice's process is SIGKILLed; a new one starts from her SQLite file
  (records and SM state), resumes if it still can, and sends the rest.

With ``--store postgres`` alice keeps her records and SM state in a
:class:`~xmpp_sm_tracker.stores.postgres.PostgresStore` instead (a private PostgreSQL
cluster, a fresh database per schedule, the DSN handed to her processes in the
environment, never on a command line), and a ``kill`` is a **failover**: the next
process starts at once, as a standby, and waits in ``take_over()`` until the killed
one's lease lapses (``--lease-ttl`` after its last renewal) before it attaches, loads
the SM state and connects. The kill's drawn duration is not waited: the lease is the
downtime. The records are read at the end through a read-only store, and the summary
adds the takeover times (SIGKILL to lease taken).

Besides the verdict, the summary counts what is allowed but worth seeing: messages
that failed although bob had them (``failed`` means *not confirmed*), how many of
those the archive check recognised, and which ones reached bob twice because the
resend pass sent them again (room messages are never looked up in the archive, a
restart empties the test server's archive, and a sender killed before it stored a
message's sequence number leaves its successor no way to know it went out).

Why a separate process and a real server: the bugs this hunts for live in the
seams -- a state saved a moment before a kill, a ``<failed h>`` after a restart,
an ack racing a reconnect -- that unit tests of one layer never see. Why seeds: a
failing schedule is replayed with ``--seed S --schedules 1`` (the timing of a real
network is not replayed, the faults and messages are).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO, get_args
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import slixmpp

from xmpp_sm_tracker.core.records import FailureReason, TrackedMessage
from xmpp_sm_tracker.core.smstate import SMStateError
from xmpp_sm_tracker.core.states import DeliveryState
from xmpp_sm_tracker.plugin import SMTracker
from xmpp_sm_tracker.stores.base import StoreError, TrackerStore
from xmpp_sm_tracker.stores.postgres import PostgresStore
from xmpp_sm_tracker.stores.sqlite import SQLiteStore
from xmpp_sm_tracker.testing import FaultProxy
from xmpp_sm_tracker.testing.client import connect_client, make_client, tracker_of, wait_for
from xmpp_sm_tracker.testing.postgres import PostgresServer
from xmpp_sm_tracker.testing.servers import SERVER_KINDS, ensure_server_installed, make_server

from . import child_env

__all__ = [
    "FAULT_KINDS",
    "STORE_KINDS",
    "ChaosConfig",
    "ChaosSummary",
    "Fault",
    "FaultKind",
    "Observation",
    "Schedule",
    "ScheduleResult",
    "StoreKind",
    "Violation",
    "check_invariants",
    "main",
    "run_chaos",
]

log = logging.getLogger(__name__)

FaultKind = Literal["cut", "stall", "blackhole", "refuse", "restart", "kill"]
#: What a schedule draws from: link faults (proxy), a server restart, a sender kill.
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)

#: Seconds a fault may last, per kind (a cut is instantaneous). Refusals and kills
#: may outlast the server's hibernation time, so that expiry is exercised too.
_DURATIONS: Mapping[FaultKind, tuple[float, float]] = {
    "cut": (0.0, 0.0),
    "stall": (0.2, 2.0),
    "blackhole": (0.2, 2.5),
    "refuse": (0.2, 3.5),
    "restart": (0.0, 1.0),
    "kill": (0.0, 3.0),
}
StoreKind = Literal["sqlite", "postgres"]
#: Where alice keeps her records and SM state (``--store``).
STORE_KINDS: tuple[StoreKind, ...] = get_args(StoreKind)
#: The environment variable that hands the PostgreSQL DSN (with its password) to alice.
_DSN_VARIABLE = "CHAOS_STORE_DSN"
_ACCOUNT = "alice@localhost"
_PASSWORD = "chaos-pass"
_NICK = "Alice"
_AT_LEAST_ACKED = frozenset(
    {
        DeliveryState.ACKED,
        DeliveryState.ROOM_RECEIVED,
        DeliveryState.DELIVERED,
        DeliveryState.DISPLAYED,
    }
)
_SETTLED = _AT_LEAST_ACKED | {DeliveryState.FAILED}
#: The sender's tracker: quick to notice a dead link and to come back.
_SENDER_CONFIG: dict[str, Any] = {
    "ack_delay": 0.05,
    "ack_timeout": 1.5,
    "negotiation_timeout": 3.0,
    "reconnect_delay": 0.1,
    "reconnect_max_delay": 1.0,
    "reconcile_slack": 5.0,
    "reconcile_timeout": 5.0,
}


# ---------------------------------------------------------------------- schedules


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: when (seconds after the schedule starts), what, and for how long.

    ``hard`` picks SIGKILL over a graceful stop for a server restart.
    """

    at: float
    kind: FaultKind
    duration: float = 0.0
    hard: bool = False


@dataclass(frozen=True, slots=True)
class Schedule:
    """A reproducible scenario: the messages alice sends and the faults she meets."""

    seed: int
    messages: int
    interval: float
    faults: tuple[Fault, ...]
    #: Fraction of messages that go to the room rather than to bob.
    room_share: float = 0.5

    @classmethod
    def generate(cls, seed: int, *, length: float = 4.0, max_faults: int = 4) -> Schedule:
        """The schedule of ``seed``: 1..max_faults faults, one after the other.

        Faults do not overlap (a heal ends every proxy fault at once, so overlapping
        ones would cut each other short); the sending lasts about ``length`` seconds.
        """
        rng = random.Random(seed)
        messages = rng.randint(12, 30)
        faults: list[Fault] = []
        at = rng.uniform(0.2, 0.8)
        for _ in range(rng.randint(1, max_faults)):
            kind = rng.choice(FAULT_KINDS)
            low, high = _DURATIONS[kind]
            duration = round(rng.uniform(low, high), 3)
            faults.append(Fault(round(at, 3), kind, duration, hard=rng.random() < 0.5))
            at += duration + rng.uniform(0.2, 1.2)
        return cls(seed, messages, round(length / messages, 4), tuple(faults))

    def target(self, n: int) -> Literal["chat", "groupchat"]:
        """Whether message ``n`` goes to bob or to the room (fixed by the seed)."""
        draw = random.Random(f"{self.seed}:{n}").random()
        return "groupchat" if draw < self.room_share else "chat"

    def describe(self) -> str:
        return ", ".join(
            f"{f.kind}{'!' if f.hard and f.kind == 'restart' else ''}@{f.at:g}"
            + (f"+{f.duration:g}s" if f.duration else "")
            for f in self.faults
        )


# ---------------------------------------------------------------------- invariants


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken invariant, with the seed that replays the schedule."""

    seed: int
    kind: str
    message_id: str | None
    detail: str


@dataclass(slots=True)
class Observation:
    """Everything one schedule produced, as the invariant checker needs it."""

    seed: int
    #: Final records from the sender's SQLite file, by id.
    records: dict[str, TrackedMessage]
    #: Ids the sender reported stored (``send_message`` returned) before it went on.
    reported: set[str]
    #: How often bob saw each message id (chat and room), live copies only.
    received: Mapping[str, int]
    #: The same, counted before the resend pass.
    received_before_resend: Mapping[str, int] = field(default_factory=dict)
    #: Ids the resend pass sent again (they may legitimately arrive twice).
    resent: set[str] = field(default_factory=set)
    #: Ids still in flight when the sender's settle wait gave up.
    stuck: list[str] = field(default_factory=list)
    #: States after the first settle, before the resend pass: id -> (state, reason).
    first_settle: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    #: Ids recorded failed *and never written* (no seq) at the first settle.
    unsent_at_settle: set[str] = field(default_factory=set)
    #: The sender was SIGKILLed at least once: its last writes may be missing.
    sender_killed: bool = False


def check_invariants(obs: Observation) -> list[Violation]:
    """The invariants of the module docstring; an empty list when all hold."""
    out: list[Violation] = []

    def violated(kind: str, message_id: str | None, detail: str) -> None:
        out.append(Violation(obs.seed, kind, message_id, detail))

    for message_id in obs.stuck:
        violated("in-flight-after-settle", message_id, "still in flight when the settle wait ended")
    for message_id, (state, reason) in sorted(obs.first_settle.items()):
        if DeliveryState(state) not in _SETTLED and message_id not in obs.stuck:
            violated("unsettled", message_id, f"{state} after the first settle (reason={reason})")
    for message_id, final in sorted(obs.records.items()):
        if final.state not in _SETTLED:
            violated("unsettled", message_id, f"{final.state.value} in the store at the end")
    for message_id in sorted(obs.reported - obs.records.keys()):
        violated("record-lost", message_id, "reported stored by the sender, missing from the file")
    if not obs.sender_killed:  # a killed sender may die before it stores the seq
        for message_id in sorted(obs.unsent_at_settle):
            if obs.received_before_resend.get(message_id):
                violated(
                    "delivered-though-unsent",
                    message_id,
                    "recorded failed and never written (no seq), yet bob got it before any "
                    "resend: the archive check will skip it and the resend duplicates it",
                )
    for message_id, count in sorted(obs.received.items()):
        record = obs.records.get(message_id)
        if record is None:
            violated("received-not-recorded", message_id, f"bob got it {count}x, no record")
            continue
        if record.state not in _AT_LEAST_ACKED:
            violated(
                "received-but-not-acked",
                message_id,
                f"bob got it {count}x, recorded {record.state.value} (reason={record.reason})",
            )
        if count > 1 and message_id not in obs.resent:
            violated(
                "received-twice",
                message_id,
                f"bob got it {count}x though it was never resent by hand "
                f"(attempts={record.attempts}, {record.type})",
            )
    return out


# ---------------------------------------------------------------------- results


@dataclass(slots=True)
class ScheduleResult:
    """What one schedule did and found."""

    seed: int
    schedule: str
    messages: int
    faults: Counter[str]
    first_settle: Counter[str]
    final: Counter[str]
    resent: int
    found_in_archive: int
    #: Messages that reached bob twice because the resend pass sent them again, by cause.
    duplicates_after_resend: Counter[str]
    #: What deserves a look without breaking an invariant.
    notes: list[str]
    failed_but_received: int
    acked_not_received: int
    violations: list[Violation]
    seconds: float
    #: Failovers (PostgreSQL): seconds from each SIGKILL to the lease taken by the next.
    takeovers: list[float] = field(default_factory=list)


def _outcome(state: str, reason: str | None) -> str:
    if state == DeliveryState.FAILED.value and reason:
        return f"failed:{reason.split(' (', 1)[0]}"
    if reason == FailureReason.FOUND_IN_ARCHIVE:
        return f"{state}:{reason}"
    return state


def _summarize(
    schedule: Schedule, obs: Observation, faults: Counter[str], seconds: float
) -> ScheduleResult:
    final = Counter(_outcome(r.state.value, r.reason) for r in obs.records.values())
    first = Counter(_outcome(state, reason) for state, reason in obs.first_settle.values())
    found = sum(1 for r in obs.records.values() if r.reason == FailureReason.FOUND_IN_ARCHIVE)
    dupes: Counter[str] = Counter()
    notes: list[str] = []
    restarted = bool(faults.get("restart"))
    for message_id, count in sorted(obs.received.items()):
        if count < 2 or message_id not in obs.resent:
            continue
        record = obs.records.get(message_id)
        before = obs.first_settle.get(message_id, ("?", None))
        if record is not None and record.type == "groupchat":
            dupes["room"] += 1  # the resend path never asks the archive about rooms
        elif restarted:
            dupes["archive lost in a restart"] += 1  # the test server's archive is in memory
        elif obs.sender_killed and message_id in obs.unsent_at_settle:
            # it died before storing the seq: its successor cannot know it went out
            dupes["sender killed before storing it"] += 1
        else:
            dupes["unexplained"] += 1
            notes.append(
                f"seed {schedule.seed}: {message_id} reached bob {count}x after a resend; "
                f"before it: {before[0]} ({before[1]}, "
                f"{'no seq' if message_id in obs.unsent_at_settle else 'had a seq'}), "
                "archive check did not find it"
            )
    failed_received = sum(
        1
        for i, (state, _reason) in obs.first_settle.items()
        if state == DeliveryState.FAILED.value and obs.received_before_resend.get(i)
    )
    acked_missing = sum(
        1
        for i, r in obs.records.items()
        if r.state in _AT_LEAST_ACKED and r.type == "chat" and not obs.received.get(i)
    )
    return ScheduleResult(
        seed=schedule.seed,
        schedule=schedule.describe(),
        messages=len(obs.records),
        faults=faults,
        first_settle=first,
        final=final,
        resent=len(obs.resent),
        found_in_archive=found,
        duplicates_after_resend=dupes,
        notes=notes,
        failed_but_received=failed_received,
        acked_not_received=acked_missing,
        violations=check_invariants(obs),
        seconds=round(seconds, 2),
    )


@dataclass(slots=True)
class ChaosSummary:
    """The whole run: totals over every schedule, and every violation with its seed."""

    results: list[ScheduleResult]
    seconds: float
    #: The server the schedules ran against.
    server: str = "prosody"
    #: Where alice kept her records: "sqlite" or "postgres" (then with her lease's ttl).
    store: str = "sqlite"
    lease_ttl: float | None = None

    @property
    def violations(self) -> list[Violation]:
        return [v for r in self.results for v in r.violations]

    def _total(self, name: str) -> Counter[str]:
        total: Counter[str] = Counter()
        for result in self.results:
            total.update(getattr(result, name))
        return total

    def as_dict(self) -> dict[str, Any]:
        seeds = [r.seed for r in self.results]
        return {
            "server": self.server,
            "schedules": len(self.results),
            "seeds": [min(seeds), max(seeds)] if seeds else [],
            "messages": sum(r.messages for r in self.results),
            "seconds": round(self.seconds, 1),
            "faults": dict(sorted(self._total("faults").items())),
            "first_settle": dict(sorted(self._total("first_settle").items())),
            "final": dict(sorted(self._total("final").items())),
            "resent": sum(r.resent for r in self.results),
            "found_in_archive": sum(r.found_in_archive for r in self.results),
            "duplicates_after_resend": dict(sorted(self._total("duplicates_after_resend").items())),
            "failed_but_received": sum(r.failed_but_received for r in self.results),
            "acked_not_received": sum(r.acked_not_received for r in self.results),
            "notes": [note for r in self.results for note in r.notes],
            "violations": [asdict(v) for v in self.violations],
            "store": self.store,
            "lease_ttl": self.lease_ttl,
            "takeovers": sorted(t for r in self.results for t in r.takeovers),
        }

    def render(self) -> str:
        """The summary table printed at the end of a run."""
        data = self.as_dict()
        seeds = data["seeds"]
        dupes: dict[str, int] = data["duplicates_after_resend"]
        lines = [
            f"chaos on {self.server}"
            + (f" ({self.store} store)" if self.store != "sqlite" else "")
            + f": {data['schedules']} schedules "
            f"(seeds {seeds[0]}..{seeds[-1]}), "
            f"{data['messages']} messages, {data['seconds']}s"
            if seeds
            else "chaos: no schedules",
            "",
            _row("faults", data["faults"], FAULT_KINDS),
            _row("after settling", data["first_settle"]),
            _row("after resend pass", data["final"]),
            f"  {'resend pass':<20} resent {data['resent']}, found in archive "
            f"{data['found_in_archive']}, reached bob twice after a resend "
            f"{sum(dupes.values())}" + (f" ({_cells(dupes)})" if dupes else ""),
            f"  {'unconfirmed':<20} failed but received {data['failed_but_received']} "
            '("failed" means not confirmed), acked chat bob did not see live '
            f"{data['acked_not_received']}",
            *([_takeovers(data["takeovers"], self.lease_ttl)] if self.store == "postgres" else []),
            "",
        ]
        lines += [f"  note: {note}" for note in data["notes"]]
        violations = self.violations
        if not violations:
            lines.append("violations: none")
            return "\n".join(lines)
        lines.append(f"violations: {len(violations)}")
        for v in violations:
            lines.append(f"  seed {v.seed:<8} {v.kind:<24} {v.message_id or '-':<34} {v.detail}")
        replay = sorted({v.seed for v in violations})
        lines.append("")
        lines += [f"  replay: scripts/chaos --schedules 1 --seed {seed}" for seed in replay]
        return "\n".join(lines)


def _takeovers(seconds: Sequence[float], lease_ttl: float | None) -> str:
    title = f"  {'takeovers':<20} "
    if not seconds:
        return title + "none (no kill, or no successor took the lease)"
    middle = seconds[len(seconds) // 2]
    return (
        title + f"{len(seconds)} (SIGKILL to lease taken, lease_ttl {lease_ttl:g} s): "
        f"min {seconds[0]:.2f} s, median {middle:.2f} s, max {seconds[-1]:.2f} s"
    )


def _cells(counts: Mapping[str, int], order: Sequence[str] = ()) -> str:
    keys = [k for k in order if k in counts] + sorted(k for k in counts if k not in order)
    return ", ".join(f"{k} {counts[k]}" for k in keys)


def _row(title: str, counts: Mapping[str, int], order: Sequence[str] = ()) -> str:
    return f"  {title:<20} {_cells(counts, order).replace(', ', '  ') or '-'}"


# ---------------------------------------------------------------------- bob


class _Bob:
    """A plain client that counts what alice's messages reached him, by origin-id.

    He reconnects by himself after a server restart (slixmpp does not) and joins
    the schedule's room again. Offline copies (a server ``<delay/>``) and room
    history (a room ``<delay/>``) are not live deliveries and are not counted.
    """

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.xmpp = make_client("bob@localhost/observer", _PASSWORD, tracked=False)
        self.xmpp.register_plugin("xep_0045")
        self.room: str | None = None
        self.counts: Counter[str] = Counter()
        self.last_seen = 0.0
        self._closing = False
        self._joins: set[asyncio.Future[Any]] = set()
        self.xmpp.add_event_handler("session_start", self._on_session_start)
        self.xmpp.add_event_handler("disconnected", self._on_disconnected)
        self.xmpp.add_event_handler("message", self._on_message)

    async def start(self) -> None:
        await connect_client(self.xmpp, self.address)

    async def use_room(self, room: str) -> None:
        """Count from zero, in ``room`` from now on."""
        old, self.room = self.room, room
        self.counts = Counter()
        muc = self.xmpp.plugin["xep_0045"]
        if old is not None:
            with contextlib.suppress(Exception):
                muc.leave_muc(old, "Bob")
        for attempt in range(3):  # the previous schedule may have left him reconnecting
            try:
                await wait_for(lambda: self.xmpp.transport is not None, timeout=20)
                await muc.join_muc_wait(room, "Bob", maxchars=0, timeout=10)
                return
            except (TimeoutError, slixmpp.exceptions.XMPPError):
                if attempt == 2:
                    raise

    def _on_session_start(self, _event: Any) -> None:
        self.xmpp.send_presence()
        if self.room is not None:
            join = asyncio.ensure_future(
                self.xmpp.plugin["xep_0045"].join_muc_wait(self.room, "Bob", maxchars=0, timeout=10)
            )
            self._joins.add(join)
            join.add_done_callback(self._joined)

    def _joined(self, future: asyncio.Future[Any]) -> None:
        self._joins.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.debug("bob could not join %s again: %r", self.room, future.exception())

    def _on_disconnected(self, _event: Any) -> None:
        if not self._closing:
            asyncio.get_running_loop().call_later(0.2, self._reconnect)

    def _reconnect(self) -> None:
        if self._closing or self.xmpp.transport is not None or self.xmpp.is_connecting():
            return
        self.xmpp.connect(*self.address)

    def _on_message(self, msg: Any) -> None:
        xml = msg.xml
        kind = xml.get("type", "normal")
        body = xml.find("{jabber:client}body")
        if body is None or not body.text:
            return
        sender = xml.get("from", "")
        if kind == "groupchat":
            if self.room is None or sender != f"{self.room}/{_NICK}":
                return
        elif kind not in ("chat", "normal") or not sender.startswith("alice@localhost/"):
            return
        for delay in xml.findall("{urn:xmpp:delay}delay"):
            stamped_by = delay.get("from")
            if stamped_by and stamped_by in ("localhost", self.room):
                return  # an offline copy, or room history: not a live delivery
        origin = xml.find("{urn:xmpp:sid:0}origin-id")
        key = origin.get("id") if origin is not None else xml.get("id")
        if key:
            self.counts[key] += 1
            self.last_seen = time.monotonic()

    async def aclose(self) -> None:
        self._closing = True
        for join in list(self._joins):
            join.cancel()
        if self.xmpp.transport is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.xmpp.disconnect(wait=0.5), 3)
        if self.xmpp.transport is not None:
            self.xmpp.abort()


# ---------------------------------------------------------------------- alice (child)


def _open_store(
    kind: str, where: str, *, lease_ttl: float, read_only: bool = False
) -> SQLiteStore | PostgresStore:
    """alice's store, for her processes and for the final check: her SQLite file
    ``where``, or her account in the PostgreSQL database of the DSN ``where``."""
    if kind == "postgres":
        return PostgresStore(where, account=_ACCOUNT, read_only=read_only, lease_ttl=lease_ttl)
    return SQLiteStore(where, read_only=read_only)


class _Sender:
    """The parent's handle on one alice process: its output, its answers, and SIGKILL."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: TextIO) -> None:
        self.proc = proc
        self.stderr = stderr
        self.sent: dict[int, str] = {}
        self.done = asyncio.Event()
        #: time.monotonic() of the SIGKILL of the last owner of the lease before it
        #: (a failover; None when no owner was killed: the lease was free).
        self.after_kill: float | None = None
        #: time.monotonic() at which it took the account's lease (PostgreSQL only).
        self.owned_at: float | None = None
        #: Answers to commands, in order; None once the process has gone.
        self.replies: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip("\n")
            word, _, rest = line.partition(" ")
            if word == "SENT":
                n, message_id = rest.split(" ", 2)[:2]
                self.sent[int(n)] = message_id
            elif word == "DONE":
                self.done.set()
            elif word == "OWNED":
                self.owned_at = float(rest)
            elif word == "REPLY":
                self.replies.put_nowait(json.loads(rest))
        self.replies.put_nowait(None)

    async def ask(self, command: str, timeout: float) -> dict[str, Any]:
        """Send a command and wait for its answer; raises RuntimeError without one."""
        self.command(command)
        try:
            reply = await asyncio.wait_for(self.replies.get(), timeout)
        except TimeoutError:
            raise RuntimeError(f"no answer to {command!r} within {timeout:g}s") from None
        if reply is None:
            raise RuntimeError(f"the sender exited instead of answering {command!r}")
        return reply

    def command(self, line: str) -> None:
        if self.proc.stdin is not None and self.proc.returncode is None:
            self.proc.stdin.write(f"{line}\n".encode())

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self._finish()

    async def wait(self, timeout: float) -> bool:
        """Wait for a clean exit; kill it if it does not come. True if it was clean."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
            return False
        await self._finish()
        return self.proc.returncode == 0

    async def _finish(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.reader, 5)
        self.stderr.close()

    @property
    def takeover(self) -> float | None:
        """Seconds from the SIGKILL of the lease's last owner to the lease taken."""
        if self.after_kill is None or self.owned_at is None:
            return None
        return self.owned_at - self.after_kill


async def _start_sender(config: dict[str, Any], log_path: Path, dsn: str | None) -> _Sender:
    """An alice process; ``dsn`` (PostgreSQL) goes in its environment, not its argv."""
    stderr = log_path.open("a", encoding="utf-8")
    secret = {_DSN_VARIABLE: dsn} if dsn is not None else {}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "devtools.chaos",
        "_sender",
        json.dumps(config),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        env=child_env(PYTHONUNBUFFERED="1", **secret),
    )
    return _Sender(proc, stderr)


async def _sender_main(config: dict[str, Any]) -> None:
    """The alice process: send durably, survive what happens, settle on command."""
    logging.basicConfig(
        level=logging.DEBUG if config.get("debug") else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    schedule = Schedule.generate(config["seed"])
    room, bob = config["room"], "bob@localhost"
    xmpp = make_client(config["jid"], _PASSWORD, tracker_config=dict(_SENDER_CONFIG))
    xmpp.register_plugin("xep_0045")
    tracker = tracker_of(xmpp)
    if config.get("debug"):
        for state in DeliveryState:
            tracker.events.on(f"message:{state.value}", _log_event(f"message:{state.value}"))
    kind = config["store"]
    where = os.environ[_DSN_VARIABLE] if kind == "postgres" else config["db"]
    store = _open_store(kind, where, lease_ttl=config["lease_ttl"])
    if isinstance(store, PostgresStore):
        # A standby: wait for the killed owner's lease to lapse (at once the first time);
        # only then touch its records, its SM state and its stream.
        await store.take_over(poll=0.05, timeout=config["lease_ttl"] * 10 + 30)
        print(f"OWNED {time.monotonic()!r}", flush=True)
    await tracker.attach(store)
    try:
        tracker.sm.load(await store.load_sm_state())
    except (SMStateError, StoreError) as exc:
        print(f"not resuming: {exc}", file=sys.stderr)
    tracker.sm.cache(store.save_sm_state)

    joins: set[asyncio.Future[Any]] = set()

    def join(_event: Any = None) -> None:
        # What an app does at start and after a fresh session: be in its rooms.
        future = asyncio.ensure_future(
            xmpp.plugin["xep_0045"].join_muc_wait(slixmpp.JID(room), _NICK, maxchars=0, timeout=10)
        )
        joins.add(future)
        future.add_done_callback(joined)

    def joined(future: asyncio.Future[Any]) -> None:
        joins.discard(future)
        if not future.cancelled() and future.exception() is not None:
            print(f"joining {room} failed: {future.exception()!r}", file=sys.stderr)

    # A fresh session is in no room. A process that resumed its predecessor's stream
    # is still in the room, and knows its nick from the saved state: no rejoin.
    xmpp.add_event_handler("session_start", join)
    xmpp.connect(*config["address"])

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_commands() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "BYE")

    loop.run_in_executor(None, read_commands)
    life = config["life"]
    known_room = False
    for n in range(config["start"], schedule.messages):
        kind = schedule.target(n)
        to = room if kind == "groupchat" else bob
        if kind == "groupchat" and not known_room:
            # An app sends to a room once it has been in it: a message to a room it never
            # joined bounces, and says nothing about the tracker. From then on, joins
            # lost to faults are the tracker's business (it holds messages for them).
            await _until_known(tracker, room, timeout=10.0)
            known_room = True
        body = f"chaos {schedule.seed} life {life} #{n}"
        try:
            record = await tracker.send_message(to, body, mtype=kind)
        except StoreError as exc:  # the record is kept, failed (store-failed)
            print(f"message {n} not stored: {exc}", file=sys.stderr)
        else:
            print(f"SENT {n} {record.id} {kind}", flush=True)
        await asyncio.sleep(schedule.interval)
    print("DONE", flush=True)

    conversations = (room, bob)
    while True:
        command, _, arg = (await commands.get()).partition(" ")
        if command == "SETTLE":
            reply = await _settle(tracker, store, conversations, float(arg))
        elif command == "RESEND":
            reply = await _resend(tracker, float(arg))
        elif command == "BYE":
            break
        else:
            continue
        print(f"REPLY {json.dumps(reply)}", flush=True)
    tracker.auto_reconnect = False
    with contextlib.suppress(Exception):
        await asyncio.wait_for(xmpp.disconnect(wait=1.0), 5)
    with contextlib.suppress(Exception):
        await tracker.flush()
    await store.aclose()
    print("BYE", flush=True)
    os._exit(0)  # the stdin reader thread would keep the interpreter alive


async def _until_known(tracker: SMTracker, room: str, timeout: float) -> None:
    """Wait until the session is in ``room``, or knows it must rejoin it (from a saved
    state or an ended session); gives up ``timeout`` seconds after a session is up.

    The first connection is slixmpp's own, with a backoff that grows on each refusal:
    after a few short refusals it can take longer than the join itself may (at most
    three times ``timeout`` in all)."""
    core, loop = tracker.core, asyncio.get_running_loop()
    started = loop.time()
    live_since: float | None = None
    while core.nick_in(room) is None and room not in core.rejoining:
        now = loop.time()
        if live_since is None and tracker.session_live:
            live_since = now
        joined_too_late = live_since is not None and now - live_since > timeout
        if joined_too_late or now - started > 3 * timeout:
            print(f"not in {room} after {now - started:.1f}s: sending anyway", file=sys.stderr)
            return
        await asyncio.sleep(0.05)


def _log_event(name: str) -> Callable[[TrackedMessage], None]:
    def handler(record: TrackedMessage) -> None:
        log.debug(
            "%s %s seq=%s attempts=%d reason=%s",
            name,
            record.id,
            record.seq,
            record.attempts,
            record.reason,
        )

    return handler


async def _until_quiet(tracker: SMTracker, seconds: float) -> bool:
    """Wait until the session is live and no record is in flight; False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    def quiet() -> bool:
        records = tracker.core.records.values()
        return bool(tracker.session_live) and not any(r.in_flight for r in records)

    while not quiet():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _settle(
    tracker: SMTracker, store: TrackerStore, conversations: Sequence[str], timeout: float
) -> dict[str, Any]:
    """Wait until nothing is in flight; every record as it stands then."""
    await _until_quiet(tracker, timeout)
    await tracker.flush()
    states: dict[str, tuple[str, str | None]] = {}
    unsent: list[str] = []
    for conversation in conversations:
        for record in await store.conversation(conversation, limit=1_000_000):
            states[record.id] = (record.state.value, record.reason)
            if record.state is DeliveryState.FAILED and record.seq is None:
                unsent.append(record.id)
    stuck = [r.id for r in tracker.core.records.values() if r.in_flight]
    return {"states": states, "unsent": unsent, "stuck": stuck}


async def _resend(tracker: SMTracker, timeout: float) -> dict[str, Any]:
    """One ``resend_failed()`` pass (archive check first), then settle again."""
    resent: list[str] = []
    try:
        results = await asyncio.wait_for(tracker.resend_failed(), timeout)
    except Exception as exc:
        print(f"resend pass failed: {exc!r}", file=sys.stderr)
    else:
        resent = [r.id for r in results if r.state is DeliveryState.RESENT]
    await _until_quiet(tracker, timeout)
    await tracker.flush()
    stuck = [r.id for r in tracker.core.records.values() if r.in_flight]
    return {"resent": resent, "stuck": stuck}


# ---------------------------------------------------------------------- the harness


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    """How a run is set up (the schedules themselves come from the seeds)."""

    schedules: int = 3
    seed: int = 1
    jobs: int = 1
    hibernation_time: int = 2
    settle_timeout: float = 20.0
    work_dir: Path | None = None
    #: The sender logs everything (slixmpp's stream included) to its file in work_dir.
    debug: bool = False
    #: Which server: "prosody" or "ejabberd" (xmpp_sm_tracker.testing.servers).
    server: str = "prosody"
    #: Where alice keeps her records and SM state: "sqlite" or "postgres".
    store: StoreKind = "sqlite"
    #: PostgreSQL: the cluster to use (a database per schedule is made in it, so its
    #: role must be allowed to create databases); None starts a private one.
    dsn: str | None = None
    #: PostgreSQL: alice's lease (s); a failover waits for the killed owner's to lapse.
    lease_ttl: float = 2.0


class _Worker:
    """One server, one fault proxy in front of it, and bob: runs schedules in turn.

    With PostgreSQL, ``cluster`` is the DSN of the cluster in which each schedule gets
    a database of its own (made and dropped through one admin connection)."""

    def __init__(self, base: Path, config: ChaosConfig, cluster: str | None = None) -> None:
        self.base = base
        self.config = config
        self.cluster = cluster
        self.admin: asyncpg.Connection | None = None
        self.server = make_server(
            config.server, base / config.server, hibernation_time=config.hibernation_time
        )
        self.proxy: FaultProxy | None = None
        self.bob_link: FaultProxy | None = None
        self.bob: _Bob | None = None

    async def start(self) -> None:
        for user in ("alice", "bob"):
            self.server.register(user, _PASSWORD)
        await self.server.start()
        self.proxy = FaultProxy(self.server.host, self.server.c2s_port)
        await self.proxy.start()
        # bob's own link is never faulted; through a proxy, a server that is down
        # looks like a closed connection, which he retries at once, not like a
        # refused one, which slixmpp retries with a growing backoff.
        self.bob_link = FaultProxy(self.server.host, self.server.c2s_port)
        await self.bob_link.start()
        self.bob = _Bob(self.bob_link.address)
        await self.bob.start()
        if self.cluster is not None:
            self.admin = await asyncpg.connect(self.cluster)

    async def aclose(self) -> None:
        if self.admin is not None:
            await self.admin.close()
        if self.bob is not None:
            await self.bob.aclose()
        for proxy in (self.proxy, self.bob_link):
            if proxy is not None:
                await proxy.aclose()
        await self.server.stop()

    async def run(self, schedule: Schedule) -> ScheduleResult:
        """Play one schedule, settle, resend, and check: a fresh room, file and resource
        each time, so one schedule's leftovers never count in the next one's verdict."""
        assert self.proxy is not None and self.bob is not None
        started = time.monotonic()
        proxy, bob = self.proxy, self.bob
        tag = f"{schedule.seed}-{uuid.uuid4().hex[:6]}"
        room = f"chaos-{tag}@{self.server.muc_domain}"
        db = self.base / f"alice-{tag}.sqlite"
        kind = self.config.store
        dsn = await self._database(tag) if self.admin is not None else None
        await bob.use_room(room)
        config: dict[str, Any] = {
            "seed": schedule.seed,
            "room": room,
            "db": str(db),
            "store": kind,
            "lease_ttl": self.config.lease_ttl,
            "jid": f"alice@localhost/chaos-{tag}",
            "address": list(proxy.address),
            "life": 0,
            "debug": self.config.debug,
            "start": 0,
        }
        logs = self.base / f"alice-{tag}.log"
        sender = await _start_sender(config, logs, dsn)
        lives = [sender]
        sent: dict[int, str] = {}
        received_before: dict[str, int] = {}
        faults: Counter[str] = Counter()
        harness: list[Violation] = []
        try:
            for fault in schedule.faults:
                delay = started + fault.at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                faults[fault.kind] += 1
                if fault.kind == "kill":
                    killed_at = time.monotonic()
                    await sender.kill()
                    sent.update(sender.sent)
                    if dsn is None:  # a failover starts at once: the lease is the wait
                        await asyncio.sleep(fault.duration)
                    config = {
                        **config,
                        "life": config["life"] + 1,
                        "start": max(sent) + 1 if sent else 0,
                    }
                    killed = sender
                    sender = await _start_sender(config, logs, dsn)
                    # The lease it waits for: the killed one's, or if that one died
                    # before it took it, the one its own predecessor waited for.
                    owned = killed.owned_at is not None
                    sender.after_kill = killed_at if owned else killed.after_kill
                    lives.append(sender)
                else:
                    await self._link_fault(fault)
            try:
                await asyncio.wait_for(sender.done.wait(), schedule.messages * 2 + 30)
            except TimeoutError:
                harness.append(Violation(schedule.seed, "harness", None, "sender never finished"))
            proxy.heal()
            if not self.server.running:
                await self.server.start()
            settle = self.config.settle_timeout
            first: dict[str, Any] = {}
            second: dict[str, Any] = {}
            try:
                first = await sender.ask(f"SETTLE {settle}", settle + 30)
                await self._bob_quiet()
                received_before = dict(bob.counts)
                second = await sender.ask(f"RESEND {settle}", settle * 2 + 30)
                await self._bob_quiet()
            except RuntimeError as exc:
                harness.append(Violation(schedule.seed, "harness", None, str(exc)))
            sender.command("BYE")
            if not await sender.wait(15):
                harness.append(Violation(schedule.seed, "harness", None, "sender did not exit"))
            sent.update(sender.sent)
        finally:
            await sender.kill()
            proxy.heal()
            if not self.server.running:
                await self.server.start()
        records: dict[str, TrackedMessage] = {}
        try:  # the SQLite file as ever (writable: a killed sender may leave a WAL to recover)
            async with _open_store(
                kind, dsn or str(db), lease_ttl=self.config.lease_ttl, read_only=dsn is not None
            ) as store:
                for conversation in (room, "bob@localhost"):
                    for record in await store.conversation(conversation, limit=1_000_000):
                        records[record.id] = record
        finally:
            if dsn is not None:
                await self._drop(dsn)
        obs = Observation(
            seed=schedule.seed,
            records=records,
            reported=set(sent.values()),
            received=dict(bob.counts),
            received_before_resend=received_before,
            resent=set(second.get("resent", [])),
            stuck=sorted(set(first.get("stuck", [])) | set(second.get("stuck", []))),
            first_settle={k: (v[0], v[1]) for k, v in first.get("states", {}).items()},
            unsent_at_settle=set(first.get("unsent", [])),
            sender_killed=bool(faults.get("kill")),
        )
        result = _summarize(schedule, obs, faults, time.monotonic() - started)
        result.violations[:0] = harness
        result.takeovers = [round(t, 3) for s in lives if (t := s.takeover) is not None]
        for took in result.takeovers:
            if took < self.config.lease_ttl / 3:  # renewed every third: >= 2/3 ttl left
                result.notes.append(
                    f"seed {schedule.seed}: lease taken {took:.2f} s after the SIGKILL, "
                    f"sooner than a lease renewed every {self.config.lease_ttl / 3:.2f} s lapses"
                )
        return result

    async def _database(self, tag: str) -> str:
        """A fresh database for one schedule in the cluster; its DSN."""
        assert self.admin is not None and self.cluster is not None
        name = f"chaos_{tag.replace('-', '_')}"
        await self.admin.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(self.cluster)
        return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))

    async def _drop(self, dsn: str) -> None:
        assert self.admin is not None
        name = urlsplit(dsn).path.lstrip("/")
        await self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def _link_fault(self, fault: Fault) -> None:
        proxy = self.proxy
        assert proxy is not None
        if fault.kind == "cut":
            proxy.cut()
            return
        if fault.kind == "restart":
            if fault.hard:
                await self.server.kill()
            else:
                await self.server.stop()
            await asyncio.sleep(fault.duration)
            await self.server.start()
            return
        if fault.kind == "stall":
            proxy.stall()
        elif fault.kind == "blackhole":
            proxy.blackhole()
        elif fault.kind == "refuse":
            proxy.refuse(True)
            proxy.cut()  # the server "goes down": the link drops and stays down
        await asyncio.sleep(fault.duration)
        if fault.kind == "blackhole":
            # Real TCP never delivers bytes after a gap: by the time a dead route comes
            # back, the connection it swallowed is reset. Healing the same connection
            # would splice the two halves of a stream and desync XEP-0198's counters
            # on both sides, something no network can do.
            proxy.cut()
        proxy.heal()

    async def _bob_quiet(self, quiet: float = 0.5, limit: float = 5.0) -> None:
        """Let the last deliveries reach bob: until nothing came for ``quiet`` seconds."""
        assert self.bob is not None
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if time.monotonic() - max(self.bob.last_seen, 0.0) >= quiet:
                return
            await asyncio.sleep(0.05)


async def run_chaos(
    config: ChaosConfig, progress: Callable[[ScheduleResult], None] | None = None
) -> ChaosSummary:
    """Run ``config.schedules`` schedules with seeds ``seed, seed+1, ...``; with
    PostgreSQL and no ``config.dsn``, in a private cluster started for the run."""
    if config.store == "postgres" and config.dsn is None:
        with PostgresServer(database="chaos") as postgres:
            return await _run_chaos(config, progress, postgres.dsn)
    return await _run_chaos(config, progress, config.dsn)


async def _run_chaos(
    config: ChaosConfig,
    progress: Callable[[ScheduleResult], None] | None,
    cluster: str | None,
) -> ChaosSummary:
    ensure_server_installed(config.server)
    if config.store != "postgres":
        cluster = None
    started = time.monotonic()
    own_dir = config.work_dir is None
    base = Path(tempfile.mkdtemp(prefix="sm-chaos-")) if own_dir else Path(config.work_dir or "")
    seeds: asyncio.Queue[int] = asyncio.Queue()
    for offset in range(config.schedules):
        seeds.put_nowait(config.seed + offset)
    results: list[ScheduleResult] = []

    async def work(index: int) -> None:
        folder = base / f"worker-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        worker = _Worker(folder, config, cluster)
        try:
            await worker.start()
            while not seeds.empty():
                schedule = Schedule.generate(seeds.get_nowait())
                began = time.monotonic()
                try:
                    result = await worker.run(schedule)
                except Exception as exc:  # report it and go on with the next seed
                    log.exception("schedule %d broke the harness", schedule.seed)
                    result = _broken(schedule, exc, time.monotonic() - began)
                results.append(result)
                if progress is not None:
                    progress(result)
        finally:
            await worker.aclose()

    try:
        await asyncio.gather(*(work(i) for i in range(max(1, min(config.jobs, config.schedules)))))
    finally:
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
    results.sort(key=lambda r: r.seed)
    postgres = config.store == "postgres"
    return ChaosSummary(
        results,
        time.monotonic() - started,
        config.server,
        store=config.store,
        lease_ttl=config.lease_ttl if postgres else None,
    )


def _broken(schedule: Schedule, exc: Exception, seconds: float) -> ScheduleResult:
    """A schedule the harness itself could not run to the end (not a tracker verdict)."""
    return ScheduleResult(
        seed=schedule.seed,
        schedule=schedule.describe(),
        messages=0,
        faults=Counter(),
        first_settle=Counter(),
        final=Counter(),
        resent=0,
        found_in_archive=0,
        duplicates_after_resend=Counter(),
        notes=[],
        failed_but_received=0,
        acked_not_received=0,
        violations=[Violation(schedule.seed, "harness", None, f"{type(exc).__name__}: {exc}")],
        seconds=round(seconds, 2),
    )


def _print_progress(result: ScheduleResult) -> None:
    verdict = f"{len(result.violations)} violations" if result.violations else "ok"
    took = ", ".join(f"{t:.2f}s" for t in result.takeovers)
    print(
        f"seed {result.seed}: {result.messages} messages, {result.schedule or 'no faults'}: "
        f"{verdict} ({result.seconds:.1f}s" + (f", takeover {took})" if took else ")"),
        file=sys.stderr,
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``scripts/chaos``: 0 when every invariant held, 1 otherwise."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_sender"]:
        asyncio.run(_sender_main(json.loads(args[1])))
        return 0
    parser = _parser()
    ns = parser.parse_args(args)
    if ns.schedules < 1 or ns.jobs < 1:
        parser.error("--schedules and --jobs must be at least 1")
    if ns.lease_ttl <= 0:
        parser.error("--lease-ttl must be positive")
    seed = ns.seed if ns.seed is not None else random.SystemRandom().randrange(1, 10**6)
    if ns.keep is not None:
        ns.keep.mkdir(parents=True, exist_ok=True)
    config = ChaosConfig(
        schedules=ns.schedules,
        seed=seed,
        jobs=ns.jobs,
        hibernation_time=ns.hibernation,
        work_dir=ns.keep,
        debug=ns.debug,
        server=ns.server,
        store=ns.store,
        lease_ttl=ns.lease_ttl,
    )
    logging.basicConfig(level=logging.ERROR, format="%(name)s %(levelname)s %(message)s")
    summary = asyncio.run(run_chaos(config, None if ns.quiet else _print_progress))
    if ns.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(summary.render())
    return 1 if summary.violations else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/chaos",
        description="Randomized fault schedules against a local server, invariants checked.",
    )
    parser.add_argument("--schedules", type=int, default=10, help="how many (default 10)")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the first schedule (default: random)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="schedules at once, one server each")
    parser.add_argument(
        "--server", choices=SERVER_KINDS, default="prosody", help="which (default prosody)"
    )
    parser.add_argument(
        "--hibernation",
        type=int,
        default=2,
        help="the server's resumption window (s): smacks_hibernation_time, resume_timeout",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no line per schedule")
    parser.add_argument("--keep", type=Path, default=None, help="keep files in this directory")
    parser.add_argument(
        "--debug", action="store_true", help="with --keep: the senders log every stanza"
    )
    parser.add_argument(
        "--store",
        choices=STORE_KINDS,
        default="sqlite",
        help="alice's store (default sqlite); postgres: a private cluster, and a kill "
        "is a failover to a standby that waits for the killed one's lease",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=2.0,
        help="with --store postgres: alice's lease in seconds (default 2)",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())

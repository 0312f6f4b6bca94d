"""Chaos schedules: the generator, the invariant checker, the summary, and a short live run.

The live run is small on purpose (three schedules that together meet every fault
kind, and two with kills on PostgreSQL, where a kill is a failover); a large one is
``scripts/chaos --schedules 200 --jobs 4``. The checker is
tested on its own first: a chaos run that finds nothing proves something only if
the checker would have said so.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from slixmpp.stanza import Message
from slixmpp.xmlstream import ET

from devtools.chaos import (
    FAULT_KINDS,
    STORE_KINDS,
    ChaosConfig,
    ChaosSummary,
    Observation,
    Schedule,
    ScheduleResult,
    Violation,
    _Bob,
    _parser,
    _start_sender,
    check_invariants,
    run_chaos,
)
from xmpp_sm_tracker import DeliveryState, MemoryStore, TrackedMessage
from xmpp_sm_tracker.testing import FaultProxy, LocalXMPPServer
from xmpp_sm_tracker.testing.client import connect_client, make_client, tracker_of, wait_for

ROOT = Path(__file__).resolve().parent.parent
HIBERNATION = 2


def covering_seed(count: int = 3) -> int:
    """The first seed whose ``count`` consecutive schedules meet every fault kind, with
    at least one refusal or kill longer than the server's hibernation time."""
    for seed in range(1, 10_000):
        schedules = [Schedule.generate(seed + i) for i in range(count)]
        faults = [f for s in schedules for f in s.faults]
        kinds = {f.kind for f in faults}
        expiry = any(f.kind in ("refuse", "kill") and f.duration > HIBERNATION for f in faults)
        if kinds == set(FAULT_KINDS) and expiry:
            return seed
    raise AssertionError("no covering seed")


def failover_seed(count: int = 2) -> int:
    """The first seed whose ``count`` consecutive schedules each kill the sender."""
    for seed in range(1, 10_000):
        schedules = [Schedule.generate(seed + i) for i in range(count)]
        if all(any(f.kind == "kill" for f in s.faults) for s in schedules):
            return seed
    raise AssertionError("no failover seed")


# ---------------------------------------------------------------------- schedules


def test_a_seed_always_gives_the_same_schedule() -> None:
    assert Schedule.generate(42) == Schedule.generate(42)
    assert Schedule.generate(42) != Schedule.generate(43)
    schedule = Schedule.generate(42)
    assert [schedule.target(n) for n in range(30)] == [
        Schedule.generate(42).target(n) for n in range(30)
    ]


def test_faults_are_ordered_apart_and_every_kind_is_drawn() -> None:
    seen: Counter[str] = Counter()
    longest: dict[str, float] = {}
    for seed in range(500):
        schedule = Schedule.generate(seed)
        assert 12 <= schedule.messages <= 30 and schedule.interval > 0
        assert 1 <= len(schedule.faults) <= 4
        for earlier, later in zip(schedule.faults, schedule.faults[1:], strict=False):
            assert earlier.at + earlier.duration < later.at, schedule
        for fault in schedule.faults:
            seen[fault.kind] += 1
            longest[fault.kind] = max(longest.get(fault.kind, 0.0), fault.duration)
            assert fault.duration == 0 if fault.kind == "cut" else fault.duration >= 0
        targets = {schedule.target(n) for n in range(schedule.messages)}
        assert targets <= {"chat", "groupchat"}
    assert set(seen) == set(FAULT_KINDS)
    assert min(seen.values()) > 100
    # long enough for the server's hibernation to expire under a refusal or a kill
    assert longest["refuse"] > HIBERNATION and longest["kill"] > HIBERNATION


# ---------------------------------------------------------------------- the checker


def record(
    message_id: str,
    state: DeliveryState,
    *,
    kind: str = "chat",
    reason: str | None = None,
    attempts: int = 1,
) -> TrackedMessage:
    return TrackedMessage(
        id=message_id,
        origin_id=message_id,
        to="bob@localhost" if kind == "chat" else "room@conference.localhost",
        type=kind,
        body=f"body of {message_id}",
        state=state,
        xml="<message/>",
        created_at=1.0,
        updated_at=2.0,
        attempts=attempts,
        reason=reason,
        seq=1,
    )


def clean_observation() -> Observation:
    records = {
        "a": record("a", DeliveryState.ACKED),
        "r": record("r", DeliveryState.ROOM_RECEIVED, kind="groupchat"),
        "f": record("f", DeliveryState.FAILED, reason="resume-failed"),
        "x": record("x", DeliveryState.ACKED, reason="found-in-archive"),
        "d": record("d", DeliveryState.ACKED, attempts=2),
    }
    return Observation(
        seed=7,
        records=records,
        reported={"a", "r", "f", "x", "d"},
        received={"a": 1, "r": 1, "x": 1, "d": 2},  # d came twice: the resend pass sent it
        resent={"d"},
        first_settle={i: (r.state.value, r.reason) for i, r in records.items()},
    )


def test_a_clean_run_breaks_no_invariant() -> None:
    assert check_invariants(clean_observation()) == []


def test_the_checker_names_every_broken_promise_with_the_seed() -> None:
    obs = clean_observation()
    obs.records["s"] = record("s", DeliveryState.SENT)  # never settled
    obs.reported.add("lost")  # stored by the sender, gone from the file
    obs.received = {**obs.received, "ghost": 1}  # bob has it, the file does not
    obs.received = {**obs.received, "f": 1}  # bob has it, the file says failed
    obs.received = {**obs.received, "a": 2}  # twice, and nobody resent it
    obs.unsent_at_settle = {"u"}  # failed, never written, yet bob had it before a resend
    obs.records["u"] = record("u", DeliveryState.ACKED, attempts=2)
    obs.received_before_resend = {"u": 1}
    obs.received = {**obs.received, "u": 2}
    obs.resent = {*obs.resent, "u"}
    obs.stuck = ["h"]
    obs.first_settle["h"] = ("hibernated", None)
    obs.first_settle["z"] = ("resent", None)
    found = {(v.kind, v.message_id) for v in check_invariants(obs)}
    assert found == {
        ("unsettled", "s"),
        ("unsettled", "z"),
        ("record-lost", "lost"),
        ("received-not-recorded", "ghost"),
        ("received-but-not-acked", "f"),
        ("received-twice", "a"),
        ("in-flight-after-settle", "h"),
        ("delivered-though-unsent", "u"),
    }
    obs.sender_killed = True  # its last writes may be gone: not held against the tracker
    assert "delivered-though-unsent" not in {v.kind for v in check_invariants(obs)}
    assert {v.seed for v in check_invariants(obs)} == {7}


def test_the_summary_counts_and_names_the_seed_to_replay() -> None:
    ok = ScheduleResult(
        seed=3,
        schedule="cut@0.5",
        messages=10,
        faults=Counter({"cut": 1}),
        first_settle=Counter({"acked": 9, "failed:resume-failed": 1}),
        final=Counter({"acked": 10}),
        resent=1,
        found_in_archive=0,
        duplicates_after_resend=Counter({"room": 1}),
        notes=[],
        failed_but_received=0,
        acked_not_received=0,
        violations=[],
        seconds=4.0,
    )
    bad = ScheduleResult(
        **{
            **vars_of(ok),
            "seed": 4,
            "violations": [Violation(4, "received-twice", "m1", "bob got it 2x")],
        }
    )
    summary = ChaosSummary([ok, bad], seconds=9.5)
    text = summary.render()
    assert "2 schedules (seeds 3..4), 20 messages" in text
    assert "cut 2" in text and "failed:resume-failed 2" in text
    assert "reached bob twice after a resend 2 (room 2)" in text
    assert "received-twice" in text and "replay: scripts/chaos --schedules 1 --seed 4" in text
    data = summary.as_dict()
    assert data["faults"] == {"cut": 2} and len(data["violations"]) == 1
    assert "violations: none" in ChaosSummary([ok], 1.0).render()
    assert "takeovers" not in text and data["store"] == "sqlite" and data["takeovers"] == []

    ok.takeovers, bad.takeovers = [1.9, 1.7], [1.8]
    on_postgres = ChaosSummary([ok, bad], 9.5, store="postgres", lease_ttl=2.0)
    text = on_postgres.render()
    assert text.startswith("chaos on prosody (postgres store): 2 schedules")
    assert "takeovers            3 (SIGKILL to lease taken, lease_ttl 2 s): " in text
    assert "min 1.70 s, median 1.80 s, max 1.90 s" in text
    assert on_postgres.as_dict()["takeovers"] == [1.7, 1.8, 1.9]
    none = ChaosSummary([ScheduleResult(**{**vars_of(ok), "takeovers": []})], 1, store="postgres")
    assert "takeovers            none" in none.render()


def vars_of(result: ScheduleResult) -> dict[str, Any]:
    return {name: getattr(result, name) for name in ScheduleResult.__slots__}


def test_the_store_options_parse() -> None:
    parser = _parser()
    default = parser.parse_args([])
    assert (default.store, default.lease_ttl) == ("sqlite", 2.0)
    chosen = parser.parse_args(["--store", "postgres", "--lease-ttl", "1.5"])
    assert (chosen.store, chosen.lease_ttl) == ("postgres", 1.5)
    assert STORE_KINDS == ("sqlite", "postgres")
    with pytest.raises(SystemExit):
        parser.parse_args(["--store", "mysql"])
    assert ChaosConfig().store == "sqlite"


async def test_the_dsn_reaches_the_sender_in_its_environment_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    async def spawn(*argv: str, **kwargs: Any) -> Any:
        seen.update(argv=argv, env=kwargs["env"])
        raise OSError("not started")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn)
    dsn = "postgresql://role:s3cret@127.0.0.1:5/db"
    with pytest.raises(OSError):
        await _start_sender({"store": "postgres"}, tmp_path / "log", dsn)
    assert seen["env"]["CHAOS_STORE_DSN"] == dsn
    assert not any("s3cret" in arg for arg in seen["argv"])


def test_bob_counts_live_copies_only() -> None:
    bob = _Bob(("127.0.0.1", 1))
    bob.room = "room@conference.localhost"

    def feed(xml: str) -> None:
        bob._on_message(Message(bob.xmpp, xml=ET.fromstring(xml)))

    chat = (
        "<message xmlns='jabber:client' type='chat' from='alice@localhost/x' id='{i}'>"
        "<body>b</body><origin-id xmlns='urn:xmpp:sid:0' id='{i}'/>{extra}</message>"
    )
    feed(chat.format(i="live", extra=""))
    feed(
        chat.format(
            i="resent", extra="<delay xmlns='urn:xmpp:delay' stamp='2020-01-01T00:00:00Z'/>"
        )
    )
    feed(
        chat.format(
            i="offline",
            extra="<delay xmlns='urn:xmpp:delay' from='localhost' stamp='2020-01-01T00:00:00Z'/>",
        )
    )
    room = (
        "<message xmlns='jabber:client' type='groupchat' from='room@conference.localhost/{nick}'"
        " id='x'><body>b</body><origin-id xmlns='urn:xmpp:sid:0' id='{i}'/>{extra}</message>"
    )
    feed(room.format(nick="Alice", i="in-room", extra=""))
    feed(room.format(nick="Mallory", i="not-alice", extra=""))
    feed(
        room.format(
            nick="Alice",
            i="history",
            extra="<delay xmlns='urn:xmpp:delay' from='room@conference.localhost' "
            "stamp='2020-01-01T00:00:00Z'/>",
        )
    )
    feed(chat.format(i="live", extra="").replace("alice@", "eve@"))
    assert dict(bob.counts) == {"live": 1, "resent": 1, "in-room": 1}


# ---------------------------------------------------------------------- live


async def test_chaos_schedules_keep_every_invariant(
    xmpp_server_kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = covering_seed()
    config = ChaosConfig(
        schedules=3, seed=seed, hibernation_time=HIBERNATION, server=xmpp_server_kind
    )
    summary = await run_chaos(config)
    with capsys.disabled():
        print(f"\n{summary.render()}\n")
    assert summary.violations == []
    data = summary.as_dict()
    assert data["server"] == xmpp_server_kind
    assert data["schedules"] == 3 and data["messages"] >= 36
    assert set(data["faults"]) == set(FAULT_KINDS)
    settled = {"acked", "room_received", "failed", "delivered", "displayed"}
    for outcome in [*data["first_settle"], *data["final"]]:
        assert outcome.split(":", 1)[0] in settled, outcome
    assert sum(data["final"].values()) == data["messages"]


async def test_chaos_failovers_on_postgres_keep_every_invariant(
    xmpp_server_kind: str, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each kill is a failover: the next sender waits for the killed one's lease."""
    seed = failover_seed()
    config = ChaosConfig(
        schedules=2,
        seed=seed,
        hibernation_time=HIBERNATION,
        server=xmpp_server_kind,
        store="postgres",
        dsn=postgres_dsn,
        lease_ttl=2.0,
    )
    summary = await run_chaos(config)
    with capsys.disabled():
        print(f"\n{summary.render()}\n")
    assert summary.violations == []
    data = summary.as_dict()
    assert data["store"] == "postgres" and data["lease_ttl"] == 2.0
    assert data["schedules"] == 2 and data["faults"]["kill"] >= 2
    settled = {"acked", "room_received", "failed", "delivered", "displayed"}
    for outcome in [*data["first_settle"], *data["final"]]:
        assert outcome.split(":", 1)[0] in settled, outcome
    assert sum(data["final"].values()) == data["messages"]
    # At least one kill hit an owner: its successor waited for the lease to lapse,
    # which is lease_ttl after its last renewal (every third of it), so no sooner
    # than about two thirds of it after the SIGKILL.
    assert data["takeovers"], data
    assert all(0 < t < 2.0 * 5 for t in data["takeovers"]), data["takeovers"]
    assert max(data["takeovers"]) > 2.0 / 2, data["takeovers"]
    assert "takeovers" in summary.render()


def test_scripts_chaos_replays_one_seed_and_prints_json() -> None:
    seed = covering_seed()
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "chaos"), "--schedules", "1", "--seed", str(seed),
         "--json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    data: dict[str, Any] = json.loads(done.stdout[done.stdout.index("{") :])
    assert data["schedules"] == 1 and data["seeds"] == [seed, seed]
    planned = Counter(f.kind for f in Schedule.generate(seed).faults)
    assert data["faults"] == dict(planned)
    assert data["violations"] == []


def test_the_chaos_module_runs_as_a_script_with_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "devtools.chaos", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    assert "--schedules" in done.stdout and "--seed" in done.stdout
    assert "--store" in done.stdout and "--lease-ttl" in done.stdout


# ---------------------------------------------------------------------- found by chaos


class GatedStore(MemoryStore):
    """A MemoryStore whose writes wait at a gate: a slow disk, held on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        await super().upsert(records)


async def test_a_message_failed_during_send_message_never_goes_out_unasked(
    server: LocalXMPPServer, proxy: FaultProxy
) -> None:
    """Regression (found by scripts/chaos --seed 5045, a refusal during the first
    negotiation): when the session ended while send_message() was storing the
    record, the message was failed as never sent and then handed over anyway; the
    server got it, and the resend pass (no seq, no archive check) sent it twice."""
    received: list[str] = []
    bob = make_client("bob@localhost/chaos-regression", "pass", tracked=False)
    bob.add_event_handler("message", lambda m: received.append(str(m["body"])))
    # without resumption every drop ends the session, as before the first <enabled/>
    alice = make_client(
        "alice@localhost/chaos-regression",
        "pass",
        tracker_config={"allow_resume": False, "reconnect_delay": 0.1, "ack_delay": 0.05},
    )
    tracker = tracker_of(alice)
    store = GatedStore()
    await tracker.attach(store)
    try:
        await connect_client(bob, server.address)
        await connect_client(alice, proxy.address)
        store.gate.clear()
        sending = asyncio.ensure_future(tracker.send_message("bob@localhost", "in the gap"))
        await wait_for(lambda: store.waiting > 0)  # stored? not yet: the disk is slow
        proxy.cut()  # ... and the session ends meanwhile
        await wait_for(lambda: alice.transport is None)
        store.gate.set()
        record = await sending
        await wait_for(lambda: tracker.session_live, timeout=10)  # a fresh session
        await asyncio.sleep(1.0)
        final = await tracker.get(record.id)
        assert final is not None
        delivered = "in the gap" in received
        assert not (delivered and final.state is DeliveryState.FAILED), (
            f"bob got it, yet it is recorded {final.state.value} ({final.reason}, "
            f"seq={final.seq}): the resend pass will send it twice"
        )
    finally:
        tracker.auto_reconnect = False
        for xmpp in (alice, bob):
            xmpp.disconnect(wait=0.5)
        await asyncio.sleep(0.2)


class FreezingStore(MemoryStore):
    """A MemoryStore that stops taking writes once ``frozen``: what a SIGKILL leaves."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = False

    async def upsert(self, records: Sequence[TrackedMessage]) -> None:
        if not self.frozen:
            await super().upsert(records)

    async def save_sm_state(self, state: Any) -> None:
        if not self.frozen:
            await super().save_sm_state(state)


async def test_a_message_whose_seq_died_with_its_sender_is_found_in_the_archive(
    server: LocalXMPPServer, proxy: FaultProxy
) -> None:
    received: list[str] = []
    bob = make_client("bob@localhost/chaos-seq", "pass", tracked=False)
    bob.add_event_handler("message", lambda m: received.append(str(m["body"])))
    silent = {
        "ack_every": 10**6,
        "ack_delay": 3600.0,
        "ack_at_burst_end": False,
        "auto_reconnect": False,
    }
    first = make_client("alice@localhost/chaos-first", "pass", tracker_config=silent)
    second = make_client("alice@localhost/chaos-second", "pass", tracker_config={"ack_delay": 0.05})
    store = FreezingStore()
    try:
        await connect_client(bob, server.address)
        tracker = tracker_of(first)
        await tracker.attach(store)
        tracker.sm.cache(store.save_sm_state)
        await connect_client(first, proxy.address)
        await tracker.flush()
        record = await tracker.send_message("bob@localhost", "died with its seq")
        store.frozen = True  # killed right after: the stanza leaves, its seq is never stored
        await wait_for(lambda: "died with its seq" in received)
        first.abort()  # no goodbye: the server keeps the session for resumption
        stored = await store.get(record.id)
        assert stored is not None and stored.seq is None
        await asyncio.sleep(0.2)  # the dead process writes nothing more
        store.frozen = False  # the next process writes as usual

        successor = tracker_of(second)
        await successor.attach(store)
        successor.sm.load(await store.load_sm_state())
        second.connect(*proxy.address)
        await wait_for(lambda: successor.session_live, timeout=10)
        await wait_for(lambda: record.id not in successor.core.records, timeout=5)
        settled = await successor.get(record.id)
        assert settled is not None and settled.state is not DeliveryState.SENT, settled
        await successor.resend_failed()
        await asyncio.sleep(1.0)
        assert received.count("died with its seq") == 1
        final = await successor.get(record.id)
        assert final is not None and final.state is DeliveryState.ACKED
    finally:
        tracker_of(second).auto_reconnect = False
        for xmpp in (first, second, bob):
            xmpp.disconnect(wait=0.5)
        await asyncio.sleep(0.2)

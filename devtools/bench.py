"""What tracking costs next to bare slixmpp, measured on a local Prosody this starts.

Run with ``./scripts/bench`` (or ``python -m devtools.bench`` from the repository
root); ``--quick`` is a smoke run, ``--full`` adds the 100 000-in-flight sizes,
``--json FILE`` keeps every sample. One run prints one table, with bare slixmpp,
bare slixmpp sending the same stanzas as the tracker (with the XEP-0359 origin-id),
the tracker with ``MemoryStore`` and the tracker with ``SQLiteStore`` side by side.
Repeated measurements are reported as the median:

* acked messages per second, alice → bob, and the ratios to bare (paired per repeat);
  Prosody's and alice's CPU per message (alice's on the live link of those runs, and
  on a stalled link, where no reads interleave, her acks are read once Prosody is
  done, and a store writes every record twice: three runs per repeat), and
  ``sm.cache`` calls under load;
* a lone message on an idle link: send to ``message:acked`` (bare: to its own
  ``stanza_acked``), p50 and p90, with the default settings and with ``ack_every=1``,
  next to the link's round trip;
* the cost per message of send, ack, reflection and resume with 1 000, 10 000 (and
  with ``--full`` 100 000) in flight, and of one ``sm.cache`` hand-over: in process,
  without a server (:mod:`devtools.bench_wire`);
* memory per in-flight message through the whole client (tracemalloc);
* ``sm.cache`` calls for 4 000 durable sends (``tracker.send_message``, SQLiteStore)
  while unacked;
* 10 000 messages unacked when the link is cut, then resumed: the time to settle them,
  next to the time Prosody needs for the same stanzas written on a live stream;
* ``SQLiteStore`` state changes per second (batched by the store writer) and the time
  to recover 100 000 in-flight records at start-up.

bob runs in a child process, so only alice's work shares her event loop and CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import gc
import importlib
import io
import json
import logging
import os
import platform
import pstats
import re
import shlex
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import slixmpp
from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.stanza import Message
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

import xmpp_sm_tracker
from xmpp_sm_tracker.core.records import TrackedMessage
from xmpp_sm_tracker.ids import TimeOrderedIds
from xmpp_sm_tracker.stanzas import REQUEST_ACK
from xmpp_sm_tracker.stores.postgres import PostgresStore
from xmpp_sm_tracker.testing import FaultProxy, ProsodyServer, ensure_prosody_installed
from xmpp_sm_tracker.testing.client import connect_client, make_client, tracker_of, wait_for
from xmpp_sm_tracker.testing.postgres import PostgresServer
from xmpp_sm_tracker.testing.prosody import installed_prosody_version

from . import child_env
from .bench_fleet import (
    FLEET_KINDS,
    FLEET_PASSWORD,
    disconnect_client,
    fill_store,
    fleet_database,
    fleet_names,
    fleet_run,
    recover_run,
    store_changes_run,
    store_ids_run,
)
from .bench_instructions import VARIANTS as INSTRUCTION_VARIANTS
from .bench_instructions import instructions_run, valgrind
from .bench_wire import SCALE_OPS, scale_run

__all__ = [
    "COLUMNS",
    "PARTS",
    "SQLITE_NA",
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "Metric",
    "format_markdown",
    "format_table",
    "machine_info",
    "main",
    "receiver_main",
    "run_bench",
    "sqlite_store_class",
]

#: "bare_oid" is bare slixmpp sending the same stanzas as the tracker (with an
#: XEP-0359 origin-id): it tells the cost of tracking from the cost of the bigger stanza.
Variant = Literal["bare", "bare_oid", "memory", "sqlite"]
Progress = Callable[[str], None]
#: The table's columns: what each variant is.
COLUMNS: dict[str, str] = {
    "bare": "bare slixmpp",
    "bare_oid": "bare, same stanzas",
    "memory": "tracked, MemoryStore",
    "sqlite": "tracked, SQLiteStore",
    "postgres": "tracked, PostgresStore",
}
_SHORT = {
    "bare": "bare",
    "bare_oid": "same stanzas",
    "memory": "memory",
    "sqlite": "SQLite",
    "postgres": "PostgreSQL",
}

PASSWORD = "bench-pass"
BOB = "bob@localhost"
ORIGIN_ID_TAG = "{urn:xmpp:sid:0}origin-id"
SQLITE_NA = "n/a (SQLiteStore not available)"
#: The benchmarks, in the order they run.
PARTS = (
    "throughput",
    "latency",
    "scale",
    "instructions",
    "resume",
    "memory",
    "durable",
    "sqlite",
    "postgres",
    "fleet",
)
_BODY = "{jabber:client}body"
#: Settings that keep every message of the memory and durable runs unacked until we say
#: (and written: no max_unacked window holds them back).
_NO_ACKS: dict[str, Any] = {
    "ack_every": 10**6,
    "ack_delay": 3600.0,
    "ack_at_burst_end": False,
    "max_unacked": None,
}
#: How soon alice reconnects after the cut in the resume test (part of the time measured).
_RECONNECT_DELAY = 0.05
#: The resume run keeps the default ack policy, so its resend asks for acks as it goes,
#: as a user's does: the stalled link keeps the burst unacked until the cut. No
#: max_unacked window holds the 10 000 back.
_RESUME_CONFIG: dict[str, Any] = {
    "max_unacked": None,
    "reconnect_delay": _RECONNECT_DELAY,
    "reconnect_max_delay": 0.5,
}


class BenchError(RuntimeError):
    """A benchmark could not run to the end (timeout, a child process died, ...)."""


# ---------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repeats of one bench run."""

    #: Messages per throughput run (alice → bob).
    messages: int = 5000
    #: Messages sent first on each connection and not timed.
    warmup: int = 100
    #: Messages unacked when the link is cut, then resumed.
    resume_messages: int = 10_000
    #: In-flight messages measured with tracemalloc.
    memory_messages: int = 5000
    #: Record changes written through the batching store writer.
    sqlite_changes: int = 100_000
    #: Changes handed to the writer per event-loop turn in that test.
    sqlite_burst: int = 100
    #: In-flight records recovered from SQLite at start-up.
    recover_records: int = 100_000
    #: Settled records kept in SQLite before timing the cost of its index of ids...
    ids_kept: int = 50_000
    #: ...over this many messages sent and acked, this many new ones a transaction (about
    #: what the live link's transactions hold: 5 000 messages in 25-36 of them).
    ids_messages: int = 5000
    ids_batch: int = 140
    #: How many times each measurement runs (medians are reported).
    repeat: int = 3
    #: The stalled-link CPU runs are cheap and vary most from run to run (a shared
    #: VM's CPU time varies by ±20%): they run this many times per repeat.
    cpu_runs_per_repeat: int = 3
    #: So do the throughput runs (their alice CPU and msg/s moved a median of 7 by
    #: ±0.1 from one bench run to the next): this many per repeat, all paired.
    throughput_runs_per_repeat: int = 3
    #: Profile one extra tracked (MemoryStore) throughput run with cProfile.
    profile: bool = False
    #: Which benchmarks run (all by default).
    parts: tuple[str, ...] = PARTS
    #: Let Prosody archive messages (MAM). Off by default: its memory archive truncates
    #: at 1 000 items per user, which makes Prosody the bottleneck (~1 500 msg/s, drifting).
    archive: bool = False
    #: Lone messages timed per tracked setting (measured once, not repeated).
    latency_samples: int = 30
    #: Lone messages timed with bare slixmpp (each may wait ``latency_wait``).
    bare_latency_samples: int = 5
    #: Seconds a lone message may wait for its ack before it counts as never acked.
    latency_wait: float = 1.0
    #: Messages in flight for the per-message costs (``--full`` adds 100 000).
    scale: tuple[int, ...] = (1000, 10_000)
    #: Messages timed per operation at each of those sizes.
    scale_batch: int = 1000
    #: Messages sent and acked in each instruction count (valgrind, in process).
    instruction_messages: int = 2000
    #: Durable sends (``tracker.send_message``) while nothing is acked.
    durable_sends: int = 4000
    #: Accounts in the fleet run (one process, one shared store) and messages each sends.
    fleet_accounts: int = 500
    fleet_messages: int = 20

    @classmethod
    def quick(cls, repeat: int = 1) -> BenchConfig:
        """Small sizes: proves the bench works in a few seconds, measures little."""
        return cls(
            messages=200,
            warmup=20,
            resume_messages=500,
            memory_messages=200,
            sqlite_changes=5000,
            recover_records=5000,
            ids_kept=2000,
            ids_messages=500,
            repeat=repeat,
            latency_samples=5,
            bare_latency_samples=2,
            latency_wait=0.5,
            scale=(1000,),
            scale_batch=200,
            instruction_messages=200,
            durable_sends=200,
            fleet_accounts=20,
            fleet_messages=5,
            cpu_runs_per_repeat=1,
            throughput_runs_per_repeat=1,
        )

    @classmethod
    def full(cls, repeat: int = 3) -> BenchConfig:
        """The default sizes, and 100 000 in flight for the per-message costs."""
        return cls(repeat=repeat, scale=(1000, 10_000, 100_000))

    def __post_init__(self) -> None:
        for name in (
            "messages",
            "resume_messages",
            "memory_messages",
            "repeat",
            "cpu_runs_per_repeat",
            "throughput_runs_per_repeat",
            "latency_samples",
            "bare_latency_samples",
            "scale_batch",
            "instruction_messages",
            "durable_sends",
            "fleet_accounts",
            "fleet_messages",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"bench config: {name} must be at least 1")
        if not self.scale or min(self.scale) < 1 or self.latency_wait <= 0:
            raise ValueError("bench config: scale sizes and latency_wait must be positive")
        if (
            self.sqlite_changes < 2
            or self.recover_records < 1
            or self.sqlite_burst < 1
            or min(self.ids_messages, self.ids_batch) < 1
            or self.ids_kept < 0
        ):
            raise ValueError("bench config: sqlite sizes must be positive")
        if self.warmup < 0:
            raise ValueError("bench config: warmup must be >= 0")
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"bench config: unknown parts {sorted(unknown)}; known: {PARTS}")


@dataclass
class Metric:
    """One cell of the table: the median over repeats (the worst for correctness
    counts), checked against its target when it has one. ``row`` is the table's line
    (shared by the variants measured side by side), ``column`` the variant."""

    key: str
    label: str
    value: float | None
    unit: str
    target: str = ""
    ok: bool | None = None
    samples: list[float] = field(default_factory=list)
    note: str = ""
    row: str = ""
    column: str = "memory"

    def shown(self) -> str:
        """The value as printed in the table."""
        if self.value is None:
            return self.note or "n/a"
        if self.unit == "×":
            spread = f" ({min(self.samples):.2f}–{max(self.samples):.2f})"
            return f"{self.value:.2f}×" + (spread if len(self.samples) > 1 else "")
        if self.unit == "s":
            return f"{self.value:.3f} s"
        if self.unit in ("calls", "µs", "ms"):
            return f"{self.value:.1f} {self.unit}"
        return f"{self.value:,.0f} {self.unit}".replace(",", " ").strip()


@dataclass
class BenchResult:
    """Everything one run measured: the table's metrics and each run's raw numbers."""

    machine: dict[str, Any]
    config: dict[str, Any]
    command: str
    metrics: list[Metric]
    runs: dict[str, list[dict[str, Any]]]
    profile: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    duration_s: float = 0.0

    def metric(self, key: str) -> Metric:
        """The metric named ``key`` (KeyError if the run has none)."""
        for metric in self.metrics:
            if metric.key == key:
                return metric
        raise KeyError(key)

    @property
    def all_ok(self) -> bool:
        """True when no metric with a target missed it."""
        return all(m.ok is not False for m in self.metrics)

    def to_json(self) -> str:
        """The whole result as JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False)


# ---------------------------------------------------------------------- environment


def sqlite_store_class() -> Any | None:
    """``SQLiteStore`` when this installation has it, else None (checked at run time)."""
    try:
        module = importlib.import_module("xmpp_sm_tracker.stores.sqlite")
    except ImportError:
        return None
    return getattr(module, "SQLiteStore", None)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """The machine and software the numbers come from."""
    return {
        "cores": os.cpu_count(),
        "load_average": _load_average(),
        "cpu": _cpu_model(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "slixmpp": getattr(slixmpp, "__version__", _version("slixmpp")),
        "prosody": installed_prosody_version() or "?",
        "xmpp_sm_tracker": _version("xmpp_sm_tracker"),
        "sqlite_store": sqlite_store_class() is not None,
    }


def _machine_line(machine: dict[str, Any]) -> str:
    load = (machine.get("load_average_before"), machine.get("load_average"))
    return (
        f"{machine['cores']} cores ({machine['cpu']}), {machine['system']}, "
        f"Python {machine['python']}, slixmpp {machine['slixmpp']}, "
        f"Prosody {machine['prosody']}, load average {load[0]} before, {load[1]} after"
    )


# ---------------------------------------------------------------------- bob, in a child


_RECEIVER_BOOT = (
    "import sys; from devtools.bench import receiver_main; "
    "raise SystemExit(receiver_main(sys.argv[1:]))"
)


def receiver_main(argv: Sequence[str]) -> int:
    """Child process: ``JID PASSWORD HOST PORT``; counts received bodies per tag.

    Speaks a line protocol on stdin/stdout: ``ready`` once online, then
    ``count TAG`` → ``UNIQUE TOTAL`` (bodies are ``TAG:n``), ``quit`` to leave.
    """
    jid, password, host, port = argv
    logging.basicConfig(level=logging.ERROR)
    return asyncio.run(_receive(jid, password, (host, int(port))))


async def _receive(jid: str, password: str, address: tuple[str, int]) -> int:
    xmpp = make_client(jid, password, tracked=False)
    counts: dict[str, dict[str, int]] = {}

    def on_message(message: Any) -> None:
        body = message.xml.find(_BODY)
        if body is None or not body.text:
            return
        per_tag = counts.setdefault(body.text.partition(":")[0], {})
        per_tag[body.text] = per_tag.get(body.text, 0) + 1

    xmpp.add_event_handler("message", on_message)
    await connect_client(xmpp, address, timeout=30)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while line := await reader.readline():
        command, _, argument = line.decode().strip().partition(" ")
        if command == "count":
            per_tag = counts.get(argument, {})
            print(f"{len(per_tag)} {sum(per_tag.values())}", flush=True)
        elif command == "quit":
            break
    with contextlib.suppress(Exception):
        await asyncio.wait_for(xmpp.disconnect(), 5)
    return 0


class _Receiver:
    """The parent's handle on bob's child process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, jid: str, address: tuple[str, int]) -> _Receiver:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _RECEIVER_BOOT,
            jid,
            PASSWORD,
            address[0],
            str(address[1]),
            env=child_env(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        receiver = cls(proc)
        line = await receiver._readline(60)
        if line != "ready":
            await receiver.aclose()
            raise BenchError(f"bob's receiver process did not come online (said {line!r})")
        return receiver

    async def _readline(self, timeout: float) -> str:
        assert self._proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        except TimeoutError as exc:
            raise BenchError("bob's receiver process stopped answering") from exc
        if not raw:
            raise BenchError(f"bob's receiver process exited ({self._proc.returncode})")
        return raw.decode().strip()

    async def count(self, tag: str) -> tuple[int, int]:
        """(distinct bodies, bodies in all) bob received with ``tag``."""
        assert self._proc.stdin is not None
        async with self._lock:
            self._proc.stdin.write(f"count {tag}\n".encode())
            await self._proc.stdin.drain()
            unique, total = (await self._readline(30)).split()
        return int(unique), int(total)

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def wait(self, tag: str, n: int, timeout: float, settle: float = 0.3) -> tuple[int, int]:
        """Wait until bob has ``n`` distinct bodies of ``tag`` (or timeout), then let
        late duplicates arrive for ``settle`` seconds; returns the final counts."""
        deadline = time.monotonic() + timeout
        unique, _total = await self.count(tag)
        while unique < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            unique, _total = await self.count(tag)
        await asyncio.sleep(settle)
        return await self.count(tag)

    async def aclose(self) -> None:
        proc = self._proc
        if proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.write(b"quit\n")
                await proc.stdin.drain()
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# ---------------------------------------------------------------------- helpers


class _AckCounter:
    """Counts acked messages; a future resolves with the time the n-th one came."""

    def __init__(self, xmpp: slixmpp.ClientXMPP, tracked: bool) -> None:
        self.count = 0
        self._target = 0
        self._future: asyncio.Future[float] | None = None
        if tracked:
            xmpp.add_event_handler("message:acked", self._on_record)
        else:
            xmpp.add_event_handler("stanza_acked", self._on_stanza)

    def _on_record(self, _record: TrackedMessage) -> None:
        self._bump()

    def _on_stanza(self, stanza: Any) -> None:
        if isinstance(stanza, Message):
            self._bump()

    def _bump(self) -> None:
        self.count += 1
        future = self._future
        if future is not None and self.count >= self._target and not future.done():
            future.set_result(time.perf_counter())

    def expect(self, n: int) -> asyncio.Future[float]:
        """Count from zero; the future resolves when ``n`` more messages are acked."""
        self.count = 0
        self._target = n
        self._future = asyncio.get_running_loop().create_future()
        return self._future


async def _connect(xmpp: slixmpp.ClientXMPP, address: tuple[str, int]) -> None:
    """Connect and wait until stream management is on, tracked or not."""
    await connect_client(xmpp, address, timeout=30)
    if "sm_tracker" not in xmpp.plugin:
        xep = xmpp.plugin["xep_0198"]
        await wait_for(lambda: xep.enabled_in, timeout=30)


def _like_tracked(xmpp: slixmpp.ClientXMPP, body: str) -> Message:
    """A chat message to bob as the tracker writes it: slixmpp's own, with the XEP-0359
    origin-id the tracker adds (the same stanza, byte for byte but the id)."""
    message = xmpp.make_message(mto=BOB, mbody=body, mtype="chat")
    ET.SubElement(message.xml, ORIGIN_ID_TAG, {"id": message["id"]})
    return message


def _send_all(xmpp: slixmpp.ClientXMPP, tag: str, n: int, *, origin_id: bool = False) -> None:
    """Send ``n`` chat messages to bob, as an app does.

    ``origin_id``: add the XEP-0359 origin-id the tracker adds, for a like-for-like bare run.
    """
    if origin_id:
        for i in range(n):
            _like_tracked(xmpp, f"{tag}:{i}").send()
    else:
        send = xmpp.send_message
        for i in range(n):
            send(mto=BOB, mbody=f"{tag}:{i}", mtype="chat")


async def _burst(xmpp: slixmpp.ClientXMPP, tag: str, n: int, *, origin_id: bool = False) -> None:
    """Send ``n`` chat messages to bob; bare slixmpp asks for the tail's ack itself."""
    _send_all(xmpp, tag, n, origin_id=origin_id)
    if "sm_tracker" not in xmpp.plugin:
        # xep_0198 writes <r/> straight to the socket: only once the queue is written.
        await xmpp.waiting_queue.join()
        xmpp.plugin["xep_0198"].request_ack()


async def _await(future: Awaitable[float], timeout: float, what: str) -> float:
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError as exc:
        raise BenchError(f"timed out after {timeout:g}s waiting for {what}") from exc


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process ``pid`` so far (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _CPU:
    """CPU seconds spent by alice (this process), Prosody and bob over a span."""

    def __init__(self, prosody: int | None, bob: int | None) -> None:
        self._pids = {"prosody": prosody, "bob": bob}
        self._start: dict[str, float | None] = {}

    def _now(self) -> dict[str, float | None]:
        now: dict[str, float | None] = {"alice": time.process_time()}
        now.update({name: _cpu_seconds(pid) for name, pid in self._pids.items()})
        return now

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float | None]:
        """CPU seconds per process since :meth:`start` (None where unknown)."""
        end = self._now()
        return {
            name: (None if (a := self._start.get(name)) is None or b is None else b - a)
            for name, b in end.items()
        }


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------- throughput


async def _throughput_run(
    server: ProsodyServer,
    bob: _Receiver,
    variant: Variant,
    config: BenchConfig,
    tag: str,
    workdir: Path,
    profiler: cProfile.Profile | None = None,
) -> dict[str, Any]:
    """One timed burst: first send until the server's ``h`` covers all N."""
    n = config.messages
    tracked = variant not in ("bare", "bare_oid")
    origin_id = variant == "bare_oid"
    alice = make_client(f"alice@localhost/{tag}", PASSWORD, tracked=tracked)
    acks = _AckCounter(alice, tracked)
    cache_calls = 0
    store: Any = None
    if tracked:
        tracker = tracker_of(alice)
        if variant == "sqlite":
            store_class = sqlite_store_class()
            assert store_class is not None
            store = store_class(workdir / f"{tag}.sqlite")
            await tracker.attach(store)
            save = store.save_sm_state

            async def cache(state: dict[str, Any] | None) -> None:
                nonlocal cache_calls
                cache_calls += 1
                await save(state)

            tracker.sm.cache(cache)
        else:

            def count_call(_state: dict[str, Any] | None) -> None:
                nonlocal cache_calls
                cache_calls += 1

            tracker.sm.cache(count_call)
    try:
        await _connect(alice, server.address)
        if config.warmup:
            warm = acks.expect(config.warmup)
            await _burst(alice, f"{tag}w", config.warmup, origin_id=origin_id)
            await _await(warm, 60, "the warm-up acks")
        if tracked:
            await tracker.flush()
        await asyncio.sleep(0.05)
        cache_calls = 0
        done = acks.expect(n)
        cpu = _CPU(server.pid, bob.pid)
        cpu.start()
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        await _burst(alice, tag, n, origin_id=origin_id)
        end = await _await(done, max(120.0, n / 50), f"{n} acks ({variant})")
        if profiler is not None:
            profiler.disable()
        seconds = end - start
        flush_s = None
        if tracked:
            # alice's CPU counts until her store has every change (SQLite's worker
            # thread writes after the last ack came), not just until the acks came.
            flush_start = time.perf_counter()
            await tracker.flush()
            flush_s = time.perf_counter() - flush_start
        cpu_s = cpu.stop()
        alice_s = cpu_s.get("alice")
        run: dict[str, Any] = {
            "variant": variant,
            "tag": tag,
            "messages": n,
            "seconds": seconds,
            "acked_per_s": n / seconds,
            "acked": acks.count,
            "cache_calls": cache_calls if tracked else None,
            "cpu_s": cpu_s,
            "alice_us_per_message": None if alice_s is None else 1e6 * alice_s / n,
        }
        if tracked:
            run["store_flush_after_acks_s"] = flush_s
            run["store_pending_after"] = len(await tracker.store.pending())
        unique, total = await bob.wait(tag, n, timeout=max(60.0, n / 100))
        run["bob_unique"], run["bob_total"] = unique, total
        run["lost"], run["duplicated"] = n - unique, total - unique
        return run
    finally:
        await disconnect_client(alice)
        if store is not None:
            await store.aclose()


# ---------------------------------------------------------------------- resume


async def _resume_run(server: ProsodyServer, bob: _Receiver, n: int, tag: str) -> dict[str, Any]:
    """``n`` messages on the wire but unacked, the link cut, the stream resumed."""
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        alice = make_client(
            f"alice@localhost/{tag}",
            PASSWORD,
            tracker_config=_RESUME_CONFIG,
        )
        tracker = tracker_of(alice)
        acks = _AckCounter(alice, tracked=True)
        events: Counter[str] = Counter()
        acked_ids: Counter[str] = Counter()
        for name in ("hibernated", "resent", "failed"):
            tracker.events.on(f"message:{name}", lambda _r, name=name: events.update([name]))
        tracker.events.on("message:acked", lambda r: acked_ids.update([r.id]))
        try:
            await _connect(alice, proxy.address)
            proxy.stall()
            await _burst(alice, tag, n)
            await alice.waiting_queue.join()
            records = tracker.core.records
            await wait_for(
                lambda: sum(1 for r in records.values() if r.seq is not None) >= n, timeout=60
            )
            unacked_at_cut = len(tracker.core.ledger)
            done = acks.expect(n)
            start = time.perf_counter()
            proxy.cut()
            proxy.heal()
            end = await _await(done, max(120.0, n / 20), f"{n} acks after resumption")
            unique, total = await bob.wait(tag, n, timeout=max(60.0, n / 100), settle=1.0)
            return {
                "tag": tag,
                "messages": n,
                "unacked_at_cut": unacked_at_cut,
                "settle_s": end - start,
                "settled_per_s": n / (end - start),
                "reconnect_delay_s": _RECONNECT_DELAY,
                "connections": proxy.connections,
                "hibernated": events["hibernated"],
                "resent": events["resent"],
                "failed": events["failed"],
                "acked_ids": len(acked_ids),
                "acked_twice": sum(c - 1 for c in acked_ids.values()),
                "bob_unique": unique,
                "bob_total": total,
                "lost": n - unique,
                "duplicated": total - unique,
            }
        finally:
            await disconnect_client(alice)


# ---------------------------------------------------------------------- CPU


async def _cpu_run(
    server: ProsodyServer, bob: _Receiver, variant: Variant, n: int, tag: str, workdir: Path
) -> dict[str, Any]:
    """alice's CPU per message, default settings, without the noise of a shared CPU.

    The burst is sent (and tracked) into a stalled link, so no reads interleave and
    Prosody and bob are idle; then the link heals, and once bob has every message
    alice reads the acks, again alone on the machine. CPU time of the whole process
    (the SQLite worker thread too), not wall time: far steadier than rates on a busy
    machine. The tracked runs hand the SM state to ``sm.cache`` as the throughput runs do.
    """
    tracked = variant in ("memory", "sqlite")
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        alice = make_client(
            f"alice@localhost/{tag}",
            PASSWORD,
            tracked=tracked,
            tracker_config={"auto_reconnect": False},
        )
        acks = _AckCounter(alice, tracked)
        store: Any = None
        if tracked:
            tracker = tracker_of(alice)
            if variant == "sqlite":
                store_class = sqlite_store_class()
                assert store_class is not None
                store = store_class(workdir / f"{tag}.sqlite")
                await tracker.attach(store)
                tracker.sm.cache(store.save_sm_state)
            else:
                tracker.sm.cache(lambda _state: None)  # as in the throughput runs
        try:
            await _connect(alice, proxy.address)
            if tracked:
                await tracker.flush()
            proxy.stall()
            await asyncio.sleep(0.05)
            gc.collect()  # an earlier run's garbage is not this run's cost
            start = time.process_time()
            _send_all(alice, tag, n, origin_id=variant == "bare_oid")
            await alice.waiting_queue.join()
            if tracked:
                await tracker.flush()
            send_s = time.process_time() - start
            done = acks.expect(n)
            # alice reads the acks once Prosody and bob are done with the burst, so
            # her CPU is not measured while theirs compete with her for the cores.
            alice.transport.pause_reading()
            proxy.heal()
            alice.send_raw(REQUEST_ACK)  # for the tail, tracked or not
            await bob.wait(tag, n, timeout=max(60.0, n / 100), settle=0.1)
            gc.collect()
            start = time.process_time()
            alice.transport.resume_reading()
            await _await(done, 60, f"the acks of {n} messages")
            if tracked:
                await tracker.flush()
            ack_s = time.process_time() - start
            return {
                "variant": variant,
                "tracked": tracked,
                "messages": n,
                "send_s": send_s,
                "ack_s": ack_s,
                "us_per_message": 1e6 * (send_s + ack_s) / n,
            }
        finally:
            await disconnect_client(alice)
            if store is not None:
                await store.aclose()


# ---------------------------------------------------------------------- latency


def _percentile(values: Sequence[float], share: float) -> float | None:
    """The ``share`` quantile (nearest rank) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


async def _latency_run(
    server: ProsodyServer, kind: str, samples: int, wait: float, tag: str
) -> dict[str, Any]:
    """A lone message on an idle link, ``samples`` times: send to acked, in seconds.

    ``kind``: ``bare`` (slixmpp's ``stanza_acked``), ``default`` (the tracker's
    ``message:acked`` with the default settings) or ``every1`` (``ack_every=1``).
    The bare run also times the link's round trip: a raw ``<r/>`` to its ``<a/>``.
    """
    tracked = kind != "bare"
    alice = make_client(
        f"alice@localhost/{tag}",
        PASSWORD,
        tracked=tracked,
        tracker_config={"ack_every": 1} if kind == "every1" else {},
    )
    loop = asyncio.get_running_loop()
    waiting: dict[str, asyncio.Future[float]] = {}
    answered: list[asyncio.Future[float]] = []

    def acked(message_id: str) -> None:
        future = waiting.pop(message_id, None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    def on_a(_stanza: Any) -> None:
        if answered and not answered[0].done():
            answered.pop(0).set_result(time.perf_counter())

    if tracked:
        alice.add_event_handler("message:acked", lambda record: acked(record.id))
    else:
        alice.add_event_handler(
            "stanza_acked", lambda s: acked(s["id"]) if isinstance(s, Message) else None
        )
        alice.register_handler(
            Callback("bench round trip", MatchXPath(sm_stanza.Ack.tag_name()), on_a, instream=True)
        )
    latencies: list[float] = []
    rtts: list[float] = []
    missed = 0
    try:
        await _connect(alice, server.address)
        await asyncio.sleep(0.5)  # what the session start sent is acked: the link is idle
        if not tracked:
            for _ in range(samples):
                await asyncio.sleep(0.05)
                future = loop.create_future()
                answered.append(future)
                start = time.perf_counter()
                alice.send_raw(REQUEST_ACK)
                rtts.append(await _await(future, 10, "an <a/> for a raw <r/>") - start)
        for i in range(samples):
            await asyncio.sleep(0.3)
            message = alice.make_message(mto=BOB, mbody=f"{tag}:{i}", mtype="chat")
            message["id"] = f"{tag}-{i}"
            future = loop.create_future()
            waiting[message["id"]] = future
            start = time.perf_counter()
            message.send()
            try:
                latencies.append(await asyncio.wait_for(future, wait) - start)
            except TimeoutError:
                missed += 1
        return {
            "kind": kind,
            "samples": samples,
            "latencies_s": latencies,
            "not_acked_within_s": wait,
            "not_acked": missed,
            "rtts_s": rtts,
        }
    finally:
        await disconnect_client(alice)


# ---------------------------------------------------------------------- durable sends


async def _durable_run(server: ProsodyServer, n: int, tag: str, workdir: Path) -> dict[str, Any]:
    """``n`` durable sends, one after the other, while nothing is acked (a stalled
    link): how often the whole SM state goes to ``sm.cache`` (SQLiteStore)."""
    store_class = sqlite_store_class()
    assert store_class is not None
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        alice = make_client(
            f"alice@localhost/{tag}",
            PASSWORD,
            tracker_config={**_NO_ACKS, "auto_reconnect": False},
        )
        tracker = tracker_of(alice)
        store = store_class(workdir / f"{tag}.sqlite")
        await tracker.attach(store)
        save = store.save_sm_state
        calls = entries = 0

        async def cache(state: dict[str, Any] | None) -> None:
            nonlocal calls, entries
            calls += 1
            entries += len(state["unacked"]) if state is not None else 0
            await save(state)

        tracker.sm.cache(cache)
        try:
            await _connect(alice, proxy.address)
            await tracker.flush()
            proxy.stall()
            await asyncio.sleep(0.05)
            calls = entries = 0
            each: list[float] = []
            start = time.perf_counter()
            for i in range(n):
                sent = time.perf_counter()
                await tracker.send_message(BOB, f"{tag}:{i}")
                each.append(time.perf_counter() - sent)
            seconds = time.perf_counter() - start
            await alice.waiting_queue.join()
            tail = each[-max(1, n // 10) :]
            return {
                "sends": n,
                "seconds": seconds,
                "cache_calls": calls,
                "entries_handed_over": entries,
                "unacked_after": len(tracker.core.ledger),
                "last_tenth_ms": 1e3 * statistics.mean(tail),
                "first_tenth_ms": 1e3 * statistics.mean(each[: max(1, n // 10)]),
            }
        finally:
            proxy.heal()
            await disconnect_client(alice)
            await store.aclose()


# ---------------------------------------------------------------------- memory


def _traced_total(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot
) -> tuple[int, list[tracemalloc.StatisticDiff]]:
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
        tracemalloc.Filter(False, "<unknown>"),
    ]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "filename")
    return sum(s.size_diff for s in stats), stats


def _short(path: str) -> str:
    for marker in ("site-packages/", "xmpp_sm_tracker/", "lib/python"):
        if marker in path:
            return path[path.index(marker) :].removeprefix("site-packages/")
    return path


async def _memory_run(
    server: ProsodyServer, variant: Variant, n: int, tag: str, workdir: Path
) -> dict[str, Any]:
    """Bytes that stay allocated per message while ``n`` messages are unacked: the whole
    client (slixmpp, the plugin, its store), as an app sends them."""
    tracked = variant in ("memory", "sqlite")
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        alice = make_client(
            f"alice@localhost/{tag}",
            PASSWORD,
            tracked=tracked,
            tracker_config={**_NO_ACKS, "auto_reconnect": False},
        )
        store: Any = None
        if variant == "sqlite":
            store_class = sqlite_store_class()
            assert store_class is not None
            store = store_class(workdir / f"{tag}.sqlite")
            await tracker_of(alice).attach(store)
        try:
            await _connect(alice, proxy.address)
            if tracked:
                await tracker_of(alice).flush()
            proxy.stall()  # nothing is acked, nothing is freed
            await asyncio.sleep(0.05)
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.take_snapshot()
                send = alice.send_message
                for i in range(n):
                    send(mto=BOB, mbody=f"{tag}:{i}", mtype="chat")
                await alice.waiting_queue.join()
                if tracked:
                    await tracker_of(alice).flush()
                for _ in range(3):
                    await asyncio.sleep(0)
                gc.collect()
                after = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
            total, stats = _traced_total(before, after)
            if tracked:
                in_flight = len(tracker_of(alice).core.ledger)
            else:
                in_flight = len(alice.plugin["xep_0198"].unacked_queue)
            top = sorted(stats, key=lambda s: s.size_diff, reverse=True)[:8]
            return {
                "variant": variant,
                "tracked": tracked,
                "messages": n,
                "in_flight": in_flight,
                "bytes": total,
                "bytes_per_message": total / n,
                "top_files": [
                    {"file": _short(str(s.traceback[0].filename)), "bytes": s.size_diff}
                    for s in top
                ],
            }
        finally:
            proxy.heal()
            await disconnect_client(alice)
            if store is not None:
                await store.aclose()


# ---------------------------------------------------------------------- Prosody alone


async def _prosody_run(server: ProsodyServer, bob: _Receiver, n: int, tag: str) -> dict[str, Any]:
    """The time Prosody needs for ``n`` messages on a live stream: the stanzas the
    tracker resends, written at once (text made beforehand, through the same proxy as
    the resume run), then an ``<r/>``, until the ``<a/>`` that covers them. What a
    resumption cannot beat."""
    async with FaultProxy(server.host, server.c2s_port) as proxy:
        alice = make_client(f"alice@localhost/{tag}", PASSWORD, tracked=False)
        xep = alice.plugin["xep_0198"]
        # Written raw, they are not in xep_0198's queue: its ack handler would complain.
        alice.remove_handler("Stream Management Ack")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[float] = loop.create_future()
        target = 0

        def on_a(stanza: Any) -> None:
            h = int(stanza.xml.get("h", "0"))
            if (h - target) % 2**32 < 2**31 and not done.done():
                done.set_result(time.perf_counter())

        alice.register_handler(
            Callback("bench Prosody ack", MatchXPath(sm_stanza.Ack.tag_name()), on_a, instream=True)
        )
        try:
            await _connect(alice, proxy.address)
            await asyncio.sleep(0.2)
            text = "".join(str(_like_tracked(alice, f"{tag}:{i}")) for i in range(n))
            target = (xep.seq + n) % 2**32
            start = time.perf_counter()
            alice.send_raw(text + REQUEST_ACK)
            end = await _await(done, max(120.0, n / 20), f"the <a/> for {n} raw messages")
            unique, total = await bob.wait(tag, n, timeout=max(60.0, n / 100), settle=0.3)
            return {
                "messages": n,
                "seconds": end - start,
                "bob_unique": unique,
                "bob_total": total,
            }
        finally:
            await disconnect_client(alice)


# ---------------------------------------------------------------------- the run


def _rotate(variants: Sequence[Variant], i: int) -> list[Variant]:
    k = i % len(variants)
    return [*variants[k:], *variants[:k]]


_Func = tuple[str, int, str]

#: The library's own files (the profile shows where its time goes, not the bench's).
_LIBRARY = str(Path(xmpp_sm_tracker.__file__).parent) + os.sep


def _ours(func: _Func) -> bool:
    return func[0].startswith(_LIBRARY)


def _func_name(func: _Func) -> str:
    return f"{_short(func[0])}:{func[1]}({func[2]})"


def _profile_rows(profiler: cProfile.Profile, limit: int = 15) -> dict[str, Any]:
    """Where a tracked run spends its time inside xmpp_sm_tracker.

    ``entry_points``: our functions called from outside (slixmpp, asyncio), inclusive
    time: together, what tracking costs. ``hot_spots``: our functions by own time, and
    library functions by the inclusive time of the calls our code makes to them.
    """
    stats = pstats.Stats(profiler, stream=io.StringIO())
    raw: dict[_Func, tuple[int, int, float, float, dict[_Func, tuple[Any, ...]]]]
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values())
    entries: dict[_Func, list[float]] = {}
    hot: list[dict[str, Any]] = []
    for func, (_cc, calls, tottime, _ct, callers) in raw.items():
        if _ours(func):
            hot.append({"function": _func_name(func), "calls": calls, "seconds": tottime})
        for caller, (_ccc, ncalls, _ctt, cumtime) in callers.items():
            if _ours(func) and not _ours(caller):
                entry = entries.setdefault(func, [0, 0.0])
                entry[0] += ncalls
                entry[1] += cumtime
            elif _ours(caller) and not _ours(func):
                name = f"{_func_name(func)} <- {caller[2]}"
                hot.append({"function": name, "calls": ncalls, "seconds": cumtime})
    entry_rows: list[dict[str, Any]] = [
        {"function": _func_name(func), "calls": int(calls), "seconds": seconds}
        for func, (calls, seconds) in entries.items()
    ]
    for rows in (entry_rows, hot):
        rows.sort(key=lambda row: float(row["seconds"]), reverse=True)
        for row in rows:
            row["share"] = row["seconds"] / total if total else 0.0
    return {"total_s": total, "entry_points": entry_rows[:limit], "hot_spots": hot[:limit]}


async def run_bench(
    config: BenchConfig,
    base_dir: Path,
    *,
    progress: Progress | None = None,
    command: str = "scripts/bench",
) -> BenchResult:
    """Start Prosody under ``base_dir``, run the benchmarks, return the result."""
    say: Progress = progress or (lambda _text: None)
    started_at, t0 = time.time(), time.perf_counter()
    load_before = _load_average()
    if load_before is not None and load_before > 0.5 * (os.cpu_count() or 1):
        say(f"warning: the machine is busy (load average {load_before}): numbers will be noisy")
    have_sqlite = sqlite_store_class() is not None
    runs: dict[str, list[dict[str, Any]]] = {
        "throughput": [],
        "cpu": [],
        "latency": [],
        "scale": [],
        "instructions": [],
        "resume": [],
        "prosody": [],
        "memory": [],
        "durable": [],
        "sqlite_changes": [],
        "sqlite_recover": [],
        "sqlite_ids": [],
        "postgres_changes": [],
        "postgres_recover": [],
        "fleet": [],
    }
    profile: dict[str, Any] = {}
    workdir = base_dir / "stores"
    workdir.mkdir(parents=True, exist_ok=True)
    live = {"throughput", "latency", "resume", "memory", "durable"}
    if live & set(config.parts) or config.profile:
        profile = await _live_parts(config, base_dir, workdir, runs, have_sqlite, say)
    if "scale" in config.parts:
        await _scale_parts(config, workdir, runs, have_sqlite, say)
    if "instructions" in config.parts:
        await _instruction_parts(config, workdir, runs, have_sqlite, say)
    if "sqlite" in config.parts and have_sqlite:
        await _sqlite_parts(config, workdir, runs, say)
    if {"postgres", "fleet"} & set(config.parts):
        with PostgresServer(database="bench") as postgres:
            if "postgres" in config.parts:
                await _postgres_parts(config, postgres.dsn, runs, say)
            if "fleet" in config.parts:
                await _fleet_parts(config, base_dir, workdir, postgres.dsn, runs, say)
    machine = machine_info()
    machine["load_average_before"] = load_before
    return BenchResult(
        machine=machine,
        config=dataclasses.asdict(config),
        command=command,
        metrics=_metrics(config, runs, have_sqlite),
        runs=runs,
        profile=profile,
        started_at=started_at,
        duration_s=time.perf_counter() - t0,
    )


async def _live_parts(
    config: BenchConfig,
    base_dir: Path,
    workdir: Path,
    runs: dict[str, list[dict[str, Any]]],
    have_sqlite: bool,
    say: Progress,
) -> dict[str, Any]:
    """The benchmarks against Prosody; returns the profile (if asked for)."""
    ensure_prosody_installed()
    variants: list[Variant] = ["bare", "bare_oid", "memory"]
    if have_sqlite:
        variants.append("sqlite")
    biggest = max(
        config.resume_messages, config.messages, config.memory_messages, config.durable_sends
    )
    server = ProsodyServer(
        base_dir / "prosody",
        log_level="warn",
        smacks_max_queue_size=2 * biggest + 500,
        extra_config="" if config.archive else "default_archive_policy = false",
    )
    for user in ("alice", "bob"):
        server.register(user, PASSWORD)
    profile: dict[str, Any] = {}
    parts = set(config.parts)
    async with server:
        bob = await _Receiver.start(f"{BOB}/bench", server.address)
        try:
            throughput_runs = config.repeat * config.throughput_runs_per_repeat
            for i in range(throughput_runs if "throughput" in parts else 0):
                for variant in _rotate(variants, i):
                    tag = f"t{i}{variant}"
                    run = await _throughput_run(server, bob, variant, config, tag, workdir)
                    runs["throughput"].append(run)
                    say(
                        f"throughput {i + 1}/{throughput_runs} {variant:<8} "
                        f"{run['acked_per_s']:8.0f} acked msg/s "
                        f"(lost {run['lost']}, duplicated {run['duplicated']})"
                    )
            if config.profile:
                profiler = cProfile.Profile()
                await _throughput_run(server, bob, "memory", config, "prof", workdir, profiler)
                profile = _profile_rows(profiler)
                say("profiled one tracked (MemoryStore) throughput run")
            cpu_runs = config.repeat * config.cpu_runs_per_repeat
            for i in range(cpu_runs if "throughput" in parts else 0):
                for variant in _rotate(variants, i):
                    tag = f"c{i}{variant}"
                    run = await _cpu_run(server, bob, variant, config.messages, tag, workdir)
                    runs["cpu"].append(run)
                    cost = run["us_per_message"]
                    say(f"cpu {i + 1}/{cpu_runs} {variant:<8} {cost:.1f} µs/msg")
            if "latency" in parts:
                for kind in ("bare", "default", "every1"):
                    samples = (
                        config.bare_latency_samples if kind == "bare" else config.latency_samples
                    )
                    run = await _latency_run(server, kind, samples, config.latency_wait, f"l{kind}")
                    runs["latency"].append(run)
                    p50 = _percentile(run["latencies_s"], 0.5)
                    say(
                        f"latency {kind:<8} p50 "
                        + ("-" if p50 is None else f"{1e3 * p50:.1f} ms")
                        + f", {run['not_acked']}/{samples} not acked in {config.latency_wait:g} s"
                    )
            for i in range(config.repeat if "resume" in parts else 0):
                run = await _resume_run(server, bob, config.resume_messages, f"r{i}")
                runs["resume"].append(run)
                say(
                    f"resume {i + 1}/{config.repeat}: {run['messages']} settled in "
                    f"{run['settle_s']:.3f} s (lost {run['lost']}, duplicated {run['duplicated']})"
                )
                run = await _prosody_run(server, bob, config.resume_messages, f"p{i}")
                runs["prosody"].append(run)
                say(f"prosody alone {i + 1}/{config.repeat}: {run['seconds']:.3f} s")
            memory_variants = [v for v in variants if v != "bare_oid"]
            for i in range(config.repeat if "memory" in parts else 0):
                for variant in memory_variants:
                    tag = f"m{i}{variant}"
                    run = await _memory_run(server, variant, config.memory_messages, tag, workdir)
                    runs["memory"].append(run)
                    say(
                        f"memory {i + 1}/{config.repeat} {variant:<8} "
                        f"{run['bytes_per_message']:.0f} B/msg"
                    )
            if "durable" in parts and have_sqlite:
                run = await _durable_run(server, config.durable_sends, "d", workdir)
                runs["durable"].append(run)
                say(
                    f"durable: {run['sends']} sends, {run['cache_calls']} sm.cache calls, "
                    f"last tenth {run['last_tenth_ms']:.2f} ms each"
                )
        finally:
            await bob.aclose()
    return profile


async def _scale_parts(
    config: BenchConfig,
    workdir: Path,
    runs: dict[str, list[dict[str, Any]]],
    have_sqlite: bool,
    say: Progress,
) -> None:
    """Per-message costs with 1 000, 10 000 (, 100 000) in flight, in process."""
    variants: list[str] = ["bare", "memory"] + (["sqlite"] if have_sqlite else [])
    store_class = sqlite_store_class()
    await scale_run("memory", 200, 100)  # warm-up: first-call costs are not the tracker's
    for n in config.scale:
        for i in range(config.repeat):
            for variant in variants:
                store = None
                if variant == "sqlite":
                    assert store_class is not None
                    store = store_class(workdir / f"scale{n}-{i}.sqlite")
                run = await scale_run(variant, n, config.scale_batch, store, say)
                runs["scale"].append(run)


async def _instruction_parts(
    config: BenchConfig,
    workdir: Path,
    runs: dict[str, list[dict[str, Any]]],
    have_sqlite: bool,
    say: Progress,
) -> None:
    """Instructions per message sent and acked, once per variant: they do not vary."""
    if valgrind() is None:
        say("instructions: valgrind is not installed (apt-get install valgrind)")
        return
    for variant in INSTRUCTION_VARIANTS:
        if variant == "sqlite" and not have_sqlite:
            continue
        run = await instructions_run(variant, config.instruction_messages, workdir)
        runs["instructions"].append(run)
        say(f"instructions {variant:<8}: {run['per_message']:,.0f} a message")


#: The ids a store's index is measured with: slixmpp's own, and the tracker's.
_ID_KINDS: dict[str, Callable[[], Callable[[], str]]] = {
    "random": lambda: lambda: uuid.uuid4().hex,
    "time-ordered": TimeOrderedIds,
}


async def _sqlite_parts(
    config: BenchConfig, workdir: Path, runs: dict[str, list[dict[str, Any]]], say: Progress
) -> None:
    """Store-only benchmarks: batched state changes and start-up recovery."""
    store_class = sqlite_store_class()
    assert store_class is not None
    for i in range(config.repeat):
        store = store_class(workdir / f"changes{i}.sqlite")
        run = await store_changes_run(store, config.sqlite_changes, config.sqlite_burst)
        runs["sqlite_changes"].append(run)
        say(f"sqlite {i + 1}/{config.repeat}: {run['changes_per_s']:.0f} changes/s")
    for i in range(config.repeat):
        for ids, new_id in _ID_KINDS.items():
            store = store_class(workdir / f"ids{i}{ids}.sqlite")
            run = await store_ids_run(
                store, config.ids_kept, config.ids_messages, config.ids_batch, new_id()
            )
            runs["sqlite_ids"].append({**run, "ids": ids})
            say(f"sqlite ids {i + 1}/{config.repeat}, {ids}: {run['cpu_us']:.1f} µs a message")
    recover_path = workdir / "recover.sqlite"
    await fill_store(store_class(recover_path), config.recover_records)
    for i in range(config.repeat):
        run = await recover_run(store_class(recover_path), config.recover_records)
        runs["sqlite_recover"].append(run)
        say(f"recover {i + 1}/{config.repeat}: {run['recovered']} in {run['seconds']:.3f} s")


async def _postgres_parts(
    config: BenchConfig, dsn: str, runs: dict[str, list[dict[str, Any]]], say: Progress
) -> None:
    """The same store benchmarks on PostgresStore (a test cluster on this machine:
    fsync and synchronous_commit off, as the test kit runs it)."""
    for i in range(config.repeat):
        store = PostgresStore(dsn, account=f"changes{i}@localhost")
        run = await store_changes_run(store, config.sqlite_changes, config.sqlite_burst)
        runs["postgres_changes"].append(run)
        say(f"postgres {i + 1}/{config.repeat}: {run['changes_per_s']:.0f} changes/s")
    await fill_store(PostgresStore(dsn, account="recover@localhost"), config.recover_records)
    for i in range(config.repeat):
        store = PostgresStore(dsn, account="recover@localhost")
        run = await recover_run(store, config.recover_records)
        runs["postgres_recover"].append(run)
        say(f"recover {i + 1}/{config.repeat}: {run['recovered']} in {run['seconds']:.3f} s")


async def _fleet_parts(
    config: BenchConfig,
    base_dir: Path,
    workdir: Path,
    dsn: str,
    runs: dict[str, list[dict[str, Any]]],
    say: Progress,
) -> None:
    """Many accounts in this process, each its own client, through one shared store."""
    ensure_prosody_installed()
    server = ProsodyServer(base_dir / "fleet-prosody", log_level="warn")
    server.register_many(fleet_names(config.fleet_accounts), FLEET_PASSWORD)
    async with server:
        for i in range(config.repeat):
            for kind in FLEET_KINDS:
                database = fleet_database(kind, workdir / f"fleet{i}.sqlite", dsn)
                try:
                    run = await fleet_run(
                        server, kind, config.fleet_accounts, config.fleet_messages, database, say
                    )
                finally:
                    if database is not None:
                        await database.aclose()
                runs["fleet"].append(run)
                say(
                    f"fleet {i + 1}/{config.repeat} {kind:<8} {run['msgs_per_s']:.0f} msg/s, "
                    f"{run['bytes_per_idle_client']:.0f} B per idle client, "
                    f"lost {run['lost']}, duplicated {run['duplicated']}"
                )


def _metrics(
    config: BenchConfig, runs: dict[str, list[dict[str, Any]]], have_sqlite: bool
) -> list[Metric]:
    """Medians, paired ratios and target checks: every cell of the table, always."""
    parts = set(config.parts)
    metrics: list[Metric] = []

    def cell(
        key: str,
        row: str,
        column: str,
        unit: str,
        samples: Sequence[float],
        target: str = "",
        check: Callable[[float], bool] | None = None,
        *,
        part: str,
        worst: bool = False,
        value: float | None = None,
        note: str = "",
    ) -> None:
        """One cell: ``value`` when given, else the median (``worst``: the max) of samples."""
        label = f"{row} [{COLUMNS[column]}]"
        if column == "sqlite" and not have_sqlite:
            metrics.append(Metric(key, label, None, unit, target, None, [], SQLITE_NA, row, column))
            return
        if part not in parts:
            metrics.append(Metric(key, label, None, unit, target, None, [], "skipped", row, column))
            return
        if value is None and not note:
            value = (max(samples) if samples else None) if worst else _median(samples)
        ok = None if check is None else (value is not None and check(value))
        metrics.append(
            Metric(key, label, value, unit, target, ok, list(samples), note, row, column)
        )

    def of(kind: str, variant: str, field: str) -> list[float]:
        return [float(r[field]) for r in runs[kind] if r.get("variant") == variant]

    def paired(
        kind: str, field: str, variant: str, base: str, how: Callable[[float, float], float]
    ) -> list[float]:
        pairs = zip(of(kind, variant, field), of(kind, base, field), strict=False)
        return [how(a, b) for a, b in pairs]

    def ratio(a: float, b: float) -> float:
        return a / b

    def minus(a: float, b: float) -> float:
        return a - b

    all4 = ("bare", "bare_oid", "memory", "sqlite")
    n, m = config.messages, config.resume_messages
    # -- throughput
    row = f"acked msg/s, alice → bob (N={n})"
    for v in all4:
        cell(
            f"throughput.{v}",
            row,
            v,
            "msg/s",
            of("throughput", v, "acked_per_s"),
            part="throughput",
        )
    row = "throughput × bare slixmpp (its default stanzas)"
    for v in ("bare_oid", "memory", "sqlite"):
        samples = paired("throughput", "acked_per_s", v, "bare", ratio)
        cell(f"ratio.{v}", row, v, "×", samples, part="throughput")
    row = "throughput × bare with the same stanzas (the tracker's own cost)"
    for v, floor in (("memory", 0.97), ("sqlite", 0.95)):
        samples = paired("throughput", "acked_per_s", v, "bare_oid", ratio)
        cell(
            f"ratio.{v}_same_stanzas",
            row,
            v,
            "×",
            samples,
            f"≥ {floor:.2f}",
            _at_least(floor),
            part="throughput",
        )
    row = "Prosody CPU per message (throughput runs)"
    for v in all4:
        samples = [
            1e6 * r["cpu_s"]["prosody"] / r["messages"]
            for r in runs["throughput"]
            if r["variant"] == v and r["cpu_s"].get("prosody") is not None
        ]
        cell(f"server_cpu.{v}", row, v, "µs", samples, part="throughput")
    # alice's CPU two ways: the throughput runs (a live link, until her store has every
    # change) and a stalled link (every ack after the whole burst: records written twice).
    for key, kind, sample, link in (
        ("live_cpu", "throughput", "alice_us_per_message", "live link"),
        ("cpu", "cpu", "us_per_message", "stalled link"),
    ):
        row = f"alice CPU per message ({link})"
        for v in all4:
            cell(f"{key}.{v}", row, v, "µs", of(kind, v, sample), part="throughput")
        row = f"alice CPU × bare with the same stanzas ({link})"
        for v, ceiling in (("memory", 1.25), ("sqlite", 1.5)):
            samples = paired(kind, sample, v, "bare_oid", ratio)
            cell(
                f"{key}_ratio.{v}",
                row,
                v,
                "×",
                samples,
                f"≤ {ceiling:.2f}",
                _at_most(ceiling),
                part="throughput",
            )
    _instruction_cells(runs["instructions"], cell)
    row = "sm.cache calls per 1 000 stanzas under load"
    for v in ("memory", "sqlite"):
        samples = [
            1000 * r["cache_calls"] / r["messages"] for r in runs["throughput"] if r["variant"] == v
        ]
        cell(f"sm_cache.per_1000.{v}", row, v, "calls", samples, part="throughput")
    row = "throughput runs: lost + duplicated at bob (max)"
    for v in all4:
        samples = [r["lost"] + r["duplicated"] for r in runs["throughput"] if r["variant"] == v]
        cell(
            f"lost.{v}",
            row,
            v,
            "msgs",
            samples,
            "0",
            lambda x: x == 0,
            part="throughput",
            worst=True,
        )
    # -- a lone message
    _latency_cells(config, runs["latency"], cell)
    # -- in flight
    _scale_cells(config, runs["scale"], cell)
    # -- memory
    row = f"memory per in-flight message, whole client ({config.memory_messages} unacked)"
    for v in ("bare", "memory", "sqlite"):
        target, check = ("", None) if v == "bare" else ("≤ 1 024 B", lambda x: x <= 1024)
        cell(
            f"memory.{v}",
            row,
            v,
            "B",
            of("memory", v, "bytes_per_message"),
            target,
            check,
            part="memory",
        )
    row = "memory per in-flight message, more than bare slixmpp"
    for v in ("memory", "sqlite"):
        samples = paired("memory", "bytes_per_message", v, "bare", minus)
        cell(f"memory.over_bare.{v}", row, v, "B", samples, part="memory")
    # -- durable sends
    durable = runs["durable"]
    k = config.durable_sends
    row = f"sm.cache calls during {k} durable sends while unacked"
    cell(
        "durable.cache_calls",
        row,
        "sqlite",
        "calls",
        [r["cache_calls"] for r in durable],
        "≤ 50",
        lambda x: x <= 50,
        part="durable",
    )
    row = f"unacked stanzas handed to sm.cache during those {k} sends"
    samples = [r["entries_handed_over"] for r in durable]
    cell("durable.entries", row, "sqlite", "", samples, part="durable")
    for key, when in (("first", "first"), ("last", "last")):
        row = f"durable send while unacked, ms each, the {when} tenth"
        samples = [r[f"{key}_tenth_ms"] for r in durable]
        cell(f"durable.{key}_ms", row, "sqlite", "ms", samples, part="durable")
    # -- resume
    res, alone = runs["resume"], runs["prosody"]
    row = f"{m} messages: Prosody alone on a live stream (bare) / cut + resume, to all acked"
    cell("resume.prosody_s", row, "bare", "s", [r["seconds"] for r in alone], part="resume")
    cell("resume.settle_s", row, "memory", "s", [r["settle_s"] for r in res], part="resume")
    row = "resume time × Prosody alone"
    samples = [r["settle_s"] / p["seconds"] for r, p in zip(res, alone, strict=False)]
    cell("resume.ratio", row, "memory", "×", samples, "≤ 1.20", lambda x: x <= 1.2, part="resume")
    row = "cut + resume: lost + duplicated, at bob and in acks (max)"
    samples = [
        r["lost"] + r["duplicated"] + r["acked_twice"] + (r["messages"] - r["acked_ids"])
        for r in res
    ]
    cell(
        "resume.lost_or_duplicated",
        row,
        "memory",
        "msgs",
        samples,
        "0",
        lambda x: x == 0,
        part="resume",
        worst=True,
    )
    # -- stores
    _store_cells(config, runs, cell)
    # -- a fleet
    _fleet_cells(config, runs["fleet"], cell)
    return metrics


_Cell = Callable[..., None]


def _store_cells(config: BenchConfig, runs: dict[str, list[dict[str, Any]]], cell: _Cell) -> None:
    """Store state changes per second, batched, and recovery at start-up."""
    row = f"store state changes/s (batched, {config.sqlite_changes}, {config.sqlite_burst} a turn)"
    for name, floor in (("sqlite", 100_000), ("postgres", 50_000)):
        cell(
            f"{name}.changes_per_s",
            row,
            name,
            "/s",
            [r["changes_per_s"] for r in runs[f"{name}_changes"]],
            f"≥ {floor:,}/s".replace(",", " "),
            _at_least(floor),
            part=name,
        )
    kept = f"{config.ids_kept:,}".replace(",", " ")
    for ids, whose in (
        ("random", "slixmpp's random"),
        ("time-ordered", "the tracker's time-ordered"),
    ):
        of_ids = [r for r in runs["sqlite_ids"] if r["ids"] == ids]
        row = f"store, {kept} records kept: CPU per message sent + acked, {whose} ids"
        cell(
            f"sqlite.ids.{ids}.cpu_us",
            row,
            "sqlite",
            "µs",
            [r["cpu_us"] for r in of_ids],
            part="sqlite",
        )
        row = f"store, {kept} records kept: bytes written per message, {whose} ids"
        samples = [r["bytes"] for r in of_ids if r["bytes"] is not None]
        cell(f"sqlite.ids.{ids}.bytes", row, "sqlite", "B", samples, part="sqlite")
    row = f"store: recover {config.recover_records} in-flight records at start-up (attach)"
    for name, ceiling in (("sqlite", 1.0), ("postgres", 2.0)):
        recovered = runs[f"{name}_recover"]
        all_back = all(r["recovered"] == r["records"] for r in recovered)
        cell(
            f"{name}.recover_s",
            row,
            name,
            "s",
            [r["seconds"] for r in recovered],
            f"< {ceiling:g} s",
            lambda v, ceiling=ceiling, all_back=all_back: v < ceiling and all_back,
            part=name,
        )


def _fleet_cells(config: BenchConfig, runs: list[dict[str, Any]], cell: _Cell) -> None:
    """The fleet: bare slixmpp beside the tracker on one shared SQLite / PostgreSQL store."""
    a, m = config.fleet_accounts, config.fleet_messages
    kinds = FLEET_KINDS

    def of(kind: str, field: str) -> list[float]:
        return [float(r[field]) for r in runs if r["variant"] == kind and r[field] is not None]

    row = f"fleet of {a} accounts in one process, {m} msgs each: msg/s to all received (acked)"
    for kind in kinds:
        cell(f"fleet.msgs_per_s.{kind}", row, kind, "msg/s", of(kind, "msgs_per_s"), part="fleet")
    row = "fleet: memory per idle client, whole client (tracemalloc)"
    for kind in kinds:
        samples = of(kind, "bytes_per_idle_client")
        cell(f"fleet.bytes_per_client.{kind}", row, kind, "B", samples, part="fleet")
    row = "fleet: store transactions/s while sending"
    for kind in ("sqlite", "postgres"):
        samples = of(kind, "transactions_per_s")
        cell(f"fleet.transactions_per_s.{kind}", row, kind, "/s", samples, part="fleet")
    row = "fleet: lost + duplicated (max)"
    for kind in kinds:
        samples = [r["lost"] + r["duplicated"] for r in runs if r["variant"] == kind]
        cell(
            f"fleet.lost.{kind}",
            row,
            kind,
            "msgs",
            samples,
            "0",
            lambda x: x == 0,
            part="fleet",
            worst=True,
        )


def _at_least(floor: float) -> Callable[[float], bool]:
    return lambda value: value >= floor


def _at_most(ceiling: float) -> Callable[[float], bool]:
    return lambda value: value <= ceiling


def _latency_cells(config: BenchConfig, runs: list[dict[str, Any]], cell: _Cell) -> None:
    """A lone message on an idle link: p50 and p90, send to acked, in ms."""
    by_kind = {r["kind"]: r for r in runs}
    bare = by_kind.get("bare", {})
    rtt = _percentile(bare.get("rtts_s", []), 0.5)
    rtt_ms = None if rtt is None else 1e3 * rtt
    cell(
        "latency.rtt",
        "idle link round trip, a raw <r/> to its <a/> (p50)",
        "bare",
        "ms",
        [1e3 * x for x in bare.get("rtts_s", [])],
        part="latency",
        value=rtt_ms,
    )
    for kind, columns, what in (
        ("bare", "bare", "lone message, send to acked"),
        ("default", "memory", "lone message, send to acked"),
        ("every1", "memory", "lone message with ack_every=1, send to acked"),
    ):
        run = by_kind.get(kind)
        for share, slack in ((0.5, 5.0), (0.9, 15.0)):
            name = f"p{round(100 * share)}"
            key, row = f"latency.{kind}.{name}", f"{what}, {name}"
            if run is None:
                cell(key, row, columns, "ms", [], part="latency")
                continue
            ms = [1e3 * x for x in run["latencies_s"]]
            value = _percentile(ms + [float("inf")] * run["not_acked"], share)
            target, check = "", None
            if kind == "default" and rtt_ms is not None:
                target, check = f"≤ RTT + {slack:g} ms", _at_most(rtt_ms + slack)
            if value is None or value == float("inf"):
                missed, wait = run["not_acked"], run["not_acked_within_s"]
                note = f"never ({missed}/{run['samples']} not in {wait:g} s)"
                cell(key, row, columns, "ms", ms, target, check, part="latency", note=note)
            else:
                cell(key, row, columns, "ms", ms, target, check, part="latency", value=value)


def _instruction_cells(runs: list[dict[str, Any]], cell: _Cell) -> None:
    """Instructions per message, and the tracker's against bare with the same stanzas."""
    note = "" if runs else "valgrind not installed"  # else the part raises or is skipped
    per = {r["variant"]: float(r["per_message"]) for r in runs}
    row = "alice CPU instructions per message sent and acked (valgrind, in process)"
    for v in INSTRUCTION_VARIANTS:
        samples = [per[v]] if v in per else []
        cell(f"instructions.{v}", row, v, "instr", samples, part="instructions", note=note)
    row = "alice CPU instructions × bare with the same stanzas"
    base = per.get("bare_oid")
    for v, ceiling in (("memory", 1.25), ("sqlite", 1.5)):
        samples = [per[v] / base] if v in per and base else []
        cell(
            f"instructions_ratio.{v}",
            row,
            v,
            "×",
            samples,
            f"≤ {ceiling:.2f}",
            _at_most(ceiling),
            part="instructions",
            note=note,
        )


def _scale_cells(config: BenchConfig, runs: list[dict[str, Any]], cell: _Cell) -> None:
    """CPU per message of each operation at each number in flight, and one sm.cache call."""
    for op in ("fill", *SCALE_OPS, "sm_state"):
        for n in config.scale:
            count = f"{n:,}".replace(",", " ")
            if op == "fill":
                row = f"send: CPU per message over the fill to {count} (GC included)"
                columns: tuple[str, ...] = ("bare", "memory", "sqlite")
                unit, field = "µs", "fill_us"
            elif op == "sm_state":
                row = f"sm.cache: one hand-over of the SM state, {count} in flight"
                columns = ("memory", "sqlite")
                unit, field = "ms", "sm_state_ms"
            else:
                row = f"{op}: CPU per message, {count} in flight (after a GC)"
                columns = (
                    ("bare", "memory", "sqlite") if op in ("send", "ack") else ("memory", "sqlite")
                )
                unit, field = "µs", f"{op}_us"
            for v in columns:
                samples = [
                    r[field]
                    for r in runs
                    if r["variant"] == v and r["in_flight"] == n and field in r
                ]
                target, check = "", None
                if op == "reflection" and n == 10_000:
                    target, check = "< 100 µs (10 000 in < 1 s)", lambda x: x < 100
                cell(f"scale.{op}.{n}.{v}", row, v, unit, samples, target, check, part="scale")


# ---------------------------------------------------------------------- output


def _setup_line(config: dict[str, Any]) -> str:
    archive = "on" if config["archive"] else "off (--archive to turn it on)"
    scale = ", ".join(f"{n:,}".replace(",", " ") for n in config["scale"])
    repeat = config["repeat"]
    return (
        f"{repeat * config['throughput_runs_per_repeat']} throughput runs and "
        f"{repeat * config['cpu_runs_per_repeat']} stalled-link CPU runs per variant, "
        "paired; "
        f"bob receives in a child process; Prosody archiving {archive}; "
        f"{config['warmup']} warm-up messages per connection, not timed; "
        f"lone messages: {config['latency_samples']} per tracked setting, "
        f"{config['bare_latency_samples']} bare, measured once; per-message costs in "
        f"process (no server) at {scale} in flight, {config['scale_batch']} timed after "
        f"a gc.collect(); instructions: {config['instruction_messages']} messages sent and "
        "acked in process, counted by valgrind (cachegrind)"
    )


def _grid(result: BenchResult) -> list[tuple[str, list[str], str, list[bool]]]:
    """The table's lines: (row, a cell per column, the row's target, its verdicts)."""
    rows: dict[str, dict[str, Metric]] = {}
    for metric in result.metrics:
        rows.setdefault(metric.row or metric.label, {})[metric.column] = metric
    lines = []
    for row, cells in rows.items():
        if all(m.note == "skipped" for m in cells.values()):
            continue  # not measured in this run (--only): in the JSON, not in the table
        shown = [cells[c].shown() if c in cells else "–" for c in COLUMNS]
        targeted = [(c, cells[c]) for c in COLUMNS if c in cells and cells[c].target]
        targets = {m.target for _c, m in targeted}
        if len(targets) == 1 and len(targeted) > 0:
            target = targets.pop()
        else:
            target = ", ".join(f"{_SHORT[c]} {m.target}" for c, m in targeted)
        verdicts = [bool(m.ok) for _c, m in targeted if m.ok is not None]
        lines.append((row, shown, target, verdicts))
    return lines


def format_table(result: BenchResult) -> str:
    """The result as a plain-text table with a header naming the machine."""
    rows = [("metric", *COLUMNS.values(), "target", "ok?")]
    for name, shown, target, verdicts in _grid(result):
        ok = " / ".join("yes" if v else "NO" for v in verdicts)
        rows.append((name, *shown, target, ok))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"xmpp_sm_tracker bench: {_machine_line(result.machine)}",
        f"command: {result.command}   repeats: {result.config['repeat']} (medians)   "
        f"took {result.duration_s:.0f} s",
        f"setup: {_setup_line(result.config)}",
        "",
    ]
    for i, row in enumerate(rows):
        lines.append(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            lines.append("-+-".join("-" * w for w in widths))
    if result.profile:
        prof = result.profile
        lines += [
            "",
            f"cProfile of one tracked (MemoryStore) run, {prof['total_s']:.3f} s profiled in all",
        ]
        for title, key in (
            ("tracker entry points (inclusive)", "entry_points"),
            ("hot spots: own time, and library calls made by tracker code", "hot_spots"),
        ):
            lines.append(f"  {title}:")
            for cost in prof[key]:
                lines.append(
                    f"    {cost['seconds']:7.3f} s {100 * cost['share']:5.1f}% "
                    f"{cost['calls']:>7} calls  {cost['function']}"
                )
    return "\n".join(line.rstrip() for line in lines)


def format_markdown(result: BenchResult) -> str:
    """A README block: the command, the machine, and the table."""
    lines = [
        f"`{result.command}` on {_machine_line(result.machine)}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime(result.started_at))}; "
        f"medians of {result.config['repeat']} runs; {_setup_line(result.config)}:",
        "",
        "| metric | " + " | ".join(COLUMNS.values()) + " | target | ok? |",
        "|---|" + "---:|" * len(COLUMNS) + "---|---|",
    ]
    for row, shown, target, verdicts in _grid(result):
        ok = " / ".join("✓" if v else "✗" for v in verdicts)
        cells = " | ".join(shown)
        lines.append(f"| {_md(row)} | {cells} | {target} | {ok} |")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    """Markdown-safe table text (``<r/>`` would be read as HTML)."""
    return re.sub(r"(<[^<>]*>)", r"`\1`", text)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the table; 0 when every target was met, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke)")
    size.add_argument(
        "--full",
        action="store_true",
        help="also 100 000 in flight for the per-message costs (default: 1 000 and 10 000)",
    )
    parser.add_argument("--repeat", type=int, default=None, help="repeats per measurement (3)")
    parser.add_argument("--messages", type=int, default=None, help="N per throughput run (5000)")
    parser.add_argument("--json", metavar="FILE", type=Path, help="write every number as JSON")
    parser.add_argument("--markdown", metavar="FILE", type=Path, help="write a README block")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile one more tracked run, show top costs"
    )
    parser.add_argument(
        "--only",
        metavar="PARTS",
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--archive", action="store_true", help="let Prosody archive messages (MAM); off by default"
    )
    parser.add_argument("--verbose", action="store_true", help="log what the plugin does")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if args.quick:
        config = BenchConfig.quick(repeat)
    else:
        config = BenchConfig.full(repeat) if args.full else BenchConfig(repeat=repeat)
    try:
        config = dataclasses.replace(
            config,
            profile=args.profile,
            archive=args.archive,
            messages=args.messages or config.messages,
            parts=tuple(args.only.split(",")) if args.only else PARTS,
        )
    except ValueError as exc:
        parser.error(str(exc))
    argv_used = sys.argv[1:] if argv is None else argv
    command = " ".join(["scripts/bench", shlex.join(argv_used)]).strip()

    def say(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="sm-tracker-bench-") as tmp:
        result = asyncio.run(run_bench(config, Path(tmp), progress=say, command=command))
    print(format_table(result))
    if args.json:
        args.json.write_text(result.to_json() + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(format_markdown(result), encoding="utf-8")
    return 0 if result.all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

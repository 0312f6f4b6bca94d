"""scripts/bench must keep working: a tiny run proves every measurement runs end to end.

Benchmarks are not timed unit tests: nothing here asserts a time, a rate or a target,
only that every metric is there and that no message was lost or duplicated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devtools import bench
from devtools.bench import PARTS, SQLITE_NA, BenchConfig, run_bench

ALL4 = ("bare", "bare_oid", "memory", "sqlite")
TRACKED = ("memory", "sqlite")


def expected_metrics(config: BenchConfig) -> set[str]:
    """Every cell the table has for ``config``."""
    kinds = ("throughput", "server_cpu", "live_cpu", "cpu", "lost")
    keys = {f"{kind}.{v}" for kind in kinds for v in ALL4}
    keys |= {f"ratio.{v}" for v in ("bare_oid", *TRACKED)}
    keys |= {f"ratio.{v}_same_stanzas" for v in TRACKED}
    ratios = ("live_cpu_ratio", "cpu_ratio", "sm_cache.per_1000")
    keys |= {f"{kind}.{v}" for kind in ratios for v in TRACKED}
    keys |= {"latency.rtt"}
    keys |= {f"latency.{k}.{p}" for k in ("bare", "default", "every1") for p in ("p50", "p90")}
    for n in config.scale:
        for op in ("fill", "send", "ack"):
            keys |= {f"scale.{op}.{n}.{v}" for v in ("bare", *TRACKED)}
        for op in ("reflection", "resume", "sm_state"):
            keys |= {f"scale.{op}.{n}.{v}" for v in TRACKED}
    keys |= {f"instructions.{v}" for v in ALL4}
    keys |= {f"instructions_ratio.{v}" for v in TRACKED}
    keys |= {f"memory.{v}" for v in ("bare", *TRACKED)}
    keys |= {f"memory.over_bare.{v}" for v in TRACKED}
    keys |= {"durable.cache_calls", "durable.entries", "durable.first_ms", "durable.last_ms"}
    keys |= {"resume.prosody_s", "resume.settle_s", "resume.ratio", "resume.lost_or_duplicated"}
    keys |= {f"{s}.{k}" for s in ("sqlite", "postgres") for k in ("changes_per_s", "recover_s")}
    keys |= {f"sqlite.ids.{i}.{k}" for i in ("random", "time-ordered") for k in ("cpu_us", "bytes")}
    fleet = ("msgs_per_s", "bytes_per_client", "lost")
    keys |= {f"fleet.{k}.{v}" for k in fleet for v in ("bare", "sqlite", "postgres")}
    keys |= {f"fleet.transactions_per_s.{v}" for v in ("sqlite", "postgres")}
    return keys


def sqlite_metric(key: str) -> bool:
    """The cells that need SQLiteStore."""
    return (
        key.endswith(".sqlite")
        or key.startswith(("sqlite.", "durable."))
        or (key == "ratio.sqlite_same_stanzas")
    )


#: Cells that may hold a note instead of a value: bare slixmpp never asks for the ack
#: of a lone message, so it may never come.
MAY_BE_NEVER = {"latency.bare.p50", "latency.bare.p90"}


def test_quick_bench_measures_everything_and_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    bench.main(["--quick", "--json", str(out_json), "--markdown", str(out_md)])
    result = json.loads(out_json.read_text(encoding="utf-8"))
    metrics = {m["key"]: m for m in result["metrics"]}
    config = BenchConfig.quick()
    assert set(metrics) == expected_metrics(config)

    have_sqlite = bench.sqlite_store_class() is not None
    assert result["machine"]["sqlite_store"] is have_sqlite
    for key, metric in metrics.items():
        if sqlite_metric(key) and not have_sqlite:
            assert metric["value"] is None and metric["note"] == SQLITE_NA
        elif key in MAY_BE_NEVER and metric["value"] is None:
            assert metric["note"].startswith("never")
        else:
            assert metric["value"] is not None, key
            assert metric["samples"], key

    # Correctness is part of the result: every message arrived exactly once.
    for variant in ALL4 if have_sqlite else ALL4[:3]:
        assert metrics[f"lost.{variant}"]["value"] == 0
    assert metrics["resume.lost_or_duplicated"]["value"] == 0
    variants = 4 if have_sqlite else 3
    throughput = result["runs"]["throughput"]
    assert len(throughput) == variants * config.repeat * config.throughput_runs_per_repeat
    for run in throughput:
        assert run["acked"] == run["bob_unique"] == run["bob_total"] == config.messages
    assert len(result["runs"]["cpu"]) == variants * config.repeat * config.cpu_runs_per_repeat
    for run in result["runs"]["resume"]:
        assert run["messages"] == config.resume_messages
        assert run["unacked_at_cut"] >= run["messages"]  # the stall held every ack back
        assert run["hibernated"] == run["resent"] == run["acked_ids"] == run["messages"]
        assert run["failed"] == run["acked_twice"] == run["lost"] == run["duplicated"] == 0
    if have_sqlite:  # the index-of-ids runs wrote and acked every message, with each kind
        ids_runs = result["runs"]["sqlite_ids"]
        assert sorted(r["ids"] for r in ids_runs) == sorted(
            ["random", "time-ordered"] * config.repeat
        )
        for run in ids_runs:
            assert run["pending_after"] == 0 and run["messages"] == config.ids_messages
    for run in result["runs"]["prosody"]:
        assert run["bob_unique"] == run["bob_total"] == config.resume_messages
    for run in result["runs"]["memory"]:
        assert run["in_flight"] >= config.memory_messages  # nothing acked while measured
    for run in result["runs"]["latency"]:
        if run["kind"] != "bare":  # the tracker asks for the tail: every one is acked
            assert run["not_acked"] == 0 and len(run["latencies_s"]) == run["samples"]
    for run in result["runs"]["scale"]:
        assert run["in_flight_at_ack"] == run["in_flight"] + run["batch"]
        if run["variant"] != "bare":  # every resent one acked, every reflection matched
            assert run["resumed"] == run["in_flight"]
            assert run["unreflected_after"] == run["in_flight"] - run["batch"]
    # valgrind counted each variant once; a variant that does more per message counts
    # more (a count of the start-up alone, or of the wrong run, would not).
    counted = {run["variant"]: run["per_message"] for run in result["runs"]["instructions"]}
    assert sorted(counted) == sorted(ALL4 if have_sqlite else ALL4[:3])
    assert 0 < counted["bare"] < counted["bare_oid"] < counted["memory"]  # origin-id, tracking
    if have_sqlite:
        assert counted["memory"] < counted["sqlite"]  # and the rows it writes
    for run in result["runs"]["durable"]:
        assert run["unacked_after"] >= config.durable_sends  # nothing acked meanwhile
    for name in ("sqlite", "postgres"):
        for run in result["runs"][f"{name}_recover"]:
            assert run["recovered"] == run["records"] == config.recover_records
        for run in result["runs"][f"{name}_changes"]:
            assert run["last_state"] == "acked" and run["pending_after"] == 0
    fleet = result["runs"]["fleet"]
    assert sorted(r["variant"] for r in fleet) == ["bare", "postgres", "sqlite"]
    for run in fleet:
        assert run["messages"] == config.fleet_accounts * config.fleet_messages
        assert run["lost"] == run["duplicated"] == 0, run
        if run["variant"] != "bare":
            assert run["acked"] == run["messages"] and run["transactions"] > 0

    table = capsys.readouterr().out
    assert result["machine"]["python"] in table and "Prosody" in table
    for metric in result["metrics"]:
        assert metric["row"] in table
    assert out_md.read_text(encoding="utf-8").startswith("`scripts/bench --quick")


async def test_without_sqlite_store_its_metrics_say_not_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "sqlite_store_class", lambda: None)
    result = await run_bench(BenchConfig(parts=("sqlite",)), tmp_path)
    sqlite_keys = {key for key in expected_metrics(BenchConfig()) if sqlite_metric(key)}
    assert {m.key for m in result.metrics} >= sqlite_keys
    for key in sqlite_keys:
        assert result.metric(key).value is None
        assert result.metric(key).shown() == SQLITE_NA
    assert result.metric("memory.memory").shown() == "skipped"
    assert SQLITE_NA in bench.format_table(result)


def test_unknown_parts_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown parts"):
        BenchConfig(parts=("throughput", "bogus"))
    with pytest.raises(SystemExit):
        bench.main(["--only", "bogus"])
    assert set(PARTS) == {
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
    }

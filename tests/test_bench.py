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

METRICS = {
    "throughput.bare",
    "throughput.bare_oid",
    "throughput.memory",
    "throughput.sqlite",
    "ratio.memory",
    "ratio.sqlite",
    "ratio.memory_same_stanzas",
    "ratio.sqlite_same_stanzas",
    "ratio.bare_oid",
    "server_cpu.bare",
    "server_cpu.bare_oid",
    "server_cpu.memory",
    "cpu.bare",
    "cpu.tracked",
    "throughput.lost_or_duplicated",
    "resume.settle_s",
    "resume.lost_or_duplicated",
    "memory.total",
    "memory.bare",
    "memory.tracker",
    "sm_cache.per_1000",
    "sqlite.changes_per_s",
    "sqlite.recover_s",
}
SQLITE_METRICS = {
    "throughput.sqlite",
    "ratio.sqlite",
    "ratio.sqlite_same_stanzas",
    "sqlite.changes_per_s",
    "sqlite.recover_s",
}


def test_quick_bench_measures_everything_and_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    bench.main(["--quick", "--json", str(out_json), "--markdown", str(out_md)])
    result = json.loads(out_json.read_text(encoding="utf-8"))
    metrics = {m["key"]: m for m in result["metrics"]}
    assert set(metrics) == METRICS

    have_sqlite = bench.sqlite_store_class() is not None
    assert result["machine"]["sqlite_store"] is have_sqlite
    for key, metric in metrics.items():
        if key in SQLITE_METRICS and not have_sqlite:
            assert metric["value"] is None and metric["note"] == SQLITE_NA
        else:
            assert metric["value"] is not None, key
            assert metric["samples"], key

    # Correctness is part of the result: every message arrived exactly once.
    assert metrics["throughput.lost_or_duplicated"]["value"] == 0
    assert metrics["resume.lost_or_duplicated"]["value"] == 0
    config = BenchConfig.quick()
    variants = 4 if have_sqlite else 3
    throughput = result["runs"]["throughput"]
    assert len(throughput) == variants * config.repeat
    for run in throughput:
        assert run["acked"] == run["bob_unique"] == run["bob_total"] == config.messages
    assert len(result["runs"]["cpu"]) == 2 * config.repeat
    for run in result["runs"]["resume"]:
        assert run["messages"] == config.resume_messages
        assert run["hibernated"] == run["resent"] == run["acked_ids"] == run["messages"]
        assert run["failed"] == run["acked_twice"] == run["lost"] == run["duplicated"] == 0
    for run in result["runs"]["memory"]:
        assert run["in_flight"] >= config.memory_messages  # nothing acked while measured
    for run in result["runs"]["sqlite_recover"]:
        assert run["recovered"] == run["records"] == config.recover_records

    table = capsys.readouterr().out
    assert result["machine"]["python"] in table and "Prosody" in table
    for metric in result["metrics"]:
        assert metric["label"] in table
    assert out_md.read_text(encoding="utf-8").startswith("`scripts/bench --quick")


async def test_without_sqlite_store_its_metrics_say_not_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "sqlite_store_class", lambda: None)
    result = await run_bench(BenchConfig(parts=("sqlite",)), tmp_path)
    for key in SQLITE_METRICS:
        assert result.metric(key).value is None
        assert result.metric(key).shown() == SQLITE_NA
    assert result.metric("memory.tracker").shown() == "skipped"
    assert SQLITE_NA in bench.format_table(result)


def test_unknown_parts_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown parts"):
        BenchConfig(parts=("throughput", "bogus"))
    with pytest.raises(SystemExit):
        bench.main(["--only", "bogus"])
    assert set(PARTS) == {"throughput", "resume", "memory", "sqlite"}

"""Smoke tests for the benchmark suite: each benchmark at a tiny size, result structure only.

No timing is asserted anywhere: these tests only check that the benchmarks
run, verify their own outputs, and return (and render) the documented fields.
"""

from __future__ import annotations

import json
import os

import pytest

from benchmarks import bench_beam, bench_cells, bench_kms, bench_lake, bench_peers, run
from benchmarks.common import Timing, machine_info, measure_rounds, random_strings, ratio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timing_shape(t: dict) -> None:
    assert set(t) >= {"runs", "n", "median_s", "min_s", "max_s", "q1_s", "q3_s"}
    assert t["n"] == len(t["runs"]) >= 1
    assert all(isinstance(x, float) for x in t["runs"])


def _ratio_shape(r: dict) -> None:
    assert set(r) >= {"per_round", "median", "min", "max"}
    assert r["min"] <= r["median"] <= r["max"]


def test_common_helpers() -> None:
    import numpy as np

    strings = random_strings(100, np.random.default_rng(1), 16, 32)
    assert len(strings) == 100 and strings.null_count == 0
    assert all(16 <= len(s) <= 32 for s in strings.to_pylist())
    timings = measure_rounds({"a": lambda: 1, "b": lambda: 2}, runs=2, warmup=0)
    assert set(timings) == {"a", "b"} and all(len(t.runs) == 2 for t in timings.values())
    assert len(ratio(timings["a"], timings["b"]).values) == 2
    assert Timing([1.0, 2.0, 3.0]).median == 2.0
    info = machine_info()
    assert {"cpu_model", "logical_cores", "python", "versions"} <= set(info)
    assert {"pyarrow", "cryptography", "apache-beam"} <= set(info["versions"])


def test_cells_structure() -> None:
    result = bench_cells.run(rows=2_000, runs=1, warmup=0)
    assert result["name"] == "cells"
    for part in ("encrypt", "decrypt"):
        _timing_shape(result[part]["keyturn"])
        _timing_shape(result[part]["baseline"])
        _ratio_shape(result[part]["ratio"])
        assert set(result[part]["keyturn_cells_per_s"]) == {"median", "min", "max"}
    assert result["encrypt"]["target"] == bench_cells.ENCRYPT_TARGET
    assert isinstance(result["encrypt"]["met"], bool)
    kms = result["kms"]
    assert kms["calls_per_scope"] == 1  # a count, not a timing: one GenerateDataKey per scope
    assert kms["met"] is True
    for name in ("encrypt_batch", "decrypt_batch"):
        prof = result["profile"][name]
        assert prof["top"] and {"function", "ncalls", "tottime_s", "share"} <= set(prof["top"][0])
        assert not any(os.path.isabs(r["function"].split(":")[0]) for r in prof["top"])
    json.dumps(result)


@pytest.mark.beam
def test_beam_overhead_structure() -> None:
    result = bench_beam.run_overhead(rows=4_000, batch_rows=1_000, partitions=2, runs=1, warmup=0, profile=False)
    assert result["name"] == "beam_overhead"
    for part in ("core", "pipeline", "identity_pipeline"):
        _timing_shape(result[part])
    _ratio_shape(result["ratio"])
    _ratio_shape(result["ratio_without_fixed_cost"])
    assert isinstance(result["met"], bool)
    assert result["kms"]["core_calls_per_run"] == [2]
    assert result["kms"]["pipeline_counters_last_run"]["rows_encrypted"] == 4_000
    json.dumps(result)


@pytest.mark.beam
def test_beam_streaming_structure() -> None:
    result = bench_beam.run_streaming(records=4_000, source_rows=100, batch_rows=1_000, partitions=2)
    assert result["name"] == "beam_streaming"
    grouped, naive = result["with_partition_batches"], result["without_partition_batches"]
    for r in (grouped, naive):
        assert set(r["kms_calls_per_partition"]) == {"p0", "p1"}
        assert r["kms_calls_total"] == sum(r["kms_calls_per_partition"].values()) == r["audit_kms_calls"]
        assert r["scopes"] >= 1 and isinstance(r["runner_counters"], dict)
    assert isinstance(result["met"], bool)
    json.dumps(result)


def test_peers_structure() -> None:
    result = bench_peers.run(rows=500, esdk_rows=5, runs=1, warmup=0)
    assert result["name"] == "peers"
    names = {"keyturn", "bare_aesgcm", "tink", "esdk", "esdk_cached"}
    for part in ("encrypt", "decrypt"):
        assert set(result[part]) == names
        for name in names:
            _timing_shape(result[part][name]["timing"])
            assert set(result[part][name]["cells_per_s"]) == {"median", "min", "max"}
            if name != "keyturn":
                _ratio_shape(result[part][name]["keyturn_ratio"])
    assert result["encrypt"]["esdk"]["cells"] == 5 and result["encrypt"]["tink"]["cells"] == 500
    assert set(result["targets"]) == {"bare_aesgcm", "tink", "esdk", "esdk_cached"}
    assert all(isinstance(result["targets"][k]["met"], bool) for k in ("bare_aesgcm", "tink", "esdk"))
    json.dumps(result)


def test_kms_structure() -> None:
    result = bench_kms.run(records=2_000, partitions=4, batch_rows=500, per_record_subset=200)
    assert result["name"] == "kms"
    assert result["keyturn"]["calls"] == 4  # counts, not timings: one DEK per partition scope
    assert result["per_record"]["calls_measured"] == 200 and result["params"]["extrapolated"] is True
    assert result["per_record"]["calls_per_1m_records"] == 1_000_000
    assert isinstance(result["met"], bool)
    json.dumps(result)


@pytest.mark.beam
@pytest.mark.slow
def test_beam_workers_structure() -> None:
    result = bench_beam.run_workers(rows=2_000, batch_rows=500, partitions=2, runs=1, warmup=0)
    assert result["name"] == "beam_workers"
    for part in ("one_worker", "two_workers", "core"):
        _timing_shape(result[part])
    _ratio_shape(result["speedup"])
    assert isinstance(result["met"], bool)
    json.dumps(result)


@pytest.mark.beam
def test_lake_structure(tmp_path) -> None:
    result = bench_lake.run_lake(rows=2_000, partitions=2, runs=1, out=str(tmp_path / "lake"), profile=False)
    assert result["name"] == "lake"
    assert set(result["timings"]) == {
        "encrypt", "encrypt_1_core", "encrypt_shares", "rotate_rewrap", "pme_rotate", "reencrypt", "plain_rewrite", "pme_write",
    }
    # the ceiling: one pinned child per CPU (at most one per source file), every row written exactly once between them
    shares = min(len(os.sched_getaffinity(0)), result["params"]["source_files"])
    assert [len(c) for c in result["encrypt_shares_children_s"]] == [shares]
    assert "encrypt_1_core_over_shares_time" in result["ratios"]
    for t in result["timings"].values():
        _timing_shape(t)
    for r in result["ratios"].values():
        _ratio_shape(r)
    # counts, not timings: the control-plane rotation writes no lake byte and makes one KMS call per DEK
    rot = result["rotation"]
    deks = result["params"]["deks"]
    assert deks >= 1
    for r in rot["rotate_rewrap"]["rounds"]:
        assert r["lake_bytes_written"] == 0 and r["lake_files_written"] == 0 and r["lake_files"] > 0
        assert r["kms_calls"] == r["deks_moved"] == r["deks_on_old_version"] == deks
    assert rot["rotate_rewrap"]["payload_bytes_decrypted"] == 0
    for r in rot["pme_rotate"]["rounds"]:
        assert r["parquet_bytes_written"] == 0 and r["key_material_bytes_written"] > 0
        assert r["key_material_files_written"] == result["params"]["pme_external"]["key_material_files"] == result["params"]["lake_files"]
    assert rot["reencrypt"]["payload_bytes_decrypted"] > 0 and rot["reencrypt"]["bytes_rewritten"] > 0
    assert rot["reencrypt"]["files_rewritten"] == result["params"]["lake_files"]
    read = result["read_path"]
    assert set(read["timings"]) == {"decrypt_directory", "decrypt_no_directory"}
    for t in read["timings"].values():
        _timing_shape(t)
    _ratio_shape(read["throughput_ratio"])
    assert read["stats"]["decrypt_directory"]["directory_lookups"][0] >= 1
    assert read["stats"]["decrypt_no_directory"]["directory_lookups"][0] == 0
    # counted, not timed: one decrypt and one encrypt per cell, plus one verifying decrypt
    reen = rot["reencrypt"]
    assert reen["cells_decrypted"] == 2 * reen["lake_cells"] and reen["cells_encrypted"] == reen["lake_cells"] > 0
    assert result["targets"]["reencrypt_cell_operations"]["met"]
    storage = result["storage"]["keyturn"]
    assert storage["cells"] == reen["lake_cells"]
    assert all("DELTA_BYTE_ARRAY" in e for e in storage["encodings"].values())
    assert set(result["targets"]) == {
        "encrypt_over_pme_write_time",
        "encrypt_1_core_over_default_time",
        "reencrypt_cell_operations",
        "stored_bytes_per_cell_beyond_plaintext",
        "reencrypt_over_rotate_rewrap_time",
        "rotate_rewrap_over_pme_rotate_time",
        "rewrap_kms_calls_equal_deks",
        "rotate_rewrap_lake_bytes_written",
        "decrypt_directory_over_no_directory_throughput",
    }
    assert all(isinstance(t["met"], bool) for t in result["targets"].values())
    assert result["targets"]["rewrap_kms_calls_equal_deks"]["met"] and result["targets"]["rotate_rewrap_lake_bytes_written"]["met"]
    assert result["params"]["lake_bytes"] > 0 and isinstance(result["met"], bool)
    json.dumps(result)
    meta = {"command": "python -m benchmarks.run --only lake", "machine": machine_info()}
    meta["machine"]["load_avg_start"] = [0.0, 0.0, 0.0]
    text = run.render_lake({**result, "elapsed_s": 1.0}, meta)
    assert "rotate --rewrap" in text and "rotate_master_keys" in text
    assert run.summary({"benchmarks": {"lake": result}})


@pytest.mark.beam
@pytest.mark.slow
def test_memory_structure(tmp_path) -> None:
    result = bench_lake.run_memory(rows=1_000, scale=2, partitions=2, runs=1, out=str(tmp_path / "mem"))
    assert result["name"] == "memory"
    assert set(result["peak_rss_bytes"]) == {"floor", "1x", "2x"}
    assert all(v[0] > 0 for v in result["peak_rss_bytes"].values())
    _ratio_shape(result["ratio"])
    assert isinstance(result["met"], bool)
    json.dumps(result)


def test_render_and_markdown_update(tmp_path) -> None:
    cells = bench_cells.run(rows=1_000, runs=1, warmup=0, profile=False)
    results = {"command": "python -m benchmarks.run --only cells", "quick": True, "machine": machine_info(), "benchmarks": {"cells": cells}}
    results["machine"]["load_avg_start"] = [0.0, 0.0, 0.0]
    sections = run.render(results)
    assert set(sections) == {"machine", "cells"}
    assert "| Measurement |" in sections["cells"]
    text = "intro\n<!-- bench:cells:begin -->\nold\n<!-- bench:cells:end -->\noutro\n"
    updated = run.update_markdown(text, {"cells": sections["cells"]})
    assert "old" not in updated and updated.startswith("intro") and updated.endswith("outro\n")
    assert run.update_markdown(updated, {"cells": sections["cells"]}) == updated
    with pytest.raises(ValueError):
        run.update_markdown("no markers", {"cells": "x"})


def test_main_quick_writes_results(tmp_path) -> None:
    out = tmp_path / "results.json"
    assert run.main(["--only", "cells", "--quick", "--runs", "1", "--warmup", "0", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] is True and list(data["benchmarks"]) == ["cells"]


def test_benchmarks_md_has_every_marker() -> None:
    with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as fh:
        text = fh.read()
    for name in ("machine", *run.BENCHMARKS):
        assert text.count(f"<!-- bench:{name}:begin -->") == 1
        assert text.count(f"<!-- bench:{name}:end -->") == 1

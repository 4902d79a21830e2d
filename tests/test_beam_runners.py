"""The same encrypt -> decrypt pipeline on Beam's multi-process and portable runners.

- DirectRunner in multi-process mode (`direct_running_mode=multi_processing`,
  `direct_num_workers=2`): its batch engine, the FnApiRunner, starts two SDK
  worker processes and ships every DoFn, key source and batch to them over
  the Fn API. The runner is pinned to the FnApiRunner (see `beam_support`)
  so the DirectRunner's first choice, a Prism binary downloaded from GitHub,
  never enters the test.
- PortableRunner against Beam's own local job service
  (`apache_beam.runners.portability.local_job_service_main`), started by
  the test on localhost with a port it picks itself, with LOOPBACK workers:
  the portable path that Flink and Dataflow runner v2 use.

Results come back through files in `tmp_path` (JSON lines written with
`WriteToText`) and through the runner's metrics, never through state
shared with the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from beam_support import (
    BATCH_RUNNER,
    DATASET,
    SENSITIVE,
    counters,
    encrypt_direct,
    flatten_rows,
    key_source,  # noqa: F401  (fixture)
    keyed_batches,
    keyed_rows,
    read_jsonl,
    rows_of,
    write_jsonl,
)
from keyturn.transforms.arrow import DecryptBatches, EncryptBatches

pytestmark = [pytest.mark.beam, pytest.mark.slow]

TESTS_DIR = str(Path(__file__).resolve().parent)
PARTS = ("p1", "p2", "p3")


def row_json(row: tuple[Any, ...]) -> str:
    return json.dumps([x.hex() if isinstance(x, bytes) else x for x in row])


def mismatch_json(element: tuple[dict[str, Any], pa.RecordBatch]) -> str:
    event, rows = element
    return json.dumps({"event": event, "rows": [row_json(r) for r in rows_of(rows)]})


def build_round_trip(p: beam.Pipeline, source: Any, data: list, unknown: list, out: Path) -> None:
    """Encrypt `data`, add the `unknown`-version batches, decrypt everything; write every output as JSON lines."""
    enc = p | "Plain" >> beam.Create(data) | "Encrypt" >> EncryptBatches(source, DATASET, SENSITIVE)
    foreign = p | "Foreign" >> beam.Create(unknown)
    dec = (enc.main, foreign) | "Both" >> beam.Flatten() | "Decrypt" >> DecryptBatches(source, DATASET)
    write_jsonl(
        dec.main | "Rows" >> beam.FlatMap(flatten_rows) | "RowJson" >> beam.Map(row_json), out / "rows", "WriteRows"
    )
    write_jsonl(enc.audit | "EncAuditJson" >> beam.Map(json.dumps), out / "enc-audit", "WriteEncAudit")
    write_jsonl(dec.audit | "DecAuditJson" >> beam.Map(json.dumps), out / "dec-audit", "WriteDecAudit")
    write_jsonl(dec.version_mismatch | "MmJson" >> beam.Map(mismatch_json), out / "mismatch", "WriteMismatch")
    write_jsonl(
        dec.quarantine | "QJson" >> beam.Map(lambda r: json.dumps(r["rows"])), out / "quarantine", "WriteQuarantine"
    )
    side = (enc.version_mismatch, enc.quarantine) | "EncSide" >> beam.Flatten()
    write_jsonl(side | "SideJson" >> beam.Map(lambda e: "unexpected"), out / "enc-side", "WriteEncSide")


def check_results(result: beam.runners.runner.PipelineResult, data: list, unknown: list, out: Path) -> None:
    c = counters(result)
    assert sorted(read_jsonl(out / "rows")) == sorted(row_json(r) for r in keyed_rows(data))
    enc_audit = [json.loads(line) for line in read_jsonl(out / "enc-audit")]
    dec_audit = [json.loads(line) for line in read_jsonl(out / "dec-audit")]
    total = sum(b.num_rows for _, b in data)
    # Every scope audited once, each with its one DEK; scopes may be split across workers and bundles.
    assert sum(e["counts"]["rows"] for e in enc_audit) == total
    assert {e["partition"] for e in enc_audit} == set(PARTS)
    assert all(e["counts"]["deks"] == 1 for e in enc_audit)
    assert c["deks_generated"] == len(enc_audit)
    assert c["kms_calls"] == len(enc_audit) + sum(e["counts"]["unwraps"] for e in dec_audit)
    assert len({e["event_id"] for e in enc_audit + dec_audit}) == len(enc_audit) + len(dec_audit)
    assert sum(e["counts"]["current"] for e in dec_audit) == total
    assert sum(e["counts"]["unknown"] for e in dec_audit) == sum(b.num_rows for _, b in unknown)
    # Side outputs crossed the process boundary with their batches intact.
    mismatches = [json.loads(line) for line in read_jsonl(out / "mismatch")]
    assert [(m["event"]["reason"], m["event"]["found_version"], m["event"]["rows"]) for m in mismatches] == [
        ("unknown", 99, 4)
    ]
    assert sorted(mismatches[0]["rows"]) == sorted(row_json(r) for r in rows_of(unknown[0][1]))
    assert read_jsonl(out / "quarantine") == []
    assert read_jsonl(out / "enc-side") == []
    assert c["rows_encrypted"] == c["rows_decrypted"] == total


@pytest.fixture
def workload(key_source):
    data = keyed_batches(PARTS, 4, 6)
    unknown = [("p2", encrypt_direct(key_source, keyed_batches(["p2"], 1, 4, start=900)[0][1], "p2", version=99))]
    return data, unknown


def test_direct_runner_multi_processing(key_source, workload, tmp_path, monkeypatch):
    data, unknown = workload
    # The SDK workers are fresh Python processes: they import the test helpers to unpickle the pipeline's functions.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")])))
    options = PipelineOptions(flags=[], direct_running_mode="multi_processing", direct_num_workers=2)
    p = beam.Pipeline(runner=BATCH_RUNNER, options=options)
    build_round_trip(p, key_source, data, unknown, tmp_path / "out")
    result = p.run()
    result.wait_until_finish()
    check_results(result, data, unknown, tmp_path / "out")


def _start_local_job_service(workdir: Path) -> tuple[subprocess.Popen, int]:
    """Start Beam's local job service on localhost with a port of its choosing; return (process, port)."""
    port_file = workdir / "job.port"
    log = open(workdir / "job-service.log", "wb")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apache_beam.runners.portability.local_job_service_main",
            "--port=0",  # the service binds localhost; 0 lets the OS pick a free port
            f"--port_file={port_file}",
            f"--staging_dir={workdir / 'staging'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 120  # a start-up wait, not an assertion about speed
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"local job service did not start:\n{(workdir / 'job-service.log').read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_portable_runner_against_the_local_job_service(key_source, workload, tmp_path):
    data, unknown = workload
    service = tmp_path / "service"
    service.mkdir()
    proc, port = _start_local_job_service(service)
    try:
        options = PipelineOptions(
            flags=[],
            runner="PortableRunner",
            job_endpoint=f"localhost:{port}",
            environment_type="LOOPBACK",
        )
        p = beam.Pipeline(options=options)
        build_round_trip(p, key_source, data, unknown, tmp_path / "out")
        result = p.run()
        assert result.wait_until_finish() == "DONE"
        check_results(result, data, unknown, tmp_path / "out")
        assert "Completed job" in (service / "job-service.log").read_text()
    finally:
        _stop(proc)
    assert proc.returncode is not None

"""`keyturn.pipelines.ingest`: files landing in a directory are encrypted in partition batches and appended to the lake.

Files are landed the way producers should land them (written under a hidden
name, then renamed), by a thread or between runs. Assertions are on what
reaches the lake, never on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from keyturn.errors import InputError
from keyturn.lake.layout import Lake
from keyturn.pipelines import decrypt, encrypt, ingest
from keyturn.lake.sideoutputs import read_side_outputs
from tests.pipeline_support import (
    REPO,
    SENSITIVE,
    all_files,
    avro_records,
    cli_command,
    customers,
    data_files,
    make_home,
    read_hive,
    run_python,
    write_avro,
)

pytestmark = pytest.mark.beam

FAST = {"poll_interval": 0.1, "until_idle": 1.5}


@pytest.fixture
def home(tmp_path):
    return make_home(tmp_path / "home")


def land_parquet(directory: Path, name: str, table) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, directory / f".landing-{name}")
    os.replace(directory / f".landing-{name}", directory / name)


def ledger(lake: Path) -> dict:
    return json.loads((lake / "_keyturn" / "ingested.json").read_text())["sources"]


def test_files_landing_while_it_runs_reach_the_lake_once(home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    land.mkdir()
    tables = [customers(400, start=k * 1000) for k in range(4)]

    def producer():
        for k, t in enumerate(tables):
            land_parquet(land, f"batch-{k}.parquet", t)
            time.sleep(0.3)

    thread = threading.Thread(target=producer)
    thread.start()
    try:
        report = ingest.run(home=home, watch=str(land), lake=str(lake), columns=SENSITIVE, partition_by="region", **FAST)
    finally:
        thread.join()
    assert report["stopped"] == "idle"
    assert report["files_ingested"] == 4 and report["rows_written"] == 1600 and report["problems"] == []
    assert sorted({os.path.dirname(f) for f in data_files(lake)}) == [f"region={r}" for r in range(4)]
    ids = read_hive(lake).column("id").to_pylist()
    assert sorted(ids) == sorted(i for t in tables for i in t.column("id").to_pylist())
    assert set(ledger(lake)) == {f"batch-{k}.parquet" for k in range(4)}
    assert {e["status"] for e in ledger(lake).values()} == {"ingested"}
    # one audit event per partition scope per batch; DEKs bounded by partitions x batches
    assert report["kms_calls"] <= 4 * report["batches"]

    # the lake decrypts back to exactly what landed
    out = tmp_path / "out"
    decrypt.run(home=home, lake=str(lake), out=str(out))
    back = read_hive(out)
    expected = sorted((r["id"], r["ssn"]) for t in tables for r in t.to_pylist())
    assert sorted(zip(back.column("id").to_pylist(), back.column("ssn").to_pylist())) == expected


def test_a_second_run_ingests_nothing_and_new_files_are_appended(home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    land_parquet(land, "a.parquet", customers(300))
    first = ingest.run(home=home, watch=str(land), lake=str(lake), columns=SENSITIVE, partition_by="region", **FAST)
    assert first["rows_written"] == 300
    before = data_files(lake)

    again = ingest.run(home=home, watch=str(land), lake=str(lake), **FAST)  # columns and partitions from the lake
    assert again["rows_written"] == 0 and again["batches"] == 0 and again["kms_calls"] == 0
    assert data_files(lake) == before
    assert again["columns"] == SENSITIVE and again["partition_by"] == ["region"]

    os.utime(land / "a.parquet")  # touched, same bytes: still done
    land_parquet(land, "b.parquet", customers(200, start=5000))
    third = ingest.run(home=home, watch=str(land), lake=str(lake), **FAST)
    assert third["files_ingested"] == 1 and third["rows_written"] == 200
    assert read_hive(lake).num_rows == 500


def test_avro_files_are_ingested(home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    records = avro_records(300)
    write_avro(land / "x.avro", records[:100])
    write_avro(land / "sub" / "y.avro", records[100:])
    report = ingest.run(home=home, watch=str(land), lake=str(lake), columns=["ssn"], partition_by="region", **FAST)
    assert report["files_ingested"] == 2 and report["rows_written"] == 300
    out = tmp_path / "out"
    decrypt.run(home=home, lake=str(lake), out=str(out))
    assert read_hive(out).column("ssn").to_pylist() == [r["ssn"] for r in records]


def test_bad_files_are_quarantined_and_the_stream_goes_on(home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    land_parquet(land, "good.parquet", customers(200))
    (land / "broken.parquet").write_bytes(b"PAR1 truncated")
    land_parquet(land, "no-ssn.parquet", customers(50, start=900).drop_columns(["ssn"]))
    report = ingest.run(home=home, watch=str(land), lake=str(lake), columns=SENSITIVE, partition_by="region", **FAST)
    assert report["rows_written"] == 200 and report["files_quarantined"] == 2 and len(report["problems"]) == 2
    assert sorted(os.path.basename(p) for p in report["quarantined"]) == ["broken.parquet", "no-ssn.parquet"]
    statuses = {k: v["status"] for k, v in ledger(lake).items()}
    assert statuses == {"good.parquet": "ingested", "broken.parquet": "rejected", "no-ssn.parquet": "rejected"}
    records = read_side_outputs(Lake(str(lake)), "quarantine")
    assert b"PAR1 truncated" in [r["payload"] for r in records] and len(records) == 2
    assert (land / "broken.parquet").exists()  # the landing directory is never modified
    # a second run does not retry them
    assert ingest.run(home=home, watch=str(land), lake=str(lake), **FAST)["files_quarantined"] == 0


def test_waits_for_a_rewrite_holding_the_lake_lock(home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    land_parquet(land, "a.parquet", customers(100))
    lake.mkdir()
    lock = Lake(str(lake)).lock(exclusive=True, owner="test rewrite").acquire()
    result: dict = {}

    def go():
        result.update(ingest.run(home=home, watch=str(land), lake=str(lake), columns=SENSITIVE, poll_interval=0.1, until_idle=1.0))

    thread = threading.Thread(target=go)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (lake / "_keyturn" / "lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # longer than until_idle: a blocked batch must not count as idle
        assert not data_files(lake)
    finally:
        lock.release()
        thread.join()
    assert result["lock_waits"] >= 1 and result["rows_written"] == 100


def test_columns_are_required_for_an_empty_lake(home, tmp_path):
    (tmp_path / "land").mkdir()
    with pytest.raises(InputError, match="name the columns"):
        ingest.run(home=home, watch=str(tmp_path / "land"), lake=str(tmp_path / "lake"), **FAST)
    with pytest.raises(InputError, match="not a directory"):
        ingest.run(home=home, watch=str(tmp_path / "nope"), lake=str(tmp_path / "lake"), columns=SENSITIVE, **FAST)


_INGEST = """
from keyturn.pipelines import ingest
from keyturn.home import KeyHome
ingest.run(home=KeyHome.open({home!r}), watch={land!r}, lake={lake!r}, columns=["email", "ssn"], partition_by="region",
           poll_interval=0.1, until_idle=1.0, file_rows=150)
"""


@pytest.mark.parametrize(
    "point, skip",
    [("write:after-file", 1), ("encrypt:before-commit", 0), ("encrypt:mid-publish", 1), ("encrypt:before-record", 0)],
)
def test_killed_ingest_resumes_with_every_row_once(home, tmp_path, point, skip):
    land, lake = tmp_path / "land", tmp_path / "lake"
    tables = [customers(300, start=k * 1000) for k in range(3)]
    for k, t in enumerate(tables):
        land_parquet(land, f"f{k}.parquet", t)
    code = _INGEST.format(home=home.path, land=str(land), lake=str(lake))
    proc = run_python(code, env={"KEYTURN_CRASHPOINT": point, "KEYTURN_CRASHPOINT_SKIP": str(skip)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if data_files(lake):
        ids = read_hive(lake).column("id").to_pylist()
        assert len(ids) == len(set(ids))  # never a row twice, even mid-crash

    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = read_hive(lake).column("id").to_pylist()
    assert sorted(ids) == sorted(i for t in tables for i in t.column("id").to_pylist())
    assert set(ledger(lake)) == {"f0.parquet", "f1.parquet", "f2.parquet"}
    assert not [f for f in all_files(lake) if "staging" in f or ".keyturn-tmp" in f]


def test_sigterm_stops_after_the_current_batch(home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    land_parquet(land, "a.parquet", customers(100))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = cli_command("--home", home.path, "--json", "ingest", "--watch", str(land), "--lake", str(lake),
                      "--columns", "email,ssn", "--poll-interval", "0.1")
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (lake / "_keyturn" / "ingested.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    report = json.loads(stdout)
    assert report["stopped"] == "stopped" and report["rows_written"] == 100

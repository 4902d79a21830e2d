"""`keyturn.pipelines.encrypt`: plain Parquet/Avro into an encrypted hive-partitioned lake.

Each test runs the real pipeline (FnApiRunner) against a real key home and
reads the lake back with pyarrow, as any reader would.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keyturn.errors import InputError
from keyturn.pipelines import decrypt, encrypt
from keyturn.lake.sideoutputs import read_side_outputs
from keyturn.lake.layout import Lake
from keyturn.reports import EncryptReport
from tests.pipeline_support import (
    SENSITIVE,
    all_files,
    avro_records,
    customers,
    data_files,
    make_home,
    read_hive,
    run_cli,
    run_python,
    write_avro,
    write_parquet_source,
)

pytestmark = pytest.mark.beam


@pytest.fixture
def home(tmp_path):
    return make_home(tmp_path / "home")


def footer(path) -> dict:
    return json.loads(pq.read_metadata(path).metadata[b"keyturn"])


def test_encrypt_partitions_by_column_stamps_footers_and_audits(home, tmp_path):
    table = customers(3000, partitions=4)
    src = write_parquet_source(tmp_path / "src", table, files=3)
    lake = tmp_path / "lake"

    heard = []
    report = encrypt.run(home=home, source=src, lake=str(lake), columns=SENSITIVE, partition_by="region",
                         progress=heard.append)

    files = data_files(lake)
    assert sorted({os.path.dirname(f) for f in files}) == [f"region={r}" for r in range(4)]
    # progress came from the pipeline's own steps as they read: file by file, up to every file and row
    reading = [e for e in heard if e.stage == "encrypting"]
    assert [e.files_done for e in reading] == [0, 1, 2, 3] and {e.files_total for e in reading} == {3}
    assert reading[-1].rows_done == 3000 and heard[-1].stage == "committing"
    assert isinstance(report, EncryptReport) and report.rows_written == report["rows_written"]
    assert set(report.to_json()) == {  # the --json keys
        "command", "run_id", "dataset", "source", "lake", "columns", "partition_by", "bind", "source_files",
        "partitions_written", "partitions_skipped", "rows_source", "rows_written", "rows_skipped", "files_written",
        "bytes_written", "kms_calls", "audit_events", "audit_file", "recovered", "seconds", "problems",
    }
    assert report["rows_written"] == 3000 and report["files_written"] == len(files)
    assert report["partitions_written"] == {f"region={r}": {"files": 1, "rows": 750, "bytes": report["partitions_written"][f"region={r}"]["bytes"]} for r in range(4)}
    for f in files:
        meta = footer(lake / f)
        assert meta["format"] == 1 and meta["dataset"] == "customers"
        assert meta["partition"] == os.path.dirname(f)
        assert meta["versions"] == {"1": meta["rows"]}
        assert sorted(meta["encrypted_columns"]) == SENSITIVE
        schema = pq.read_schema(lake / f)
        assert "region" not in schema.names  # hive style: the partition lives in the path
        assert schema.field("email").type == pa.binary()
    # one DEK (one KMS call) and one audit event per partition scope
    events = read_side_outputs(Lake(str(lake)), "audit", run_id=report["run_id"])
    assert len(events) == report["audit_events"] == 4
    assert {e["action"] for e in events} == {"encrypt"}
    assert sum(e["counts"]["rows"] for e in events) == 3000
    assert report["kms_calls"] == 4
    # no staging or temp files left behind
    assert not [f for f in all_files(lake) if "staging" in f or ".keyturn-tmp" in f]


def test_encrypted_lake_decrypts_to_the_source(home, tmp_path):
    table = customers(2000, partitions=5)
    src = write_parquet_source(tmp_path / "src", table, files=2)
    encrypt.run(home=home, source=src, lake=str(tmp_path / "lake"), columns=SENSITIVE, partition_by="region")
    decrypt.run(home=home, lake=str(tmp_path / "lake"), out=str(tmp_path / "out"))
    back = read_hive(tmp_path / "out")
    assert back.num_rows == 2000
    for name in table.column_names:
        assert back.column(name).to_pylist() == table.column(name).to_pylist(), name


def test_hive_source_keeps_its_partitions(home, tmp_path):
    table = customers(900, partitions=3)
    src = write_parquet_source(tmp_path / "src", table, hive_by="region")
    lake = tmp_path / "lake"
    report = encrypt.run(home=home, source=src, lake=str(lake), columns=["email"])
    assert sorted(report["partitions_written"]) == ["region=0", "region=1", "region=2"]
    back = read_hive(lake)
    assert back.column("region").to_pylist() == table.column("region").to_pylist()
    assert back.column("ssn").to_pylist() == table.column("ssn").to_pylist()  # not asked: stays clear


def test_unpartitioned_single_file(home, tmp_path):
    table = customers(500)
    pq.write_table(table, tmp_path / "one.parquet")
    lake = tmp_path / "lake"
    report = encrypt.run(home=home, source=str(tmp_path / "one.parquet"), lake=str(lake), columns=["ssn"])
    assert list(report["partitions_written"]) == [""]
    assert all("/" not in f for f in data_files(lake))
    assert footer(lake / data_files(lake)[0])["partition"] == ""


def test_avro_source_is_encrypted_into_parquet(home, tmp_path):
    records = avro_records(700)
    write_avro(tmp_path / "src" / "a.avro", records[:400])
    write_avro(tmp_path / "src" / "b.avro", records[400:])
    lake, out = tmp_path / "lake", tmp_path / "out"
    report = encrypt.run(home=home, source=str(tmp_path / "src"), lake=str(lake), columns=["email", "ssn"], partition_by="region")
    assert report["rows_written"] == 700 and len(report["partitions_written"]) == 3
    decrypt.run(home=home, lake=str(lake), out=str(out))
    back = read_hive(out)
    assert back.column("email").to_pylist() == [r["email"] for r in records]
    assert back.column("ssn").to_pylist() == [r["ssn"] for r in records]
    assert back.column("spend").to_pylist() == [r["spend"] for r in records]
    assert back.column("seen").to_pylist() == [r["seen"] for r in records]
    assert back.column("tier").to_pylist() == [r["tier"] for r in records]


def test_second_run_skips_encrypted_partitions_and_adds_new_ones(home, tmp_path):
    src = tmp_path / "src"
    write_parquet_source(src, customers(800, partitions=4), hive_by="region")
    lake = tmp_path / "lake"
    first = encrypt.run(home=home, source=str(src), lake=str(lake), columns=SENSITIVE)
    before = {f: (lake / f).stat().st_mtime_ns for f in data_files(lake)}

    again = encrypt.run(home=home, source=str(src), lake=str(lake), columns=SENSITIVE)
    assert again["rows_written"] == 0 and again["kms_calls"] == 0
    assert again["partitions_skipped"] == {f"region={r}": 200 for r in range(4)}
    assert {f: (lake / f).stat().st_mtime_ns for f in data_files(lake)} == before

    # a new partition lands in the source: only it is encrypted
    new = customers(100, partitions=1, start=10_000)
    (src / "region=9").mkdir()
    pq.write_table(new.drop_columns(["region"]), src / "region=9" / "part-0.parquet")
    third = encrypt.run(home=home, source=str(src), lake=str(lake), columns=SENSITIVE)
    assert list(third["partitions_written"]) == ["region=9"] and third["rows_written"] == 100
    assert read_hive(lake).num_rows == first["rows_written"] + 100


@pytest.mark.parametrize(
    "columns, partition_by, message",
    [
        (["email", "nope"], None, "column 'nope' does not exist"),
        (["email"], "nope", "partition column 'nope'"),
        (["email", "region"], "region", "is a partition column"),
        ([], None, "at least one column"),
    ],
)
def test_bad_request_is_one_clear_error_before_anything_is_written(home, tmp_path, columns, partition_by, message):
    src = write_parquet_source(tmp_path / "src", customers(100), files=1)
    lake = tmp_path / "lake"
    with pytest.raises(InputError, match=message):
        encrypt.run(home=home, source=src, lake=str(lake), columns=columns, partition_by=partition_by)
    assert not lake.exists()


def test_already_encrypted_source_and_overlapping_paths_are_refused(home, tmp_path):
    src = write_parquet_source(tmp_path / "src", customers(100), files=1)
    lake = tmp_path / "lake"
    encrypt.run(home=home, source=src, lake=str(lake), columns=["email"])
    with pytest.raises(InputError, match="already encrypted"):
        encrypt.run(home=home, source=str(lake), lake=str(tmp_path / "lake2"), columns=["ssn"])
    with pytest.raises(InputError, match="overlap"):
        encrypt.run(home=home, source=src, lake=str(Path(src) / "lake"), columns=["email"])
    with pytest.raises(InputError, match="does not exist"):
        encrypt.run(home=home, source=str(tmp_path / "missing"), lake=str(lake), columns=["email"])


def test_cli_unknown_column_exits_2_with_one_line(tmp_path):
    make_home(tmp_path / "home")
    src = write_parquet_source(tmp_path / "src", customers(50), files=1)
    proc = run_cli(["encrypt", "--home", str(tmp_path / "home"), "--source", src, "--lake", str(tmp_path / "lake"), "--columns", "email,nope"])
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("keyturn")]
    assert len(lines) == 1 and "'nope' does not exist" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "lake").exists()


_CRASH_RUN = """
import sys
from keyturn.pipelines import encrypt
from keyturn.home import KeyHome
encrypt.run(home=KeyHome.open(sys.argv[1] if len(sys.argv) > 1 else {home!r}), source={src!r}, lake={lake!r},
            columns=["email", "ssn"], partition_by="region", file_rows=200)
"""


@pytest.mark.parametrize(
    "point, skip",
    [("encrypt:before-commit", 0), ("encrypt:mid-publish", 2), ("encrypt:before-cleanup", 0), ("write:after-file", 1)],
)
def test_killed_encrypt_leaves_every_row_once_after_the_next_run(home, tmp_path, point, skip):
    table = customers(1200, partitions=4)
    src = write_parquet_source(tmp_path / "src", table, files=2)
    lake = tmp_path / "lake"
    code = _CRASH_RUN.format(home=home.path, src=src, lake=str(lake))
    proc = run_python(code, env={"KEYTURN_CRASHPOINT": point, "KEYTURN_CRASHPOINT_SKIP": str(skip)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # whatever the crash left, readers see no row twice
    if lake.exists() and data_files(lake):
        ids = read_hive(lake).column("id").to_pylist()
        assert len(ids) == len(set(ids))

    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = read_hive(lake)
    assert back.column("id").to_pylist() == table.column("id").to_pylist()
    assert not [f for f in all_files(lake) if "staging" in f or ".keyturn-tmp" in f]
    out = tmp_path / "out"
    report = decrypt.run(home=home, lake=str(lake), out=str(out))
    assert report["rows_written"] == 1200 and report["problems"] == []
    assert read_hive(out).column("ssn").to_pylist() == table.column("ssn").to_pylist()


def test_a_source_file_corrupt_past_its_footer_fails_the_run_and_commits_nothing(home, tmp_path):
    (tmp_path / "src").mkdir()
    pq.write_table(customers(3000), tmp_path / "src" / "a.parquet", row_group_size=500)
    data = bytearray((tmp_path / "src" / "a.parquet").read_bytes())
    middle = len(data) // 3
    data[middle : middle + 200] = b"\xff" * 200  # a damaged data page; the footer still reads
    (tmp_path / "src" / "a.parquet").write_bytes(bytes(data))
    lake = tmp_path / "lake"
    with pytest.raises(InputError, match="a.parquet' cannot be read"):
        encrypt.run(home=home, source=str(tmp_path / "src"), lake=str(lake), columns=["email"])
    assert data_files(lake) == []
    assert not [f for f in all_files(lake) if "staging/" in f]


def test_beam_options_pass_through_multi_process_workers(home, tmp_path):
    table = customers(2000, partitions=4)
    src = write_parquet_source(tmp_path / "src", table, files=4)
    lake = tmp_path / "lake"
    args = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    report = encrypt.run(home=home, source=src, lake=str(lake), columns=SENSITIVE, partition_by="region", beam_args=args)
    assert report["rows_written"] == 2000
    out = tmp_path / "out"
    assert decrypt.run(home=home, lake=str(lake), out=str(out), beam_args=args)["rows_written"] == 2000
    assert read_hive(out).column("ssn").to_pylist() == table.column("ssn").to_pylist()

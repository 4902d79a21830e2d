"""Beam-native use: Beam's own IO connectors in and out, keyturn lakes the CLI reads.

- ``ReadFromParquetBatched -> EncryptBatches(partition_by=...) -> WriteLake``
  gives a lake that ``keyturn decrypt`` and ``keyturn status`` read, and
  ``ReadLake -> DecryptBatches(output="tables") -> WriteToParquetBatched``
  gives the source back: in process, on the multi-process DirectRunner and
  on the PortableRunner against Beam's local job service.
- ``ReadFromAvro -> EncryptRecords -> WriteToAvro`` and back, no glue.
- Bare tables without partition_by are an unpartitioned dataset; a wrong
  element type is a clear `InputError`, when the pipeline is built if the
  type hint says so, else when the element arrives.
- WriteLake commits all or nothing, does not duplicate rows of retried
  bundles, refuses plain data where the contract says ciphertext, and leaks
  no DEK (the canary DEK of `test_beam_leaks`).
- A pipeline built on Beam's DaskRunner is refused.
"""

from __future__ import annotations

import glob
import os
import time
import pickle
from pathlib import Path
from typing import Any

import apache_beam as beam
import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.internal import pickler as beam_pickler
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineRunner

from beam_support import BATCH_RUNNER, DATASET, SENSITIVE, encrypt_with_beam, key_source, keyed_batches  # noqa: F401
from cli_support import run_cli
from keyturn import arrow_codec
from keyturn.errors import ConfigError, ContractError, ElementTypeError, InputError
from keyturn.format import derive_commitment, parse_envelope
from keyturn.home import KeyHome
from keyturn.lake.footer import read_footer
from keyturn.lake.hive import hive_segments
from keyturn.lake.layout import Lake
from keyturn.lake.staging import STAGING, STALE_RUN_SECONDS, recover_staging
from keyturn.pipelines.runner import pipeline_options
from keyturn.transforms import (
    DecryptBatches,
    DecryptRecords,
    EncryptBatches,
    EncryptRecords,
    ReadLake,
    WriteLake,
    encrypted_schema,
)

pytestmark = pytest.mark.beam

TESTS_DIR = str(Path(__file__).resolve().parent)
PLAIN = pa.schema(
    [
        pa.field("id", pa.int64()),
        pa.field("region", pa.string()),
        pa.field("email", pa.string()),
        pa.field("spend", pa.float64()),
    ]
)
COLUMNS = ["email"]


def source_table(n: int, start: int = 0) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table(
        {
            "id": ids,
            "region": [["eu", "us", None, "a/b"][i % 4] for i in ids],
            "email": [None if i % 9 == 4 else f"user{i}@example.com" for i in ids],
            "spend": [i * 0.5 for i in ids],
        },
        schema=PLAIN,
    )


def rows(table: pa.Table) -> list[tuple]:
    names = PLAIN.names
    return sorted((tuple(r[n] for n in names) for r in table.select(names).to_pylist()), key=repr)


@pytest.fixture
def home(tmp_path) -> KeyHome:
    return KeyHome.init(tmp_path / "home", dataset="customers")


@pytest.fixture
def source(tmp_path) -> tuple[str, pa.Table]:
    """Two plain Parquet files of several row groups each (ReadFromParquetBatched yields one table per row group)."""
    directory = tmp_path / "source"
    directory.mkdir()
    tables = [source_table(120), source_table(80, start=120)]
    for i, t in enumerate(tables):
        pq.write_table(t, directory / f"part-{i}.parquet", row_group_size=50)
    return str(directory / "*.parquet"), pa.concat_tables(tables)


def decrypted_by_cli(home: KeyHome, lake: str, out: str) -> pa.Table:
    """`keyturn decrypt` of `lake` into `out`, read back with the partition columns from the paths."""
    result = run_cli("decrypt", "--home", home.path, "--lake", lake, "--out", out, "--json")
    assert result.code == 0, result.err
    pieces = []
    for path in glob.glob(os.path.join(out, "**", "*.parquet"), recursive=True):
        t = pq.read_table(path)
        rel = os.path.relpath(os.path.dirname(path), out)
        for name, value in hive_segments("" if rel == "." else rel):
            t = t.append_column(name, pa.array([value] * t.num_rows, pa.string()))
        pieces.append(t.select(PLAIN.names))
    return pa.concat_tables(pieces)


def lake_parquet_files(lake: str) -> list[str]:
    return glob.glob(os.path.join(lake, "**", "*.parquet"), recursive=True)


# --------------------------------------------------------------------------- the Parquet round trip, three runners


def _round_trip(home: KeyHome, source: tuple[str, pa.Table], tmp_path: Path, make_pipeline) -> dict[str, Any]:
    pattern, table = source
    keys = home.key_source()
    lake = str(tmp_path / "lake")
    with make_pipeline() as p:
        enc = (
            p
            | "Read" >> beam.io.ReadFromParquetBatched(pattern)
            | "Encrypt" >> EncryptBatches(keys, "customers", COLUMNS, partition_by=["region"])
        )
        _ = enc | "Write" >> WriteLake(lake, dataset="customers", keys=keys)
    # the lake is the CLI's: decrypt gives the source back, status counts every row from the footers
    assert rows(decrypted_by_cli(home, lake, str(tmp_path / "cli-out"))) == rows(table)
    status = run_cli("status", "--home", home.path, "--lake", lake, "--json")
    assert status.code == 0, status.err
    report = status.json()
    assert report["rows"] == table.num_rows
    assert report["status_rows"]["current"] == table.num_rows
    # and back through Beam: ReadLake -> DecryptBatches -> Beam's own Parquet writer
    back = tmp_path / "back"
    with make_pipeline() as p:
        dec = p | "ReadLake" >> ReadLake(lake) | "Decrypt" >> DecryptBatches(
            keys, "customers", output="tables", output_schema=PLAIN
        )
        _ = dec.main | "WriteBack" >> beam.io.WriteToParquetBatched(str(back / "part"), schema=PLAIN, file_name_suffix=".parquet")
    again = pa.concat_tables([pq.read_table(f) for f in glob.glob(str(back / "*.parquet"))])
    assert rows(again) == rows(table)
    return report


def test_parquet_round_trip_in_process(home, source, tmp_path):
    report = _round_trip(home, source, tmp_path, lambda: beam.Pipeline(options=pipeline_options()))
    lake = Lake(tmp_path / "lake")
    assert sorted({f.partition for f in lake.data_files()}) == [
        "region=__HIVE_DEFAULT_PARTITION__", "region=a%2Fb", "region=eu", "region=us"
    ]
    for f in lake.data_files():  # every file carries the footer the inventory reads
        footer = read_footer(lake.fs, f.path)
        assert (footer.dataset, footer.partition, footer.encrypted_columns) == ("customers", f.partition, COLUMNS)
    # the dataset contract names the partition column, as a CLI write with --partition-by does
    assert home.registry().get_contract("customers").partition_by == ("region",)
    assert report["files"] == len(lake.data_files())
    assert not os.path.exists(lake.keyturn_path(STAGING)) or not os.listdir(lake.keyturn_path(STAGING))


@pytest.mark.slow
def test_parquet_round_trip_multi_processing(home, source, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")])))
    options = dict(direct_running_mode="multi_processing", direct_num_workers=2)
    _round_trip(home, source, tmp_path, lambda: beam.Pipeline(runner=BATCH_RUNNER, options=PipelineOptions(flags=[], **options)))


@pytest.mark.slow
def test_parquet_round_trip_portable_runner(home, source, tmp_path):
    from test_beam_runners import _start_local_job_service, _stop

    service = tmp_path / "service"
    service.mkdir()
    proc, port = _start_local_job_service(service)
    try:
        options = dict(runner="PortableRunner", job_endpoint=f"localhost:{port}", environment_type="LOOPBACK")
        _round_trip(home, source, tmp_path, lambda: beam.Pipeline(options=PipelineOptions(flags=[], **options)))
        assert "Completed job" in (service / "job-service.log").read_text()
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- bare tables, element types


def test_a_bare_table_without_partition_by_is_an_unpartitioned_dataset(home, tmp_path):
    table = source_table(30)
    lake = str(tmp_path / "lake")
    with beam.Pipeline(options=pipeline_options()) as p:
        tables = p | beam.Create([table])
        assert tables.element_type is pa.Table
        _ = tables | EncryptBatches(home.key_source(), "customers", COLUMNS) | WriteLake(lake, keys=home)
    files = Lake(lake).data_files()
    assert files and {f.partition for f in files} == {""}
    assert all("/" not in f.relpath for f in files)
    assert home.registry().get_contract("customers").partition_by == ()
    assert rows(decrypted_by_cli(home, lake, str(tmp_path / "out"))) == rows(table)


def test_a_wrong_element_type_is_refused_when_the_pipeline_is_built(key_source):
    p = beam.Pipeline(runner=BATCH_RUNNER)
    strings = p | beam.Create(["not", "batches"])
    with pytest.raises(ElementTypeError, match=r"EncryptBatches takes pyarrow\.Table, pyarrow\.RecordBatch or \(partition: str, pyarrow\.RecordBatch\) elements, not <class 'str'>"):
        _ = strings | EncryptBatches(key_source, DATASET, SENSITIVE)
    with pytest.raises(ElementTypeError, match=r"EncryptRecords takes dict \(an Avro record\) or \(partition: str, dict\) elements"):
        _ = strings | EncryptRecords(key_source, DATASET, AVRO_SCHEMA, ["email"])


def test_a_wrong_element_type_without_a_hint_fails_with_the_expected_forms(key_source):
    p = beam.Pipeline(runner=BATCH_RUNNER)
    _ = p | beam.Create([{"id": 1}]).with_output_types(Any) | EncryptBatches(key_source, DATASET, SENSITIVE)
    with pytest.raises(Exception) as caught:
        p.run().wait_until_finish()
    text = str(caught.value)
    assert "EncryptBatches takes pyarrow.Table, pyarrow.RecordBatch or (partition: str, pyarrow.RecordBatch) elements, not dict" in text
    assert "too many values to unpack" not in text


def test_a_partition_column_must_be_a_hive_name(key_source):
    with pytest.raises(InputError, match="hidden directory"):
        EncryptBatches(key_source, DATASET, SENSITIVE, partition_by=["_day"])


# --------------------------------------------------------------------------- WriteLake: commit, retries, contract


def _encrypted(key_source, tmp_path) -> list[tuple[str, pa.RecordBatch]]:
    return encrypt_with_beam(key_source, keyed_batches(["region=eu", "region=us"], 2, 5), tmp_path / "pre")


def test_writelake_refuses_plain_data_and_a_failed_pipeline_publishes_nothing(key_source, tmp_path):
    good = _encrypted(key_source, tmp_path)
    partition, batch = good[0]
    i = batch.schema.get_field_index("email")
    plain = batch.set_column(i, pa.field("email", pa.string()), pa.array(["leaked@example.com"] * batch.num_rows))
    lake = Lake(tmp_path / "lake")
    p = beam.Pipeline(runner=BATCH_RUNNER)
    _ = (
        p
        | beam.Create(good + [(partition, plain)], reshuffle=False)
        | WriteLake(lake, dataset=DATASET, keys=key_source, run_id="run-1")
    )
    with pytest.raises(Exception) as caught:
        p.run().wait_until_finish()
    assert "contract column 'email' holds string, not ciphertext" in str(caught.value)
    assert "ContractError" in repr(caught.value) or isinstance(caught.value, ContractError)
    staged = glob.glob(os.path.join(lake.keyturn_path(STAGING, "run-1"), "**", "*.staged"), recursive=True)
    assert len(staged) == len(good)  # the good batches were staged before the bad one failed the run...
    assert lake_parquet_files(lake.root) == []  # ...and none of them is visible: no *.parquet anywhere
    assert lake.data_files() == []
    # a Beam run's owner is not one process: its staging is left alone while it may still be running...
    assert recover_staging(lake) == {"rolled_forward_files": 0, "discarded_runs": 0, "live_runs": 1}
    later = time.time() + STALE_RUN_SECONDS + 1  # ...and discarded once it is older than any live run can be
    assert recover_staging(lake, now=lambda: later) == {"rolled_forward_files": 0, "discarded_runs": 1, "live_runs": 0}
    assert lake.data_files() == [] and not os.path.exists(lake.keyturn_path(STAGING, "run-1"))


def test_a_retried_bundle_does_not_duplicate_rows(key_source, tmp_path):
    data = keyed_batches(["region=eu", "region=us"], 3, 4)
    lake = Lake(tmp_path / "lake")
    reports = tmp_path / "report"
    p = beam.Pipeline(runner=BATCH_RUNNER, options=PipelineOptions(flags=[], direct_runner_bundle_repeat=1))
    report = (
        p
        | beam.Create(data)
        | EncryptBatches(key_source, DATASET, SENSITIVE)
        | WriteLake(lake, dataset=DATASET, keys=key_source)
    )
    _ = report | beam.Map(repr) | beam.io.WriteToText(str(reports))
    p.run().wait_until_finish()
    files = lake.data_files()
    written = sum(pq.ParquetFile(f.path).metadata.num_rows for f in files)
    assert written == sum(b.num_rows for _, b in data)  # every row once, though every write ran twice
    ids = sorted(i for f in files for i in pq.read_table(f.path, columns=["id"]).column("id").to_pylist())
    assert ids == sorted(i for _, b in data for i in b.column("id").to_pylist())
    assert len(files) == eval(open(glob.glob(str(reports) + "*")[0]).read())["files"]  # noqa: S307 (our own repr)
    assert not os.path.exists(lake.keyturn_path(STAGING)) or not os.listdir(lake.keyturn_path(STAGING))


def test_writelake_needs_a_contract(key_source, tmp_path):
    from beam_support import encrypt_direct, sample_batch

    sealed = encrypt_direct(key_source, sample_batch(3), "p1", version=1)  # the core codec alone pins no contract
    p = beam.Pipeline(runner=BATCH_RUNNER)
    _ = p | beam.Create([("p1", sealed)]) | WriteLake(tmp_path / "lake", dataset=DATASET, keys=key_source)
    with pytest.raises(Exception, match="has no contract in the key home"):
        p.run().wait_until_finish()


# --------------------------------------------------------------------------- ReadLake: quarantine, tables


def test_readlake_quarantines_unreadable_files_and_refuses_tables_of_a_partitioned_lake(key_source, tmp_path):
    good = _encrypted(key_source, tmp_path)
    lake = Lake(tmp_path / "lake")
    with beam.Pipeline(runner=BATCH_RUNNER) as p:
        _ = p | beam.Create(good) | WriteLake(lake, dataset=DATASET, keys=key_source)
    junk = lake.path("region=eu", "junk.parquet")
    with open(junk, "wb") as f:
        f.write(b"not parquet")
    out = tmp_path / "q"
    with beam.Pipeline(runner=BATCH_RUNNER) as p:
        read = p | ReadLake(lake)
        dec = read | DecryptBatches(key_source, DATASET)
        _ = read.quarantine | "Q" >> beam.Map(lambda r: r["reason"] + " " + r["detail"]) | "WQ" >> beam.io.WriteToText(str(out / "q"))
        _ = dec.main | "N" >> beam.Map(lambda kv: kv[1].num_rows) | beam.CombineGlobally(sum) | "WN" >> beam.io.WriteToText(str(out / "n"))
    quarantined = open(glob.glob(str(out / "q*"))[0]).read().splitlines()
    assert len(quarantined) == 1 and quarantined[0].startswith("unparseable not a readable Parquet file: region=eu/junk.parquet")
    assert int(open(glob.glob(str(out / "n*"))[0]).read()) == sum(b.num_rows for _, b in good)
    with pytest.raises(InputError, match="is partitioned"):
        _ = beam.Pipeline(runner=BATCH_RUNNER) | ReadLake(lake, output="tables")


# --------------------------------------------------------------------------- writing Parquet yourself


def test_encrypted_schema_is_what_encrypt_batch_writes(key_source):
    from beam_support import SCHEMA, encrypt_direct, sample_batch

    sealed = encrypt_direct(key_source, sample_batch(4), "p1", version=1)
    assert encrypted_schema(SCHEMA, SENSITIVE).equals(sealed.schema, check_metadata=True)


def test_write_to_parquet_batched_yourself_and_read_back(home, tmp_path):
    """EncryptBatches(output="tables") -> WriteToParquetBatched(encrypted_schema) -> ReadFromParquetBatched -> DecryptBatches."""
    table = source_table(60)
    keys = home.key_source()
    sealed_schema = encrypted_schema(PLAIN, COLUMNS)
    with beam.Pipeline(options=pipeline_options()) as p:
        enc = p | beam.Create([table]) | EncryptBatches(
            keys, "customers", COLUMNS, partition_by=["region"], output="tables", output_schema=sealed_schema
        )
        _ = enc.main | beam.io.WriteToParquetBatched(str(tmp_path / "enc" / "part"), schema=sealed_schema, file_name_suffix=".parquet")
    written = pa.concat_tables([pq.read_table(f) for f in glob.glob(str(tmp_path / "enc" / "*.parquet"))])
    assert "user1@example.com" not in str(written.column("email").to_pylist())
    back = tmp_path / "back"
    with beam.Pipeline(options=pipeline_options()) as p:
        dec = p | beam.io.ReadFromParquetBatched(str(tmp_path / "enc" / "*.parquet")) | DecryptBatches(
            keys, "customers", partition_by=["region"], output="tables", output_schema=PLAIN
        )
        _ = dec.quarantine | "Q" >> beam.Map(repr) | "WQ" >> beam.io.WriteToText(str(tmp_path / "quarantine"))
        _ = dec.main | beam.io.WriteToParquetBatched(str(back / "part"), schema=PLAIN, file_name_suffix=".parquet")
    assert not any(open(f).read() for f in glob.glob(str(tmp_path / "quarantine*")))
    assert rows(pa.concat_tables([pq.read_table(f) for f in glob.glob(str(back / "*.parquet"))])) == rows(table)


# --------------------------------------------------------------------------- Avro


AVRO_SCHEMA = {
    "type": "record",
    "name": "Customer",
    "namespace": "keyturn.tests",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "region", "type": ["null", "string"], "default": None},
        {"name": "email", "type": ["null", "string"], "default": None},
    ],
}


def test_avro_round_trip_with_beams_avro_io(home, tmp_path):
    records = [{"id": i, "region": ["eu", "us", None][i % 3], "email": f"user{i}@example.com"} for i in range(40)]
    with open(tmp_path / "plain.avro", "wb") as f:
        fastavro.writer(f, fastavro.parse_schema(AVRO_SCHEMA), records)
    keys = home.key_source()
    encrypt = EncryptRecords(keys, "customers", AVRO_SCHEMA, ["email"], partition_by=["region"], output="records")
    with beam.Pipeline(options=pipeline_options()) as p:
        enc = p | beam.io.ReadFromAvro(str(tmp_path / "plain.avro")) | encrypt
        _ = enc.main | beam.io.WriteToAvro(str(tmp_path / "enc" / "part"), schema=encrypt.encrypted_schema, file_name_suffix=".avro")
    sealed = [r for path in glob.glob(str(tmp_path / "enc" / "*.avro")) for r in fastavro.reader(open(path, "rb"))]
    assert len(sealed) == len(records) and not any(b"user1@" in (r["email"] or b"") for r in sealed)
    with beam.Pipeline(options=pipeline_options()) as p:
        dec = p | beam.io.ReadFromAvro(str(tmp_path / "enc" / "*.avro")) | DecryptRecords(
            keys, "customers", encrypt.encrypted_schema, partition_by=["region"], output="records"
        )
        _ = dec.main | beam.io.WriteToAvro(str(tmp_path / "back" / "part"), schema=AVRO_SCHEMA, file_name_suffix=".avro")
    back = [r for path in glob.glob(str(tmp_path / "back" / "*.avro")) for r in fastavro.reader(open(path, "rb"))]
    assert sorted(back, key=lambda r: r["id"]) == records


# --------------------------------------------------------------------------- runners


class DaskRunner(PipelineRunner):
    """Named like Beam's DaskRunner (not installed here): keyturn detects the runner by its class."""

    def run_pipeline(self, pipeline, options):  # pragma: no cover - never run
        raise AssertionError("a keyturn pipeline must be refused before it runs")


@pytest.mark.parametrize("how", ["options", "runner"])
def test_keyturn_refuses_to_build_on_the_dask_runner(key_source, tmp_path, how):
    if how == "options":  # the options name it (the runner object is not consulted to build)
        p = beam.Pipeline(runner=BATCH_RUNNER, options=PipelineOptions(["--runner=apache_beam.runners.dask.dask_runner.DaskRunner"]))
    else:
        p = beam.Pipeline(runner=DaskRunner())
    batches = p | beam.Create(keyed_batches(["p1"], 1, 2))
    for build in (
        lambda: batches | "E" >> EncryptBatches(key_source, DATASET, SENSITIVE),
        lambda: batches | "D" >> DecryptBatches(key_source, DATASET),
        lambda: batches | "W" >> WriteLake(tmp_path / "lake", dataset=DATASET, keys=key_source),
        lambda: p | "R" >> ReadLake(tmp_path),
    ):
        with pytest.raises(ConfigError, match="DaskRunner routes tagged outputs to the wrong consumers"):
            build()


def test_the_cli_refuses_the_dask_runner(home, source, tmp_path):
    pattern, _ = source
    result = run_cli(
        "encrypt", "--home", home.path, "--source", os.path.dirname(pattern), "--lake", str(tmp_path / "lake"),
        "--columns", "email", "--", "--runner=DaskRunner",
    )
    assert result.code == 2
    assert "DaskRunner routes tagged outputs" in result.err
    assert not os.path.exists(tmp_path / "lake" / "region=eu")


# --------------------------------------------------------------------------- no DEK in WriteLake's pickles or outputs


def test_writelake_never_holds_or_writes_the_dek(key_source, tmp_path):
    from test_beam_leaks import CANARY, CanaryKeySource, leaks

    canary = CanaryKeySource(key_source)
    lake = Lake(tmp_path / "lake")
    write = WriteLake(lake, dataset=DATASET, keys=canary)
    p = beam.Pipeline(runner=BATCH_RUNNER)
    enc = p | beam.Create(keyed_batches(["region=eu", "region=us"], 2, 5)) | EncryptBatches(canary, DATASET, SENSITIVE)
    report = enc | write
    _ = report | beam.Map(repr) | beam.io.WriteToText(str(tmp_path / "report"))
    p.run().wait_until_finish()
    files = lake.data_files()
    assert files
    envelope = parse_envelope(pq.read_table(files[0].path).column(arrow_codec.DEK_COLUMN).combine_chunks().dictionary[0].as_py())
    assert derive_commitment(CANARY, envelope.dek_id) == envelope.commitment  # the canary really is the DEK
    found = leaks(pickle.dumps(write)) + leaks(beam_pickler.dumps(write))
    for path in glob.glob(str(tmp_path / "**" / "*"), recursive=True):
        if os.path.isfile(path) and not path.startswith(os.path.dirname(key_source.keystore)):
            found += [(path, f) for f in leaks(open(path, "rb").read())]
    assert not found, found
    assert glob.glob(lake.keyturn_path("audit", "*.avro"))  # the audit side output was written (and scanned)

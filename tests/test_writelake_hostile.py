"""WriteLake against hostile and careless input: only genuine sealed output of this key home reaches the lake.

A batch claiming to be EncryptBatches output is checked before it is staged
(keyturn.lake.admission): type checks alone would let any binary column, or
null key columns, through under a keyturn footer. A committed run publishes
exactly the files it verified; run ids cannot leave the staging directory.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.transforms.window import FixedWindows

from beam_support import BATCH_RUNNER, DATASET, encrypt_with_beam, key_source, keyed_batches  # noqa: F401
from keyturn.errors import ContractError, InputError, LakeError
from keyturn.lake.atomic import write_json_atomically, write_parquet_atomically
from keyturn.lake.hive import split_by_partition
from keyturn.lake.layout import Lake
from keyturn.lake.staging import COMMIT_MARKER, STAGING, begin_run, commit_run_marker, publish, recover_staging
from keyturn.transforms import WriteLake

pytestmark = pytest.mark.beam


@pytest.fixture
def sealed(key_source, tmp_path) -> list[tuple[str, pa.RecordBatch]]:
    """Genuine EncryptBatches output for two partitions (pins the dataset's contract)."""
    return encrypt_with_beam(key_source, keyed_batches(["region=eu", "region=us"], 1, 6), tmp_path / "pre")


def _write(elements, key_source, lake: Lake, **kwargs) -> None:
    with beam.Pipeline(runner=BATCH_RUNNER) as p:
        _ = p | beam.Create(elements, reshuffle=False) | WriteLake(lake, dataset=DATASET, keys=key_source, **kwargs)


def _refused(elements, key_source, lake: Lake, match: str) -> None:
    with pytest.raises(Exception) as caught:
        _write(elements, key_source, lake)
    assert match in str(caught.value), str(caught.value)[-2000:]
    assert "ContractError" in repr(caught.value) or isinstance(caught.value, ContractError)
    assert glob.glob(os.path.join(lake.root, "**", "*.parquet"), recursive=True) == []


def test_genuine_output_is_written(sealed, key_source, tmp_path):
    lake = Lake(tmp_path / "lake")
    _write(sealed, key_source, lake)
    assert sorted({f.partition for f in lake.data_files()}) == ["region=eu", "region=us"]


def test_cells_under_another_partition_are_refused(sealed, key_source, tmp_path):
    partition, batch = sealed[0]
    other = "region=us" if partition == "region=eu" else "region=eu"
    _refused([(other, batch)], key_source, Lake(tmp_path / "lake"), "registered for another dataset or partition")


def test_a_bare_table_of_a_partitioned_dataset_is_refused(sealed, key_source, tmp_path):
    """Its DEKs are bound to region=..., so at the lake root every row would read corrupt."""
    _refused([sealed[0][1]], key_source, Lake(tmp_path / "lake"), "registered for another dataset or partition than 'sales' / ''")


def test_forged_binary_cells_with_real_key_columns_are_refused(sealed, key_source, tmp_path):
    partition, batch = sealed[0]
    i = batch.schema.get_field_index("email")
    forged = batch.set_column(i, batch.schema.field("email"), pa.array([b"plain@x.example"] * batch.num_rows, pa.binary()))
    _refused([(partition, forged)], key_source, Lake(tmp_path / "lake"), "not a cell sealed under its row's DEK")


def test_null_key_columns_are_refused(sealed, key_source, tmp_path):
    partition, batch = sealed[0]
    for name in ("_keyturn_version", "_keyturn_dek"):
        i = batch.schema.get_field_index(name)
        nulled = batch.set_column(i, batch.schema.field(name), pa.nulls(batch.num_rows, batch.schema.field(name).type))
        _refused([(partition, nulled)], key_source, Lake(tmp_path / name), "no key version or no DEK envelope")


def test_a_column_shadowing_a_contract_column_by_case_is_refused(sealed, key_source, tmp_path):
    partition, batch = sealed[0]
    shadow = batch.append_column("Email", pa.array(["clear@x.example"] * batch.num_rows))
    _refused([(partition, shadow)], key_source, Lake(tmp_path / "lake"), "only by case")


def test_a_dek_the_directory_does_not_know_is_refused(sealed, key_source, tmp_path):
    """A cell copied from another key home's lake carries a genuine-looking header, but no entry here."""
    partition, batch = sealed[0]
    from keyturn.format import parse_envelope

    env = parse_envelope(batch.column("_keyturn_dek").dictionary[0].as_py())
    stranger = bytes(16 - 1) + b"\x07"
    raw = env.to_bytes().replace(env.dek_id, stranger)
    forged = batch
    for name in ("email", "card"):
        cells = [None if c is None else c[:1] + stranger + c[17:] for c in batch.column(name).to_pylist()]
        forged = forged.set_column(forged.schema.get_field_index(name), forged.schema.field(name), pa.array(cells, pa.binary()))
    deks = pa.DictionaryArray.from_arrays(pa.array([0] * batch.num_rows, pa.int32()), pa.array([raw], pa.binary()))
    forged = forged.set_column(forged.schema.get_field_index("_keyturn_dek"), forged.schema.field("_keyturn_dek"), deks)
    _refused([(partition, forged)], key_source, Lake(tmp_path / "lake"), "is not in the key home's DEK directory")


@pytest.mark.parametrize("run_id", ["../..", "..", ".", "nightly/2024-06-01", "", "_hidden"])
def test_a_run_id_must_be_one_visible_name(key_source, run_id):
    with pytest.raises(InputError, match="run id"):
        WriteLake("lake", dataset=DATASET, keys=key_source, run_id=run_id)


def test_a_run_id_in_use_cannot_be_taken_again(sealed, key_source, tmp_path):
    lake = Lake(tmp_path / "lake")
    _write(sealed, key_source, lake, run_id="nightly-1")
    before = sorted(f.path for f in lake.data_files())
    begin_run(lake, "nightly-1b", process=False)  # a run of that id is staging now
    with pytest.raises(InputError, match="was used before"):
        _write(sealed, key_source, lake, run_id="nightly-1b")
    # an audit file of that id is enough: reusing it would overwrite that run's record
    write_json_atomically(lake, lake.side_output_path("audit", "nightly-2"), {})
    with pytest.raises(InputError, match="was used before"):
        _write(sealed, key_source, lake, run_id="nightly-2")
    assert sorted(f.path for f in lake.data_files()) == before


def test_windowed_input_is_refused_when_the_pipeline_is_built(sealed, key_source, tmp_path):
    p = beam.Pipeline(runner=BATCH_RUNNER)
    windowed = p | beam.Create(sealed) | beam.WindowInto(FixedWindows(60))
    with pytest.raises(InputError, match="global window"):
        _ = windowed | WriteLake(Lake(tmp_path / "lake"), dataset=DATASET, keys=key_source)


def test_binary_partition_values_are_refused_not_turned_into_hex():
    batch = pa.record_batch({"k": pa.array([b"abc", b"\x00\xff"]), "v": [1, 2]})
    with pytest.raises(InputError, match="hex"):
        list(split_by_partition(batch, "", ["k"], ["k"], batch.schema))


# --------------------------------------------------------------------------- the commit marker


def _stage(lake: Lake, run_dir: str, rel: str) -> str:
    path = posixpath.join(run_dir, rel)
    write_parquet_atomically(lake, path, pa.table({"id": [1, 2, 3]}), None)
    return path


def test_only_the_files_the_marker_lists_are_published(tmp_path):
    lake = Lake(tmp_path / "lake")
    run_dir = begin_run(lake, "run")
    _stage(lake, run_dir, "region=1/part-a.parquet.staged")
    commit_run_marker(lake, run_dir, "run", ["region=1/part-a.parquet.staged"])
    _stage(lake, run_dir, "region=1/part-late.parquet.staged")  # a late bundle attempt, or a planted file
    _stage(lake, run_dir, "region=2/planted.parquet")
    publish(lake, run_dir)
    assert [os.path.basename(f.path) for f in lake.data_files()] == ["part-a.parquet"]


@pytest.mark.parametrize("marker", ["[]", "{not json", '{"sources": 5}', '{"paths": ["../../escape.parquet"]}', '{"paths": "x"}'])
def test_a_marker_keyturn_did_not_write_is_a_typed_error(tmp_path, marker):
    lake = Lake(tmp_path / "lake")
    run_dir = lake.keyturn_path(STAGING, "forged")
    _stage(lake, run_dir, "region=1/part-a.parquet.staged")
    with open(posixpath.join(run_dir, COMMIT_MARKER), "w") as f:
        f.write(marker)
    with pytest.raises(LakeError, match="staged run"):
        recover_staging(lake)
    assert lake.data_files() == []


def test_forged_owner_records_do_not_keep_a_run_alive(tmp_path):
    lake = Lake(tmp_path / "lake")
    for name, owner in {
        "future": {"kind": "beam", "began_at": 1e15},
        "pid-without-start": {"pid": 1, "host": os.uname().nodename, "began_at": 0},
    }.items():
        run_dir = begin_run(lake, name)
        _stage(lake, run_dir, "region=1/part.parquet.staged")
        with open(posixpath.join(run_dir, "_owner.json"), "w") as f:
            json.dump(owner, f)
    assert recover_staging(lake) == {"rolled_forward_files": 0, "discarded_runs": 2, "live_runs": 0}


def test_temp_files_of_staged_runs_are_not_swept_by_the_lake_cleanup(tmp_path):
    lake = Lake(tmp_path / "lake")
    run_dir = begin_run(lake, "beam-run", process=False)
    os.makedirs(os.path.join(run_dir, "region=1"), exist_ok=True)
    inflight = os.path.join(run_dir, "region=1", ".keyturn-tmp-0123-part.parquet.staged.tmp")
    open(inflight, "wb").close()
    stray = os.path.join(lake.root, "region=1", ".keyturn-tmp-0456-part.parquet.tmp")
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    open(stray, "wb").close()
    assert lake.remove_temp_files() == ["region=1/.keyturn-tmp-0456-part.parquet.tmp"]
    assert os.path.exists(inflight)


def test_a_symlinked_lake_file_never_copies_its_target_into_quarantine(tmp_path):
    from keyturn.transforms.lakefiles import ReadLakeFiles

    secret = tmp_path / "operator-secret.txt"
    secret.write_bytes(b"OPERATOR-PRIVATE-KEY-MATERIAL")
    lake = Lake(tmp_path / "lake")
    os.makedirs(lake.path("region=1"))
    os.symlink(secret, lake.path("region=1", "part-evil.parquet"))
    fn = ReadLakeFiles(lake, DATASET)
    fn.setup()
    [out] = list(fn.process(("region=1", lake.path("region=1", "part-evil.parquet"))))
    record = out.value
    assert record["reason"] == "unparseable" and "symbolic link" in record["detail"]
    assert b"OPERATOR" not in (record["payload"] or b"")

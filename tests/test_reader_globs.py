"""The globs other engines' users write see exactly the committed data files.

DuckDB's ``read_parquet`` globs do not skip hidden names (pyarrow.dataset
and Spark do), so no file keyturn writes may end in ``.parquet`` before it
is data:

- temp files of atomic writes are ``.keyturn-tmp-<uuid>-<name>.tmp``; a
  ``kill -9`` in the middle of a rewrite leaves one, and
  ``read_parquet('lake/*/*.parquet')`` and ``'lake/**/*.parquet'`` still
  count the committed rows only (the older ``.keyturn-tmp-...-x.parquet``
  leftovers are still recognised and removed);
- files staged by a running (or killed) encrypt under
  ``_keyturn/staging/<run-id>/`` end in ``.parquet.staged`` until the commit
  publishes them under their ``.parquet`` name; a committed staging run of
  an older keyturn (``.parquet`` names) is still rolled forward;
- side outputs under ``_keyturn/`` are Avro and JSON: ``'lake/**/*.parquet'``
  works with them present, a bare ``'lake/**'`` reaches them and fails (as
  the README says).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from keyturn.lake.atomic import AtomicParquetWriter
from keyturn.lake.layout import TEMP_PREFIX, Lake, is_temp_name, temp_name_for
from lake_support import rotate
from keyturn.pipelines import encrypt, reencrypt
from keyturn.lake.staging import COMMIT_MARKER, STAGED_SUFFIX, recover_staging
from tests.pipeline_support import REPO, SENSITIVE, cli_command, customers, make_home, set_config, write_parquet_source

pytestmark = pytest.mark.beam

ROWS = 600


@pytest.fixture
def lake(tmp_path):
    home = make_home(tmp_path / "home")
    src = write_parquet_source(tmp_path / "src", customers(ROWS, partitions=3), files=2)
    lake = tmp_path / "lake"
    encrypt.run(home=home, source=src, lake=str(lake), columns=SENSITIVE, partition_by="region")
    assert (lake / "_keyturn" / "audit").is_dir()  # side outputs are present in every case below
    return home, lake, tmp_path


def duckdb_count(glob: str) -> int:
    duckdb = pytest.importorskip("duckdb")
    return duckdb.connect().execute(f"select count(*) from read_parquet('{glob}', hive_partitioning = true)").fetchone()[0]


def assert_readers_count(lake: Path, rows: int) -> None:
    assert duckdb_count(f"{lake}/**/*.parquet") == rows
    assert duckdb_count(f"{lake}/*/*.parquet") == rows
    assert ds.dataset(str(lake), format="parquet", partitioning="hive").count_rows() == rows


def _kill_at(point: str, cmd: list[str], skip: int = 0) -> None:
    env = {**os.environ, "KEYTURN_CRASHPOINT": point, "KEYTURN_CRASHPOINT_SKIP": str(skip)}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


# ------------------------------------------------------------------ temp names


def test_temp_names_do_not_end_in_the_final_suffix_and_old_ones_are_still_temp():
    name = temp_name_for("part-1.parquet")
    assert name.startswith(TEMP_PREFIX) and not name.endswith(".parquet") and name.endswith(".tmp")
    assert is_temp_name(name)
    assert is_temp_name(".keyturn-tmp-0123abcd-part-1.parquet")  # what older versions left behind


def test_an_old_style_leftover_temp_file_is_removed(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    (tmp_path / "lake" / "region=0").mkdir(parents=True)
    old = tmp_path / "lake" / "region=0" / ".keyturn-tmp-0123abcd-part-x.parquet"
    old.write_bytes(b"PAR1 torn")
    assert lake.remove_temp_files() == ["region=0/.keyturn-tmp-0123abcd-part-x.parquet"] and not old.exists()


def test_an_unfinished_atomic_write_is_invisible_to_duckdb_and_pyarrow(lake):
    home, lake_dir, _ = lake
    lake_obj = Lake(str(lake_dir))
    writer = AtomicParquetWriter(lake_obj, lake_obj.new_data_path("region=1"), customers(50).schema)
    writer.write(customers(50))
    writer.flush()  # a torn file, as a crash leaves it
    try:
        assert_readers_count(lake_dir, ROWS)
        assert not writer.temp_path.endswith(".parquet")
    finally:
        writer.abort()


def test_duckdb_and_pyarrow_count_only_committed_rows_after_kill_9_of_a_rewrite(lake):
    home, lake_dir, _ = lake
    rotate(home)
    set_config(home.path, "lifecycle", max_concurrent_reencryption_workers=1)  # one file in flight at a time
    cmd = cli_command("--home", str(home.path), "reencrypt", "--lake", str(lake_dir), "--mode", "reencrypt")
    _kill_at("rewrite:mid-write", cmd)
    leftovers = [p for p in lake_dir.rglob(f"{TEMP_PREFIX}*")]
    assert len(leftovers) == 1 and leftovers[0].parent.name.startswith("region=")
    assert_readers_count(lake_dir, ROWS)
    report = reencrypt.run(str(lake_dir), home=home.path, mode="reencrypt")
    assert report["complete"] and not list(lake_dir.rglob(f"{TEMP_PREFIX}*"))
    assert_readers_count(lake_dir, ROWS)


# ------------------------------------------------------------------ staging


def test_an_encrypt_killed_before_its_commit_is_invisible_to_duckdb_and_pyarrow(lake):
    home, lake_dir, tmp_path = lake
    more = customers(300, partitions=1, start=10_000).set_column(1, "region", pa.array([9] * 300))
    src = write_parquet_source(tmp_path / "src2", more, files=1)
    cmd = cli_command("--home", str(home.path), "encrypt", "--source", src, "--lake", str(lake_dir),
                      "--columns", ",".join(SENSITIVE), "--partition-by", "region")
    _kill_at("encrypt:before-commit", cmd)
    assert_readers_count(lake_dir, ROWS)
    staged = [p for p in (lake_dir / "_keyturn" / "staging").rglob("*") if p.is_file() and "part-" in p.name]
    assert staged and all(p.name.endswith(".parquet" + STAGED_SUFFIX) for p in staged)
    # the next run discards the uncommitted staging and writes the partition once
    again = encrypt.run(home=home, source=src, lake=str(lake_dir), columns=SENSITIVE, partition_by="region")
    assert again["recovered"]["discarded_runs"] == 1 and again["rows_written"] == 300
    assert_readers_count(lake_dir, ROWS + 300)


def test_an_encrypt_killed_after_its_commit_is_rolled_forward_under_parquet_names(lake):
    home, lake_dir, tmp_path = lake
    more = customers(200, partitions=1, start=20_000).set_column(1, "region", pa.array([8] * 200))
    src = write_parquet_source(tmp_path / "src3", more, files=1)
    cmd = cli_command("--home", str(home.path), "encrypt", "--source", src, "--lake", str(lake_dir),
                      "--columns", ",".join(SENSITIVE), "--partition-by", "region")
    _kill_at("encrypt:before-record", cmd)
    assert_readers_count(lake_dir, ROWS + 200)
    assert [p.name for p in (lake_dir / "region=8").iterdir() if p.name.endswith(".parquet")]
    assert not [p for p in (lake_dir / "region=8").iterdir() if not p.name.endswith(".parquet")]


def test_a_committed_staging_run_of_an_older_keyturn_is_still_rolled_forward(lake):
    home, lake_dir, tmp_path = lake
    lake_obj = Lake(str(lake_dir))
    # what an older keyturn left: a committed run whose staged files are named *.parquet
    run_dir = lake_dir / "_keyturn" / "staging" / "20240101T000000Z-0ld0ld00"
    (run_dir / "region=5").mkdir(parents=True)
    existing = next((lake_dir / "region=0").glob("*.parquet"))
    shutil.copy(existing, run_dir / "region=5" / "part-old.parquet")
    (run_dir / COMMIT_MARKER).write_text(json.dumps({"run_id": run_dir.name, "files": 1, "sources": {}}))
    recovered = recover_staging(lake_obj)
    assert (recovered["rolled_forward_files"], recovered["discarded_runs"]) == (1, 0)
    assert (lake_dir / "region=5" / "part-old.parquet").is_file() and not run_dir.exists()


# ------------------------------------------------------------------ side outputs and globs


def test_the_documented_glob_works_with_side_outputs_present_and_a_bare_double_star_does_not(lake):
    duckdb = pytest.importorskip("duckdb")
    home, lake_dir, _ = lake
    assert list((lake_dir / "_keyturn" / "audit").glob("*.avro"))
    assert duckdb_count(f"{lake_dir}/**/*.parquet") == ROWS
    with pytest.raises(duckdb.Error):  # `**` alone reaches keyturn's own Avro and JSON files (README)
        duckdb_count(f"{lake_dir}/**")
    regions = duckdb.connect().execute(
        f"select distinct region from read_parquet('{lake_dir}/**/*.parquet', hive_partitioning = true) order by 1"
    ).fetchall()
    assert [int(r) for (r,) in regions] == [0, 1, 2]
    assert not [f for f in pq.ParquetDataset(str(lake_dir)).files if "_keyturn" in f]

"""Other readers of an encrypted lake: pyarrow.dataset (and DuckDB when installed) see an ordinary hive lake.

Non-sensitive columns and the partition layout are unchanged from the
source; sensitive columns are opaque binary; keyturn's own files
(`_keyturn/`, temp files) are invisible.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from keyturn.pipelines import encrypt, reencrypt
from tests.pipeline_support import SENSITIVE, customers, make_home, write_parquet_source

pytestmark = pytest.mark.beam

PUBLIC = ["id", "spend", "signup"]


@pytest.fixture
def setup(tmp_path):
    home = make_home(tmp_path / "home")
    table = customers(1500, partitions=5)
    src = write_parquet_source(tmp_path / "src", table, hive_by="region")
    lake = tmp_path / "lake"
    encrypt.run(home=home, source=src, lake=str(lake), columns=SENSITIVE)
    return home, table, src, lake


def partitions(path) -> list[str]:
    files = ds.dataset(str(path), format="parquet", partitioning="hive").files
    return sorted({os.path.relpath(os.path.dirname(f), str(path)) for f in files})


def hive(path) -> pa.Table:
    return ds.dataset(str(path), format="parquet", partitioning="hive").to_table().sort_by("id")


def test_pyarrow_dataset_sees_public_columns_and_layout_unchanged(setup):
    home, table, src, lake = setup
    source, encrypted = hive(src), hive(lake)
    assert encrypted.num_rows == source.num_rows == 1500
    for name in PUBLIC + ["region"]:
        assert encrypted.column(name).to_pylist() == source.column(name).to_pylist(), name
    assert encrypted.schema.field("region").type == source.schema.field("region").type
    for name in SENSITIVE:
        assert encrypted.schema.field(name).type == pa.binary()
        cells = [c for c in encrypted.column(name).to_pylist() if c is not None]
        plain = [v.encode() for v in source.column(name).to_pylist() if v is not None]
        assert not any(p in c for c, p in zip(cells, plain))  # no plaintext inside its ciphertext
    # nulls stay null (documented): null-ness of a sensitive cell is visible, its value is not
    assert encrypted.column("ssn").null_count == source.column("ssn").null_count
    # the same partitions, as directories
    assert partitions(lake) == partitions(src) == [f"region={r}" for r in range(5)]


def test_filters_on_partitions_and_public_columns_work(setup):
    home, table, src, lake = setup
    dataset = ds.dataset(str(lake), format="parquet", partitioning="hive")
    got = dataset.to_table(filter=(ds.field("region") == 3) & (ds.field("spend") > 500), columns=["id"]).column("id").to_pylist()
    want = [r["id"] for r in table.to_pylist() if r["region"] == 3 and r["spend"] > 500]
    assert sorted(got) == sorted(want)


def test_readers_still_see_the_same_after_a_rotation_and_rewrap(setup):
    from keyturn.pipelines import status

    home, table, src, lake = setup
    before = hive(lake)
    registry = home.registry()
    registry.rotate(home.provision_kek(registry.active().version + 1), actor="tests", reason="rotate")
    report = reencrypt.run(str(lake), home=home.path, mode="rewrap")  # the directory only
    assert report["directory_rewrap"]["deks_moved"] > 0 and report["files_rewritten"] == 0
    after = hive(lake)
    # every column, keyturn's own included, is exactly as it was: a rewrap writes no lake byte
    assert after.equals(before)
    assert set(after.column("_keyturn_version").to_pylist()) == {1}  # the birth version stays in the rows
    assert status.run(home=home, lake=str(lake))["percent_current"] == 100.0  # ... the directory says version 2
    assert not [f for f in ds.dataset(str(lake), format="parquet").files if "_keyturn" in f or ".keyturn-tmp" in f]


def test_readers_still_see_the_same_after_a_rotation_and_reencrypt(setup):
    home, table, src, lake = setup
    before = hive(lake)
    registry = home.registry()
    registry.rotate(home.provision_kek(registry.active().version + 1), actor="tests", reason="rotate")
    report = reencrypt.run(str(lake), home=home.path, mode="reencrypt")  # fresh DEKs: the payload changes
    assert report["files_rewritten"] > 0 and report["complete"]
    after = hive(lake)
    for name in PUBLIC + ["region"]:
        assert after.column(name).to_pylist() == before.column(name).to_pylist(), name
    assert after.column("ssn").null_count == before.column("ssn").null_count
    assert after.column("ssn").to_pylist() != before.column("ssn").to_pylist()
    assert set(after.column("_keyturn_version").to_pylist()) == {2}
    assert partitions(lake) == partitions(src)
    assert not [f for f in ds.dataset(str(lake), format="parquet").files if "_keyturn" in f or ".keyturn-tmp" in f]


def test_duckdb_reads_the_lake(setup):
    duckdb = pytest.importorskip("duckdb")
    home, table, src, lake = setup
    con = duckdb.connect()
    rows = con.execute(
        f"select region, count(*), sum(spend) from read_parquet('{lake}/*/*.parquet', hive_partitioning = true) "
        "group by region order by region"
    ).fetchall()
    expected = {}
    for r in table.to_pylist():
        n, s = expected.get(r["region"], (0, 0.0))
        expected[r["region"]] = (n + 1, s + r["spend"])
    assert [(int(reg), n) for reg, n, _ in rows] == [(k, v[0]) for k, v in sorted(expected.items())]
    assert all(abs(s - expected[int(reg)][1]) < 1e-6 for reg, _, s in rows)

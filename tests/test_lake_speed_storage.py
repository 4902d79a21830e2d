"""Issue 12, storage: ciphertext columns are written with DELTA_BYTE_ARRAY (no dictionary), wherever keyturn writes lake files.

Neighbouring cells share their version byte and dek_id; the encoding stores
that prefix once per run of cells. Other columns keep dictionary encoding.
pyarrow and DuckDB read the files (see also tests/test_other_readers.py).
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keyturn.lake.atomic import CIPHERTEXT_ENCODING, ciphertext_columns, encoding_options
from keyturn.lake.rewrite import rewrite_file
from lake_support import DATASET, SENSITIVE, build_lake, make_home, plain_equal, rotate, source_table


@pytest.fixture
def home(tmp_path):
    return make_home(str(tmp_path / "home"))


@pytest.fixture
def source():
    return source_table(600, 2)


def _encodings(path: str) -> dict[str, set[str]]:
    md = pq.ParquetFile(path).metadata
    out: dict[str, set[str]] = {}
    for g in range(md.num_row_groups):
        for i in range(md.num_columns):
            col = md.row_group(g).column(i)
            out.setdefault(col.path_in_schema, set()).update(col.encodings)
    return out


def _check_layout(path: str) -> None:
    enc = _encodings(path)
    for name in SENSITIVE:
        assert CIPHERTEXT_ENCODING in enc[name], (name, enc[name])
        assert not enc[name] & {"RLE_DICTIONARY", "PLAIN_DICTIONARY"}, (name, enc[name])
    assert "RLE_DICTIONARY" in enc["_keyturn_dek"]  # one envelope per DEK: a dictionary of a few values
    assert CIPHERTEXT_ENCODING not in enc["id"]
    md = pq.ParquetFile(path).metadata
    for g in range(md.num_row_groups):
        stats = {md.row_group(g).column(i).path_in_schema: md.row_group(g).column(i).is_stats_set for i in range(md.num_columns)}
        assert not any(stats[name] for name in SENSITIVE), stats  # min/max of ciphertext prune nothing
        assert stats["_keyturn_version"] and stats["id"], stats  # status counts versions from these


def test_lake_files_and_rewrites_encode_ciphertext_columns_by_shared_prefix(home, source, tmp_path):
    lake = build_lake(home, str(tmp_path / "lake"), source, files_per_partition=1, row_group_size=100)
    for f in lake.data_files():
        _check_layout(f.path)
    rotate(home)
    registry = home.registry()
    with home.kms() as kms:
        for f in lake.data_files():
            out = rewrite_file(lake, f, kms=kms, policy=home.policy(), dataset=DATASET, directory=registry,
                               contract=registry.get_contract(DATASET))
            assert out.result == "rewritten"
    for f in lake.data_files():
        _check_layout(f.path)
    assert plain_equal(home, lake.root, source)
    duckdb = pytest.importorskip("duckdb")
    count = duckdb.connect().execute(
        f"select count(*), count(email) from read_parquet('{lake.root}/**/*.parquet', hive_partitioning = true)"
    ).fetchone()
    assert count == (600, 600)


def test_the_encoding_stores_fewer_bytes_than_dictionary_encoding(home, source, tmp_path):
    lake = build_lake(home, str(tmp_path / "lake"), source, files_per_partition=1, row_group_size=1000)
    table = pq.read_table(lake.data_files()[0].path)
    plain, delta = io.BytesIO(), io.BytesIO()
    pq.write_table(table, plain, compression="snappy")
    pq.write_table(table, delta, compression="snappy", **encoding_options(table.schema))
    assert pq.read_table(io.BytesIO(delta.getvalue())).equals(table)
    cells = sum(table.column(n).length() - table.column(n).null_count for n in SENSITIVE)
    saved = len(plain.getvalue()) - len(delta.getvalue())
    assert saved > 3 * cells  # the version byte and dek_id (and what neighbouring nonces share), stored once per run of cells


def test_only_keyturn_ciphertext_columns_change_encoding():
    meta = {b"keyturn.format": b"1"}
    schema = pa.schema([
        pa.field("c", pa.binary(), metadata=meta),
        pa.field("s", pa.string(), metadata=meta),  # not binary: not cells
        pa.field("b", pa.binary()),
        pa.field("l", pa.list_(pa.int64())),
    ])
    assert ciphertext_columns(schema) == ["c"]
    options = encoding_options(schema)
    assert options["column_encoding"] == {"c": CIPHERTEXT_ENCODING}
    assert "c" not in options["use_dictionary"] and {"s", "b"} <= set(options["use_dictionary"])
    assert any(p.startswith("l.") for p in options["use_dictionary"])  # nested leaves by their Parquet path
    assert options["write_statistics"] == options["use_dictionary"]  # every column but the ciphertext
    sink = io.BytesIO()
    pq.write_table(schema.empty_table(), sink, **options)  # pyarrow takes the nested leaf paths
    assert encoding_options(pa.schema([pa.field("x", pa.int64())])) == {}


def test_a_ciphertext_name_that_is_also_a_struct_leaf_path_keeps_the_defaults_and_both_columns_read_back(tmp_path):
    meta = {b"keyturn.format": b"1"}
    schema = pa.schema([
        pa.field("a.b", pa.binary(), metadata=meta),  # a dotted name: Parquet's path of this column is "a.b"
        pa.field("a", pa.struct([pa.field("b", pa.int64())])),  # and so is the path of this struct's leaf
        pa.field("c", pa.binary(), metadata=meta),
    ])
    options = encoding_options(schema)
    assert options["column_encoding"] == {"c": CIPHERTEXT_ENCODING}  # nothing is named "a.b": it would mean both
    assert "a.b" in options["use_dictionary"] and "a.b" in options["write_statistics"]
    table = pa.table({"a.b": pa.array([b"x" * 45, None], pa.binary()), "a": pa.array([{"b": 1}, {"b": 2}]),
                      "c": pa.array([b"y" * 45, b"z" * 45], pa.binary())}).cast(schema)
    path = str(tmp_path / "t.parquet")
    pq.write_table(table, path, **options)  # with the old options the int64 leaf got DELTA_BYTE_ARRAY: refused
    assert pq.read_table(path).equals(table)

"""Arrow codec: round trips of every supported type, Parquet, rewrap, re-encrypt, caller mistakes."""

from __future__ import annotations

import datetime as dt
import decimal
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keyturn.arrow_codec import (
    DEK_COLUMN,
    VERSION_COLUMN,
    decrypt_batch,
    encrypt_batch,
    encrypted_columns,
    reencrypt_batch,
    rewrap_batch,
)
from keyturn.arrow_values import arrow_type_descriptor, decode_plain_field
from keyturn.context import encode_context
from keyturn.errors import DecryptionError
from keyturn.format import cell_aad, parse_cell_header, parse_envelope
from keyturn.policy import ReadStatus
from keyturn.reader import DekReader
from keyturn.scope import ScopeLimits

D = decimal.Decimal
UTC = dt.timezone.utc


def _f16(values):
    return pa.array(
        np.array([0 if v is None else v for v in values], dtype=np.float16),
        type=pa.float16(),
        mask=np.array([v is None for v in values]),
    )


def _nan_values():
    return [1.5, None, float("nan"), -0.0, 0.0, float("inf"), float("-inf"), None]


# name -> array (every one has at least one null)
TYPED_ARRAYS = {
    "string": lambda: pa.array(["a", None, "", "héllo wörld", "x" * 300], pa.string()),
    "large_string": lambda: pa.array(["a", None, "", "ü"], pa.large_string()),
    "binary": lambda: pa.array([b"\x00\xff", None, b"", b"abc"], pa.binary()),
    "large_binary": lambda: pa.array([b"\x00", None, b""], pa.large_binary()),
    "fixed_size_binary": lambda: pa.array([b"abcd", None, b"\x00\x00\x00\x00"], pa.binary(4)),
    "bool": lambda: pa.array([True, None, False, True], pa.bool_()),
    "int8": lambda: pa.array([-128, None, 0, 127], pa.int8()),
    "int16": lambda: pa.array([-32768, None, 1, 32767], pa.int16()),
    "int32": lambda: pa.array([-(2**31), None, 7, 2**31 - 1], pa.int32()),
    "int64": lambda: pa.array([-(2**63), None, 42, 2**63 - 1], pa.int64()),
    "uint8": lambda: pa.array([0, None, 255], pa.uint8()),
    "uint16": lambda: pa.array([0, None, 65535], pa.uint16()),
    "uint32": lambda: pa.array([0, None, 2**32 - 1], pa.uint32()),
    "uint64": lambda: pa.array([0, None, 2**64 - 1], pa.uint64()),
    "float16": lambda: _f16([1.5, None, float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 65504.0]),
    "float32": lambda: pa.array(_nan_values(), pa.float32()),
    "float64": lambda: pa.array(_nan_values() + [5e-324, 1.7976931348623157e308], pa.float64()),
    "decimal128": lambda: pa.array([D("12345.67"), None, D("-0.01"), D("99999999999999999999999999999999.99")], pa.decimal128(34, 2)),
    "decimal256": lambda: pa.array([D("1.000000001"), None, D("-" + "9" * 66 + ".000000001")], pa.decimal256(76, 9)),
    "date32": lambda: pa.array([dt.date(2024, 2, 29), None, dt.date(1, 1, 1), dt.date(9999, 12, 31)], pa.date32()),
    "date64": lambda: pa.array([dt.date(2024, 2, 29), None, dt.date(1970, 1, 1)], pa.date64()),
    "time32_s": lambda: pa.array([0, None, 86399], pa.time32("s")),
    "time32_ms": lambda: pa.array([0, None, 86399999], pa.time32("ms")),
    "time64_us": lambda: pa.array([0, None, 86399999999], pa.time64("us")),
    "time64_ns": lambda: pa.array([0, None, 86399999999999], pa.time64("ns")),
    **{
        f"timestamp_{unit}{'_' + tz.replace('/', '_') if tz else ''}": (
            lambda unit=unit, tz=tz: pa.array([0, None, -1, 1_700_000_000_123, 2**62], pa.timestamp(unit, tz=tz))
        )
        for unit in ("s", "ms", "us", "ns")
        for tz in (None, "UTC", "America/New_York")
    },
    **{
        f"duration_{unit}": (lambda unit=unit: pa.array([0, None, -5, 2**62], pa.duration(unit)))
        for unit in ("s", "ms", "us", "ns")
    },
    "list": lambda: pa.array([[1, 2], None, [], [None, 3]], pa.list_(pa.int64())),
    "large_list": lambda: pa.array([["a"], None, [], ["b", None]], pa.large_list(pa.string())),
    "fixed_size_list": lambda: pa.array([[1.0, 2.0], None, [None, -0.0]], pa.list_(pa.float32(), 2)),
    "struct": lambda: pa.array(
        [{"x": 1, "y": "a"}, None, {"x": None, "y": None}, {"x": -1, "y": ""}],
        pa.struct([("x", pa.int32()), ("y", pa.string())]),
    ),
    "map": lambda: pa.array([[("k", 1), ("j", None)], None, [], [("k", 2)]], pa.map_(pa.string(), pa.int64())),
    "dictionary_string": lambda: pa.array(["red", None, "blue", "red", "red"], pa.string()).dictionary_encode(),
    "dictionary_int8_index": lambda: pa.array(["x", None, "y", "x"]).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
    "dictionary_int64_values": lambda: pa.array([10, None, 10, 20], pa.int64()).dictionary_encode(),
    "list_of_struct": lambda: pa.array(
        [[{"a": 1, "b": [b"x"]}], None, [], [None, {"a": None, "b": None}, {"a": 3, "b": []}]],
        pa.list_(pa.struct([("a", pa.int16()), ("b", pa.list_(pa.binary()))])),
    ),
    "struct_of_timestamp_decimal": lambda: pa.array(
        [{"t": dt.datetime(2024, 1, 1, tzinfo=UTC), "d": D("1.50")}, None],
        pa.struct([("t", pa.timestamp("us", tz="UTC")), ("d", pa.decimal128(10, 2))]),
    ),
}


# The type descriptor bound into every cell's AAD is part of wire format v1: pinned here, so a
# pyarrow upgrade that renders a type differently fails the build instead of making old cells unreadable.
PINNED_DESCRIPTORS = {
    "binary": "arrow:binary",
    "bool": "arrow:bool",
    "date32": "arrow:date32[day]",
    "date64": "arrow:date64[ms]",
    "decimal128": "arrow:decimal128(34, 2)",
    "decimal256": "arrow:decimal256(76, 9)",
    "dictionary_int64_values": "arrow:dictionary<values=int64, indices=int32, ordered=0>",
    "dictionary_int8_index": "arrow:dictionary<values=string, indices=int8, ordered=0>",
    "dictionary_string": "arrow:dictionary<values=string, indices=int32, ordered=0>",
    "duration_ms": "arrow:duration[ms]",
    "duration_ns": "arrow:duration[ns]",
    "duration_s": "arrow:duration[s]",
    "duration_us": "arrow:duration[us]",
    "fixed_size_binary": "arrow:fixed_size_binary[4]",
    "fixed_size_list": "arrow:fixed_size_list<item: float>[2]",
    "float16": "arrow:halffloat",
    "float32": "arrow:float",
    "float64": "arrow:double",
    "int16": "arrow:int16",
    "int32": "arrow:int32",
    "int64": "arrow:int64",
    "int8": "arrow:int8",
    "large_binary": "arrow:large_binary",
    "large_list": "arrow:large_list<item: string>",
    "large_string": "arrow:large_string",
    "list": "arrow:list<item: int64>",
    "list_of_struct": "arrow:list<item: struct<a: int16, b: list<item: binary>>>",
    "map": "arrow:map<string, int64>",
    "string": "arrow:string",
    "struct": "arrow:struct<x: int32, y: string>",
    "struct_of_timestamp_decimal": "arrow:struct<t: timestamp[us, tz=UTC], d: decimal128(10, 2)>",
    "time32_ms": "arrow:time32[ms]",
    "time32_s": "arrow:time32[s]",
    "time64_ns": "arrow:time64[ns]",
    "time64_us": "arrow:time64[us]",
    "timestamp_ms": "arrow:timestamp[ms]",
    "timestamp_ms_America_New_York": "arrow:timestamp[ms, tz=America/New_York]",
    "timestamp_ms_UTC": "arrow:timestamp[ms, tz=UTC]",
    "timestamp_ns": "arrow:timestamp[ns]",
    "timestamp_ns_America_New_York": "arrow:timestamp[ns, tz=America/New_York]",
    "timestamp_ns_UTC": "arrow:timestamp[ns, tz=UTC]",
    "timestamp_s": "arrow:timestamp[s]",
    "timestamp_s_America_New_York": "arrow:timestamp[s, tz=America/New_York]",
    "timestamp_s_UTC": "arrow:timestamp[s, tz=UTC]",
    "timestamp_us": "arrow:timestamp[us]",
    "timestamp_us_America_New_York": "arrow:timestamp[us, tz=America/New_York]",
    "timestamp_us_UTC": "arrow:timestamp[us, tz=UTC]",
    "uint16": "arrow:uint16",
    "uint32": "arrow:uint32",
    "uint64": "arrow:uint64",
    "uint8": "arrow:uint8",
}


def assert_arrays_identical(got: pa.Array, want: pa.Array) -> None:
    """Same type, same nulls, same values, floats compared bit for bit (NaN, -0.0)."""
    if isinstance(got, pa.ChunkedArray):
        got = got.combine_chunks()
    if isinstance(want, pa.ChunkedArray):
        want = want.combine_chunks()
    assert got.type == want.type, (got.type, want.type)
    assert len(got) == len(want)
    assert got.is_null().to_pylist() == want.is_null().to_pylist()
    if pa.types.is_dictionary(want.type):
        assert_arrays_identical(got.dictionary_decode(), want.dictionary_decode())
        return
    if pa.types.is_floating(want.type):
        width = {16: np.uint16, 32: np.uint32, 64: np.uint64}[want.type.bit_width]
        valid = want.is_valid()
        g = got.filter(valid).to_numpy(zero_copy_only=False).view(width)
        w = want.filter(valid).to_numpy(zero_copy_only=False).view(width)
        assert g.tolist() == w.tolist()
        return
    assert got.equals(want), (got, want)


def batch_with(arr: pa.Array, name: str = "v") -> pa.RecordBatch:
    ids = pa.array(range(len(arr)), pa.int64())
    return pa.record_batch([ids, arr, pa.array([f"row{i}" for i in range(len(arr))])], names=["id", name, "note"])


def roundtrip(batch, columns, kms, make_scope, policy, location, **kwargs):
    with make_scope() as scope:
        enc = encrypt_batch(batch, columns, scope, **kwargs)
    with DekReader(kms) as reader:
        result = decrypt_batch(enc, reader, policy, location)
    return enc, result


def serialize_column(batch: pa.RecordBatch, name: str) -> bytes:
    """IPC bytes of one column with its field, for byte-identity checks."""
    one = pa.record_batch([batch.column(name)], schema=pa.schema([batch.schema.field(name)]))
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, one.schema) as writer:
        writer.write_batch(one)
    return sink.getvalue()


def one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


def parquet_bytes(obj) -> bytes:
    table = obj if isinstance(obj, pa.Table) else pa.Table.from_batches([obj])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def read_parquet(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


# ----------------------------------------------------------------------------- type round trips


@pytest.mark.parametrize("type_name", sorted(TYPED_ARRAYS))
def test_round_trip_every_type_with_nulls(type_name, kms, make_scope, policy, location):
    arr = TYPED_ARRAYS[type_name]()
    assert arr.null_count >= 1
    batch = batch_with(arr)
    enc, result = roundtrip(batch, ["v"], kms, make_scope, policy, location)
    # encrypted column: binary, nulls kept, plain field recorded
    cells = enc.column("v")
    assert cells.type == pa.binary()
    assert cells.is_null().to_pylist() == arr.is_null().to_pylist()
    assert decode_plain_field(enc.schema.field("v").metadata[b"keyturn.plain_field"]) == batch.schema.field("v")
    assert result.status == [ReadStatus.CURRENT] * len(arr)
    assert result.plain.schema == batch.schema
    assert_arrays_identical(result.plain.column("v"), arr)
    assert result.plain.equals(batch) or pa.types.is_floating(arr.type) or pa.types.is_dictionary(arr.type)


def test_every_type_has_a_pinned_descriptor():
    assert sorted(PINNED_DESCRIPTORS) == sorted(TYPED_ARRAYS)


@pytest.mark.parametrize("type_name", sorted(TYPED_ARRAYS))
def test_type_descriptor_is_pinned_and_bound(type_name, kms, make_scope, location):
    arr = TYPED_ARRAYS[type_name]()
    descriptor = arrow_type_descriptor(arr.type)
    assert descriptor == PINNED_DESCRIPTORS[type_name]
    with make_scope() as scope:
        enc = encrypt_batch(batch_with(arr), ["v"], scope)
    cell = next(c for c in enc.column("v").to_pylist() if c is not None)
    with DekReader(kms) as reader:
        dek = reader.open(enc.column(DEK_COLUMN).dictionary[0].as_py(), location)
        for value_type, opens in [(descriptor, True), ("arrow:binary" if descriptor != "arrow:binary" else "arrow:string", False)]:
            aad = encode_context(
                cell_aad(
                    dataset=location.dataset,
                    partition=location.partition,
                    field="v",
                    dek_id=dek.envelope.dek_id,
                    value_type=value_type,
                )
            )
            if opens:
                dek.open_cell(cell, aad)
            else:
                with pytest.raises(DecryptionError):
                    dek.open_cell(cell, aad)


SLICE_TYPES = [
    "string", "int32", "float64", "bool", "decimal128", "timestamp_ns_UTC",
    "list", "struct", "map", "dictionary_string", "list_of_struct", "fixed_size_binary",
]


@pytest.mark.parametrize("type_name", SLICE_TYPES)
def test_round_trip_sliced_arrays(type_name, kms, make_scope, policy, location):
    full = pa.concat_arrays([TYPED_ARRAYS[type_name]()] * 3)
    arr = full.slice(3, len(full) - 5)
    assert arr.offset == 3
    batch = batch_with(arr)
    sliced_batch = pa.record_batch(
        [pa.array(range(len(full)), pa.int64()), full, pa.array(["n"] * len(full))], names=["id", "v", "note"]
    ).slice(3, len(full) - 5)
    for b in (batch, sliced_batch):
        enc, result = roundtrip(b, ["v"], kms, make_scope, policy, location)
        assert result.counts()["current"] == len(arr)
        assert_arrays_identical(result.plain.column("v"), arr)
        assert result.plain.column("id").equals(b.column("id"))


def test_round_trip_all_null_and_chunk_of_one(kms, make_scope, policy, location):
    batch = pa.record_batch(
        {"a": pa.nulls(3, pa.int64()), "b": pa.nulls(3, pa.string()), "c": pa.nulls(3, pa.list_(pa.int8()))}
    )
    enc, result = roundtrip(batch, ["a", "b", "c"], kms, make_scope, policy, location)
    assert enc.column("a").null_count == 3
    assert result.plain.equals(batch)


@pytest.mark.parametrize("type_name", sorted(TYPED_ARRAYS))
def test_empty_batch_round_trips_with_zero_kms_calls(type_name, kms, make_scope, policy, location):
    batch = batch_with(TYPED_ARRAYS[type_name]()).slice(0, 0)
    enc, result = roundtrip(batch, ["v"], kms, make_scope, policy, location)
    assert kms.calls.total == 0
    assert enc.num_rows == 0 and enc.schema.names == ["id", "v", "note", VERSION_COLUMN, DEK_COLUMN]
    assert result.status == []
    assert result.plain.schema == batch.schema and result.plain.num_rows == 0


def test_several_sensitive_columns_others_byte_identical(kms, make_scope, policy, location):
    meta = {b"owner": b"team-a"}
    batch = pa.record_batch(
        [
            pa.array([1, 2, None, 4], pa.int64()),
            pa.array(["a", None, "c", "d"]),
            pa.array([1.5, 2.5, None, -0.0]),
            pa.array([b"k1", b"k2", b"k3", None]),
            pa.array([{"x": 1}, None, {"x": 3}, {"x": 4}], pa.struct([("x", pa.int8())])),
        ],
        schema=pa.schema(
            [
                pa.field("id", pa.int64(), metadata={b"doc": b"row id"}),
                pa.field("name", pa.string(), nullable=True, metadata={b"pii": b"yes"}),
                pa.field("score", pa.float64()),
                pa.field("key", pa.binary(), nullable=False),
                pa.field("info", pa.struct([("x", pa.int8())])),
            ],
            metadata={b"lake": b"sales", b"pandas": b"{}"},
        ),
    )
    enc, result = roundtrip(batch, ["name", "key", "info"], kms, make_scope, policy, location)
    assert kms.calls.generate == 1 and kms.calls.decrypt == 1
    assert encrypted_columns(enc.schema) == ["name", "key", "info"]
    for untouched in ("id", "score"):
        assert enc.schema.field(untouched) == batch.schema.field(untouched)
        assert enc.schema.field(untouched).metadata == batch.schema.field(untouched).metadata
        assert serialize_column(enc, untouched) == serialize_column(batch, untouched)
        assert serialize_column(result.plain, untouched) == serialize_column(batch, untouched)
    assert enc.schema.metadata == batch.schema.metadata
    assert result.plain.schema == batch.schema
    assert result.plain.schema.metadata == batch.schema.metadata
    for name in ("name", "key", "info"):
        assert result.plain.schema.field(name).metadata == batch.schema.field(name).metadata
        assert result.plain.schema.field(name).nullable == batch.schema.field(name).nullable
    assert result.plain.equals(batch)
    # the row metadata
    assert enc.column(VERSION_COLUMN).to_pylist() == [1] * 4
    dek = enc.column(DEK_COLUMN)
    assert pa.types.is_dictionary(dek.type) and len(dek.dictionary) == 1
    env = parse_envelope(dek.dictionary[0].as_py())
    assert env.key_version == 1 and env.kek_id == "kek-1"
    for name in ("name", "key", "info"):
        for cell in enc.column(name).to_pylist():
            if cell is not None:
                assert parse_cell_header(cell).dek_id == env.dek_id


def test_decrypt_only_some_columns(kms, make_scope, policy, location):
    batch = pa.record_batch({"a": ["x", "y"], "b": [1, 2], "c": [True, None]})
    with make_scope() as scope:
        enc = encrypt_batch(batch, ["a", "b"], scope)
    with DekReader(kms) as reader:
        result = decrypt_batch(enc, reader, policy, location, columns=["b"])
    assert result.plain.schema.names == ["b", "c"]
    assert result.plain.column("b").to_pylist() == [1, 2]
    with DekReader(kms) as reader:
        with pytest.raises(ValueError, match="not encrypted columns"):
            decrypt_batch(enc, reader, policy, location, columns=["c"])
        with pytest.raises(ValueError, match="nope"):
            decrypt_batch(enc, reader, policy, location, columns=["nope"])


def test_one_unwrap_per_distinct_dek(kms, make_scope, policy, location):
    batch = pa.record_batch({"a": [str(i) for i in range(10)]})
    with make_scope(limits=ScopeLimits(max_cells=3)) as scope:
        enc = encrypt_batch(batch, ["a"], scope)
    assert kms.calls.generate == 4 and len(enc.column(DEK_COLUMN).dictionary) == 4
    with DekReader(kms) as reader:
        result = decrypt_batch(enc, reader, policy, location)
        again = decrypt_batch(enc, reader, policy, location)  # same reader: cached
    assert kms.calls.decrypt == 4 and reader.stats.unwraps == 4
    assert result.plain.equals(batch) and again.plain.equals(batch)


def test_bind_columns_round_trip(kms, make_scope, policy, location):
    batch = pa.record_batch({"id": pa.array([1, 2, None], pa.int64()), "ssn": ["a", "b", "c"]})
    enc, result = roundtrip(batch, ["ssn"], kms, make_scope, policy, location, bind_columns=["id"])
    assert enc.schema.field("ssn").metadata[b"keyturn.bind"] == b'["id"]'
    assert result.plain.equals(batch)


# ----------------------------------------------------------------------------- Parquet


def _two_files(kms, make_scope, location):
    a = pa.record_batch({"id": pa.array([1, 2, 3], pa.int64()), "ssn": ["a1", None, "a3"], "amt": [1.0, 2.0, None]})
    b = pa.record_batch({"id": pa.array([4, 5], pa.int64()), "ssn": ["b4", "b5"], "amt": [4.0, None]})
    with make_scope() as s1:
        ea = encrypt_batch(a, ["ssn", "amt"], s1)
    with make_scope() as s2:  # a second bundle: another DEK
        eb = encrypt_batch(b, ["ssn", "amt"], s2)
    return a, b, parquet_bytes(ea), parquet_bytes(eb)


def test_parquet_round_trip_keeps_types_and_metadata(kms, make_scope, policy, location):
    names = ("string", "decimal128", "timestamp_us_UTC", "list_of_struct", "map", "float32", "dictionary_string")
    arrays = {name: TYPED_ARRAYS[name]() for name in names}
    n = min(len(a) for a in arrays.values())
    batch = pa.RecordBatch.from_pydict({k: v.slice(0, n) for k, v in arrays.items()}).replace_schema_metadata({b"k": b"v"})
    with make_scope() as scope:
        enc = encrypt_batch(batch, list(arrays), scope)
    back = one_batch(read_parquet(parquet_bytes(enc)))
    assert encrypted_columns(back.schema) == list(arrays)
    with DekReader(kms) as reader:
        result = decrypt_batch(back, reader, policy, location)
    assert result.counts()["current"] == n
    assert result.plain.schema.metadata[b"k"] == b"v"
    for name, arr in arrays.items():
        assert_arrays_identical(result.plain.column(name), arr.slice(0, n))


def test_parquet_two_files_concatenated(kms, make_scope, policy, location):
    a, b, fa, fb = _two_files(kms, make_scope, location)
    merged = one_batch(pa.concat_tables([read_parquet(fa), read_parquet(fb)]))
    with DekReader(kms) as reader:
        result = decrypt_batch(merged, reader, policy, location)
    assert result.counts()["current"] == 5
    assert result.plain.to_pylist() == a.to_pylist() + b.to_pylist()
    assert kms.calls.decrypt == 2


def test_parquet_rows_moved_between_files(kms, make_scope, policy, location):
    a, b, fa, fb = _two_files(kms, make_scope, location)
    ta, tb = read_parquet(fa), read_parquet(fb)
    # row 2 of file A and row 0 of file B go to a new file, in swapped order
    moved = pa.concat_tables([tb.slice(0, 1), ta.slice(2, 1)])
    back = one_batch(read_parquet(parquet_bytes(moved)))
    with DekReader(kms) as reader:
        result = decrypt_batch(back, reader, policy, location)
    assert result.counts()["current"] == 2
    assert result.plain.to_pylist() == [b.to_pylist()[0], a.to_pylist()[2]]
    # and each single row decrypts on its own
    for i in range(back.num_rows):
        with DekReader(kms) as reader:
            single = decrypt_batch(back.slice(i, 1), reader, policy, location)
        assert single.plain.to_pylist() == result.plain.slice(i, 1).to_pylist()


def test_parquet_compaction(kms, make_scope, policy, location):
    a, b, fa, fb = _two_files(kms, make_scope, location)
    compacted = parquet_bytes(pa.concat_tables([read_parquet(fb), read_parquet(fa)]).combine_chunks())
    meta = pq.ParquetFile(io.BytesIO(compacted)).metadata
    assert meta.num_rows == 5
    table = read_parquet(compacted)
    with DekReader(kms) as reader:
        results = [decrypt_batch(batch, reader, policy, location) for batch in table.to_batches()]
    rows = [r for res in results for r in res.plain.to_pylist()]
    assert rows == b.to_pylist() + a.to_pylist()
    assert all(s is ReadStatus.CURRENT for res in results for s in res.status)


# ----------------------------------------------------------------------------- rewrap and re-encrypt


@pytest.fixture
def multi_dek_batch(kms, make_scope):
    """A batch of 12 rows under key version 1, sealed by 4 DEKs (cap of 6 cells, 2 sensitive columns)."""
    plain = pa.record_batch(
        {
            "id": pa.array(range(12), pa.int64()),
            "ssn": [f"ssn-{i}" for i in range(12)],
            "amount": pa.array([i * 1.5 for i in range(12)]),
            "region": ["eu", "us"] * 6,
        }
    )
    with make_scope(1, limits=ScopeLimits(max_cells=6)) as scope:
        enc = encrypt_batch(plain, ["ssn", "amount"], scope)
    assert len(enc.column(DEK_COLUMN).dictionary) == 4 and kms.calls.generate == 4
    return plain, enc


def test_rewrap_keeps_every_cell_and_calls_kms_once_per_dek(kms, make_policy, location, multi_dek_batch):
    plain, enc = multi_dek_batch
    policy_v2 = make_policy(active=2, decrypt_only=[1])
    before = kms.calls.rewrap
    result = rewrap_batch(enc, kms, policy_v2, location)
    assert kms.calls.rewrap - before == 4 == result.deks_rewrapped
    assert len(result.kms_request_ids) == 4
    assert result.counts()["stale"] == 12
    out = result.batch
    for name in ("ssn", "amount"):
        assert out.column(name).to_pylist() == enc.column(name).to_pylist()
        assert serialize_column(out, name) == serialize_column(enc, name)
    for name in ("id", "region"):
        assert serialize_column(out, name) == serialize_column(enc, name)
    assert out.schema == enc.schema
    assert out.column(VERSION_COLUMN).to_pylist() == [2] * 12
    old = [parse_envelope(e) for e in enc.column(DEK_COLUMN).to_pylist()]
    new = [parse_envelope(e) for e in out.column(DEK_COLUMN).to_pylist()]
    for o, n in zip(old, new):
        assert (n.dek_id, n.commitment) == (o.dek_id, o.commitment)
        assert (n.key_version, n.kek_id) == (2, "kek-2") and n.wrapped_dek != o.wrapped_dek
    with DekReader(kms) as reader:
        read_new = decrypt_batch(out, reader, policy_v2, location)
    with DekReader(kms) as reader:
        read_old = decrypt_batch(enc, reader, policy_v2, location)
    assert read_new.status == [ReadStatus.CURRENT] * 12
    assert read_old.status == [ReadStatus.STALE] * 12
    assert read_new.plain.equals(plain) and read_old.plain.equals(plain)
    # the old KEK is no longer needed for the rewrapped rows
    policy_v3 = make_policy(active=2, retired=[1])
    with DekReader(kms) as reader:
        assert decrypt_batch(out, reader, policy_v3, location).plain.equals(plain)


def test_rewrap_of_current_rows_makes_no_kms_call(kms, policy, location, multi_dek_batch):
    _, enc = multi_dek_batch
    before = kms.calls.total
    result = rewrap_batch(enc, kms, policy, location)
    assert kms.calls.total == before
    assert result.deks_rewrapped == 0 and result.batch is enc
    assert result.counts()["current"] == 12


def test_rewrap_twice_is_a_no_op(kms, make_policy, location, multi_dek_batch):
    _, enc = multi_dek_batch
    policy_v2 = make_policy(active=2, decrypt_only=[1])
    once = rewrap_batch(enc, kms, policy_v2, location).batch
    before = kms.calls.total
    twice = rewrap_batch(once, kms, policy_v2, location)
    assert kms.calls.total == before and twice.batch.equals(once)


def test_reencrypt_changes_payload_and_reads_back_identical(kms, make_policy, make_scope, location, multi_dek_batch):
    plain, enc = multi_dek_batch
    policy_v2 = make_policy(active=2, decrypt_only=[1])
    with DekReader(kms) as reader, make_scope(2) as scope:
        result = reencrypt_batch(enc, reader, scope, policy_v2, location)
    out = result.batch
    assert result.counts()["stale"] == 12
    assert out.schema == enc.schema
    for name in ("ssn", "amount"):
        for old, new in zip(enc.column(name).to_pylist(), out.column(name).to_pylist()):
            assert old != new and old[29:] != new[29:]
    for name in ("id", "region"):
        assert serialize_column(out, name) == serialize_column(enc, name)
    assert out.column(VERSION_COLUMN).to_pylist() == [2] * 12
    assert len(out.column(DEK_COLUMN).dictionary) == 1  # one fresh DEK, no cap on this scope
    with DekReader(kms) as reader:
        back = decrypt_batch(out, reader, policy_v2, location)
    assert back.status == [ReadStatus.CURRENT] * 12 and back.plain.equals(plain)


def test_reencrypt_keeps_unreadable_rows_in_place(kms, make_policy, make_scope, location):
    plain = pa.record_batch({"id": pa.array(range(6), pa.int64()), "ssn": [f"s{i}" for i in range(6)]})
    with make_scope(1) as s1:
        v1 = encrypt_batch(plain.slice(0, 3), ["ssn"], s1)
    with make_scope(2) as s2:
        v2 = encrypt_batch(plain.slice(3, 3), ["ssn"], s2)
    mixed = one_batch(pa.Table.from_batches([v2.slice(0, 1), v1, v2.slice(1, 2)]))
    policy = make_policy(active=3, decrypt_only=[2], retired=[1])
    with DekReader(kms) as reader, make_scope(3) as scope:
        result = reencrypt_batch(mixed, reader, scope, policy, location)
    assert [s.value for s in result.status] == ["stale", "retired", "retired", "retired", "stale", "stale"]
    out = result.batch
    assert out.column("id").to_pylist() == [3, 0, 1, 2, 4, 5]
    assert out.column(VERSION_COLUMN).to_pylist() == [3, 1, 1, 1, 3, 3]
    # retired rows are kept byte for byte
    for i in (1, 2, 3):
        assert out.column("ssn")[i].as_py() == mixed.column("ssn")[i].as_py()
        assert out.column(DEK_COLUMN)[i].as_py() == mixed.column(DEK_COLUMN)[i].as_py()
    readable = make_policy(active=3, decrypt_only=[1, 2])
    with DekReader(kms) as reader:
        back = decrypt_batch(out, reader, readable, location)
    assert back.plain.to_pylist() == [plain.to_pylist()[i] for i in (3, 0, 1, 2, 4, 5)]


def test_reencrypt_with_bound_columns(kms, make_policy, make_scope, location):
    plain = pa.record_batch({"id": pa.array([1, 2], pa.int64()), "ssn": ["a", "b"]})
    with make_scope(1) as s1:
        enc = encrypt_batch(plain, ["ssn"], s1, bind_columns=["id"])
    policy = make_policy(active=2, decrypt_only=[1])
    with DekReader(kms) as reader, make_scope(2) as s2:
        out = reencrypt_batch(enc, reader, s2, policy, location).batch
    with DekReader(kms) as reader:
        assert decrypt_batch(out, reader, policy, location).plain.equals(plain)


# ----------------------------------------------------------------------------- caller mistakes


@pytest.fixture
def plain_batch():
    return pa.record_batch({"id": pa.array([1, 2], pa.int64()), "ssn": ["a", "b"], "name": ["x", "y"]})


@pytest.mark.parametrize(
    "columns, bind, needle",
    [
        (["nope"], [], "'nope' is not in the batch"),
        (["ssn", "ssn"], [], "named twice: \\['ssn'\\]"),
        ([], [], "at least one column"),
        (["ssn"], ["ssn"], "bind columns must not be encrypted"),
        (["ssn"], ["missing"], "'missing' is not in the batch"),
        (["ssn", "name"], ["name"], "bind columns must not be encrypted"),
    ],
    ids=["unknown", "duplicate", "none", "bind-sensitive", "bind-unknown", "bind-sensitive-2"],
)
def test_encrypt_caller_mistakes(plain_batch, make_scope, kms, columns, bind, needle):
    with make_scope() as scope:
        with pytest.raises(ValueError, match=needle):
            encrypt_batch(plain_batch, columns, scope, bind_columns=bind)
    assert kms.calls.total == 0


def test_encrypting_an_encrypted_batch_is_refused(plain_batch, make_scope):
    with make_scope() as scope:
        enc = encrypt_batch(plain_batch, ["ssn"], scope)
        with pytest.raises(ValueError, match="reserved column '_keyturn_version'.*encrypted already"):
            encrypt_batch(enc, ["name"], scope)
        stripped = enc.drop_columns([VERSION_COLUMN, DEK_COLUMN])
        with pytest.raises(ValueError, match="already encrypted: \\['ssn'\\]"):
            encrypt_batch(stripped, ["ssn"], scope)


def test_a_batch_with_a_duplicate_column_name_is_refused(make_scope):
    batch = pa.RecordBatch.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["x", "x"])
    with make_scope() as scope:
        with pytest.raises(ValueError, match="'x' appears 2 times"):
            encrypt_batch(batch, ["x"], scope)


@pytest.mark.parametrize(
    "value",
    [pa.table({"a": [1]}), {"a": [1]}, [1, 2], None],
    ids=["table", "dict", "list", "None"],
)
def test_wrong_batch_types(value, make_scope, kms, policy, location):
    with make_scope() as scope:
        with pytest.raises(TypeError, match="RecordBatch"):
            encrypt_batch(value, ["a"], scope)
    with DekReader(kms) as reader:
        with pytest.raises(TypeError, match="RecordBatch"):
            decrypt_batch(value, reader, policy, location)


@pytest.mark.parametrize("columns", ["ssn", b"ssn", [1], [None]], ids=["str", "bytes", "int", "None"])
def test_column_names_must_be_a_list_of_str(plain_batch, make_scope, kms, policy, location, columns):
    with make_scope() as scope:
        with pytest.raises(TypeError, match="column names"):
            encrypt_batch(plain_batch, columns, scope)
        with pytest.raises(TypeError, match="column names"):
            encrypt_batch(plain_batch, ["ssn"], scope, bind_columns=columns)
        enc = encrypt_batch(plain_batch, iter(["ssn"]), scope)  # any iterable of names will do
    assert kms.calls.total == 1
    with DekReader(kms) as reader:
        with pytest.raises(TypeError, match="column names"):
            decrypt_batch(enc, reader, policy, location, columns=columns)


def test_reencrypt_refuses_a_scope_of_another_location(kms, make_scope, policy, location, plain_batch):
    from keyturn.scope import Location

    with make_scope() as scope:
        enc = encrypt_batch(plain_batch, ["ssn"], scope)
    with DekReader(kms) as reader, make_scope(at=Location("sales", "elsewhere")) as other:
        with pytest.raises(ValueError, match="same location"):
            reencrypt_batch(enc, reader, other, policy, location)

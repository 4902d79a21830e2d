"""The plain type is bound into every cell (cell AAD pair "type"), and the shared helpers both codecs use.

Self-contained: no shared fixtures, so it runs on its own.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from keyturn import arrow_codec, avro_codec
from keyturn.arrow_codec import decrypt_batch, encrypt_batch, reencrypt_batch, rewrap_batch
from keyturn.arrow_values import arrow_type_descriptor, encode_plain_field
from keyturn.avro_codec import (
    PLAIN_TYPE_PROP,
    avro_type_descriptor,
    decrypt_records,
    derive_encrypted_schema,
    encrypt_records,
    rewrap_records,
)
from keyturn.format import DEK_FIELD, VERSION_FIELD
from keyturn.kms.local import LocalKms
from keyturn.policy import KeyPolicy, ReadStatus, count_statuses
from keyturn.reader import DekReader, open_rows
from keyturn.registry.base import KeyState
from keyturn.rewrap import rewrap_rows
from keyturn.scope import DekScope, KekRef, Location

CURRENT, STALE, CORRUPT = ReadStatus.CURRENT, ReadStatus.STALE, ReadStatus.CORRUPT
KMS = LocalKms.in_memory({"kek-1": os.urandom(32), "kek-2": os.urandom(32)})
POLICY = KeyPolicy(active=KekRef(1, "kek-1"), states={1: KeyState.ACTIVE}, kek_ids={1: "kek-1"})
ROTATED = KeyPolicy(
    active=KekRef(2, "kek-2"),
    states={1: KeyState.DECRYPT_ONLY, 2: KeyState.ACTIVE},
    kek_ids={1: "kek-1", 2: "kek-2"},
)
LOC = Location("sales", "2024-01-01")


def scope() -> DekScope:
    return DekScope(KMS, KekRef(1, "kek-1"), LOC)


def seal_batch(batch: pa.RecordBatch, columns: list[str], **kw) -> pa.RecordBatch:
    with scope() as s:
        return encrypt_batch(batch, columns, s, **kw)


def read_batch(batch: pa.RecordBatch, policy: KeyPolicy = POLICY):
    with DekReader(KMS) as reader:
        return decrypt_batch(batch, reader, policy, LOC)


def with_metadata(batch: pa.RecordBatch, name: str, updates: dict[bytes, bytes]) -> pa.RecordBatch:
    i = batch.schema.get_field_index(name)
    f = batch.schema.field(i)
    f = f.with_metadata({**f.metadata, **updates})
    return pa.RecordBatch.from_arrays(batch.columns, schema=batch.schema.set(i, f))


# ----------------------------------------------------------------------------- descriptors


def test_descriptors_are_the_documented_strings():
    assert arrow_type_descriptor(pa.int64()) == "arrow:int64"
    assert arrow_type_descriptor(pa.timestamp("us", tz="UTC")) == "arrow:timestamp[us, tz=UTC]"
    assert arrow_type_descriptor(pa.list_(pa.int32())) == "arrow:list<item: int32>"
    assert avro_type_descriptor("string") == 'avro:"string"'
    assert avro_type_descriptor(["null", "long"]) == 'avro:["null","long"]'
    assert avro_type_descriptor({"type": "enum", "symbols": ["A"], "name": "E"}) == (
        'avro:{"name":"E","symbols":["A"],"type":"enum"}'
    )
    with pytest.raises(ValueError):
        avro_type_descriptor({"type": {1, 2}})
    with pytest.raises(ValueError):
        avro_type_descriptor("x" * 70000)


# ----------------------------------------------------------------------------- Arrow: edited plain_field


@pytest.mark.parametrize(
    "original, tampered, values",
    [
        (pa.int64(), pa.float64(), [1, 2, None]),
        (pa.string(), pa.binary(), ["a", "b", None]),
        (pa.string(), pa.large_string(), ["a", "b", None]),
        (pa.timestamp("s"), pa.timestamp("ns"), [1, 2, None]),
        (pa.timestamp("us", tz="UTC"), pa.timestamp("us", tz="Europe/Paris"), [1, 2, None]),
        (pa.int32(), pa.uint32(), [1, 2, None]),
        (pa.decimal128(10, 2), pa.decimal128(10, 3), [None, None, None]),
    ],
    ids=["int64-float64", "string-binary", "string-large_string", "ts-unit", "ts-zone", "int32-uint32", "all-null"],
)
def test_arrow_type_swap_is_corrupt_never_wrong_plaintext(original, tampered, values):
    batch = pa.record_batch({"id": pa.array([1, 2, 3]), "v": pa.array(values, original)})
    sealed = seal_batch(batch, ["v"])
    assert read_batch(sealed).status == [CURRENT] * 3
    bad = with_metadata(sealed, "v", {b"keyturn.plain_field": encode_plain_field(pa.field("v", tampered))})
    result = read_batch(bad)
    if all(v is None for v in values):  # no cell to authenticate: nothing to misread either
        assert result.plain.schema.field("v").type == tampered
        assert result.plain.column("v").null_count == 3
        return
    assert result.status == [CORRUPT, CORRUPT, CURRENT]  # the null-only row has no cell
    assert result.plain.num_rows == 1 and result.plain.column("v").to_pylist() == [None]
    assert result.rows_with(CORRUPT).equals(bad.slice(0, 2))


def test_arrow_nested_and_dictionary_types_round_trip():
    batch = pa.record_batch(
        {
            "l": pa.array([[1, 2], None, []], pa.list_(pa.int32())),
            "d": pa.array(["x", "y", "x"]).dictionary_encode(),
            "s": pa.array([{"a": 1}, {"a": 2}, None], pa.struct([("a", pa.int8())])),
        }
    )
    result = read_batch(seal_batch(batch, ["l", "d", "s"]))
    assert result.status == [CURRENT] * 3
    assert result.plain.equals(batch)


# ----------------------------------------------------------------------------- Arrow: foreign keyturn.format


def test_column_with_another_keyturn_format_is_never_clear_data():
    batch = pa.record_batch({"id": pa.array([1, 2, 3]), "ssn": pa.array(["a", None, "c"])})
    sealed = seal_batch(batch, ["ssn"])
    foreign = with_metadata(sealed, "ssn", {b"keyturn.format": b"2"})
    assert arrow_codec.encrypted_columns(foreign.schema) == []
    result = read_batch(foreign)
    assert result.status == [CORRUPT, CURRENT, CORRUPT]
    assert result.plain.schema.names == ["id"]
    assert result.plain.column("id").to_pylist() == [2]
    assert result.rows_with(CORRUPT).equals(foreign.take(pa.array([0, 2])))
    with pytest.raises(ValueError, match="already encrypted"):
        with scope() as s:
            only_ssn = pa.RecordBatch.from_arrays([foreign.column("ssn")], schema=pa.schema([foreign.schema.field("ssn")]))
            encrypt_batch(only_ssn, ["ssn"], s)


def test_foreign_format_column_next_to_a_v1_column_reencrypts_without_loss():
    batch = pa.record_batch({"id": pa.array([1, 2, 3]), "a": pa.array(["x", "y", "z"]), "b": pa.array([None, 5, None])})
    sealed = seal_batch(batch, ["a", "b"])
    foreign = with_metadata(sealed, "b", {b"keyturn.format": b"9"})
    with DekReader(KMS) as reader, scope() as s:
        out = reencrypt_batch(foreign, reader, s, POLICY, LOC)
    assert out.status == [CURRENT, CORRUPT, CURRENT]
    assert out.batch.schema == foreign.schema
    assert out.batch.slice(1, 1).to_pylist() == foreign.slice(1, 1).to_pylist()  # the unreadable row is kept as is
    assert out.batch.column("b").to_pylist() == [None, foreign.column("b")[1].as_py(), None]
    assert read_batch(out.batch).status == [CURRENT, CORRUPT, CURRENT]  # b is still foreign: never clear data


# ----------------------------------------------------------------------------- Avro: edited plain_type

USERS = {
    "type": "record",
    "name": "User",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "ssn", "type": "string"},
        {"name": "age", "type": ["null", "long"], "default": None},
    ],
}


def avro_encrypt(records, sensitive=("ssn", "age")):
    with scope() as s:
        return encrypt_records(records, USERS, list(sensitive), s)


def avro_decrypt(records, schema, policy=POLICY):
    with DekReader(KMS) as reader:
        return decrypt_records(records, schema, reader, policy, LOC)


def retyped(schema: dict, field: str, plain_type) -> dict:
    out = copy.deepcopy(schema)
    for f in out["fields"]:
        if f["name"] == field:
            f[PLAIN_TYPE_PROP] = plain_type
    return out


@pytest.mark.parametrize(
    "field, plain_type",
    [("ssn", "bytes"), ("ssn", ["null", "string"]), ("age", ["long", "null"]), ("age", ["null", "double"])],
    ids=["string-bytes", "string-nullable", "union-order", "union-branch-type"],
)
def test_avro_type_swap_is_corrupt_never_wrong_plaintext(field, plain_type):
    records = [{"id": 1, "ssn": "123-45-6789", "age": 40}, {"id": 2, "ssn": "987-65-4321", "age": 41}]
    encrypted_schema = derive_encrypted_schema(USERS, ["ssn", "age"])
    encrypted = avro_encrypt(records)
    assert avro_decrypt(encrypted, encrypted_schema).plain == records
    result = avro_decrypt(encrypted, retyped(encrypted_schema, field, plain_type))
    assert result.status == [CORRUPT, CORRUPT]
    assert result.plain == []
    assert result.rows_with(CORRUPT) == encrypted


def test_avro_type_key_order_in_the_schema_does_not_matter():
    schema = copy.deepcopy(USERS)
    schema["fields"][1]["type"] = {"type": "string", "logicalType": "uuid"}
    records = [{"id": 1, "ssn": "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "age": None}]
    with scope() as s:
        encrypted = encrypt_records(records, schema, ["ssn"], s)
    encrypted_schema = derive_encrypted_schema(schema, ["ssn"])
    reordered = retyped(encrypted_schema, "ssn", {"logicalType": "uuid", "type": "string"})
    assert [f for f in reordered["fields"] if f["name"] == "ssn"][0][PLAIN_TYPE_PROP] == {"logicalType": "uuid", "type": "string"}
    assert avro_decrypt(encrypted, reordered).status == [CURRENT]


def test_avro_unserializable_plain_type_is_corrupt():
    encrypted_schema = derive_encrypted_schema(USERS, ["ssn"])
    with scope() as s:
        encrypted = encrypt_records([{"id": 1, "ssn": "x", "age": None}], USERS, ["ssn"], s)
    assert avro_decrypt(encrypted, retyped(encrypted_schema, "ssn", float("nan"))).status == [CORRUPT]


# ----------------------------------------------------------------------------- shared core


def test_seal_rows_and_open_rows_require_one_type_per_field():
    with scope() as s:
        with pytest.raises(TypeError):
            s.seal_rows(["a"], [[b"x"]])  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="one descriptor per field"):
            s.seal_rows(["a", "b"], [[b"x"], [b"y"]], types=["arrow:binary"])
        with pytest.raises(ValueError, match="non-empty"):
            s.seal_rows(["a"], [[b"x"]], types=[""])
        sealed = s.seal_rows(["a"], [[b"x"]], types=["arrow:binary"])
    with DekReader(KMS) as reader:
        with pytest.raises(ValueError, match="one descriptor per field"):
            open_rows(reader, LOC, ["a"], sealed.cells, sealed.envelopes, [0], types=[])
        ok = open_rows(reader, LOC, ["a"], sealed.cells, sealed.envelopes, [0], types=["arrow:binary"])
        wrong = open_rows(reader, LOC, ["a"], sealed.cells, sealed.envelopes, [0], types=["arrow:string"])
    assert ok.failed == set() and ok.values == [[b"x"]]
    assert wrong.failed == {0} and wrong.values == [[None]]


def test_count_statuses_lists_every_status():
    counts = count_statuses([CURRENT, CORRUPT, CURRENT])
    assert list(counts) == [s.value for s in ReadStatus]
    assert counts["current"] == 2 and counts["corrupt"] == 1 and sum(counts.values()) == 3


def test_row_key_names_live_in_format():
    assert (VERSION_FIELD, DEK_FIELD) == ("_keyturn_version", "_keyturn_dek")
    assert (arrow_codec.VERSION_COLUMN, arrow_codec.DEK_COLUMN) == (VERSION_FIELD, DEK_FIELD)
    assert (avro_codec.VERSION_FIELD, avro_codec.DEK_FIELD) == (VERSION_FIELD, DEK_FIELD)


def test_avro_codec_does_not_import_pyarrow():
    code = "import sys, keyturn.avro_codec; assert 'pyarrow' not in sys.modules and 'keyturn.arrow_codec' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_rewrap_rows_rewraps_each_stale_envelope_once_and_marks_failures_corrupt():
    with scope() as s:
        good = s.seal_rows(["a"], [[b"x"]], types=["arrow:binary"]).envelopes[0]
    bad = good[:-1] + bytes([good[-1] ^ 1])
    status = [STALE, STALE, STALE, CURRENT]
    replaced, request_ids = rewrap_rows(KMS, status, [good, good, bad, good], LOC, ROTATED.active)
    assert status == [STALE, STALE, CORRUPT, CURRENT]
    assert set(replaced) == {good, bad} and replaced[bad] is None and replaced[good]
    assert len(request_ids) == 1


def test_both_codecs_rewrap_and_count_alike():
    batch = pa.record_batch({"v": pa.array(["a", "b"])})
    rewrapped = rewrap_batch(seal_batch(batch, ["v"]), KMS, ROTATED, LOC)
    records = rewrap_records(avro_encrypt([{"id": 1, "ssn": "a", "age": None}]), KMS, ROTATED, LOC)
    assert rewrapped.counts()["stale"] == 2 and records.counts()["stale"] == 1
    assert rewrapped.deks_rewrapped == records.deks_rewrapped == 1
    assert read_batch(rewrapped.batch, ROTATED).status == [CURRENT, CURRENT]
    assert avro_decrypt(records.records, derive_encrypted_schema(USERS, ["ssn", "age"]), ROTATED).status == [CURRENT]


def _union_array() -> pa.Array:
    return pa.UnionArray.from_dense(
        pa.array([0, 1], pa.int8()), pa.array([0, 0], pa.int32()), [pa.array([1]), pa.array(["a"])]
    )


def test_nested_descriptors_do_not_depend_on_pyarrow_printing():
    # Spelled out by keyturn, recursively; these strings are wire format.
    t = pa.struct([pa.field("a", pa.int16(), nullable=False), ("b", pa.map_(pa.string(), pa.list_(pa.int8())))])
    assert arrow_type_descriptor(t) == "arrow:struct<a: int16 not null, b: map<string, list<item: int8>>>"
    assert arrow_type_descriptor(pa.map_(pa.string(), pa.int64(), keys_sorted=True)) == "arrow:map<string, int64, keys_sorted>"
    assert arrow_type_descriptor(pa.dictionary(pa.int16(), pa.string(), ordered=True)) == (
        "arrow:dictionary<values=string, indices=int16, ordered=1>"
    )


def test_union_columns_are_refused_on_encrypt_and_corrupt_on_read():
    with pytest.raises(ValueError, match="not supported"):
        seal_batch(pa.record_batch({"id": [1, 2], "u": _union_array()}), ["u"])
    sealed = seal_batch(pa.record_batch({"id": [1, 2], "s": ["x", "y"]}), ["s"])
    fake = pa.field("s", _union_array().type)
    tampered = with_metadata(sealed, "s", {b"keyturn.plain_field": encode_plain_field(fake)})
    result = read_batch(tampered)
    assert [s for s in result.status] == [ReadStatus.CORRUPT, ReadStatus.CORRUPT]
    assert result.plain.num_rows == 0

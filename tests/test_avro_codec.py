"""Avro codec against a real LocalKms: round trips of every Avro type, container files,
rewrap, re-encrypt, moved and tampered cells, classification, and bad arguments."""

from __future__ import annotations

import copy
import datetime as dt
import importlib.resources
import io
import json
import math
import os
import uuid
from decimal import Decimal

import fastavro
import pytest
from fastavro.validation import validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyturn.avro_codec import (
    BIND_PROP,
    DEK_FIELD,
    FORMAT_PROP,
    PLAIN_TYPE_PROP,
    VERSION_FIELD,
    decrypt_records,
    derive_encrypted_schema,
    encrypt_records,
    encrypted_fields,
    plain_schema_of,
    reencrypt_records,
    rewrap_records,
)
from keyturn.kms.base import CountingKms
from keyturn.kms.local import LocalKms
from keyturn.policy import KeyPolicy, ReadStatus
from keyturn.reader import DekReader
from keyturn.registry.base import KeyState
from keyturn.scope import DekScope, KekRef, Location, ScopeLimits

CURRENT, STALE, RETIRED = ReadStatus.CURRENT, ReadStatus.STALE, ReadStatus.RETIRED
UNKNOWN, MISSING, CORRUPT = ReadStatus.UNKNOWN, ReadStatus.MISSING, ReadStatus.CORRUPT

KEKS = {"kek-1": os.urandom(32), "kek-2": os.urandom(32), "kek-99": os.urandom(32)}
POLICY = KeyPolicy(
    active=KekRef(2, "kek-2"),
    states={1: KeyState.DECRYPT_ONLY, 2: KeyState.ACTIVE},
    kek_ids={1: "kek-1", 2: "kek-2"},
)
POLICY_V1 = KeyPolicy(active=KekRef(1, "kek-1"), states={1: KeyState.ACTIVE}, kek_ids={1: "kek-1"})
LOC = Location("customers", "dt=2024-06-01")
UTC = dt.timezone.utc

EVERYTHING = {
    "type": "record",
    "name": "Everything",
    "namespace": "io.example",
    "doc": "one field per Avro type",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}},
        {"name": "f_null", "type": "null"},
        {"name": "f_bool", "type": "boolean"},
        {"name": "f_int", "type": "int"},
        {"name": "f_long", "type": "long"},
        {"name": "f_float", "type": "float"},
        {"name": "f_double", "type": "double"},
        {"name": "f_bytes", "type": "bytes"},
        {"name": "f_string", "type": "string", "doc": "kept on the encrypted field"},
        {"name": "f_fixed", "type": {"type": "fixed", "name": "Hash", "size": 4}},
        {"name": "f_enum", "type": {"type": "enum", "name": "Suit", "symbols": ["HEARTS", "SPADES", "CLUBS"]}},
        {"name": "f_array", "type": {"type": "array", "items": "int"}},
        {"name": "f_map", "type": {"type": "map", "values": ["null", "string"]}},
        {
            "name": "f_record",
            "type": {
                "type": "record",
                "name": "Address",
                "fields": [
                    {"name": "street", "type": "string"},
                    {"name": "zip", "type": ["null", "int"], "default": None},
                    {"name": "suits", "type": {"type": "array", "items": "Suit"}},
                ],
            },
        },
        {"name": "f_union", "type": ["null", "string", "long", "Address"]},
        {"name": "f_decimal", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
        {"name": "f_date", "type": {"type": "int", "logicalType": "date"}},
        {"name": "f_ts_millis", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "f_ts_micros", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "f_uuid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "f_opt", "type": ["null", "double"], "default": None},
        {"name": "f_hash_again", "type": "Hash"},
        {"name": "f_kind", "type": "Kind"},
    ],
}
EVERYTHING_SENSITIVE = [f["name"] for f in EVERYTHING["fields"] if f["name"].startswith("f_")]


def everything_records() -> list[dict]:
    full = {
        "id": 1,
        "kind": "A",
        "f_null": None,
        "f_bool": True,
        "f_int": -(2**31),
        "f_long": 2**63 - 1,
        "f_float": 1.5,
        "f_double": 0.1,
        "f_bytes": b"\x00\xffsecret-bytes",
        "f_string": "secret-string \u00e9\u4e2d\U0001f511",
        "f_fixed": b"\xde\xad\xbe\xef",
        "f_enum": "CLUBS",
        "f_array": [1, -2, 2**31 - 1],
        "f_map": {"a": "x", "b": None},
        "f_record": {"street": "1 Main St", "zip": 12345, "suits": ["HEARTS", "SPADES"]},
        "f_union": {"street": "2 Side St", "zip": None, "suits": []},
        "f_decimal": Decimal("1234567890.12"),
        "f_date": dt.date(2024, 2, 29),
        "f_ts_millis": dt.datetime(2024, 6, 1, 12, 30, 45, 123000, tzinfo=UTC),
        "f_ts_micros": dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        "f_uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "f_opt": 2.5,
        "f_hash_again": b"\x01\x02\x03\x04",
        "f_kind": "B",
    }
    nulls = dict(full, id=2, kind="B", f_map={}, f_union=None, f_opt=None, f_array=[], f_bytes=b"", f_string="")
    weird = dict(
        full,
        id=3,
        f_bool=False,
        f_float=float("-inf"),
        f_double=float("nan"),
        f_union=-(2**63),
        f_decimal=Decimal("-0.01"),
        f_opt=float("inf"),
    )
    return [full, nulls, weird]


USERS = {
    "type": "record",
    "name": "User",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "email", "type": ["null", "string"], "default": None},
        {"name": "name", "type": "string"},
        {"name": "ssn", "type": "string"},
    ],
}
USERS_SENSITIVE = ["email", "name", "ssn"]


def users(n: int = 4, start: int = 0) -> list[dict]:
    return [
        {
            "id": i,
            "email": None if i % 3 == 2 else f"user{i}@example.com",
            "name": f"Name {i}",
            "ssn": f"{i:03d}-00-{i:04d}",
        }
        for i in range(start, start + n)
    ]


@pytest.fixture
def kms() -> CountingKms:
    return CountingKms(LocalKms.in_memory(KEKS))


def encrypt(kms, records, schema=USERS, sensitive=USERS_SENSITIVE, *, version=2, loc=LOC, bind=(), limits=None):
    extra = {} if limits is None else {"limits": limits}
    with DekScope(kms, KekRef(version, f"kek-{version}"), loc, **extra) as scope:
        return encrypt_records(records, schema, sensitive, scope, bind_fields=bind)


def decrypt(kms, records, encrypted_schema, *, policy=POLICY, loc=LOC, fields=None):
    with DekReader(kms) as reader:
        return decrypt_records(records, encrypted_schema, reader, policy, loc, fields=fields)


def avro_bytes(schema: dict, record: dict) -> bytes:
    """The canonical Avro encoding of a record: exact equality, NaN included."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


def assert_same_records(schema: dict, got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert avro_bytes(schema, g) == avro_bytes(schema, w)


# -- round trips ----------------------------------------------------------------


def test_every_avro_type_round_trips_exactly(kms):
    records = everything_records()
    original = copy.deepcopy(records)
    encrypted_schema = derive_encrypted_schema(EVERYTHING, EVERYTHING_SENSITIVE)
    encrypted = encrypt(kms, records, EVERYTHING, EVERYTHING_SENSITIVE)
    assert_same_records(EVERYTHING, records, original)  # inputs untouched
    parsed = fastavro.parse_schema(encrypted_schema)
    for rec in encrypted:
        assert validate(rec, parsed)
        for name in EVERYTHING_SENSITIVE:
            assert rec[name] is None or isinstance(rec[name], bytes)
            assert rec[name] is None or b"secret" not in rec[name]
    assert encrypted[0]["f_null"] is None and encrypted[1]["f_union"] is None and encrypted[1]["f_opt"] is None
    assert encrypted[1]["f_string"] is not None and encrypted[1]["f_array"] is not None  # empty is not null
    assert kms.calls.generate == 1

    result = decrypt(kms, encrypted, encrypted_schema)
    assert result.status == [CURRENT] * 3 and result.plain_status == [CURRENT] * 3
    assert result.counts() == {"current": 3, "stale": 0, "retired": 0, "unknown": 0, "missing": 0, "corrupt": 0}
    assert kms.calls.decrypt == 1
    assert result.schema == plain_schema_of(encrypted_schema)
    plain_parsed = fastavro.parse_schema(result.schema)
    for rec in result.plain:
        assert validate(rec, plain_parsed)
    assert_same_records(EVERYTHING, result.plain, records)
    assert result.plain[:2] == records[:2]  # equal as Python values too (no NaN in these)
    assert math.isnan(result.plain[2]["f_double"]) and result.plain[2]["f_float"] == float("-inf")


def test_decrypted_values_are_what_a_plain_avro_file_gives(kms):
    records = everything_records()
    buf = io.BytesIO()
    fastavro.writer(buf, EVERYTHING, records)
    buf.seek(0)
    via_file = list(fastavro.reader(buf))
    encrypted_schema = derive_encrypted_schema(EVERYTHING, EVERYTHING_SENSITIVE)
    result = decrypt(kms, encrypt(kms, records, EVERYTHING, EVERYTHING_SENSITIVE), encrypted_schema)
    assert result.plain[:2] == via_file[:2]
    assert_same_records(EVERYTHING, result.plain, via_file)


def test_encrypted_records_keep_clear_fields_and_carry_key_metadata(kms):
    records = users(3)
    encrypted = encrypt(kms, records)
    for plain, enc in zip(records, encrypted):
        assert enc["id"] == plain["id"]
        assert list(enc) == ["id", "email", "name", "ssn", VERSION_FIELD, DEK_FIELD]
        assert enc[VERSION_FIELD] == 2
    assert len({enc[DEK_FIELD] for enc in encrypted}) == 1  # one DEK for the scope
    assert encrypted[2]["email"] is None  # a null stays null: null-ness is visible


def test_nulls_missing_fields_and_defaults():
    schema = {
        "type": "record",
        "name": "Account",
        "fields": [
            {"name": "id", "type": "long"},
            {"name": "note", "type": ["null", "string"]},
            {"name": "tier", "type": "string", "default": "basic"},
            {"name": "score", "type": ["null", "long"], "default": None},
        ],
    }
    kms = CountingKms(LocalKms.in_memory(KEKS))
    sensitive = ["note", "tier", "score"]
    records = [{"id": 1, "note": None, "tier": "gold", "score": 7}, {"id": 2}]  # record 2: sensitive fields missing
    encrypted = encrypt(kms, records, schema, sensitive)
    assert encrypted[0]["note"] is None and encrypted[1]["note"] is None and encrypted[1]["score"] is None
    assert isinstance(encrypted[1]["tier"], bytes)  # the plain default is encrypted like any value
    result = decrypt(kms, encrypted, derive_encrypted_schema(schema, sensitive))
    assert result.plain == [
        {"id": 1, "note": None, "tier": "gold", "score": 7},
        {"id": 2, "note": None, "tier": "basic", "score": None},
    ]


def test_scope_caps_give_several_deks_in_one_call(kms):
    records = users(10)
    encrypted = encrypt(kms, records, limits=ScopeLimits(max_cells=6))
    assert kms.calls.generate == len({e[DEK_FIELD] for e in encrypted}) > 1
    result = decrypt(kms, encrypted, derive_encrypted_schema(USERS, USERS_SENSITIVE))
    assert result.plain == records
    assert kms.calls.decrypt == kms.calls.generate


def test_empty_list_makes_no_kms_call(kms):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    assert encrypt(kms, []) == []
    result = decrypt(kms, [], encrypted_schema)
    assert result.plain == [] and result.status == [] and result.rows_with(*ReadStatus) == []
    assert set(result.counts().values()) == {0}
    assert rewrap_records([], kms, POLICY, LOC).deks_rewrapped == 0
    with DekReader(kms) as reader, DekScope(kms, POLICY.active, LOC) as scope:
        assert reencrypt_records([], encrypted_schema, reader, scope, POLICY, LOC).records == []
    assert kms.calls.total == 0


def test_decrypt_a_subset_of_fields(kms):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    records = users(3)
    result = decrypt(kms, encrypt(kms, records), encrypted_schema, fields=["email"])
    assert [f["name"] for f in result.schema["fields"]] == ["id", "email"]
    assert result.plain == [{"id": r["id"], "email": r["email"]} for r in records]
    for rec in result.plain:
        assert validate(rec, fastavro.parse_schema(result.schema))


# -- the derived schema ---------------------------------------------------------


def test_derived_schema_shape():
    plain = copy.deepcopy(EVERYTHING)
    derived = derive_encrypted_schema(plain, EVERYTHING_SENSITIVE, bind_fields=["id"])
    assert plain == EVERYTHING  # not mutated
    fastavro.parse_schema(derived)
    assert derived["name"] == "Everything" and derived["namespace"] == "io.example"
    assert derived["doc"] == EVERYTHING["doc"]
    names = [f["name"] for f in derived["fields"]]
    assert names == [f["name"] for f in EVERYTHING["fields"]] + [VERSION_FIELD, DEK_FIELD]
    by_name = {f["name"]: f for f in derived["fields"]}
    for f in EVERYTHING["fields"]:
        got = by_name[f["name"]]
        if f["name"] in EVERYTHING_SENSITIVE:
            assert got["type"] == ["null", "bytes"] and got["default"] is None
            assert got[FORMAT_PROP] == "1" and got[PLAIN_TYPE_PROP] == f["type"] and got[BIND_PROP] == ["id"]
        else:
            assert got == f
    assert by_name["f_string"]["doc"] == "kept on the encrypted field"
    plain_fields = {f["name"]: f for f in plain_schema_of(derived)["fields"]}
    assert "default" not in plain_fields["f_opt"]  # the plain default is dropped
    envelope = json.loads(importlib.resources.files("schemas").joinpath("encrypted_envelope.avsc").read_text())
    assert envelope["name"] == "KeyturnRowKey" and envelope["namespace"] == "io.keyturn"
    assert derived["fields"][-2:] == envelope["fields"]
    assert encrypted_fields(derived) == EVERYTHING_SENSITIVE


def test_plain_schema_of_inverts_derivation_except_sensitive_defaults():
    derived = derive_encrypted_schema(EVERYTHING, EVERYTHING_SENSITIVE)
    want = copy.deepcopy(EVERYTHING)
    for f in want["fields"]:
        if f["name"] in EVERYTHING_SENSITIVE:
            f.pop("default", None)
    assert plain_schema_of(derived) == want
    users_plain = plain_schema_of(derive_encrypted_schema(USERS, ["ssn"]))
    assert users_plain == USERS  # clear fields keep their defaults


def test_named_types_across_fields_resolve():
    schema = {
        "type": "record",
        "name": "Node",
        "namespace": "graph",
        "fields": [
            {"name": "label", "type": {"type": "enum", "name": "Label", "symbols": ["X", "Y"]}},
            {"name": "secret_label", "type": "Label"},  # clear definition, sensitive use
            {"name": "point", "type": {"type": "record", "name": "Point", "fields": [{"name": "x", "type": "int"}]}},
            {"name": "other_point", "type": ["null", "graph.Point"]},  # sensitive definition, sensitive use
            {"name": "next", "type": ["null", "Node"], "default": None},  # sensitive recursion into the record
        ],
    }
    sensitive = ["secret_label", "point", "other_point", "next"]
    kms = CountingKms(LocalKms.in_memory(KEKS))
    records = [
        {"label": "X", "secret_label": "Y", "point": {"x": 1}, "other_point": {"x": 2},
         "next": {"label": "Y", "secret_label": "X", "point": {"x": 3}, "other_point": None, "next": None}},
    ]
    encrypted_schema = derive_encrypted_schema(schema, sensitive)
    fastavro.parse_schema(encrypted_schema)
    result = decrypt(kms, encrypt(kms, records, schema, sensitive), encrypted_schema)
    assert result.plain == records


# -- self-describing: Avro container files --------------------------------------


def test_container_file_round_trip_is_self_describing(kms):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE, bind_fields=["id"])
    part_a = encrypt(kms, users(3), bind=["id"])
    part_b = encrypt(kms, users(2, start=10), bind=["id"])  # another scope, another DEK
    buf = io.BytesIO()
    fastavro.writer(buf, encrypted_schema, part_a + part_b, codec="deflate")  # "merged" into one file
    buf.seek(0)
    avro_file = fastavro.reader(buf)
    file_schema = avro_file.writer_schema
    read_back = list(avro_file)

    fresh = CountingKms(LocalKms.in_memory(KEKS))  # only the file, the KMS and the policy
    result = decrypt(fresh, read_back, file_schema)
    assert result.status == [CURRENT] * 5
    assert result.plain == users(3) + users(2, start=10)
    assert fresh.calls.decrypt == 2
    assert [(f["name"], f["type"]) for f in plain_schema_of(file_schema)["fields"]] == [
        (f["name"], f["type"]) for f in USERS["fields"]
    ]


def test_missing_bind_value_takes_its_default_like_an_avro_writer(kms):
    schema = {
        "type": "record",
        "name": "Event",
        "fields": [
            {"name": "region", "type": "string", "default": "eu"},
            {"name": "owner", "type": ["null", "string"], "default": None},
            {"name": "payload", "type": "string"},
        ],
    }
    records = [{"payload": "p1"}, {"region": "us", "owner": "ann", "payload": "p2"}]
    encrypted_schema = derive_encrypted_schema(schema, ["payload"], bind_fields=["region", "owner"])
    encrypted = encrypt(kms, records, schema, ["payload"], bind=["region", "owner"])
    buf = io.BytesIO()
    fastavro.writer(buf, encrypted_schema, encrypted)
    buf.seek(0)
    read_back = list(fastavro.reader(buf))
    assert read_back[0]["region"] == "eu" and read_back[0]["owner"] is None
    result = decrypt(kms, read_back, encrypted_schema)
    assert result.status == [CURRENT, CURRENT]
    assert [r["payload"] for r in result.plain] == ["p1", "p2"]


# -- rewrap and re-encrypt --------------------------------------------------------


def test_rewrap_keeps_cells_and_calls_kms_once_per_distinct_dek(kms):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    old = encrypt(kms, users(3), version=1) + encrypt(kms, users(3, start=3), version=1)
    assert len({r[DEK_FIELD] for r in old}) == 2
    before = decrypt(kms, old, encrypted_schema)
    assert before.status == [STALE] * 6

    counted = CountingKms(LocalKms.in_memory(KEKS))
    result = rewrap_records(old, counted, POLICY, LOC)
    assert counted.calls.rewrap == 2 and counted.calls.total == 2
    assert result.deks_rewrapped == 2 and result.kms_request_ids == counted.calls.request_ids
    assert result.status == [STALE] * 6
    for was, now in zip(old, result.records):
        for name in USERS_SENSITIVE:
            assert now[name] == was[name]  # payload bytes untouched
        assert now[VERSION_FIELD] == 2 and now[DEK_FIELD] != was[DEK_FIELD]
        assert validate(now, fastavro.parse_schema(encrypted_schema))
    after = decrypt(kms, result.records, encrypted_schema)
    assert after.status == [CURRENT] * 6 and after.plain == before.plain == users(6)

    again = rewrap_records(result.records, counted, POLICY, LOC)
    assert again.deks_rewrapped == 0 and counted.calls.total == 2
    assert all(a is b for a, b in zip(again.records, result.records))


def test_rewrap_leaves_unreadable_rows_alone(kms):
    retired_policy = KeyPolicy(
        active=KekRef(2, "kek-2"), states={1: KeyState.RETIRED, 2: KeyState.ACTIVE}, kek_ids={1: "kek-1", 2: "kek-2"}
    )
    records = encrypt(kms, users(1), version=1) + [dict(users(1)[0], **{VERSION_FIELD: None, DEK_FIELD: None})]
    result = rewrap_records(records, kms, retired_policy, LOC)
    assert result.status == [RETIRED, MISSING] and result.deks_rewrapped == 0
    assert all(a is b for a, b in zip(result.records, records))
    moved = rewrap_records(encrypt(kms, users(1), version=1), kms, POLICY, Location("customers", "elsewhere"))
    assert moved.status == [CORRUPT] and moved.deks_rewrapped == 0


def test_reencrypt_changes_cells_reads_back_identical_and_keeps_unreadable_rows(kms):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE, bind_fields=["id"])
    stale = encrypt(kms, users(3), version=1, bind=["id"])
    unknown = encrypt(kms, users(1, start=50), version=99, bind=["id"])
    missing = [dict(users(1, start=60)[0], **{VERSION_FIELD: None, DEK_FIELD: None})]
    records = [stale[0], unknown[0], stale[1], missing[0], stale[2]]

    with DekReader(kms) as reader, DekScope(kms, POLICY.active, LOC) as scope:
        result = reencrypt_records(records, encrypted_schema, reader, scope, POLICY, LOC)
    assert result.status == [STALE, UNKNOWN, STALE, MISSING, STALE]
    assert result.counts()["stale"] == 3
    assert result.records[1] is unknown[0] and result.records[3] is missing[0]
    for i in (0, 2, 4):
        new, old = result.records[i], records[i]
        assert new[VERSION_FIELD] == 2 and new[DEK_FIELD] != old[DEK_FIELD]
        assert all(new[n] != old[n] for n in USERS_SENSITIVE if old[n] is not None)
        assert validate(new, fastavro.parse_schema(encrypted_schema))
    after = decrypt(kms, result.records, encrypted_schema)
    assert after.status == [CURRENT, UNKNOWN, CURRENT, MISSING, CURRENT]
    assert after.plain == users(3)


# -- moved cells ----------------------------------------------------------------


def test_cell_moved_to_another_field_is_corrupt(kms):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    encrypted = encrypt(kms, users(3))
    encrypted[1] = dict(encrypted[1], name=encrypted[1]["ssn"])
    result = decrypt(kms, encrypted, encrypted_schema)
    assert result.status == [CURRENT, CORRUPT, CURRENT]
    assert result.rows_with(CORRUPT) == [encrypted[1]]
    assert [r["id"] for r in result.plain] == [0, 2]


def test_cell_moved_to_another_record_is_corrupt_with_bind_fields(kms):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE, bind_fields=["id"])
    encrypted = encrypt(kms, users(3), bind=["id"])
    swapped = [dict(encrypted[0], ssn=encrypted[1]["ssn"]), dict(encrypted[1], ssn=encrypted[0]["ssn"]), encrypted[2]]
    result = decrypt(kms, swapped, encrypted_schema)
    assert result.status == [CORRUPT, CORRUPT, CURRENT]
    relabelled = [dict(encrypted[0], id=99)]  # the bound value changed: the cells no longer belong
    assert decrypt(kms, relabelled, encrypted_schema).status == [CORRUPT]


def test_without_bind_fields_a_swap_within_one_dek_is_not_detected(kms):
    """Documented limit: cells are bound to dataset, partition, field and DEK, not to a record."""
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    encrypted = encrypt(kms, users(2))
    swapped = [dict(encrypted[0], ssn=encrypted[1]["ssn"])]
    result = decrypt(kms, swapped, encrypted_schema)
    assert result.status == [CURRENT] and result.plain[0]["ssn"] == users(2)[1]["ssn"]


@pytest.mark.parametrize(
    "where",
    [Location("customers", "dt=2024-06-02"), Location("suppliers", "dt=2024-06-01")],
    ids=["another-partition", "another-dataset"],
)
def test_records_moved_to_another_partition_or_dataset_are_corrupt(kms, where):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    here = encrypt(kms, users(2))
    there = encrypt(kms, users(2, start=5), loc=where)
    result = decrypt(kms, here + there, encrypted_schema)  # read as if all belonged to LOC
    assert result.status == [CURRENT, CURRENT, CORRUPT, CORRUPT]
    assert result.rows_with(CORRUPT) == there
    assert result.plain == users(2)


# -- classification -------------------------------------------------------------


def test_unknown_missing_and_retired_are_classified_not_decrypted(kms):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    policy = KeyPolicy(
        active=KekRef(2, "kek-2"), states={1: KeyState.RETIRED, 2: KeyState.ACTIVE}, kek_ids={1: "kek-1", 2: "kek-2"}
    )
    unknown = encrypt(kms, users(1), version=99)[0]
    retired = encrypt(kms, users(1), version=1)[0]
    null_meta = dict(encrypt(kms, users(1))[0], **{VERSION_FIELD: None, DEK_FIELD: None})
    no_meta = users(1)[0]  # no metadata keys at all
    half_meta = dict(encrypt(kms, users(1))[0], **{DEK_FIELD: None})
    records = [unknown, retired, null_meta, no_meta, half_meta]

    counted = CountingKms(LocalKms.in_memory(KEKS))
    result = decrypt(counted, records, encrypted_schema, policy=policy)
    assert result.status == [UNKNOWN, RETIRED, MISSING, MISSING, MISSING]
    assert result.versions == [99, 1, None, None, 2]
    assert result.plain == [] and counted.calls.total == 0
    assert result.rows_with(UNKNOWN)[0] is unknown and result.rows_with(RETIRED)[0] is retired
    assert result.rows_with(MISSING) == [null_meta, no_meta, half_meta]
    assert sum(result.counts().values()) == len(records)


# -- tampering --------------------------------------------------------------------


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: dict(r, ssn=_flip(r["ssn"], -1)),  # GCM tag
        lambda r: dict(r, ssn=_flip(r["ssn"], 30)),  # ciphertext
        lambda r: dict(r, ssn=_flip(r["ssn"], 0)),  # format version byte
        lambda r: dict(r, ssn=_flip(r["ssn"], 5)),  # dek_id
        lambda r: dict(r, ssn=_flip(r["ssn"], 20)),  # nonce
        lambda r: dict(r, ssn=r["ssn"][:-1]),
        lambda r: dict(r, ssn=r["ssn"] + b"\x00"),
        lambda r: dict(r, ssn=b""),
        lambda r: dict(r, ssn="not bytes"),
        lambda r: dict(r, ssn=None),  # a null cell where the plain type cannot be null
        lambda r: {k: v for k, v in r.items() if k != "name"},  # a non-nullable cell removed
        lambda r: dict(r, **{DEK_FIELD: _flip(r[DEK_FIELD], -1)}),  # wrapped DEK
        lambda r: dict(r, **{DEK_FIELD: _flip(r[DEK_FIELD], 40)}),  # commitment
        lambda r: dict(r, **{DEK_FIELD: r[DEK_FIELD] + b"\x00"}),
        lambda r: dict(r, **{DEK_FIELD: "not bytes"}),
        lambda r: dict(r, **{VERSION_FIELD: 1}),  # version field disagrees with the envelope
        lambda r: dict(r, **{VERSION_FIELD: "2"}),
    ],
    ids=[
        "tag", "ciphertext", "version-byte", "dek-id", "nonce", "truncated", "extended", "empty", "str-cell",
        "null-cell", "removed-cell", "wrapped-dek", "commitment", "envelope-trailing", "str-envelope",
        "version-mismatch", "str-version",
    ],
)
def test_tampered_records_are_corrupt_and_kept(kms, tamper):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    encrypted = encrypt(kms, users(3))
    bad = tamper(encrypted[1])
    result = decrypt(kms, [encrypted[0], bad, encrypted[2]], encrypted_schema)
    assert result.status == [CURRENT, CORRUPT, CURRENT]
    assert result.rows_with(CORRUPT)[0] is bad
    assert [r["id"] for r in result.plain] == [0, 2]


def _with_plain_type(encrypted_schema: dict, field: str, plain_type) -> dict:
    schema = copy.deepcopy(encrypted_schema)
    for f in schema["fields"]:
        if f["name"] == field:
            f[PLAIN_TYPE_PROP] = plain_type
    return schema


def test_plaintext_that_does_not_decode_under_its_type_is_corrupt(kms):
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "suit", "type": {"type": "enum", "name": "Suit", "symbols": ["A", "B", "C"]}},
            {"name": "word", "type": "string"},
        ],
    }
    encrypted_schema = derive_encrypted_schema(schema, ["suit", "word"])
    encrypted = encrypt(kms, [{"suit": "A", "word": "x"}, {"suit": "C", "word": "y"}], schema, ["suit", "word"])
    fewer_symbols = _with_plain_type(encrypted_schema, "suit", {"type": "enum", "name": "Suit", "symbols": ["A", "B"]})
    # the plain type is bound into every cell: any edit fails authentication, even where the bytes would decode
    assert decrypt(kms, encrypted, fewer_symbols).status == [CORRUPT, CORRUPT]
    as_int = _with_plain_type(encrypted_schema, "word", "int")
    assert decrypt(kms, encrypted, as_int).status == [CORRUPT, CORRUPT]  # trailing bytes
    as_fixed = _with_plain_type(encrypted_schema, "word", {"type": "fixed", "name": "F", "size": 8})
    assert decrypt(kms, encrypted, as_fixed).status == [CORRUPT, CORRUPT]  # too short


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: f.update({FORMAT_PROP: "2"}),
        lambda f: f.pop(PLAIN_TYPE_PROP),
        lambda f: f.update({PLAIN_TYPE_PROP: "NoSuchType"}),
        lambda f: f.update({BIND_PROP: "id"}),
        lambda f: f.update({BIND_PROP: ["nope"]}),
        lambda f: f.update({BIND_PROP: ["name"]}),  # bound to an encrypted field
    ],
    ids=["format-2", "no-plain-type", "bad-plain-type", "bind-not-list", "bind-unknown", "bind-encrypted"],
)
def test_damaged_keyturn_properties_make_rows_corrupt_not_wrong(kms, damage):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    damaged = copy.deepcopy(encrypted_schema)
    damage(next(f for f in damaged["fields"] if f["name"] == "ssn"))
    encrypted = encrypt(kms, users(2)) + [users(1)[0]]
    result = decrypt(kms, encrypted, damaged)
    assert result.status == [CORRUPT, CORRUPT, MISSING]
    assert result.plain == [] and result.schema is None
    assert result.rows_with(CORRUPT) == encrypted[:2]
    with pytest.raises(ValueError):
        plain_schema_of(damaged)


# -- bad arguments ----------------------------------------------------------------


def _record(*fields: dict) -> dict:
    return {"type": "record", "name": "R", "fields": list(fields)}


@pytest.mark.parametrize(
    ("schema", "sensitive", "bind", "error", "match"),
    [
        (USERS, ["nope"], (), ValueError, r"\['nope'\] not top-level fields of record 'User'"),
        (USERS, ["name.first"], (), ValueError, "nested path"),
        (USERS, ["ssn", "ssn"], (), ValueError, r"sensitive_fields names \['ssn'\] more than once"),
        (USERS, ["ssn"], ["id", "id"], ValueError, "bind_fields names"),
        (USERS, ["ssn"], ["ssn"], ValueError, "bind fields must stay in clear"),
        (USERS, ["ssn"], ["nope"], ValueError, "bind_fields"),
        (USERS, [], (), ValueError, "at least one field"),
        (USERS, "ssn", (), TypeError, "not one string"),
        (USERS, [3], (), TypeError, "field names"),
        (derive_encrypted_schema(USERS, ["ssn"]), ["name"], (), ValueError, "reserved field"),
        (_record({"name": "a", "type": "string", FORMAT_PROP: "1"}), ["a"], (), ValueError, "keyturn"),
        (_record({"name": "_keyturn_x", "type": "string"}), ["_keyturn_x"], (), ValueError, "reserved"),
        ({"type": "enum", "name": "E", "symbols": ["A"]}, ["a"], (), ValueError, "record schema"),
        ([USERS], ["ssn"], (), TypeError, "record schema as a dict"),
        ({"type": "record", "name": "R"}, ["a"], (), ValueError, "'fields' list"),
        (_record({"name": "a", "type": "int"}, {"name": "a", "type": "int"}), ["a"], (), ValueError, "more than once"),
        (_record({"name": "a", "type": "Missing"}), ["a"], (), ValueError, "not a valid Avro schema"),
        (_record({"name": "a", "type": "int", "default": "x"}), ["a"], (), ValueError, "not a valid Avro schema"),
    ],
)
def test_derive_rejects_bad_arguments(schema, sensitive, bind, error, match):
    with pytest.raises(error, match=match):
        derive_encrypted_schema(schema, sensitive, bind_fields=bind)


def test_named_type_hidden_by_encryption_is_refused():
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "secret", "type": {"type": "enum", "name": "Color", "symbols": ["RED"]}},
            {"name": "visible", "type": {"type": "array", "items": "Color"}},
        ],
    }
    with pytest.raises(ValueError, match="field 'visible' uses the named type 'Color'.*sensitive field 'secret'"):
        derive_encrypted_schema(schema, ["secret"])
    assert encrypted_fields(derive_encrypted_schema(schema, ["secret", "visible"])) == ["secret", "visible"]
    recursive = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Node"]}],
    }
    with pytest.raises(ValueError, match="refers to the record type 'Node' itself"):
        derive_encrypted_schema(recursive, ["v"])


def test_encrypt_rejects_values_that_do_not_match_without_echoing_them(kms):
    bad_records = [
        [dict(users(1)[0], ssn=12345)],
        [dict(users(1)[0], ssn=None)],
        [{"id": 1, "email": None, "ssn": "x"}],  # name missing, no default
        [dict(users(1)[0], id="secret-id")],  # a bind value of the wrong type
    ]
    for records in bad_records:
        with pytest.raises(ValueError, match=r"record 0: .*field '(ssn|name|id)'") as info:
            encrypt(kms, records, bind=["id"])
        assert "12345" not in str(info.value) and "secret-id" not in str(info.value)
    with pytest.raises(ValueError, match="does not match its Avro type"):
        encrypt(kms, [dict(users(1)[0], ssn="ok"), dict(users(1)[0], name=1.5)])
    with pytest.raises(ValueError, match="encrypted already"):
        encrypt(kms, encrypt(kms, users(1)))
    with pytest.raises(TypeError, match="not one record"):
        encrypt(kms, users(1)[0])
    with pytest.raises(TypeError, match="record 1 is a list"):
        encrypt(kms, [users(1)[0], [1, 2]])
    assert kms.calls.total == 1  # only the one successful encryption above reached the KMS


def test_decrypt_and_reencrypt_reject_bad_arguments(kms):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    encrypted = encrypt(kms, users(1))
    with pytest.raises(ValueError, match=r"not encrypted fields of this schema: \['id'\]"):
        decrypt(kms, encrypted, encrypted_schema, fields=["id"])
    with pytest.raises(ValueError, match="not a keyturn-encrypted schema"):
        decrypt(kms, encrypted, USERS)
    with pytest.raises(ValueError, match="not a keyturn-encrypted schema"):
        plain_schema_of(USERS)
    with DekReader(kms) as reader, DekScope(kms, POLICY.active, Location("customers", "other")) as scope:
        with pytest.raises(ValueError, match="same location"):
            reencrypt_records(encrypted, encrypted_schema, reader, scope, POLICY, LOC)


# -- property: random records of a fixed schema -----------------------------------

HYP_SCHEMA = {
    "type": "record",
    "name": "Random",
    "namespace": "prop",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "s", "type": "string"},
        {"name": "by", "type": "bytes"},
        {"name": "fx", "type": {"type": "fixed", "name": "Three", "size": 3}},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["X", "Y", "Z"]}},
        {"name": "a", "type": {"type": "array", "items": "long"}},
        {"name": "m", "type": {"type": "map", "values": "string"}},
        {"name": "o", "type": ["null", "string", "double"]},
        {"name": "r", "type": {"type": "record", "name": "In", "fields": [{"name": "q", "type": ["null", "E"]}]}},
    ],
}
HYP_SENSITIVE = [f["name"] for f in HYP_SCHEMA["fields"] if f["name"] != "id"]
HYP_ENCRYPTED = derive_encrypted_schema(HYP_SCHEMA, HYP_SENSITIVE, bind_fields=["id"])
HYP_KMS = LocalKms.in_memory(KEKS)
_long = st.integers(-(2**63), 2**63 - 1)
_random_record = st.fixed_dictionaries(
    {
        "id": _long,
        "b": st.booleans(),
        "i": st.integers(-(2**31), 2**31 - 1),
        "l": _long,
        "f": st.floats(width=32),
        "d": st.floats(),
        "s": st.text(),
        "by": st.binary(),
        "fx": st.binary(min_size=3, max_size=3),
        "e": st.sampled_from(["X", "Y", "Z"]),
        "a": st.lists(_long, max_size=5),
        "m": st.dictionaries(st.text(max_size=5), st.text(), max_size=4),
        "o": st.one_of(st.none(), st.text(), st.floats()),
        "r": st.fixed_dictionaries({"q": st.one_of(st.none(), st.sampled_from(["X", "Y", "Z"]))}),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_random_record, max_size=6))
def test_random_records_round_trip(records):
    encrypted = encrypt(HYP_KMS, records, HYP_SCHEMA, HYP_SENSITIVE, bind=["id"])
    parsed = fastavro.parse_schema(HYP_ENCRYPTED)
    assert all(validate(r, parsed) for r in encrypted)
    result = decrypt(HYP_KMS, encrypted, HYP_ENCRYPTED)
    assert result.status == [CURRENT] * len(records)
    assert_same_records(HYP_SCHEMA, result.plain, records)


def test_same_encoding_type_swap_in_plain_type_is_corrupt(kms):
    encrypted_schema = derive_encrypted_schema(USERS, USERS_SENSITIVE)
    swapped = _with_plain_type(encrypted_schema, "ssn", "bytes")
    assert decrypt(kms, encrypt(kms, users(1)), swapped).status == [CORRUPT]

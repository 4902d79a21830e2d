"""Avro codec against a real SQLite key home: dataset contracts and the DEK directory.

Every test plays an attack on a lake file (forged plaintext, stripped
metadata, dropped fields, foreign keyturn fields, unregistered or moved DEKs,
writes that break the contract) and checks the same two things: no forged or
plain value is ever returned as decrypted data, and no record is lost (the
unreadable ones come back as they were).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import pytest
from fastavro import parse_schema
from fastavro.validation import validate

from keyturn.avro_codec import (
    BIND_PROP,
    DEK_FIELD,
    FORMAT_PROP,
    PLAIN_TYPE_PROP,
    VERSION_FIELD,
    contract_encrypted_schema,
    decrypt_records,
    derive_encrypted_schema,
    encrypt_records,
    encrypted_fields,
    reencrypt_records,
)
from keyturn.contract import ContractColumn, add_column, avro_contract
from keyturn.errors import ContractError
from keyturn.format import parse_envelope
from keyturn.kms.base import CountingKms
from keyturn.kms.local import LocalKms
from keyturn.policy import KeyPolicy, ReadStatus
from keyturn.reader import DekReader
from keyturn.registry.sqlite import SqliteKeyRegistry
from keyturn.rewrap import rewrap_envelope
from keyturn.scope import DekScope, KekRef, Location

CURRENT, STALE, UNKNOWN, CORRUPT = ReadStatus.CURRENT, ReadStatus.STALE, ReadStatus.UNKNOWN, ReadStatus.CORRUPT
LOC = Location("customers", "dt=2024-06-01")
KEK1, KEK2 = KekRef(1, "kek-1"), KekRef(2, "kek-2")

PLAIN = {
    "type": "record",
    "name": "Customer",
    "namespace": "io.example",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "region", "type": ["null", "string"], "default": None},
        {"name": "ssn", "type": "string", "doc": "national id"},
        {"name": "email", "type": ["null", "string"], "default": None},
    ],
}
FIELDS = ["ssn", "email"]
BIND = ["id"]
PLAIN_TYPES = {f["name"]: f["type"] for f in PLAIN["fields"]}
ENCRYPTED = derive_encrypted_schema(PLAIN, FIELDS, bind_fields=BIND)
FORGED = "999-99-9999 (forged)"


def sample(n: int = 4, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "region": None if i % 2 else "eu",
            "ssn": f"123-45-{i:04d}",
            "email": None if i % 3 == 2 else f"user{i}@example.com",
        }
        for i in range(start, start + n)
    ]


def stripped(schema: dict[str, Any], *, plain_types: bool = False) -> dict[str, Any]:
    """`schema` after an engine that drops unknown field properties (optionally also declaring plain types)."""
    out = copy.deepcopy(schema)
    fields = []
    for f in out["fields"]:
        if plain_types and FORMAT_PROP in f:
            f = {**f, "type": f[PLAIN_TYPE_PROP]}
            f.pop("default", None)
        fields.append({k: v for k, v in f.items() if not str(k).startswith("keyturn.")})
    out["fields"] = fields
    return out


def without_field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    out = copy.deepcopy(schema)
    out["fields"] = [f for f in out["fields"] if f["name"] != name]
    return out


def plain_values(result) -> list[Any]:
    return [v for rec in result.plain for v in rec.values()]


class Home:
    """A SQLite key home (registry + DEK directory + pinned contract) and an in-memory KMS."""

    def __init__(self, tmp_path) -> None:
        self.registry = SqliteKeyRegistry(tmp_path / "keys.db")
        self.registry.initialize("kek-1", actor="test", reason="first key")
        self.local = LocalKms.in_memory({"kek-1": os.urandom(32), "kek-2": os.urandom(32)})
        self.kms = CountingKms(self.local)
        self.contract = self.registry.pin_contract(
            avro_contract(LOC.dataset, PLAIN_TYPES, FIELDS, bind=BIND), actor="test", reason="first write"
        )

    def policy(self) -> KeyPolicy:
        return KeyPolicy.from_registry(self.registry)

    def scope(self, kek: KekRef = KEK1, *, registered: bool = True, revision: int | None = None) -> DekScope:
        """A writer's scope, as the pipelines open it: DEKs registered with the contract's revision."""
        if not registered:
            return DekScope(self.kms, kek, LOC)
        rev = self.contract.revision if revision is None else revision
        return DekScope(self.kms, kek, LOC, directory=self.registry, contract_revision=rev)

    def reader(self) -> DekReader:
        return DekReader(self.kms, directory=self.registry)

    def encrypt(self, records: list[dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
        with self.scope(**kw) as scope:
            return encrypt_records(records, PLAIN, FIELDS, scope, bind_fields=BIND, contract=self.contract)

    def decrypt(self, records, schema=ENCRYPTED, *, contract="pinned", location=LOC, **kw):
        contract = self.contract if contract == "pinned" else contract
        with self.reader() as reader:
            return decrypt_records(records, schema, reader, self.policy(), location, contract=contract, **kw)


@pytest.fixture
def home(tmp_path) -> Home:
    return Home(tmp_path)


# --------------------------------------------------------------------------- the honest path


def test_contract_write_then_read_through_the_directory(home):
    records = sample()
    sealed = home.encrypt(records)
    assert home.registry.dek_count() == 1
    assert all(isinstance(r["ssn"], bytes) for r in sealed)
    with home.reader() as reader:
        result = decrypt_records(sealed, ENCRYPTED, reader, home.policy(), LOC, contract=home.contract)
        assert reader.stats.lookups == 1
    assert result.status == [CURRENT] * 4
    assert result.versions == [1] * 4
    assert result.plain == records
    assert result.schema["fields"] == PLAIN["fields"][:2] + [
        {"name": "ssn", "type": "string", "doc": "national id"},
        {"name": "email", "type": ["null", "string"]},
    ]


# --------------------------------------------------------------------------- forged plaintext


@pytest.mark.parametrize("use_contract", [True, False], ids=["contract", "schema_only"])
@pytest.mark.parametrize("field", ["ssn", "email"])
def test_forged_plaintext_in_a_contract_field_is_corrupt(home, use_contract, field):
    records = sample()
    sealed = home.encrypt(records)
    sealed[1] = {**sealed[1], field: FORGED}  # the schema still says ciphertext, with its keyturn properties
    result = home.decrypt(sealed, contract="pinned" if use_contract else None)
    assert result.status == [CURRENT, CORRUPT, CURRENT, CURRENT]
    assert FORGED not in plain_values(result)
    assert result.plain == [records[0], records[2], records[3]]
    assert result.rows_with(CORRUPT) == [sealed[1]] and result.rows_with(CORRUPT)[0] is sealed[1]
    if use_contract:  # the contract checks every contract field, not only the ones asked for
        other = [f for f in FIELDS if f != field]
        assert home.decrypt(sealed, fields=other).status == [CURRENT, CORRUPT, CURRENT, CURRENT]


@pytest.mark.parametrize("plain_types", [False, True], ids=["bytes_fields", "plain_typed_fields"])
def test_stripped_metadata_genuine_cells_decrypt_and_forged_plaintext_is_corrupt(home, plain_types):
    records = sample()
    sealed = home.encrypt(records)
    sealed[2] = {**sealed[2], "ssn": FORGED}
    schema = stripped(ENCRYPTED, plain_types=plain_types)
    assert encrypted_fields(schema) == []  # nothing in the file says what is ciphertext any more
    result = home.decrypt(sealed, schema)
    assert result.status == [CURRENT, CURRENT, CORRUPT, CURRENT]
    assert FORGED not in plain_values(result)
    assert result.plain == [records[0], records[1], records[3]]
    assert result.rows_with(CORRUPT) == [sealed[2]]

    # a rewrite under the contract writes the contract's schema back, and keeps the forged record as it was
    effective = contract_encrypted_schema(schema, home.contract)
    assert encrypted_fields(effective) == FIELDS
    assert all(f.get(BIND_PROP) == BIND for f in effective["fields"] if f["name"] in FIELDS)
    with home.reader() as reader, home.scope() as scope:
        out = reencrypt_records(sealed, schema, reader, scope, home.policy(), LOC, contract=home.contract)
    assert out.status == result.status
    assert out.records[2] is sealed[2]
    parsed = parse_schema(effective)
    for i in (0, 1, 3):
        assert validate(out.records[i], parsed)
        assert out.records[i][DEK_FIELD] != sealed[i][DEK_FIELD]
    again = home.decrypt([out.records[i] for i in (0, 1, 3)], ENCRYPTED)
    assert again.status == [CURRENT] * 3 and again.plain == [records[0], records[1], records[3]]


# --------------------------------------------------------------------------- dropped and foreign fields


@pytest.mark.parametrize("keep_values", [False, True], ids=["records_lack_it", "records_still_have_it"])
def test_schema_that_drops_a_contract_field_makes_its_records_corrupt(home, keep_values):
    records = sample()
    sealed = home.encrypt(records)
    inputs = sealed if keep_values else [{k: v for k, v in r.items() if k != "email"} for r in sealed]
    result = home.decrypt(inputs, without_field(ENCRYPTED, "email"))
    assert result.status == [CORRUPT] * 4
    assert result.plain == []
    assert result.rows_with(CORRUPT) == inputs
    # the same records under the full schema are fine: it is the missing field that condemns them
    assert home.decrypt(sealed).status == [CURRENT] * 4


@pytest.mark.parametrize(
    "props",
    [
        {FORMAT_PROP: "1", PLAIN_TYPE_PROP: ["null", "string"], BIND_PROP: []},
        {FORMAT_PROP: "2"},
        {PLAIN_TYPE_PROP: "string"},
    ],
    ids=["format_1", "other_format", "plain_type_only"],
)
def test_a_field_with_keyturn_properties_outside_the_contract_is_never_clear_data(home, props):
    records = sample()  # region: "eu" in records 0 and 2, None in 1 and 3
    sealed = home.encrypt(records)
    schema = copy.deepcopy(ENCRYPTED)
    for f in schema["fields"]:
        if f["name"] == "region":
            f.update(props)
    result = home.decrypt(sealed, schema)
    assert result.status == [CORRUPT, CURRENT, CORRUPT, CURRENT]
    assert "eu" not in plain_values(result)
    assert all("region" not in r for r in result.plain)
    assert "region" not in [f["name"] for f in result.schema["fields"]]
    assert [r["ssn"] for r in result.plain] == [records[1]["ssn"], records[3]["ssn"]]
    assert result.rows_with(CORRUPT) == [sealed[0], sealed[2]]


def test_a_field_added_to_the_contract_later_is_only_required_of_newer_deks(home):
    old_records = sample(2)
    old = home.encrypt(old_records)  # DEK born at contract revision 1 (ssn, email)
    evolved = add_column(
        home.contract, ContractColumn("region", '["null","string"]', 'avro:["null","string"]')
    )
    home.contract = home.registry.evolve_contract(evolved, expected_revision=1, actor="test", reason="add region")
    assert home.contract.required_at(1) == FIELDS and home.contract.required_at(2) == FIELDS + ["region"]
    with home.scope() as scope:  # DEK born at revision 2: region is encrypted
        new = encrypt_records(
            sample(2, start=10), PLAIN, ["ssn", "email", "region"], scope, bind_fields=BIND, contract=home.contract
        )
    assert isinstance(new[0]["region"], bytes)

    # the old file's schema has region in clear: its records read, with region as null: a clear value in a
    # contract field is never returned (a forged record could name the same old DEK)
    result = home.decrypt(old, ENCRYPTED)
    assert result.status == [CURRENT, CURRENT] and result.plain == [{**r, "region": None} for r in old_records]
    # but not when the schema says region is ciphertext: a clear value there is not read as stored
    sealed_schema = contract_encrypted_schema(ENCRYPTED, home.contract)
    assert home.decrypt(old, sealed_schema).status == [CORRUPT, CURRENT]  # record 1 has region None
    # a newer DEK's record with region in clear is a forgery
    forged = [{**new[0], "region": "eu"}, new[1]]
    result = home.decrypt(forged, ENCRYPTED)
    assert result.status == [CORRUPT, CURRENT]
    assert result.plain == [sample(2, start=10)[1]]
    # and a schema without region is fine for old records only
    schema = without_field(ENCRYPTED, "region")
    bare_old = [{k: v for k, v in r.items() if k != "region"} for r in old]
    result = home.decrypt(bare_old + [new[1]], schema)
    assert result.status == [CURRENT, CURRENT, CORRUPT]
    assert [r["region"] for r in result.plain] == [None, None]


# --------------------------------------------------------------------------- the DEK directory


def test_a_dek_the_directory_does_not_know_is_unknown(home):
    records = sample()
    sealed = home.encrypt(records, registered=False)
    assert home.registry.dek_count() == 0
    decrypts = home.kms.calls.decrypt
    result = home.decrypt(sealed)
    assert result.status == [UNKNOWN] * 4
    assert result.plain == [] and result.rows_with(UNKNOWN) == sealed
    assert home.kms.calls.decrypt == decrypts  # never unwrapped
    # without the contract too: the directory, not the schema, decides
    assert home.decrypt(sealed, contract=None).status == [UNKNOWN] * 4
    with home.reader() as reader, home.scope() as scope:
        out = reencrypt_records(sealed, ENCRYPTED, reader, scope, home.policy(), LOC, contract=home.contract)
    assert out.status == [UNKNOWN] * 4
    assert all(a is b for a, b in zip(out.records, sealed))


def test_records_read_at_another_location_are_corrupt(home):
    sealed = home.encrypt(sample())
    result = home.decrypt(sealed, location=Location(LOC.dataset, "dt=2024-06-02"))
    assert result.status == [CORRUPT] * 4 and result.plain == []


def test_a_dek_rewrapped_in_the_directory_reads_current_with_the_birth_envelope(home):
    records = sample()
    sealed = home.encrypt(records)
    birth = sealed[0][DEK_FIELD]
    home.registry.rotate("kek-2", actor="test", reason="rotate")
    with DekReader(home.kms) as plain_reader:  # without the directory the record's own envelope says stale
        assert decrypt_records(sealed, ENCRYPTED, plain_reader, home.policy(), LOC).status == [STALE] * 4

    dek_id = parse_envelope(birth).dek_id
    entry = home.registry.lookup_deks([dek_id])[dek_id]
    new, _ = rewrap_envelope(home.kms, entry.envelope, LOC, KEK2)
    assert home.registry.replace_wrapping(dek_id, expected_envelope=entry.envelope, new_envelope=new)
    home.local.disable_kek("kek-1")  # only the directory's wrapping can be unwrapped now

    result = home.decrypt(sealed)
    assert result.status == [CURRENT] * 4
    assert result.versions == [2] * 4
    assert result.plain == records
    assert all(r[VERSION_FIELD] == 1 and r[DEK_FIELD] == birth for r in sealed)  # the records did not change
    assert parse_envelope(birth).key_version == 1


def test_reencrypt_after_a_downgrade_keeps_corrupt_records_byte_identical(home):
    records = sample(5)
    sealed = home.encrypt(records)
    sealed[1] = {**sealed[1], "ssn": FORGED}  # downgraded: plaintext where the contract says ciphertext
    sealed[3] = {**sealed[3], "email": "attacker@example.com"}
    snapshot = copy.deepcopy(sealed)
    home.registry.rotate("kek-2", actor="test", reason="rotate")
    policy = home.policy()
    with home.reader() as reader, home.scope(KEK2) as scope:
        out = reencrypt_records(sealed, ENCRYPTED, reader, scope, policy, LOC, contract=home.contract)
    assert out.status == [STALE, CORRUPT, STALE, CORRUPT, STALE]
    assert out.records[1] is sealed[1] and out.records[3] is sealed[3]
    assert sealed == snapshot  # nothing was modified in place
    for i in (1, 3):
        assert out.records[i] == snapshot[i]
        assert out.records[i][DEK_FIELD] == snapshot[i][DEK_FIELD] and out.records[i][VERSION_FIELD] == 1
    parsed = parse_schema(contract_encrypted_schema(ENCRYPTED, home.contract))
    for i in (0, 2, 4):
        assert validate(out.records[i], parsed)
        assert out.records[i][VERSION_FIELD] == 2
        assert parse_envelope(out.records[i][DEK_FIELD]).dek_id != parse_envelope(snapshot[i][DEK_FIELD]).dek_id
    back = home.decrypt(out.records)
    assert back.status == [CURRENT, CORRUPT, CURRENT, CORRUPT, CURRENT]
    assert back.plain == [records[0], records[2], records[4]]
    assert FORGED not in plain_values(back) and "attacker@example.com" not in plain_values(back)


# --------------------------------------------------------------------------- writes against the contract


def retyped(name: str, avro_type: Any) -> dict[str, Any]:
    return {**PLAIN, "fields": [{**f, "type": avro_type} if f["name"] == name else f for f in PLAIN["fields"]]}


@pytest.mark.parametrize(
    "schema, fields, bind",
    [
        (PLAIN, ["ssn"], BIND),
        (PLAIN, ["ssn", "email", "region"], BIND),
        (PLAIN, ["ssn", "email"], []),
        (PLAIN, ["ssn", "email"], ["region"]),
        (retyped("ssn", ["null", "string"]), FIELDS, BIND),
        (retyped("ssn", "bytes"), FIELDS, BIND),
        (without_field(PLAIN, "email"), ["ssn"], BIND),
    ],
    ids=["fewer_fields", "more_fields", "no_bind", "other_bind", "nullable_type", "other_type", "field_missing"],
)
def test_a_write_that_breaks_the_contract_is_refused_before_any_kms_call(home, schema, fields, bind):
    names = {f["name"] for f in schema["fields"]}
    records = [{k: v for k, v in r.items() if k in names} for r in sample()]
    with home.scope() as scope:
        with pytest.raises(ContractError):
            encrypt_records(records, schema, fields, scope, bind_fields=bind, contract=home.contract)
    assert home.kms.calls.total == 0
    assert home.registry.dek_count() == 0


def test_a_contract_of_another_codec_is_refused(home):
    arrow = dataclasses.replace(home.contract, codec="arrow")
    with home.scope() as scope, pytest.raises(ContractError):
        encrypt_records(sample(), PLAIN, FIELDS, scope, bind_fields=BIND, contract=arrow)
    assert home.kms.calls.total == 0
    sealed = home.encrypt(sample())
    with pytest.raises(ContractError):
        home.decrypt(sealed, contract=arrow)


def test_a_write_in_another_field_order_encrypts_exactly_the_contract(home):
    records = sample()
    with home.scope() as scope:
        sealed = encrypt_records(records, PLAIN, ["email", "ssn"], scope, bind_fields=["id"], contract=home.contract)
    assert all(isinstance(r["ssn"], bytes) for r in sealed)
    assert all(r["region"] == s["region"] for r, s in zip(records, sealed))
    # bound to id: a cell moved to another record does not authenticate
    swapped = [{**sealed[0], "ssn": sealed[1]["ssn"]}, *sealed[1:]]
    result = home.decrypt(swapped)
    assert result.status == [CORRUPT, CURRENT, CURRENT, CURRENT]
    assert result.plain == records[1:]

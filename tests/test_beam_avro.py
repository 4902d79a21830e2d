"""EncryptRecords, DecryptRecords and ReencryptRecords (Avro records, one per element) on the DirectRunner.

The Avro transforms run the same DoFns as the Arrow ones, so these tests
check what is Avro-specific and the accounting that differs when every
element is a single record: one DEK per partition scope however many
records it holds, one unwrap per distinct DEK per bundle on decrypt, one
KMS ReEncrypt per distinct DEK per bundle on rewrap.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import apache_beam as beam
import fastavro
import pytest

from keyturn.errors import VersionInUseError
from apache_beam.testing.util import assert_that, equal_to

from beam_support import (
    DATASET,
    batch_pipeline,
    counters,
    key_source,  # noqa: F401  (fixture)
    matches,
    read_jsonl,
    force_retire,
    retire,
    rotate,
    run_pipeline,
    write_jsonl,
)
from keyturn import avro_codec
from keyturn.audit.events import AuditEvent, QuarantineRecord, VersionMismatchEvent
from keyturn.format import parse_envelope
from keyturn.scope import DekScope, KekRef, Location
from keyturn.transforms.avro import DecryptRecords, EncryptRecords, ReencryptRecords

pytestmark = pytest.mark.beam

PARTS = ("p1", "p2")
FIELDS = ("email", "card")
SCHEMA = {
    "type": "record",
    "name": "Sale",
    "namespace": "keyturn.tests",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "region", "type": ["null", "string"], "default": None},
        {"name": "email", "type": ["null", "string"], "default": None},
        {"name": "card", "type": ["null", "bytes"], "default": None},
        {"name": "amount", "type": ["null", "double"], "default": None},
    ],
}
ENCRYPTED_SCHEMA = avro_codec.derive_encrypted_schema(SCHEMA, FIELDS)


def sample_records(n: int, *, start: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """`(partition, record)` with ids start..start+n-1, partitions alternating, some sensitive values null."""
    return [
        (
            PARTS[i % len(PARTS)],
            {
                "id": i,
                "region": None if i % 7 == 0 else "eu",
                "email": None if i % 5 == 3 else f"user{i}@example.com",
                "card": None if i % 11 == 4 else f"4111-{i:08d}".encode(),
                "amount": None if i % 13 == 6 else i * 1.25,
            },
        )
        for i in range(start, start + n)
    ]


def view(element: tuple[str, dict[str, Any]]) -> tuple[Any, ...]:
    partition, record = element
    return (partition, *(record.get(f["name"]) for f in SCHEMA["fields"]))


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$b": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$b"}:
            return base64.b64decode(value["$b"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def encrypt_with_beam(source: Any, records: list, workdir) -> list[tuple[str, dict[str, Any]]]:
    """EncryptRecords on the batch runner; the encrypted records read back, sorted by id."""

    def build(p: beam.Pipeline) -> None:
        enc = p | beam.Create(records) | EncryptRecords(source, DATASET, SCHEMA, FIELDS)
        write_jsonl(enc.main | beam.Map(lambda kv: json.dumps([kv[0], _to_json(kv[1])])), workdir / "enc", "Write")

    run_pipeline(build)
    out = [json.loads(line) for line in read_jsonl(workdir / "enc")]
    return sorted(((p, _from_json(r)) for p, r in out), key=lambda kv: kv[1]["id"])


def encrypt_unknown(source: Any, records: list, partition: str) -> list[tuple[str, dict[str, Any]]]:
    """Records sealed under key "version 99" (envelope and version agree): well formed, unknown to the registry."""
    kms = source.open_kms()
    try:
        with DekScope(kms, KekRef(99, "kek-1"), Location(DATASET, partition)) as scope:
            sealed = avro_codec.encrypt_records([r for _, r in records], SCHEMA, FIELDS, scope)
    finally:
        kms.close()
    return [(partition, r) for r in sealed]


def mismatch_view(element: tuple[dict[str, Any], list[dict[str, Any]]]) -> tuple[Any, ...]:
    event, records = element
    VersionMismatchEvent.from_dict(event)
    return (
        event["reason"],
        event["partition"],
        event["found_version"],
        event["current_version"],
        event["rows"],
        tuple(r["id"] for r in records),
    )


def quarantined_records(record: dict[str, Any]) -> list[dict[str, Any]]:
    QuarantineRecord.from_dict(record)
    assert record["payload_format"] == "avro"
    return list(fastavro.reader(io.BytesIO(record["payload"])))


# --------------------------------------------------------------------------- round trip


def test_encrypt_then_decrypt_records_round_trip_with_one_dek_per_scope(key_source):
    records = sample_records(20)
    per_part = {p: sum(1 for q, _ in records if q == p) for p in PARTS}

    def check_audit(events: list[dict[str, Any]]) -> None:
        for e in events:
            AuditEvent.from_dict(e)
        enc = sorted(
            (e["partition"], e["counts"]["rows"], e["counts"]["deks"]) for e in events if e["action"] == "encrypt"
        )
        dec = sorted(
            (e["partition"], e["counts"]["current"], e["counts"]["unwraps"]) for e in events if e["action"] == "decrypt"
        )
        assert enc == [(p, per_part[p], 1) for p in PARTS]  # one DEK for all of a partition's records in the bundle
        assert dec == [(p, per_part[p], 1) for p in PARTS]  # one unwrap per distinct DEK per bundle
        assert len({e["event_id"] for e in events}) == len(events)

    def sealed(element: tuple[str, dict[str, Any]]) -> tuple[Any, ...]:
        partition, record = element
        return (
            partition,
            record["id"],
            all(record[f] is None or isinstance(record[f], bytes) for f in FIELDS),
            record["email"] is None or b"@example.com" not in record["email"],
            record[avro_codec.VERSION_FIELD],
        )

    with batch_pipeline() as p:
        enc = p | beam.Create(records) | "Encrypt" >> EncryptRecords(key_source, DATASET, SCHEMA, FIELDS)
        dec = enc.main | "Decrypt" >> DecryptRecords(key_source, DATASET, ENCRYPTED_SCHEMA)
        assert_that(
            enc.main | "Sealed" >> beam.Map(sealed),
            equal_to([(q, r["id"], True, True, 1) for q, r in records]),
            label="Sealed",
        )
        assert_that(dec.main | "Plain" >> beam.Map(view), equal_to([view(e) for e in records]), label="PlainBack")
        for name, outputs in (("Enc", enc), ("Dec", dec)):
            assert_that(outputs.version_mismatch, equal_to([]), label=f"{name}Mismatch")
            assert_that(outputs.quarantine, equal_to([]), label=f"{name}Quarantine")
        assert_that((enc.audit, dec.audit) | beam.Flatten(), matches(check_audit), label="Audit")
    c = counters(p.result)
    assert c["deks_generated"] == len(PARTS)
    assert c["kms_calls"] == 2 * len(PARTS)
    assert c["rows_encrypted"] == c["rows_decrypted"] == len(records)


# --------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("mode", ["rewrap", "reencrypt"])
def test_reencrypt_records_after_rotation(key_source, tmp_path, mode):
    records = sample_records(16)
    encrypted = encrypt_with_beam(key_source, records, tmp_path)
    rotate(key_source)
    before = {r["id"]: r for _, r in encrypted}

    def moved(element: tuple[str, dict[str, Any]]) -> tuple[Any, ...]:
        partition, record = element
        old = before[record["id"]]
        same_cells = all(record[f] == old[f] for f in FIELDS)
        fresh_cells = all(
            (old[f] is None) == (record[f] is None) and (old[f] is None or old[f] != record[f]) for f in FIELDS
        )
        same_dek = (
            parse_envelope(record[avro_codec.DEK_FIELD]).dek_id == parse_envelope(old[avro_codec.DEK_FIELD]).dek_id
        )
        return (
            partition,
            record["id"],
            record[avro_codec.VERSION_FIELD],
            same_cells if mode == "rewrap" else fresh_cells,
            same_dek,
        )

    def check_audit(events: list[dict[str, Any]]) -> None:
        for e in events:
            assert (e["action"], e["version_from"], e["version_to"]) == (mode, 1, 2)
            assert e["counts"]["stale"] == e["counts"]["rows"]
            # One KMS call per distinct DEK per bundle, not one per record.
            key = "rewrapped_deks" if mode == "rewrap" else "deks"
            assert e["counts"][key] == 1
            assert len(e["kms_request_ids"]) == (1 if mode == "rewrap" else 2)
        assert sorted(e["partition"] for e in events) == list(PARTS)

    with batch_pipeline() as p:
        out = p | beam.Create(encrypted) | ReencryptRecords(key_source, DATASET, ENCRYPTED_SCHEMA, mode=mode)
        dec = out.main | DecryptRecords(key_source, DATASET, ENCRYPTED_SCHEMA)
        assert_that(
            out.main | "Moved" >> beam.Map(moved),
            # rewrap moves the DEK's directory entry and passes the record through (birth version 1)
            equal_to([(q, r["id"], 1 if mode == "rewrap" else 2, True, mode == "rewrap") for q, r in records]),
            label="Moved",
        )
        assert_that(out.version_mismatch, equal_to([]), label="NoMismatch")
        assert_that(out.quarantine, equal_to([]), label="NoQuarantine")
        assert_that(out.audit, matches(check_audit), label="Audit")
        assert_that(dec.main | "Plain" >> beam.Map(view), equal_to([view(e) for e in records]), label="PlainBack")
        assert_that(
            dec.audit
            | "Current"
            >> beam.Map(
                lambda e: (e["partition"], e["counts"]["current"] == e["counts"]["rows"], e["counts"]["unwraps"])
            ),
            equal_to([(q, True, 1) for q in PARTS]),
            label="AllCurrent",
        )


# --------------------------------------------------------------------------- every reason, every row accounted for


@pytest.mark.parametrize("stale_to_main", [True, False], ids=["stale_to_main", "stale_to_side_only"])
def test_decrypt_records_routes_every_kind_of_bad_record(key_source, tmp_path, stale_to_main):
    records = sample_records(24)
    encrypted = encrypt_with_beam(key_source, records, tmp_path)
    rotate(key_source)  # everything encrypted so far is stale
    fresh = encrypt_with_beam(key_source, sample_records(6, start=100), tmp_path / "v2")  # current
    unknown = encrypt_unknown(key_source, sample_records(3, start=200), "p1")
    missing = [("p2", {**encrypted[1][1], avro_codec.VERSION_FIELD: None})]
    flipped = dict(encrypted[2][1])
    flipped["email"] = flipped["email"][:-1] + bytes([flipped["email"][-1] ^ 1])
    tampered = [(encrypted[2][0], flipped)]
    stale = [e for e in encrypted if e[1]["id"] not in (1, 2)]
    inputs = stale + fresh + unknown + missing + tampered

    plain = dict((r["id"], (q, r)) for q, r in records + sample_records(6, start=100))
    expected_main = sorted(view(plain[r["id"]]) for _, r in fresh + (stale if stale_to_main else []))
    expected_mismatch = sorted(
        [("stale", q, 1, 2, 1, (r["id"],)) for q, r in stale]
        + [("unknown", "p1", 99, 2, 1, (r["id"],)) for _, r in unknown]
        + [("missing", "p2", None, 2, 1, (1,))]
    )

    def check_quarantine(items: list[dict[str, Any]]) -> None:
        assert len(items) == 1 and items[0]["reason"] == "corrupt" and items[0]["rows"] == 1
        assert quarantined_records(items[0]) == [flipped]  # the original bytes, exactly

    def every_record_once(ids: list[int]) -> None:
        assert sorted(ids) == sorted(r["id"] for _, r in inputs)

    with batch_pipeline() as p:
        dec = (
            p | beam.Create(inputs) | DecryptRecords(key_source, DATASET, ENCRYPTED_SCHEMA, stale_to_main=stale_to_main)
        )
        assert_that(dec.main | "Plain" >> beam.Map(view), equal_to(expected_main), label="Main")
        assert_that(
            dec.version_mismatch | "Mm" >> beam.Map(mismatch_view), equal_to(expected_mismatch), label="Mismatch"
        )
        assert_that(dec.quarantine, matches(check_quarantine), label="Quarantine")
        main_ids = dec.main | "MainIds" >> beam.Map(lambda kv: kv[1]["id"])
        side_ids = dec.version_mismatch | "MmIds" >> beam.FlatMap(lambda ev: [r["id"] for r in ev[1]])
        q_ids = dec.quarantine | "QIds" >> beam.FlatMap(lambda q: [r["id"] for r in quarantined_records(q)])
        # Stale records are in main AND version_mismatch when stale_to_main: count them once.
        accounted = (
            (
                main_ids
                | "NotStale"
                >> beam.Filter(lambda i, stale_ids: i not in stale_ids, stale_ids={r["id"] for _, r in stale}),
                side_ids,
                q_ids,
            )
            if stale_to_main
            else (main_ids, side_ids, q_ids)
        )
        assert_that(accounted | beam.Flatten(), matches(every_record_once), label="NothingDropped")
    c = counters(p.result)
    assert (
        c["rows_stale"] == len(stale) and c["rows_unknown"] == 3 and c["rows_missing"] == 1 and c["rows_corrupt"] == 1
    )


def test_decrypt_records_refuses_a_version_retired_behind_the_registrys_back(key_source, tmp_path):
    records = sample_records(8)
    encrypted = encrypt_with_beam(key_source, records, tmp_path)
    rotate(key_source)
    with pytest.raises(VersionInUseError):  # the DEK directory still holds the data's DEKs under version 1
        retire(key_source, 1)
    force_retire(key_source, 1)  # retired behind the registry's back: readers must still refuse the data
    with batch_pipeline() as p:
        dec = p | beam.Create(encrypted) | DecryptRecords(key_source, DATASET, ENCRYPTED_SCHEMA)
        assert_that(dec.main, equal_to([]), label="NothingDecrypted")
        assert_that(
            dec.version_mismatch | beam.Map(mismatch_view),
            equal_to([("retired", q, 1, 2, 1, (r["id"],)) for q, r in encrypted]),
            label="Retired",
        )
        assert_that(
            dec.audit | beam.Map(lambda e: (e["partition"], e["counts"]["retired"], e["counts"]["unwraps"])),
            equal_to([("p1", 4, 0), ("p2", 4, 0)]),
            label="Audit",
        )
    assert counters(p.result).get("kms_calls", 0) == 0

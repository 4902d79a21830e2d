"""EncryptBatches, DecryptBatches and ReencryptBatches on the DirectRunner, every output checked.

Every pipeline runs against a real key home in `tmp_path` (root key file,
LocalKms keystore, SQLite registry; see `beam_support`) on the DirectRunner's
in-process batch engine, the FnApiRunner (pinned: see `beam_support`).
Batches are compared as sorted Python rows inside the pipeline, so
`equal_to` never depends on how rows were split into batches. Pickling a
record batch fails in every test here (`no_batch_pickling`), so every
pipeline also proves that batches travel as Arrow IPC only.

Scopes and bundles: a DEK scope is one partition within one bundle. The
in-process runner runs each fused stage's input, here a small
`beam.Create`, as one bundle, so each partition is one scope. Tests that
depend on that assert it (one audit event per partition) rather than assume
it; the accounting tests check the relationship scopes <-> KMS calls that
holds whatever the bundling.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pytest

from keyturn.errors import VersionInUseError
from apache_beam.runners import pipeline_context
from apache_beam.testing.util import assert_that, equal_to

from beam_support import (
    DATASET,
    SCHEMA,
    SENSITIVE,
    LedgerKeySource,
    batch_pipeline,
    counters,
    encrypt_direct,
    encrypt_with_beam,
    first_id,
    flatten_rows,
    key_source,  # noqa: F401  (fixture)
    keyed_batches,
    keyed_from_json,
    keyed_rows,
    keyed_to_json,
    matches,
    no_batch_pickling,  # noqa: F401  (fixture: pickling a RecordBatch fails in every test here)
    read_jsonl,
    read_ledger,
    force_retire,
    open_registry,
    retire,
    rotate,
    rows_of,
    run_pipeline,
    sample_batch,
    tamper_cells,
    with_version,
    write_jsonl,
)
from keyturn import arrow_codec
from keyturn.audit.events import AuditEvent, QuarantineRecord, VersionMismatchEvent
from keyturn.format import parse_envelope
from keyturn.ipc import batch_from_ipc, batch_to_ipc
from keyturn.scope import ScopeLimits
from keyturn.transforms.arrow import DecryptBatches, EncryptBatches, ReencryptBatches
from keyturn.transforms.coders import RecordBatchCoder

pytestmark = [pytest.mark.beam, pytest.mark.usefixtures("no_batch_pickling")]

PARTS = ("p1", "p2", "p3")
ALL_STATUSES = ("corrupt", "current", "missing", "retired", "stale", "unknown")


# --------------------------------------------------------------------------- helpers


def plain_cells_and_bytes(batches: Sequence[pa.RecordBatch]) -> tuple[int, int]:
    """Non-null sensitive cells and their plaintext bytes (what an encrypt scope counts)."""
    cells = nbytes = 0
    for b in batches:
        for email in b.column("email").to_pylist():
            if email is not None:
                cells += 1
                nbytes += len(email.encode("utf-8"))
        for card in b.column("card").to_pylist():
            if card is not None:
                cells += 1
                nbytes += len(card)
    return cells, nbytes


def status_counts(rows: int, **statuses: int) -> dict[str, int]:
    """Decrypt audit counts: every status present, `rows`, plus `statuses` (and `unwraps`)."""
    counts = {s: 0 for s in ALL_STATUSES}
    counts["rows"] = rows
    counts.update(statuses)
    return counts


def audit_view(event: dict[str, Any]) -> tuple[Any, ...]:
    """What an audit event says, minus the time, the actor and the KMS request ids."""
    return (
        event["action"],
        event["partition"],
        event["version_from"],
        event["version_to"],
        tuple(sorted(event["counts"].items())),
    )


def mismatch_view(element: tuple[dict[str, Any], pa.RecordBatch]) -> tuple[Any, ...]:
    event, rows = element
    VersionMismatchEvent.from_dict(event)  # schema-valid
    return (
        event["reason"],
        event["partition"],
        event["found_version"],
        event["current_version"],
        event["rows"],
        tuple(rows_of(rows)),
    )


def quarantine_view(record: dict[str, Any]) -> tuple[Any, ...]:
    QuarantineRecord.from_dict(record)  # schema-valid
    payload = batch_from_ipc(record["payload"])
    return (record["reason"], record["partition"], record["payload_format"], record["rows"], tuple(rows_of(payload)))


def check_audit_ids(events: list[dict[str, Any]]) -> None:
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids)), f"duplicate audit event ids: {ids}"
    for e in events:
        AuditEvent.from_dict(e)  # schema-valid
        assert all(r.startswith("local-") for r in e["kms_request_ids"]), e["kms_request_ids"]


def envelopes_of(batch: pa.RecordBatch) -> list[bytes]:
    """Each row's DEK envelope bytes."""
    col = batch.column(arrow_codec.DEK_COLUMN)
    dictionary = col.dictionary.to_pylist()
    return [dictionary[i] for i in col.indices.to_pylist()]


def cells_of(batch: pa.RecordBatch) -> list[list[bytes | None]]:
    return [batch.column(c).to_pylist() for c in SENSITIVE]


# --------------------------------------------------------------------------- round trip


def test_encrypt_then_decrypt_gives_back_the_input_and_every_output_is_right(key_source):
    data = keyed_batches(PARTS, 4, 9)
    expected_encrypt_audit = []
    expected_decrypt_audit = []
    for p in PARTS:
        batches = [b for q, b in data if q == p]
        rows = sum(b.num_rows for b in batches)
        cells, nbytes = plain_cells_and_bytes(batches)
        counts = {"bytes": nbytes, "cells": cells, "deks": 1, "rows": rows}
        expected_encrypt_audit.append(("encrypt", p, None, 1, tuple(sorted(counts.items()))))
        dcounts = status_counts(rows, current=rows, unwraps=1)
        expected_decrypt_audit.append(("decrypt", p, 1, None, tuple(sorted(dcounts.items()))))

    def encrypted_view(element: tuple[str, pa.RecordBatch]) -> tuple[Any, ...]:
        partition, batch = element
        return (
            partition,
            tuple(batch.column("id").to_pylist()),
            tuple(arrow_codec.encrypted_columns(batch.schema)),
            tuple(str(batch.schema.field(c).type) for c in SENSITIVE),
            tuple(set(batch.column(arrow_codec.VERSION_COLUMN).to_pylist())),
        )

    expected_encrypted = [
        (p, tuple(b.column("id").to_pylist()), SENSITIVE, ("binary", "binary"), (1,)) for p, b in data
    ]
    emails = [e.encode() for _, b in data for e in b.column("email").to_pylist() if e is not None]
    n_batches = len(data)

    def no_plaintext_in_ciphertext(actual: list[bytes]) -> None:
        blob = b"".join(actual)
        assert len(actual) == n_batches
        assert not [e for e in emails if e in blob], "a plaintext email survives in the encrypted output"

    with batch_pipeline() as p:
        enc = p | "Plain" >> beam.Create(data) | "Encrypt" >> EncryptBatches(key_source, DATASET, SENSITIVE)
        dec = enc.main | "Decrypt" >> DecryptBatches(key_source, DATASET)

        assert_that(enc.main | "EncView" >> beam.Map(encrypted_view), equal_to(expected_encrypted), label="EncMain")
        assert_that(
            enc.main | "EncIpc" >> beam.Map(lambda kv: batch_to_ipc(kv[1])),
            matches(no_plaintext_in_ciphertext),
            label="EncOpaque",
        )
        assert_that(enc.version_mismatch, equal_to([]), label="EncMismatch")
        assert_that(enc.quarantine, equal_to([]), label="EncQuarantine")
        assert_that(
            enc.audit | "EncAudit" >> beam.Map(audit_view), equal_to(expected_encrypt_audit), label="EncAuditView"
        )
        assert_that(enc.audit, matches(check_audit_ids), label="EncAuditIds")

        assert_that(dec.main | "Rows" >> beam.FlatMap(flatten_rows), equal_to(keyed_rows(data)), label="DecRows")
        assert_that(
            dec.main | "Schemas" >> beam.Map(lambda kv: kv[1].schema.equals(SCHEMA, check_metadata=True)),
            equal_to([True] * len(data)),
            label="DecSchemas",
        )
        assert_that(dec.version_mismatch, equal_to([]), label="DecMismatch")
        assert_that(dec.quarantine, equal_to([]), label="DecQuarantine")
        assert_that(
            dec.audit | "DecAudit" >> beam.Map(audit_view), equal_to(expected_decrypt_audit), label="DecAuditView"
        )
        assert_that(dec.audit, matches(check_audit_ids), label="DecAuditIds")

    c = counters(p.result)
    rows = sum(b.num_rows for _, b in data)
    cells, _ = plain_cells_and_bytes([b for _, b in data])
    assert c["rows_encrypted"] == c["rows_decrypted"] == rows
    assert c["cells_encrypted"] == c["cells_decrypted"] == cells
    assert c["deks_generated"] == len(PARTS)


# --------------------------------------------------------------------------- rotation: rewrap and re-encrypt


@pytest.mark.parametrize("mode", ["rewrap", "reencrypt"])
def test_reencrypt_after_rotation_moves_every_row_to_the_new_version(key_source, tmp_path, mode):
    data = keyed_batches(PARTS, 3, 8)
    encrypted = encrypt_with_beam(key_source, data, tmp_path / "v1")
    assert rotate(key_source) == 2
    before = {first_id(e): batch_to_ipc(e[1]) for e in encrypted}  # closures hold bytes: batches are never pickled
    envelopes_per_partition = {p: len({env for q, b in encrypted if q == p for env in envelopes_of(b)}) for p in PARTS}

    def moved(element: tuple[str, pa.RecordBatch]) -> tuple[Any, ...]:
        partition, batch = element
        old = batch_from_ipc(before[first_id(element)])
        old_cells, new_cells = cells_of(old), cells_of(batch)
        pairs = [pair for cols in zip(old_cells, new_cells, strict=True) for pair in zip(*cols, strict=True)]
        old_ids = {parse_envelope(e).dek_id for e in envelopes_of(old)}
        new_envs = [parse_envelope(e) for e in envelopes_of(batch)]
        return (
            partition,
            tuple(batch.column("id").to_pylist()),
            tuple(set(batch.column(arrow_codec.VERSION_COLUMN).to_pylist())),
            tuple({e.key_version for e in new_envs}),
            tuple({e.kek_id for e in new_envs}),
            "same dek" if {e.dek_id for e in new_envs} == old_ids else "fresh dek",
            "cells identical"
            if all(a == b for a, b in pairs)
            else (
                "cells all differ"
                if all((a is None) == (b is None) and (a is None or a != b) for a, b in pairs)
                else "mixed"
            ),
        )

    # rewrap moves the DEKs' directory entries onto version 2 and passes every row through byte for byte
    # (its own, birth envelope under version 1); reencrypt gives the rows fresh DEKs under version 2
    expected_moved = [
        (
            p,
            tuple(b.column("id").to_pylist()),
            (1,) if mode == "rewrap" else (2,),
            (1,) if mode == "rewrap" else (2,),
            ("kek-1",) if mode == "rewrap" else ("kek-2",),
            "same dek" if mode == "rewrap" else "fresh dek",
            "cells identical" if mode == "rewrap" else "cells all differ",
        )
        for p, b in encrypted
    ]
    expected_audit = []
    for p in PARTS:
        rows = sum(b.num_rows for q, b in data if q == p)
        expected_audit.append((mode, p, 1, 2, rows))
    expected_decrypt_audit = [
        (
            "decrypt",
            p,
            2,
            None,
            tuple(
                sorted(
                    status_counts(
                        sum(b.num_rows for q, b in data if q == p),
                        current=sum(b.num_rows for q, b in data if q == p),
                        unwraps=1,
                    ).items()
                )
            ),
        )
        for p in PARTS
    ]

    def check_reencrypt_audit(events: list[dict[str, Any]]) -> None:
        check_audit_ids(events)
        assert (
            sorted(
                (e["action"], e["partition"], e["version_from"], e["version_to"], e["counts"]["rows"]) for e in events
            )
            == expected_audit
        )
        for e in events:
            assert e["counts"]["stale"] == e["counts"]["rows"]
            assert e["counts"]["current"] == e["counts"]["corrupt"] == 0
            if mode == "rewrap":  # one KMS ReEncrypt per distinct stale DEK, nothing generated
                assert e["counts"]["rewrapped_deks"] == envelopes_per_partition[e["partition"]]
                assert len(e["kms_request_ids"]) == envelopes_per_partition[e["partition"]]
                assert "deks" not in e["counts"]
            else:  # one fresh DEK per scope, plus one unwrap per distinct stale DEK
                assert e["counts"]["deks"] == 1
                assert len(e["kms_request_ids"]) == 1 + envelopes_per_partition[e["partition"]]

    with batch_pipeline() as p:
        out = (
            p | "Encrypted" >> beam.Create(encrypted) | "Reencrypt" >> ReencryptBatches(key_source, DATASET, mode=mode)
        )
        dec = out.main | "Decrypt" >> DecryptBatches(key_source, DATASET)
        assert_that(out.main | "Moved" >> beam.Map(moved), equal_to(expected_moved), label="Moved")
        assert_that(out.version_mismatch, equal_to([]), label="ReMismatch")
        assert_that(out.quarantine, equal_to([]), label="ReQuarantine")
        assert_that(out.audit, matches(check_reencrypt_audit), label="ReAudit")
        assert_that(dec.main | "Rows" >> beam.FlatMap(flatten_rows), equal_to(keyed_rows(data)), label="PlainBack")
        assert_that(dec.version_mismatch, equal_to([]), label="NothingStale")
        assert_that(dec.quarantine, equal_to([]), label="DecQuarantine")
        assert_that(
            dec.audit | "DecAudit" >> beam.Map(audit_view), equal_to(expected_decrypt_audit), label="AllCurrent"
        )
    if mode == "rewrap":  # every DEK the data names is now wrapped under version 2, in the directory
        assert open_registry(key_source).deks_by_version() == {2: sum(envelopes_per_partition.values())}

    c = counters(p.result)
    distinct = sum(envelopes_per_partition.values())
    if mode == "rewrap":
        assert c.get("deks_generated", 0) == 0
        assert c["kms_calls"] == distinct + len(PARTS)  # rewraps + the decrypt's unwraps of the rewrapped DEKs
    else:
        assert c["deks_generated"] == len(PARTS)
        assert c["kms_calls"] == distinct + len(PARTS) + len(PARTS)  # unwraps + fresh DEKs + decrypt's unwraps


@pytest.mark.parametrize("mode", ["rewrap", "reencrypt"])
def test_reencrypt_keeps_unreadable_rows_unchanged_and_reports_them(key_source, tmp_path, mode):
    data = keyed_batches(["p1"], 3, 6) + keyed_batches(["p2"], 1, 6, start=100)
    encrypted = {first_id(e): e for e in encrypt_with_beam(key_source, data, tmp_path / "v1")}
    rotate(key_source)
    stale = encrypted[("p1", 0)]
    unknown = ("p1", encrypt_direct(key_source, data[1][1], "p1", version=99))
    tampered = ("p1", tamper_cells(encrypted[("p1", 12)][1], [0, 2]))  # cells flipped; envelope intact
    moved = ("p1", encrypted[("p2", 100)][1])  # bound to p2: its DEK does not open under p1
    inputs = [stale, unknown, tampered, moved]
    before = {first_id(e): batch_to_ipc(e[1]) for e in inputs}  # closures hold bytes: batches are never pickled

    def view(element: tuple[str, pa.RecordBatch]) -> tuple[Any, ...]:
        partition, batch = element
        old = batch_from_ipc(before[first_id(element)])
        return (
            partition,
            first_id(element)[1],
            batch.equals(old),
            tuple(batch.column(arrow_codec.VERSION_COLUMN).to_pylist()),
        )

    # Rewrap never reads cells and never changes a row: it moves the DEKs' directory entries, and every
    # row passes through byte for byte (tampered cells fail at decrypt).
    # Re-encryption reads them: those rows are kept as they were and quarantined.
    if mode == "rewrap":
        stale_view = ("p1", 0, True, (1,) * 6)
        tampered_view = ("p1", 12, True, (1,) * 6)
        quarantined = [("corrupt", "p1", "arrow_ipc", 6, tuple(rows_of(moved[1])))]
        counts = {"rows": 24, "stale": 12, "unknown": 6, "corrupt": 6, "current": 0}
    else:
        stale_view = ("p1", 0, False, (2,) * 6)
        tampered_view = ("p1", 12, False, (1, 2, 1, 2, 2, 2))
        quarantined = [
            ("corrupt", "p1", "arrow_ipc", 2, tuple(rows_of(tampered[1].take(pa.array([0, 2]))))),
            ("corrupt", "p1", "arrow_ipc", 6, tuple(rows_of(moved[1]))),
        ]
        counts = {"rows": 24, "stale": 10, "unknown": 6, "corrupt": 8, "current": 0}
    readable_after = [data[0], ("p1", data[2][1].take(pa.array([1, 3, 4, 5])))]

    with batch_pipeline() as p:
        out = p | beam.Create(inputs) | ReencryptBatches(key_source, DATASET, mode=mode)
        assert_that(
            out.main | "View" >> beam.Map(view),
            equal_to(
                [stale_view, ("p1", 6, True, (99,) * 6), tampered_view, ("p1", 100, True, (1,) * 6)]
            ),
            label="EveryRowKept",
        )
        assert_that(
            out.version_mismatch | "Mm" >> beam.Map(mismatch_view),
            equal_to([("unknown", "p1", 99, 2, 6, tuple(rows_of(unknown[1])))]),
            label="UnknownReported",
        )
        assert_that(
            out.quarantine | "Q" >> beam.Map(quarantine_view), equal_to(quarantined), label="CorruptQuarantined"
        )
        assert_that(
            out.audit | "A" >> beam.Map(lambda e: {k: e["counts"][k] for k in counts}),
            equal_to([counts]),
            label="Audit",
        )
        # Reading the result back: only the good rows come out in clear, nothing else is lost.
        dec = out.main | "Decrypt" >> DecryptBatches(key_source, DATASET)
        assert_that(
            dec.main | "Rows" >> beam.FlatMap(flatten_rows), equal_to(keyed_rows(readable_after)), label="GoodRows"
        )
        assert_that(
            dec.quarantine | "DecQ" >> beam.FlatMap(lambda r: batch_from_ipc(r["payload"]).column("id").to_pylist()),
            equal_to([12, 14] + list(range(100, 106))),
            label="BadRowsQuarantinedAtRead",
        )
        assert_that(
            dec.version_mismatch | "DecMm" >> beam.Map(lambda ev: (ev[0]["reason"], ev[0]["rows"])),
            equal_to([("unknown", 6)]),
            label="UnknownStillReported",
        )


# --------------------------------------------------------------------------- decrypt: version mismatch reasons


@pytest.mark.parametrize("stale_to_main", [True, False], ids=["stale_to_main", "stale_to_side_only"])
def test_decrypt_reports_stale_rows(key_source, tmp_path, stale_to_main):
    data = keyed_batches(PARTS, 2, 7)
    encrypted = encrypt_with_beam(key_source, data, tmp_path / "v1")
    rotate(key_source)
    expected_mismatch = [("stale", p, 1, 2, b.num_rows, tuple(rows_of(b))) for p, b in encrypted]
    expected_audit = []
    for p in PARTS:
        rows = sum(b.num_rows for q, b in data if q == p)
        expected_audit.append(
            ("decrypt", p, 1, None, tuple(sorted(status_counts(rows, stale=rows, unwraps=1).items())))
        )

    with batch_pipeline() as p:
        dec = p | beam.Create(encrypted) | DecryptBatches(key_source, DATASET, stale_to_main=stale_to_main)
        assert_that(
            dec.main | "Rows" >> beam.FlatMap(flatten_rows),
            equal_to(keyed_rows(data) if stale_to_main else []),
            label="Main",
        )
        assert_that(dec.version_mismatch | "Mm" >> beam.Map(mismatch_view), equal_to(expected_mismatch), label="Stale")
        assert_that(dec.quarantine, equal_to([]), label="Quarantine")
        assert_that(dec.audit | "A" >> beam.Map(audit_view), equal_to(expected_audit), label="Audit")

    c = counters(p.result)
    total = sum(b.num_rows for _, b in data)
    assert c["rows_stale"] == total
    assert c["rows_decrypted"] == total  # stale rows are readable either way; only routing differs


def test_decrypt_refuses_rows_of_a_version_retired_behind_the_registrys_back(key_source, tmp_path):
    data = keyed_batches(PARTS, 2, 5)
    encrypted = encrypt_with_beam(key_source, data, tmp_path / "v1")
    rotate(key_source)
    with pytest.raises(VersionInUseError):  # the DEK directory still holds the data's DEKs under version 1
        retire(key_source, 1)
    force_retire(key_source, 1)  # retired behind the registry's back: readers must still refuse the data
    expected_mismatch = [("retired", p, 1, 2, b.num_rows, tuple(rows_of(b))) for p, b in encrypted]
    expected_audit = []
    for p in PARTS:
        rows = sum(b.num_rows for q, b in data if q == p)
        expected_audit.append(
            ("decrypt", p, None, None, tuple(sorted(status_counts(rows, retired=rows, unwraps=0).items())))
        )

    with batch_pipeline() as p:
        dec = p | beam.Create(encrypted) | DecryptBatches(key_source, DATASET)
        assert_that(dec.main, equal_to([]), label="NothingDecrypted")
        assert_that(
            dec.version_mismatch | "Mm" >> beam.Map(mismatch_view), equal_to(expected_mismatch), label="Retired"
        )
        assert_that(dec.quarantine, equal_to([]), label="Quarantine")
        assert_that(dec.audit | "A" >> beam.Map(audit_view), equal_to(expected_audit), label="Audit")

    c = counters(p.result)
    assert c["rows_retired"] == sum(b.num_rows for _, b in data)
    assert c.get("kms_calls", 0) == 0 and c.get("rows_decrypted", 0) == 0


def test_decrypt_reports_unknown_versions(key_source, tmp_path):
    data = keyed_batches(["p1", "p2"], 2, 6)
    encrypted = encrypt_with_beam(key_source, data, tmp_path / "v1")
    # Batch 0 of p2 re-encrypted under "version 99": version column and envelope agree, and the
    # wrapped DEK is bound to version 99, so it is well formed, just not in this registry.
    crafted = encrypt_direct(key_source, data[1][1], "p2", version=99)
    assert set(crafted.column(arrow_codec.VERSION_COLUMN).to_pylist()) == {99}
    assert {parse_envelope(e).key_version for e in envelopes_of(crafted)} == {99}
    inputs = [e for e in encrypted if first_id(e) != ("p2", 6)] + [("p2", crafted)]
    readable = [(p, b) for p, b in data if (p, b.column("id")[0].as_py()) != ("p2", 6)]

    with batch_pipeline() as p:
        dec = p | beam.Create(inputs) | DecryptBatches(key_source, DATASET)
        assert_that(dec.main | "Rows" >> beam.FlatMap(flatten_rows), equal_to(keyed_rows(readable)), label="Main")
        assert_that(
            dec.version_mismatch | "Mm" >> beam.Map(mismatch_view),
            equal_to([("unknown", "p2", 99, 1, 6, tuple(rows_of(crafted)))]),
            label="Unknown",
        )
        assert_that(dec.quarantine, equal_to([]), label="Quarantine")
        assert_that(
            dec.audit | "A" >> beam.Map(audit_view),
            equal_to(
                [
                    ("decrypt", "p1", 1, None, tuple(sorted(status_counts(12, current=12, unwraps=1).items()))),
                    (
                        "decrypt",
                        "p2",
                        1,
                        None,
                        tuple(sorted(status_counts(12, current=6, unknown=6, unwraps=1).items())),
                    ),
                ]
            ),
            label="Audit",
        )
    assert counters(p.result)["rows_unknown"] == 6


def test_decrypt_reports_missing_version_metadata(key_source, tmp_path):
    data = keyed_batches(["p1"], 4, 5)
    encrypted = encrypt_with_beam(key_source, data, tmp_path / "v1")
    no_version = ("p1", with_version(encrypted[0][1], None))
    no_envelope = ("p1", with_version(encrypted[1][1], 1, drop_envelope=True))
    never_encrypted = data[2]  # a plain batch: no keyturn columns at all
    inputs = [no_version, no_envelope, never_encrypted, encrypted[3]]

    with batch_pipeline() as p:
        dec = p | beam.Create(inputs) | DecryptBatches(key_source, DATASET)
        assert_that(dec.main | "Rows" >> beam.FlatMap(flatten_rows), equal_to(keyed_rows([data[3]])), label="Main")
        assert_that(
            dec.version_mismatch | "Mm" >> beam.Map(mismatch_view),
            equal_to([("missing", "p1", None, 1, 5, tuple(rows_of(b))) for _, b in inputs[:3]]),
            label="Missing",
        )
        assert_that(dec.quarantine, equal_to([]), label="Quarantine")
        assert_that(
            dec.audit | "A" >> beam.Map(audit_view),
            equal_to(
                [("decrypt", "p1", 1, None, tuple(sorted(status_counts(20, current=5, missing=15, unwraps=1).items())))]
            ),
            label="Audit",
        )
    assert counters(p.result)["rows_missing"] == 15


def test_decrypt_quarantines_tampered_rows_with_their_original_bytes(key_source, tmp_path):
    data = keyed_batches(["p1", "p2"], 2, 8)
    encrypted = encrypt_with_beam(key_source, data, tmp_path / "v1")
    by_id = {first_id(e): e for e in encrypted}
    cell_flip = ("p1", tamper_cells(by_id[("p1", 0)][1], [1, 2, 6]))
    moved = ("p2", by_id[("p1", 16)][1])  # a p1 batch relabelled as p2: bound to p1, fails everywhere else

    def bad_commitment(batch: pa.RecordBatch) -> pa.RecordBatch:
        col = batch.column(arrow_codec.DEK_COLUMN)
        envs = col.dictionary.to_pylist()
        kek_len = len(parse_envelope(envs[0]).kek_id.encode())
        at = 24 + kek_len + 3  # a byte of the key commitment
        envs = [e[:at] + bytes([e[at] ^ 0x80]) + e[at + 1 :] for e in envs]
        arrays = list(batch.columns)
        arrays[batch.schema.get_field_index(arrow_codec.DEK_COLUMN)] = pa.DictionaryArray.from_arrays(
            col.indices, pa.array(envs, pa.binary())
        )
        return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)

    commitment = ("p2", bad_commitment(by_id[("p2", 8)][1]))
    intact = by_id[("p2", 24)]
    inputs = [cell_flip, moved, commitment, intact]

    expected_quarantine = [
        ("corrupt", "p1", "arrow_ipc", 3, tuple(rows_of(cell_flip[1].take(pa.array([1, 2, 6]))))),
        ("corrupt", "p2", "arrow_ipc", 8, tuple(rows_of(moved[1]))),
        ("corrupt", "p2", "arrow_ipc", 8, tuple(rows_of(commitment[1]))),
    ]
    plain_p1 = data[0][1]
    readable = [("p1", plain_p1.take(pa.array([0, 3, 4, 5, 7]))), data[3]]

    flipped_rows = batch_to_ipc(cell_flip[1].take(pa.array([1, 2, 6])))
    input_schema = cell_flip[1].schema

    def payload_is_exact(records: list[dict[str, Any]]) -> None:
        assert len(records) == 3
        originals = {r["partition"] + str(r["rows"]): r for r in records}
        flipped = batch_from_ipc(originals["p13"]["payload"])
        assert flipped.equals(batch_from_ipc(flipped_rows)), "quarantine payload differs from the input rows"
        assert flipped.schema.equals(input_schema, check_metadata=True)

    with batch_pipeline() as p:
        dec = p | beam.Create(inputs) | DecryptBatches(key_source, DATASET)
        assert_that(dec.main | "Rows" >> beam.FlatMap(flatten_rows), equal_to(keyed_rows(readable)), label="Main")
        assert_that(dec.version_mismatch, equal_to([]), label="Mismatch")
        assert_that(
            dec.quarantine | "Q" >> beam.Map(quarantine_view), equal_to(expected_quarantine), label="Quarantine"
        )
        assert_that(dec.quarantine, matches(payload_is_exact), label="ExactPayload")
        assert_that(
            dec.audit
            | "A"
            >> beam.Map(
                lambda e: (e["partition"], e["counts"]["rows"], e["counts"]["current"], e["counts"]["corrupt"])
            ),
            equal_to([("p1", 8, 5, 3), ("p2", 24, 8, 16)]),
            label="Audit",
        )
    assert counters(p.result)["rows_corrupt"] == 3 + 8 + 8


# --------------------------------------------------------------------------- DEK scope accounting


def _run_encrypt(
    source: Any, data: list, workdir, **kwargs: Any
) -> tuple[dict[str, int], list[dict], list[tuple[str, pa.RecordBatch]]]:
    def build(p: beam.Pipeline) -> None:
        out = p | "Plain" >> beam.Create(data) | "Encrypt" >> EncryptBatches(source, DATASET, SENSITIVE, **kwargs)
        write_jsonl(out.main | "MainJson" >> beam.Map(keyed_to_json), workdir / "main", "WriteMain")
        write_jsonl(out.audit | "AuditJson" >> beam.Map(json.dumps), workdir / "audit", "WriteAudit")

    result = run_pipeline(build)
    audit = [json.loads(line) for line in read_jsonl(workdir / "audit")]
    main = [keyed_from_json(line) for line in read_jsonl(workdir / "main")]
    return counters(result), audit, main


def test_one_kms_data_key_call_per_partition_scope(key_source, tmp_path):
    data = keyed_batches(PARTS, 5, 8)
    c, audit, main = _run_encrypt(key_source, data, tmp_path)
    # One audit event per scope; each scope made exactly one GenerateDataKey call.
    assert len(audit) == c["deks_generated"] == c["kms_calls"] == sum(e["counts"]["deks"] for e in audit)
    assert all(e["counts"]["deks"] == 1 and len(e["kms_request_ids"]) == 1 for e in audit)
    # The DirectRunner ran the Create as one bundle, so scopes == partitions (not batches).
    assert sorted(e["partition"] for e in audit) == list(PARTS)
    assert c["deks_generated"] < len(data)
    # Each DEK is an envelope in the output, and all batches of a partition share it.
    envelopes = {env for _, b in main for env in envelopes_of(b)}
    assert len(envelopes) == c["deks_generated"]
    for part in PARTS:
        assert len({env for q, b in main if q == part for env in envelopes_of(b)}) == 1


def test_dek_caps_take_fresh_keys_and_every_call_is_counted(key_source, tmp_path):
    data = keyed_batches(PARTS, 5, 8)
    c, audit, main = _run_encrypt(key_source, data, tmp_path, limits=ScopeLimits(max_cells=20))
    cells_per_envelope: Counter[bytes] = Counter()
    for _, b in main:
        envs = envelopes_of(b)
        for col in cells_of(b):
            for i, cell in enumerate(col):
                if cell is not None:
                    cells_per_envelope[envs[i]] += 1
    assert max(cells_per_envelope.values()) <= 20
    assert len(audit) == len(PARTS)
    assert c["deks_generated"] == c["kms_calls"] == sum(e["counts"]["deks"] for e in audit) == len(cells_per_envelope)
    assert c["deks_generated"] > len(audit)  # caps forced fresh DEKs inside a scope
    for e in audit:
        assert len(e["kms_request_ids"]) == e["counts"]["deks"]


def test_decrypt_unwraps_each_distinct_dek_once_per_bundle(key_source, tmp_path):
    data = keyed_batches(PARTS, 5, 8)
    _, _, encrypted = _run_encrypt(key_source, data, tmp_path / "enc", limits=ScopeLimits(max_cells=40))
    distinct = {p: {env for q, b in encrypted if q == p for env in envelopes_of(b)} for p in PARTS}
    assert all(len(envs) > 1 for envs in distinct.values())  # several DEKs per partition, each over several batches

    def build(p: beam.Pipeline) -> None:
        dec = p | beam.Create(encrypted) | DecryptBatches(key_source, DATASET)
        write_jsonl(dec.audit | beam.Map(json.dumps), tmp_path / "dec" / "audit", "WriteAudit")

    c = counters(run_pipeline(build))
    audit = [json.loads(line) for line in read_jsonl(tmp_path / "dec" / "audit")]
    assert sorted(e["partition"] for e in audit) == list(PARTS)  # one bundle: one scope per partition
    for e in audit:
        assert e["counts"]["unwraps"] == len(distinct[e["partition"]]) == len(e["kms_request_ids"])
    assert c["kms_calls"] == sum(len(v) for v in distinct.values()) < sum(b.num_rows for _, b in encrypted)
    assert c.get("deks_generated", 0) == 0


# --------------------------------------------------------------------------- bundle retries


def test_retried_bundles_take_fresh_deks_and_repeat_audit_ids(key_source, tmp_path):
    """A bundle that fails and is retried must not change the output, the audit ids, or reuse a DEK.

    Beam's Python FnApiRunner (the DirectRunner here) does not retry a bundle
    that raises: the pipeline fails. So "the first attempt fails" is modelled
    with `direct_runner_bundle_repeat=1`: every bundle first runs once as a
    dry run whose outputs (main, side outputs, metrics) are thrown away, then
    for real. That is exactly what a failed-then-retried bundle looks like
    from outside: the side effects of the first attempt happened (KMS calls,
    recorded here by the KMS itself in a call log, like a cloud KMS audit
    trail), its outputs are gone. A DoFn after the audit outputs writes every
    event id it sees to a file, so it sees both attempts, as a
    non-transactional sink would.

    Audit ids are derived from each scope's input. Encrypt events hash the
    plaintext's public part; decrypt events hash the ciphertext, which is
    fresh in every run, so the decrypt compared across runs reads the same
    pre-encrypted input in both.
    """
    data = keyed_batches(PARTS, 4, 6)
    pre_encrypted = encrypt_with_beam(key_source, data, tmp_path / "pre")

    class RecordIds(beam.DoFn):
        def __init__(self, path: str) -> None:
            self.path = path

        def process(self, event: dict) -> Any:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(event["event_id"] + "\n")
            yield event["event_id"]

    def row_json(row: tuple) -> str:
        return json.dumps([x.hex() if isinstance(x, bytes) else x for x in row])

    def run(name: str, **options: Any) -> dict[str, Any]:
        work = tmp_path / name
        work.mkdir()
        source = LedgerKeySource(key_source, str(work / "kms-calls.log"))
        seen = str(work / "ids-seen.txt")

        def build(p: beam.Pipeline) -> None:
            enc = p | "Plain" >> beam.Create(data) | "Encrypt" >> EncryptBatches(source, DATASET, SENSITIVE)
            dec = p | "Sealed" >> beam.Create(pre_encrypted) | "Decrypt" >> DecryptBatches(source, DATASET)
            back = enc.main | "RoundTrip" >> DecryptBatches(source, DATASET)
            events = (enc.audit, dec.audit) | "Events" >> beam.Flatten()
            write_jsonl(events | beam.ParDo(RecordIds(seen)), work / "ids", "WriteIds")
            write_jsonl(
                dec.main | "Rows" >> beam.FlatMap(flatten_rows) | "RowJson" >> beam.Map(row_json),
                work / "rows",
                "WriteRows",
            )
            write_jsonl(
                back.main | "BackRows" >> beam.FlatMap(flatten_rows) | "BackJson" >> beam.Map(row_json),
                work / "back",
                "WriteBack",
            )
            write_jsonl(enc.main | "EncJson" >> beam.Map(keyed_to_json), work / "enc", "WriteEnc")

        c = counters(run_pipeline(build, **options))
        with open(seen, encoding="utf-8") as fh:
            ids_seen = fh.read().split()
        return {
            "counters": c,
            "calls": read_ledger(work / "kms-calls.log"),
            "ids": read_jsonl(work / "ids"),
            "seen": ids_seen,
            "rows": sorted(read_jsonl(work / "rows")),
            "back": sorted(read_jsonl(work / "back")),
            "enc": [keyed_from_json(line) for line in read_jsonl(work / "enc")],
        }

    clean = run("clean")
    retry = run("retried", direct_runner_bundle_repeat=1)
    expected_rows = sorted(row_json(r) for r in keyed_rows(data))

    # Output: exactly the fault-free output, every row once.
    assert retry["rows"] == clean["rows"] == expected_rows
    assert retry["back"] == clean["back"] == expected_rows
    # Audit: the same deterministic ids as the fault-free run, no duplicates in the output...
    assert sorted(retry["ids"]) == sorted(clean["ids"])
    assert len(retry["ids"]) == len(set(retry["ids"])) == 2 * len(PARTS)
    # ...and the discarded attempt produced exactly the same ids, so a sink can drop the repeats.
    assert Counter(retry["seen"]) == Counter({i: 2 for i in retry["ids"]})
    assert Counter(clean["seen"]) == Counter({i: 1 for i in clean["ids"]})
    # Beam's committed metrics count only the committed attempt.
    assert retry["counters"] == clean["counters"]
    # The KMS saw every attempt: twice the GenerateDataKey calls, and never the same DEK twice.
    clean_gen = [dek for op, _, dek in clean["calls"] if op == "generate"]
    retry_gen = [dek for op, _, dek in retry["calls"] if op == "generate"]
    assert len(clean_gen) == clean["counters"]["deks_generated"] == len(PARTS)
    assert len(retry_gen) > clean["counters"]["deks_generated"]
    assert len(retry_gen) == 2 * len(clean_gen)
    assert len(set(retry_gen)) == len(retry_gen), "a retried bundle reused a DEK"
    kept = {parse_envelope(env).dek_id.hex() for _, b in retry["enc"] for env in envelopes_of(b)}
    assert kept < set(retry_gen)  # the output uses one attempt's DEKs; the other attempt's were thrown away
    assert len(kept) == len(clean_gen)
    assert {parse_envelope(env).dek_id.hex() for _, b in clean["enc"] for env in envelopes_of(b)} == set(clean_gen)
    # Unwraps were repeated too (same DEKs, so nothing new is exposed by a retry).
    assert sum(op == "decrypt" for op, _, _ in retry["calls"]) == 2 * sum(
        op == "decrypt" for op, _, _ in clean["calls"]
    )


# --------------------------------------------------------------------------- bad data at scale


def test_bad_data_is_routed_exactly_and_nothing_is_dropped(key_source, tmp_path):
    parts = ("a", "b", "c", "d")
    data = keyed_batches(parts, 50, 5)  # 200 batches, 1000 rows
    assert len(data) == 200
    encrypted = encrypt_with_beam(key_source, data, tmp_path / "v1")
    plain_by_id = {first_id(e): e for e in data}
    keys = [first_id(e) for e in data]
    unknown_keys = [keys[37], keys[150]]  # 1%: re-encrypted under an unknown version
    tampered_keys = [keys[61], keys[199]]  # 1%: cells flipped in some rows
    tampered_rows = {tampered_keys[0]: [0, 2], tampered_keys[1]: [1, 4]}
    inputs = []
    for element in encrypted:
        key = first_id(element)
        if key in unknown_keys:
            inputs.append((key[0], encrypt_direct(key_source, plain_by_id[key][1], key[0], version=99)))
        elif key in tampered_keys:
            inputs.append((key[0], tamper_cells(element[1], tampered_rows[key])))
        else:
            inputs.append(element)
    all_ids = sorted(i for _, b in data for i in b.column("id").to_pylist())
    unknown_ids = sorted(i for k in unknown_keys for i in plain_by_id[k][1].column("id").to_pylist())
    quarantined_ids = sorted(k[1] + r for k in tampered_keys for r in tampered_rows[k])

    def ids(batch: pa.RecordBatch) -> list[int]:
        return batch.column("id").to_pylist()

    with batch_pipeline() as p:
        dec = p | beam.Create(inputs) | DecryptBatches(key_source, DATASET)
        main_ids = dec.main | "MainIds" >> beam.FlatMap(lambda kv: ids(kv[1]))
        mismatch_ids = dec.version_mismatch | "MmIds" >> beam.FlatMap(lambda ev: ids(ev[1]))
        quarantine_ids = dec.quarantine | "QIds" >> beam.FlatMap(lambda r: ids(batch_from_ipc(r["payload"])))
        assert_that(mismatch_ids, equal_to(unknown_ids), label="ExactlyTheUnknown")
        assert_that(quarantine_ids, equal_to(quarantined_ids), label="ExactlyTheTampered")
        assert_that(
            dec.version_mismatch
            | "Reasons" >> beam.Map(lambda ev: (ev[0]["reason"], ev[0]["found_version"], ev[0]["rows"])),
            equal_to([("unknown", 99, 5)] * 2),
            label="Reasons",
        )
        assert_that(
            dec.quarantine | "QRows" >> beam.Map(lambda r: (r["reason"], r["rows"])),
            equal_to([("corrupt", 2)] * 2),
            label="QRows",
        )
        everything = (main_ids, mismatch_ids, quarantine_ids) | "All" >> beam.Flatten()
        assert_that(everything, equal_to(all_ids), label="EveryRowExactlyOnce")
        assert_that(
            dec.audit | "Rows" >> beam.Map(lambda e: e["counts"]["rows"]) | beam.CombineGlobally(sum),
            equal_to([1000]),
            label="AuditCountsEveryRow",
        )

    c = counters(p.result)
    assert c["rows_decrypted"] == 1000 - len(unknown_ids) - len(quarantined_ids)
    assert c["rows_unknown"] == len(unknown_ids) and c["rows_corrupt"] == len(quarantined_ids)


# --------------------------------------------------------------------------- coders


def _batches_for_coding() -> list[pa.RecordBatch]:
    nested = pa.RecordBatch.from_pydict(
        {
            "tags": pa.array([["a", "b"], None, []], pa.list_(pa.string())),
            "kind": pa.array(["x", "y", "x"]).dictionary_encode(),
            "point": pa.array([{"x": 1, "y": 2.5}, None, {"x": 3, "y": None}]),
        }
    )
    empty = sample_batch(0)
    return [sample_batch(17), nested, empty, sample_batch(1, start=5)]


@pytest.mark.parametrize("batch", _batches_for_coding(), ids=["sample", "nested", "empty", "one_row"])
def test_record_batch_coder_round_trips(batch):
    coder = RecordBatchCoder()
    decoded = coder.decode(coder.encode(batch))
    assert decoded.equals(batch) and decoded.schema.equals(batch.schema, check_metadata=True)
    assert beam.coders.registry.get_coder(pa.RecordBatch) == coder
    assert coder.is_deterministic()


def test_record_batch_coder_round_trips_encrypted_batches(key_source):
    encrypted = encrypt_direct(key_source, sample_batch(12), "p1", version=1)
    coder = RecordBatchCoder()
    decoded = coder.decode(coder.encode(encrypted))
    assert decoded.equals(encrypted)
    assert decoded.schema.equals(encrypted.schema, check_metadata=True)  # field metadata (plain field, bind list) kept


def test_record_batch_coder_is_deterministic_for_equal_batches():
    coder = RecordBatchCoder()
    big = sample_batch(64)
    for start, length in [(0, 8), (3, 11), (9, 1), (13, 30), (57, 7), (0, 64)]:
        sliced = big.slice(start, length)
        fresh = sample_batch(length, start=start)
        copied = pa.Table.from_batches([sliced]).combine_chunks().to_batches()[0]
        taken = big.take(pa.array(range(start, start + length)))
        assert sliced.equals(fresh)
        encodings = {coder.encode(b) for b in (sliced, fresh, copied, taken)}
        assert len(encodings) == 1, f"slice({start}, {length}) encodes differently from an equal copy"
    # A validity bitmap with no nulls encodes like no bitmap at all.
    with_bitmap = pa.array([1, 2, None, 4], pa.int64()).slice(0, 2)
    without = pa.array([1, 2], pa.int64())
    assert coder.encode(pa.RecordBatch.from_arrays([with_bitmap], ["v"])) == coder.encode(
        pa.RecordBatch.from_arrays([without], ["v"])
    )
    with pytest.raises(TypeError):
        coder.encode(pa.table({"v": [1]}))


def _coder_of(pipeline_proto, context, pcoll) -> beam.coders.Coder:
    """The coder the portable pipeline proto assigns to `pcoll`, rebuilt from the proto alone."""
    pcoll_id = context.pcollections.get_id(pcoll)
    coder_id = pipeline_proto.components.pcollections[pcoll_id].coder_id
    return pipeline_context.PipelineContext(pipeline_proto.components).coders.get_by_id(coder_id)


def test_batches_travel_with_the_arrow_coder_never_pickle(key_source):
    from keyturn.transforms.partition import PartitionBatches

    p = beam.Pipeline()
    keyed = p | beam.Create(keyed_batches(PARTS, 1, 3))
    enc = keyed | "Encrypt" >> EncryptBatches(key_source, DATASET, SENSITIVE)
    dec = enc.main | "Decrypt" >> DecryptBatches(key_source, DATASET)
    re = enc.main | "Reencrypt" >> ReencryptBatches(key_source, DATASET)
    grouped = keyed | "Group" >> PartitionBatches(max_rows=10)
    proto, context = p.to_runner_api(return_context=True)

    keyed_coder = beam.coders.TupleCoder([beam.coders.StrUtf8Coder(), RecordBatchCoder()])
    for pcoll in (keyed, enc.main, dec.main, re.main, grouped):
        assert _coder_of(proto, context, pcoll) == keyed_coder
        pcoll_id = context.pcollections.get_id(pcoll)
        spec = proto.components.coders[proto.components.pcollections[pcoll_id].coder_id]
        assert spec.spec.urn == "beam:coder:kv:v1"
        assert proto.components.coders[spec.component_coder_ids[0]].spec.urn == "beam:coder:string_utf8:v1"
    for pcoll in (enc.version_mismatch, dec.version_mismatch, re.version_mismatch):
        coder = _coder_of(proto, context, pcoll)
        assert isinstance(coder, beam.coders.TupleCoder)
        assert coder.coders()[1] == RecordBatchCoder()

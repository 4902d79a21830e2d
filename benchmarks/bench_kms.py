"""Benchmark: KMS economics, calls per 1M records, counted at a local KMS that records them.

keyturn: `records` records (the cells benchmark's data, `id` + one sensitive
string column) in `partitions` partitions of equal size, each partition
encrypted in one `DekScope` (one DEK per partition scope) with
`encrypt_batch` in batches of `batch_rows`, all on one
`CountingKms(LocalKms.in_memory(...))`. Every GenerateDataKey call the
scopes make is counted at the KMS.

Per-record approach (what a per-record envelope tool such as the AWS
Encryption SDK without a cache does): one GenerateDataKey per record. It is
counted by really calling `LocalKms.generate_data_key` once per record,
through the same `CountingKms`, on the first `per_record_subset` records
(each call also seals the record with its DEK), and extrapolated linearly to
`records` (the calls are independent, so the count scales exactly; the time
is measured). If `per_record_subset >= records` nothing is extrapolated.
"""

from __future__ import annotations

import os
import time
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.bench_cells import COLUMN, KEK_ID, SEED, make_batch
from keyturn.arrow_codec import encrypt_batch
from keyturn.kms.base import CountingKms
from keyturn.kms.local import LocalKms
from keyturn.scope import DekScope, KekRef, Location

__all__ = ["run", "TARGET_FRACTION"]

TARGET_FRACTION = 1 / 10_000  # keyturn calls over per-record calls


def run(
    *,
    records: int = 1_000_000,
    partitions: int = 10,
    batch_rows: int = 10_000,
    per_record_subset: int = 100_000,
    seed: int = SEED,
) -> dict[str, Any]:
    batch = make_batch(records, seed)
    kms = CountingKms(LocalKms.in_memory({KEK_ID: os.urandom(32)}))
    kek = KekRef(1, KEK_ID)
    per_partition = -(-records // partitions)

    t0 = time.perf_counter()
    rows_done = 0
    calls_by_partition: dict[str, int] = {}
    for p in range(partitions):
        part = batch.slice(p * per_partition, per_partition)
        before = kms.calls.generate
        with DekScope(kms, kek, Location("bench", f"p{p}")) as scope:
            for start in range(0, part.num_rows, batch_rows):
                rows_done += encrypt_batch(part.slice(start, batch_rows), [COLUMN], scope).num_rows
        calls_by_partition[f"p{p}"] = kms.calls.generate - before
    keyturn_s = time.perf_counter() - t0
    if rows_done != records:
        raise AssertionError(f"encrypted {rows_done} rows, expected {records}")
    keyturn_calls = sum(calls_by_partition.values())

    subset = min(per_record_subset, records)
    values = batch.column(COLUMN).slice(0, subset).to_pylist()
    naive = CountingKms(LocalKms.in_memory({KEK_ID: os.urandom(32)}))
    nonce = bytes(12)
    t0 = time.perf_counter()
    sealed = 0
    for i, v in enumerate(values):
        key = naive.generate_data_key(KEK_ID, {"dataset": "bench", "record": str(i)})
        AESGCM(key.plaintext.material).encrypt(nonce, v.encode(), None)
        sealed += 1
    naive_s = time.perf_counter() - t0
    measured_calls = naive.calls.generate
    if measured_calls != subset or sealed != subset:
        raise AssertionError("per-record count mismatch")
    scale = records / subset
    per_record_calls = measured_calls * scale
    keyturn_per_1m = keyturn_calls * 1_000_000 / records
    per_record_per_1m = per_record_calls * 1_000_000 / records
    fraction = keyturn_per_1m / per_record_per_1m
    return {
        "name": "kms",
        "params": {
            "records": records,
            "partitions": partitions,
            "batch_rows": batch_rows,
            "scopes_per_partition": 1,
            "per_record_subset": subset,
            "extrapolated": subset < records,
            "seed": seed,
            "kms": "CountingKms(LocalKms.in_memory)",
        },
        "keyturn": {
            "calls": keyturn_calls,
            "calls_by_partition": calls_by_partition,
            "calls_per_1m_records": keyturn_per_1m,
            "seconds": round(keyturn_s, 3),
        },
        "per_record": {
            "calls_measured": measured_calls,
            "records_measured": subset,
            "calls_per_1m_records": per_record_per_1m,
            "seconds_measured": round(naive_s, 3),
            "seconds_extrapolated": round(naive_s * scale, 3),
            "us_per_call": round(naive_s / subset * 1e6, 2),
        },
        "fraction": fraction,
        "reduction": per_record_per_1m / keyturn_per_1m if keyturn_per_1m else None,
        "target_fraction": TARGET_FRACTION,
        "met": fraction <= TARGET_FRACTION,
    }

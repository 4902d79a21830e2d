"""Benchmark 1: cells per second of `encrypt_batch` / `decrypt_batch` against bare AES-GCM.

Data: one record batch of `rows` rows with an `id` int64 column (left in
clear) and a `value` string column (encrypted) of random ASCII alphanumeric
strings, 16 to 32 bytes each (uniform), no nulls, from a fixed seed.

Subject (encrypt): one `DekScope` on `CountingKms(LocalKms.in_memory(...))`
with default caps, `encrypt_batch(batch, ["value"], scope)`; the timed run
includes opening the scope, its one GenerateDataKey call, the Arrow -> bytes
conversion, sealing, and building the encrypted record batch.

Baseline (encrypt): the practical per-cell limit in Python: one `AESGCM`
object (random 256-bit key), a list comprehension that calls
`encrypt(i.to_bytes(12, "big"), value, aad)` once per value, with a fixed
100-byte AAD (random bytes, made once; about the size of keyturn's per-column
cell AAD), collecting the ciphertexts in a list. Its input is the same
values, already a Python list of `bytes` (made before timing).

Subject (decrypt): a fresh `DekReader` (one KMS Decrypt call) and
`decrypt_batch` of the encrypted batch (classification, envelope checks,
cell decryption, rebuilding the Arrow column). Baseline (decrypt): a list
comprehension calling `decrypt(nonce, ciphertext, aad)` on the baseline's own
ciphertexts, with nonces and ciphertexts already in separate lists.

Targets: keyturn at >= 0.85 of the baseline's cells/s, for both.

Native rows: where the native kernel is loaded (`keyturn.native`), the same
subjects run a second time on it (``KEYTURN_NATIVE=1``; the `keyturn` rows
force the pure-Python path with ``KEYTURN_NATIVE=0``), round-robin in the
same rounds as the Python rows and the baselines. Targets: native
`encrypt_batch` and `decrypt_batch` at >= 5x the baseline's cells/s.

Profiles: keyturn calls AES-GCM through `map` (C calling C), which cProfile
does not see as calls; that time is the own time of the one function that
maps them (`DekScope._seal_part`, `OpenedDek.open_many`), which does nothing
else per cell, and is counted as AES-GCM in `aes_gcm_share`.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.common import measure_rounds, profile_share, profile_top, random_strings, rate, ratio
from keyturn import native
from keyturn.arrow_codec import decrypt_batch, encrypt_batch
from keyturn.kms.base import CountingKms
from keyturn.kms.local import LocalKms
from keyturn.policy import KeyPolicy
from keyturn.reader import DekReader
from keyturn.registry.base import KeyState, KeyVersion
from keyturn.scope import DekScope, KekRef, Location

__all__ = [
    "run",
    "make_batch",
    "DEFAULT_ROWS",
    "QUICK_ROWS",
    "SEED",
    "ENCRYPT_TARGET",
    "DECRYPT_TARGET",
    "NATIVE_ENCRYPT_TARGET",
    "NATIVE_DECRYPT_TARGET",
]

DEFAULT_ROWS = 1_000_000
QUICK_ROWS = 50_000
SEED = 20240601
COLUMN = "value"
MIN_LEN, MAX_LEN = 16, 32
BASELINE_AAD_BYTES = 100
ENCRYPT_TARGET = 0.85  # keyturn cells/s over bare AES-GCM cells/s
DECRYPT_TARGET = 0.85
NATIVE_ENCRYPT_TARGET = 5.0  # native keyturn cells/s over bare AES-GCM cells/s
NATIVE_DECRYPT_TARGET = 5.0
AES_ENCRYPT_MAPPERS = ("(_seal_part)",)  # keyturn functions whose own time is AES-GCM calls made through map
AES_DECRYPT_MAPPERS = ("(open_many)",)
KMS_TARGET_PER_SCOPE = 1
KEK_ID = "bench-kek"


def make_batch(rows: int, seed: int = SEED) -> pa.RecordBatch:
    """`id` (int64) and `value` (string, 16..32 random bytes) columns."""
    rng = np.random.default_rng(seed)
    return pa.record_batch(
        [pa.array(np.arange(rows, dtype=np.int64)), random_strings(rows, rng, MIN_LEN, MAX_LEN)],
        names=["id", COLUMN],
    )


def _policy() -> KeyPolicy:
    now = datetime.now(timezone.utc)
    return KeyPolicy.from_versions(
        [KeyVersion(version=1, kek_id=KEK_ID, state=KeyState.ACTIVE, created_at=now, actor="bench", reason="bench", state_changed_at=now)]
    )


def _on_path(path: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run with ``KEYTURN_NATIVE`` set for `path` ("python" or "native"), restored afterwards."""

    def on_path() -> Any:
        before = os.environ.get(native.ENV_VAR)
        os.environ[native.ENV_VAR] = "1" if path == "native" else "0"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ[native.ENV_VAR]
            else:
                os.environ[native.ENV_VAR] = before

    return on_path


def _native_row(subject: Any, baseline: Any, rows: int, target: float) -> dict[str, Any]:
    r = ratio(subject, baseline)
    return {"timing": subject.to_dict(), "cells_per_s": rate(rows, subject), "ratio": r.to_dict(), "target": target, "met": r.median >= target}


def _direction(timings: dict[str, Any], rows: int, target: float, native_target: float | None) -> dict[str, Any]:
    """One direction's figures: keyturn against the baseline, and the native row when `native_target` is given."""
    r = ratio(timings["keyturn"], timings["baseline"])
    return {
        "keyturn": timings["keyturn"].to_dict(),
        "baseline": timings["baseline"].to_dict(),
        "keyturn_cells_per_s": rate(rows, timings["keyturn"]),
        "baseline_cells_per_s": rate(rows, timings["baseline"]),
        "ratio": r.to_dict(),
        "target": target,
        "met": r.median >= target,
        "native": None if native_target is None else _native_row(timings["native"], timings["baseline"], rows, native_target),
    }


def run(*, rows: int = DEFAULT_ROWS, runs: int = 5, warmup: int = 1, seed: int = SEED, profile: bool = True) -> dict[str, Any]:
    """Run the cells benchmark; return a JSON-able result (see BENCHMARKS.md for the fields)."""
    batch = make_batch(rows, seed)
    kms = CountingKms(LocalKms.in_memory({KEK_ID: os.urandom(32)}))
    kek = KekRef(1, KEK_ID)
    location = Location("bench", "p0")
    policy = _policy()

    # -- encrypt -----------------------------------------------------------
    generate_calls: list[int] = []

    def any_encrypt() -> pa.RecordBatch:
        before = kms.calls.generate
        with DekScope(kms, kek, location) as scope:
            out = encrypt_batch(batch, [COLUMN], scope)
        generate_calls.append(kms.calls.generate - before)
        return out

    has_native = native.kernel_loaded()
    keyturn_encrypt = _on_path("python", any_encrypt)
    encrypts = {"keyturn": keyturn_encrypt, "baseline": None}
    if has_native:
        encrypts["native"] = _on_path("native", any_encrypt)

    values: list[bytes] = batch.column(COLUMN).cast(pa.binary()).to_pylist()
    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    aad = os.urandom(BASELINE_AAD_BYTES)

    def bare_encrypt() -> list[bytes]:
        encrypt = aead.encrypt
        return [encrypt(i.to_bytes(12, "big"), v, aad) for i, v in enumerate(values)]

    def check_encrypt(name: str, result: Any) -> None:
        n = len(result) if name == "baseline" else result.num_rows
        if n != rows:
            raise AssertionError(f"{name} encrypt returned {n} rows, expected {rows}")

    encrypts["baseline"] = bare_encrypt
    enc = measure_rounds(encrypts, runs=runs, warmup=warmup, check=check_encrypt)

    # -- decrypt -----------------------------------------------------------
    encrypted = keyturn_encrypt()
    generate_calls.pop()
    nonces = [i.to_bytes(12, "big") for i in range(rows)]
    ciphertexts = bare_encrypt()
    decrypt_calls: list[int] = []
    expected = batch.column(COLUMN)

    def any_decrypt() -> Any:
        before = kms.calls.decrypt
        with DekReader(kms) as reader:
            out = decrypt_batch(encrypted, reader, policy, location)
        decrypt_calls.append(kms.calls.decrypt - before)
        return out

    keyturn_decrypt = _on_path("python", any_decrypt)
    decrypts = {"keyturn": keyturn_decrypt, "baseline": None}
    if has_native:
        decrypts["native"] = _on_path("native", any_decrypt)

    def bare_decrypt() -> list[bytes]:
        decrypt = aead.decrypt
        return [decrypt(n, c, aad) for n, c in zip(nonces, ciphertexts)]

    def check_decrypt(name: str, result: Any) -> None:
        if name != "baseline":
            if result.plain.num_rows != rows or not result.plain.column(COLUMN).equals(expected):
                raise AssertionError("keyturn decrypt did not return the original values")
        elif len(result) != rows:
            raise AssertionError("bare decrypt returned the wrong number of values")

    decrypts["baseline"] = bare_decrypt
    dec = measure_rounds(decrypts, runs=runs, warmup=warmup, check=check_decrypt)

    # -- profile (untimed) ---------------------------------------------------
    profiles: dict[str, Any] = {}
    if profile:
        mark = len(generate_calls)
        prof = profile_top(keyturn_encrypt, repeat=3)
        del generate_calls[mark:]
        is_aes = lambda label: "AESGCM" in label and "encrypt" in label  # noqa: E731
        is_mapped = lambda label: label.startswith("keyturn") and label.endswith(AES_ENCRYPT_MAPPERS)  # noqa: E731
        profiles["encrypt_batch"] = {
            "total_s": prof["total_s"],
            "top": prof["top"],
            "aes_gcm_share": profile_share(prof, lambda label: is_aes(label) or is_mapped(label)),
            "keyturn_python_share": profile_share(prof, lambda label: label.startswith("keyturn") and not is_mapped(label)),
        }
        prof = profile_top(bare_encrypt, repeat=3, top=5)
        profiles["bare_encrypt"] = {
            "total_s": prof["total_s"],
            "top": prof["top"],
            "aes_gcm_share": profile_share(prof, is_aes),
        }
        mark = len(decrypt_calls)
        prof = profile_top(keyturn_decrypt, repeat=2)
        del decrypt_calls[mark:]
        is_mapped = lambda label: label.startswith("keyturn") and label.endswith(AES_DECRYPT_MAPPERS)  # noqa: E731
        profiles["decrypt_batch"] = {
            "total_s": prof["total_s"],
            "top": prof["top"],
            "aes_gcm_share": profile_share(prof, lambda label: ("AESGCM" in label and "decrypt" in label) or is_mapped(label)),
            "keyturn_python_share": profile_share(prof, lambda label: label.startswith("keyturn") and not is_mapped(label)),
        }

    calls_per_run = max(generate_calls) if generate_calls else 0
    return {
        "name": "cells",
        "params": {
            "rows": rows,
            "seed": seed,
            "string_bytes": [MIN_LEN, MAX_LEN],
            "plaintext_bytes": int(sum(len(v) for v in values)),
            "runs": runs,
            "warmup": warmup,
            "baseline_aad_bytes": BASELINE_AAD_BYTES,
            "scope_limits": "default (max_cells=2**32, max_bytes=2**36)",
        },
        "encrypt": _direction(enc, rows, ENCRYPT_TARGET, NATIVE_ENCRYPT_TARGET if has_native else None),
        "decrypt": _direction(dec, rows, DECRYPT_TARGET, NATIVE_DECRYPT_TARGET if has_native else None),
        "kms": {
            "generate_calls_per_encrypt_run": generate_calls,
            "scopes_per_run": 1,
            "calls_per_scope": calls_per_run,
            "calls_per_1m_cells": calls_per_run * 1_000_000 / rows if rows else 0.0,
            "decrypt_calls_per_decrypt_run": decrypt_calls,
            "target_per_scope": KMS_TARGET_PER_SCOPE,
            "met": bool(generate_calls) and all(c == KMS_TARGET_PER_SCOPE for c in generate_calls),
        },
        "profile": profiles,
    }

"""Benchmark: cell encryption against the peers (Google Tink, the AWS Encryption SDK) and the bare AES-GCM loop.

Data: the cells benchmark's batch (`bench_cells.make_batch`): `rows` random
ASCII strings of 16..32 bytes, fixed seed.

Subjects, all on the same values, interleaved round by round:

- keyturn: one `DekScope` on `CountingKms(LocalKms.in_memory(...))` and
  `encrypt_batch(batch, ["value"], scope)` (Arrow in, Arrow out, one KMS call);
  decrypt: a fresh `DekReader` and `decrypt_batch`;
- bare AES-GCM: `AESGCM.encrypt(nonce, value, aad)` per value in a list
  comprehension (the practical per-cell limit in Python), and its decrypt;
- Tink: `tink.aead` with the `AES256_GCM` key template, one primitive,
  `encrypt(value, associated_data)` per value (Tink makes the nonce and adds
  its 5-byte key-id prefix), and `decrypt(ciphertext, associated_data)`;
- AWS Encryption SDK (ESDK): `EncryptionSDKClient(commitment_policy=
  REQUIRE_ENCRYPT_REQUIRE_DECRYPT)` with a raw AES-256 wrapping key
  (`RawMasterKey`, the legacy raw provider: the installed 4.x has no
  `keyrings` module without the optional material-providers library), one
  `encrypt(source=value, ...)` per value, each call a complete ESDK message
  with the default algorithm suite (committing, ECDSA P-384 signed);
  once with the master key directly (a fresh data key per record) and once
  through a `CachingCryptoMaterialsManager` over a `LocalCryptoMaterialsCache`
  (data keys reused; the per-message signature remains). The ESDK costs about
  a millisecond per record, so it runs on the first `esdk_rows` values only
  and is reported as per-cell throughput.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.bench_cells import COLUMN, KEK_ID, SEED, _policy, make_batch
from benchmarks.common import Ratio, Timing, measure_rounds, profile_top, rate
from keyturn.arrow_codec import decrypt_batch, encrypt_batch
from keyturn.kms.base import CountingKms
from keyturn.kms.local import LocalKms
from keyturn.reader import DekReader
from keyturn.scope import DekScope, KekRef, Location

__all__ = ["run", "TARGETS", "DEFAULT_ROWS", "DEFAULT_ESDK_ROWS"]

DEFAULT_ROWS = 1_000_000
DEFAULT_ESDK_ROWS = 2_000
AAD = b"bench|p0|value|string"
# keyturn cells/s over the peer's cells/s (median of per-round ratios)
TARGETS = {"bare_aesgcm": 0.8, "tink": 1.5, "esdk": 500.0}


def _tink_aead() -> Any:
    import tink
    from tink import aead

    aead.register()
    handle = tink.new_keyset_handle(aead.aead_key_templates.AES256_GCM)
    return handle.primitive(aead.Aead)


def _esdk() -> tuple[Any, Any, Any]:
    import aws_encryption_sdk
    from aws_encryption_sdk import CommitmentPolicy
    from aws_encryption_sdk.caches.local import LocalCryptoMaterialsCache
    from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
    from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
    from aws_encryption_sdk.key_providers.raw import RawMasterKey
    from aws_encryption_sdk.materials_managers.caching import CachingCryptoMaterialsManager

    key = RawMasterKey(
        provider_id="bench",
        key_id=b"bench-aes-256",
        wrapping_key=WrappingKey(
            wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
            wrapping_key=os.urandom(32),
            wrapping_key_type=EncryptionKeyType.SYMMETRIC,
        ),
    )
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    cache = LocalCryptoMaterialsCache(capacity=100)
    caching = CachingCryptoMaterialsManager(
        master_key_provider=key, cache=cache, max_age=3600.0, max_messages_encrypted=2**32
    )
    return client, key, caching


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def run(
    *,
    rows: int = DEFAULT_ROWS,
    esdk_rows: int = DEFAULT_ESDK_ROWS,
    runs: int = 5,
    warmup: int = 1,
    seed: int = SEED,
    profile: bool = True,
) -> dict[str, Any]:
    """Cells/s of keyturn, bare AES-GCM, Tink and the ESDK on the same values; JSON-able result."""
    esdk_rows = min(esdk_rows, rows)
    batch = make_batch(rows, seed)
    values: list[bytes] = batch.column(COLUMN).cast(pa.binary()).to_pylist()
    subset = values[:esdk_rows]
    kms = CountingKms(LocalKms.in_memory({KEK_ID: os.urandom(32)}))
    kek = KekRef(1, KEK_ID)
    location = Location("bench", "p0")
    policy = _policy()

    def keyturn_encrypt() -> pa.RecordBatch:
        with DekScope(kms, kek, location) as scope:
            return encrypt_batch(batch, [COLUMN], scope)

    aes = AESGCM(AESGCM.generate_key(bit_length=256))

    def bare_encrypt() -> list[bytes]:
        encrypt = aes.encrypt
        return [encrypt(i.to_bytes(12, "big"), v, AAD) for i, v in enumerate(values)]

    tink_aead = _tink_aead()

    def tink_encrypt() -> list[bytes]:
        encrypt = tink_aead.encrypt
        return [encrypt(v, AAD) for v in values]

    client, master_key, caching = _esdk()

    def esdk_encrypt() -> list[bytes]:
        return [client.encrypt(source=v, key_provider=master_key)[0] for v in subset]

    def esdk_cached_encrypt() -> list[bytes]:
        return [client.encrypt(source=v, materials_manager=caching)[0] for v in subset]

    sizes = {"keyturn": rows, "bare_aesgcm": rows, "tink": rows, "esdk": esdk_rows, "esdk_cached": esdk_rows}

    def check_encrypt(name: str, result: Any) -> None:
        n = result.num_rows if name == "keyturn" else len(result)
        if n != sizes[name]:
            raise AssertionError(f"{name} encrypt returned {n} values, expected {sizes[name]}")

    def measure(fns: tuple[Callable[[], Any], ...], check: Callable[[str, Any], None]) -> dict[str, Timing]:
        # one callable per peer, in the order of `sizes`
        return measure_rounds(dict(zip(sizes, fns)), runs=runs, warmup=warmup, check=check)

    enc = measure((keyturn_encrypt, bare_encrypt, tink_encrypt, esdk_encrypt, esdk_cached_encrypt), check_encrypt)

    # -- decrypt: each side opens its own ciphertexts -------------------------
    encrypted = keyturn_encrypt()
    bare_ct = bare_encrypt()
    nonces = [i.to_bytes(12, "big") for i in range(rows)]
    tink_ct = tink_encrypt()
    esdk_ct = esdk_encrypt()
    esdk_cached_ct = esdk_cached_encrypt()
    expected = batch.column(COLUMN)

    def keyturn_decrypt() -> Any:
        with DekReader(kms) as reader:
            return decrypt_batch(encrypted, reader, policy, location)

    def bare_decrypt() -> list[bytes]:
        decrypt = aes.decrypt
        return [decrypt(n, c, AAD) for n, c in zip(nonces, bare_ct)]

    def tink_decrypt() -> list[bytes]:
        decrypt = tink_aead.decrypt
        return [decrypt(c, AAD) for c in tink_ct]

    def esdk_decrypt() -> list[bytes]:
        return [client.decrypt(source=c, key_provider=master_key)[0] for c in esdk_ct]

    def esdk_cached_decrypt() -> list[bytes]:
        return [client.decrypt(source=c, materials_manager=caching)[0] for c in esdk_cached_ct]

    def check_decrypt(name: str, result: Any) -> None:
        if name == "keyturn":
            if not result.plain.column(COLUMN).equals(expected):
                raise AssertionError("keyturn decrypt did not return the original values")
        elif result != (subset if name.startswith("esdk") else values):
            raise AssertionError(f"{name} decrypt did not return the original values")

    dec = measure((keyturn_decrypt, bare_decrypt, tink_decrypt, esdk_decrypt, esdk_cached_decrypt), check_decrypt)

    def side(timings: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, t in timings.items():
            out[name] = {"timing": t.to_dict(), "cells": sizes[name], "cells_per_s": rate(sizes[name], t)}
        # ratios of throughputs per round: keyturn cells/s over peer cells/s
        k = timings["keyturn"]
        for name, t in timings.items():
            if name == "keyturn":
                continue
            per_round = [(sizes["keyturn"] / ks) / (sizes[name] / ps) for ks, ps in zip(k.runs, t.runs)]
            out[name]["keyturn_ratio"] = Ratio(per_round).to_dict()
        return out

    encrypt = side(enc)
    decrypt = side(dec)
    targets = {}
    for peer, target in TARGETS.items():
        measured = encrypt[peer]["keyturn_ratio"]["median"]
        targets[peer] = {"target": target, "measured": measured, "met": measured >= target}
    targets["esdk_cached"] = {"target": None, "measured": encrypt["esdk_cached"]["keyturn_ratio"]["median"], "met": None}

    profiles: dict[str, Any] = {}
    if profile:
        prof = profile_top(tink_encrypt, repeat=1, top=6)
        profiles["tink_encrypt"] = {"total_s": prof["total_s"], "top": prof["top"]}
        small = subset[: max(1, min(200, len(subset)))]
        prof = profile_top(lambda: [client.encrypt(source=v, key_provider=master_key) for v in small], repeat=1, top=8)
        profiles["esdk_encrypt"] = {"total_s": prof["total_s"], "records": len(small), "top": prof["top"]}

    return {
        "name": "peers",
        "params": {
            "rows": rows,
            "esdk_rows": esdk_rows,
            "seed": seed,
            "string_bytes": [16, 32],
            "runs": runs,
            "warmup": warmup,
            "aad_bytes": len(AAD),
            "tink": f"tink {_version('tink')}, tink.aead AES256_GCM template, encrypt(value, aad) per value",
            "esdk": (
                f"aws-encryption-sdk {_version('aws-encryption-sdk')}, RawMasterKey (AES-256-GCM wrapping), "
                "REQUIRE_ENCRYPT_REQUIRE_DECRYPT, default algorithm suite (committing, ECDSA P-384), one message per value"
            ),
            "esdk_cache": "CachingCryptoMaterialsManager over LocalCryptoMaterialsCache(capacity=100), max_age 3600 s",
        },
        "encrypt": encrypt,
        "decrypt": decrypt,
        "targets": targets,
        "profile": profiles,
    }

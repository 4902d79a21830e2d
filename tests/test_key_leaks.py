"""The plaintext DEK never leaves its scope: a planted canary DEK is never seen outside.

The in-memory LocalKms takes an injectable `random_bytes`; every 32-byte
request is a DEK, so we hand out a known canary value for those. Then we run
encrypt, decrypt, rewrap and re-encrypt with DEBUG logging captured for all
loggers, provoke every failure we can, and search every log record, repr,
str, exception text, pickle and serialized batch for the canary, its derived
cell keys, and the KEK materials, as raw bytes, hex (lower and upper),
base64 (standard and URL-safe, with and without padding) and Python bytes
repr.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import logging
import os
import pickle
import traceback
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keyturn.arrow_codec import DEK_COLUMN, decrypt_batch, encrypt_batch, reencrypt_batch, rewrap_batch
from keyturn.context import encode_context
from keyturn.errors import DecryptionError, ScopeClosedError
from keyturn.format import cell_aad, derive_cell_key, kms_context, parse_envelope
from keyturn.kms.base import CountingKms
from keyturn.kms.local import LocalKms
from keyturn.reader import DekReader
from keyturn.scope import DekScope, KekRef, Location, ScopeLimits
from keyturn.secret import SecretKey

CANARY = hashlib.sha256(b"keyturn canary DEK: must never be seen").digest()
KEKS = {f"kek-{i}": hashlib.sha256(b"canary KEK %d" % i).digest() for i in (1, 2, 3)}
LOCATION = Location("sales", "2024-01-01")


def canary_random(n: int) -> bytes:
    """random_bytes for LocalKms: DEKs (32 bytes) are the canary, nonces stay random."""
    return CANARY if n == 32 else os.urandom(n)


def forms(secret: bytes) -> list[bytes]:
    """Every encoding of `secret` we look for, as bytes."""
    b64 = base64.b64encode(secret)
    url = base64.urlsafe_b64encode(secret)
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        b64,
        b64.rstrip(b"="),
        url,
        url.rstrip(b"="),
        repr(secret)[2:-1].encode(),  # how a bytes value shows inside a repr
    ]


class Scanner:
    """Collects secrets and checks text or bytes for any form of any of them."""

    def __init__(self) -> None:
        self.needles: dict[bytes, str] = {}
        self.checked = 0

    def add(self, secret: bytes, label: str) -> None:
        for i, form in enumerate(forms(secret)):
            self.needles[form] = f"{label} (form {i})"

    def check(self, data: bytes | str, where: str) -> None:
        blob = data.encode("utf-8", "backslashreplace") if isinstance(data, str) else bytes(data)
        for needle, label in self.needles.items():
            assert needle not in blob, f"{label} found in {where}"
        self.checked += 1


def ipc_bytes(batch: pa.RecordBatch) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def parquet_bytes(batch: pa.RecordBatch) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_batches([batch]), sink)
    return sink.getvalue()


def exception_text(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def test_scanner_finds_every_form():
    scanner = Scanner()
    scanner.add(CANARY, "canary")
    for form in forms(CANARY):
        with pytest.raises(AssertionError):
            scanner.check(b"prefix " + form + b" suffix", "self-test")
    with pytest.raises(AssertionError):
        scanner.check(f"SecretKey({CANARY!r})", "self-test repr")
    with pytest.raises(AssertionError):
        scanner.check(f"key={CANARY.hex().upper()}", "self-test str")
    scanner.check(b"nothing here", "self-test clean")


def test_canary_dek_never_leaks(caplog, capsys, make_policy):
    caplog.set_level(logging.DEBUG)  # the root logger: every logger that propagates
    scanner = Scanner()
    scanner.add(CANARY, "plaintext DEK")
    for kek_id, material in KEKS.items():
        scanner.add(material, f"KEK material {kek_id}")

    kms = CountingKms(LocalKms.in_memory(KEKS, random_bytes=canary_random))
    policy_v1 = make_policy(active=1)
    policy_v2 = make_policy(active=2, decrypt_only=[1])
    policy_v3 = make_policy(active=3, decrypt_only=[1, 2])
    plain = pa.record_batch(
        {
            "id": pa.array(range(8), pa.int64()),
            "ssn": [f"{i:03d}-00-0000" for i in range(8)],
            "salary": pa.array([1000.5 * i for i in range(8)]),
            "note": ["n"] * 8,
        }
    )
    objects: list[object] = [kms, kms.inner, kms.calls, policy_v1, policy_v2]
    blobs: dict[str, bytes] = {}
    errors: list[BaseException] = []

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # --- encrypt (several DEKs through a small cap)
        scope = DekScope(kms, KekRef(1, "kek-1"), LOCATION, limits=ScopeLimits(max_cells=6))
        with scope:
            enc = encrypt_batch(plain, ["ssn", "salary"], scope, bind_columns=["id"])
            objects += [scope, scope.stats, scope.limits, scope.kek]
            for exc_type, fn in [(TypeError, pickle.dumps), (TypeError, copy.copy), (TypeError, copy.deepcopy)]:
                with pytest.raises(exc_type) as info:
                    fn(scope)
                errors.append(info.value)
        objects.append(scope)  # closed
        with pytest.raises(ScopeClosedError) as info:
            encrypt_batch(plain, ["ssn"], scope)
        errors.append(info.value)

        envelopes = [parse_envelope(e) for e in enc.column(DEK_COLUMN).dictionary.to_pylist()]
        assert len(envelopes) == 3
        # the test is only meaningful if the canary really is the DEK
        unwrapped = kms.decrypt(
            "kek-1",
            envelopes[0].wrapped_dek,
            kms_context(dataset="sales", partition="2024-01-01", dek_id=envelopes[0].dek_id, key_version=1),
        )
        assert unwrapped.plaintext.material == CANARY
        objects += [unwrapped, unwrapped.plaintext, *envelopes]
        unwrapped.plaintext.wipe()
        with pytest.raises(ValueError) as info:
            unwrapped.plaintext.material
        errors.append(info.value)

        generated = kms.generate_data_key("kek-1", {"purpose": "leak test"})
        objects += [generated, generated.plaintext]
        # (a shallow copy of the holder is harmless: it shares the one SecretKey)
        for target, fns in [(generated, (pickle.dumps, copy.deepcopy)), (generated.plaintext, (pickle.dumps, copy.copy, copy.deepcopy))]:
            for fn in fns:
                with pytest.raises(TypeError) as info:
                    fn(target)
                errors.append(info.value)
        for fn in (pickle.dumps, copy.copy):
            with pytest.raises(TypeError) as info:
                fn(kms.inner)
            errors.append(info.value)

        # --- decrypt, with an opened DEK in hand
        reader = DekReader(kms)
        with reader:
            result = decrypt_batch(enc, reader, policy_v1, LOCATION)
            assert result.plain.equals(plain)
            opened = reader.open(enc.column(DEK_COLUMN).dictionary[0].as_py(), LOCATION)
            objects += [reader, reader.stats, opened, opened.envelope, result]
            for target in (reader, opened):
                for fn in (pickle.dumps, copy.copy, copy.deepcopy):
                    with pytest.raises(TypeError) as info:
                        fn(target)
                    errors.append(info.value)
            # tampered cells, wrong contexts, wrong locations
            cell = enc.column("ssn")[0].as_py()
            aad = encode_context(
                cell_aad(
                    dataset="sales",
                    partition="2024-01-01",
                    field="ssn",
                    dek_id=opened.envelope.dek_id,
                    value_type="arrow:string",
                    bindings={"id": (0).to_bytes(8, "little")},
                )
            )
            assert opened.open_cell(cell, aad) == b"000-00-0000"
            bad_aad = encode_context(
                cell_aad(dataset="sales", partition="x", field="ssn", dek_id=opened.envelope.dek_id, value_type="arrow:string")
            )
            for bad_cell, bad_context in [
                (cell[:-1] + bytes([cell[-1] ^ 1]), aad),
                (cell[:20], aad),
                (cell, bad_aad),
                (b"\x02" + cell[1:], aad),
            ]:
                with pytest.raises(DecryptionError) as info:
                    opened.open_cell(bad_cell, bad_context)
                errors.append(info.value)
            for where in (Location("sales", "2024-01-02"), Location("hr", "2024-01-01")):
                with pytest.raises(DecryptionError) as info:
                    reader.open(enc.column(DEK_COLUMN).dictionary[1].as_py(), where)
                errors.append(info.value)
            with pytest.raises(DecryptionError) as info:
                kms.decrypt("kek-2", envelopes[0].wrapped_dek, {"keyturn:dataset": "sales"})
            errors.append(info.value)
            tampered = decrypt_batch(enc, reader, policy_v1, Location("sales", "elsewhere"))
            assert tampered.counts()["corrupt"] == 8
            objects.append(tampered)
        objects.append(reader)  # closed
        with pytest.raises(ScopeClosedError) as info:
            reader.open(enc.column(DEK_COLUMN).dictionary[0].as_py(), LOCATION)
        errors.append(info.value)

        # --- rewrap (v1 -> v2) and re-encrypt (-> v3)
        rewrapped = rewrap_batch(enc, kms, policy_v2, LOCATION)
        assert rewrapped.deks_rewrapped == 3
        with DekReader(kms) as r2, DekScope(kms, KekRef(3, "kek-3"), LOCATION) as s3:
            reencrypted = reencrypt_batch(rewrapped.batch, r2, s3, policy_v3, LOCATION)
            objects += [r2, s3, s3.stats]
        with DekReader(kms) as r3:
            back = decrypt_batch(reencrypted.batch, r3, policy_v3, LOCATION)
        assert back.plain.equals(plain)
        objects += [rewrapped, reencrypted, back]

        with pytest.raises(ValueError) as info:
            derive_cell_key(CANARY[:31], envelopes[0].dek_id)
        errors.append(info.value)

    # every DEK this test produced is the canary; scan for each derived cell key too
    all_envelopes = set(envelopes)
    for batch in (rewrapped.batch, reencrypted.batch):
        all_envelopes.update(parse_envelope(e) for e in batch.column(DEK_COLUMN).dictionary.to_pylist())
    assert len({e.dek_id for e in all_envelopes}) == 4  # 3 DEKs from the capped scope, 1 from re-encryption
    for env in all_envelopes:
        scanner.add(derive_cell_key(CANARY, env.dek_id), f"cell key of {env.dek_id.hex()}")

    # --- serialized forms
    for name, batch in [("encrypted", enc), ("rewrapped", rewrapped.batch), ("reencrypted", reencrypted.batch), ("decrypted", back.plain)]:
        blobs[f"{name} IPC"] = ipc_bytes(batch)
        blobs[f"{name} Parquet"] = parquet_bytes(batch)
        blobs[f"{name} pickle"] = pickle.dumps(batch)
    for name, obj in [
        ("DecryptResult", result),
        ("tampered DecryptResult", tampered),
        ("RewrapResult", rewrapped),
        ("ReencryptResult", reencrypted),
        ("round-trip DecryptResult", back),
        ("envelopes", sorted(all_envelopes, key=lambda e: e.dek_id)),
        ("scope stats", scope.stats),
        ("reader stats", reader.stats),
        ("policies", [policy_v1, policy_v2, policy_v3]),
        ("call log", kms.calls),
    ]:
        blobs[f"{name} pickle"] = pickle.dumps(obj)

    for name, blob in blobs.items():
        scanner.check(blob, name)
    for obj in objects:
        scanner.check(repr(obj), f"repr of {type(obj).__name__}")
        scanner.check(str(obj), f"str of {type(obj).__name__}")
    assert len(errors) >= 25
    for exc in errors:
        scanner.check(exception_text(exc), f"{type(exc).__name__}: {exc}")
    for record in caplog.records:
        scanner.check(record.getMessage(), f"log record from {record.name}")
        scanner.check(repr(record.args), f"log args from {record.name}")
        if record.exc_info:
            scanner.check("".join(traceback.format_exception(*record.exc_info)), f"logged exception from {record.name}")
    scanner.check(caplog.text, "captured log text")
    for w in caught:
        scanner.check(str(w.message), "a warning")
    out, err = capsys.readouterr()
    scanner.check(out, "stdout")
    scanner.check(err, "stderr")
    assert scanner.checked > 80


def test_secret_key_protects_itself():
    key = SecretKey(bytearray(CANARY), label="dek")
    scanner = Scanner()
    scanner.add(CANARY, "canary")
    for text in (repr(key), str(key), f"{key}", f"{key!r}"):
        scanner.check(text, "SecretKey text")
    for fn in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError):
            fn(key)
    with pytest.raises(TypeError):
        pickle.dumps({"nested": [key]})
    assert key.material == CANARY and len(key) == 32
    key.wipe()
    key.wipe()
    assert key.wiped and len(key) == 0 and "wiped" in repr(key)
    with pytest.raises(ValueError) as info:
        key.material
    scanner.check(exception_text(info.value), "wiped SecretKey error")
    assert SecretKey(CANARY) != SecretKey(CANARY)  # identity only, no comparison of material
    with pytest.raises(TypeError):
        SecretKey("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SecretKey(b"")


def test_beam_pickler_refuses_key_holders():
    """DoFns are pickled by Beam: a scope, reader or opened DEK captured by one must fail loudly."""
    pickler = pytest.importorskip("apache_beam.internal.pickler")
    kms = CountingKms(LocalKms.in_memory(KEKS, random_bytes=canary_random))
    with DekScope(kms, KekRef(1, "kek-1"), LOCATION) as scope, DekReader(kms) as reader:
        env = scope.seal_rows(["f"], [[b"x"]], types=["arrow:binary"]).envelopes[0]
        opened = reader.open(env, LOCATION)
        for target in (scope, reader, opened, SecretKey(CANARY), {"holder": [scope]}):
            with pytest.raises(TypeError, match="pickle|leave"):
                pickler.dumps(target)


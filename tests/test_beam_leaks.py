"""No plaintext DEK ever leaves its scope: not in pickles, outputs, side outputs or logs.

A canary DEK is planted: `CanaryKeySource` opens the real LocalKms keystore
with a random source that returns a known 32-byte value whenever the KMS
generates a data key, so every DEK in these tests is the canary (wrapped
under a real KEK as usual). The tests first prove the canary really is the
DEK (its key commitment matches the envelopes), then look for it, raw, as
hex and as base64 at every byte alignment, in:

- pickles (pickle and Beam's cloudpickle) of every DoFn before and after
  each lifecycle method, called directly, including mid-bundle while a DEK
  scope is open;
- every element of every output of every transform (pickled and `str()`),
  and the Arrow IPC bytes of every batch;
- every log record emitted at DEBUG level while the pipelines run.
"""

from __future__ import annotations

import base64
import logging
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.internal import pickler as beam_pickler
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.util import BeamAssertException, assert_that
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from beam_support import (
    DATASET,
    SENSITIVE,
    batch_pipeline,
    encrypt_direct,
    key_source,  # noqa: F401  (fixture)
    keyed_batches,
    keyed_from_json,
    keyed_to_json,
    read_jsonl,
    rotate,
    run_pipeline,
    tamper_cells,
    with_version,
    write_jsonl,
)
from keyturn import arrow_codec
from keyturn.format import derive_commitment, parse_envelope
from keyturn.ipc import batch_to_ipc
from keyturn.keysource import LocalKeySource
from keyturn.kms.base import KmsBackend
from keyturn.kms.local import LocalKms
from keyturn.scope import ScopeLimits
from keyturn.transforms.adapters import ArrowAdapter
from keyturn.transforms.arrow import DecryptBatches, EncryptBatches, ReencryptBatches
from keyturn.transforms.dofns import DecryptFn, EncryptFn, ReencryptFn

pytestmark = pytest.mark.beam

CANARY = b"KEYTURN-CANARY-DEK-never-leak-!!"
assert len(CANARY) == 32


def canary_random(n: int) -> bytes:
    """The KMS's random source: the canary for every 32-byte request (a DEK), real randomness otherwise."""
    return CANARY if n == len(CANARY) else os.urandom(n)


@dataclass(frozen=True)
class CanaryKeySource:
    """A picklable key source whose KMS hands out the canary as every DEK; built in the worker, like any KeySource."""

    inner: LocalKeySource

    def open_kms(self) -> KmsBackend:
        return LocalKms.open(self.inner.keystore, key_file=self.inner.key_file, random_bytes=canary_random)

    def open_registry(self) -> Any:
        return self.inner.open_registry()


def _canary_forms() -> list[bytes]:
    forms = [CANARY, CANARY.hex().encode(), CANARY.hex().upper().encode()]
    for shift in range(3):  # base64 of the canary wherever it sits in a longer byte string
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(bytes(shift) + CANARY)
            forms.append(text[4 if shift else 0 : -4])
    forms.append(base64.b32encode(CANARY)[:-8])
    return forms


FORMS = _canary_forms()


def leaks(blob: bytes | str) -> list[bytes]:
    """The canary forms found in `blob`."""
    data = blob.encode("utf-8", "surrogateescape") if isinstance(blob, str) else bytes(blob)
    return [form for form in FORMS if form in data]


def test_leak_detector_finds_every_form():
    for blob in (
        b"xx" + CANARY + b"yy",
        "prefix " + CANARY.hex() + " suffix",
        repr(CANARY),
        base64.b64encode(b"a" + CANARY + b"bc").decode(),
        base64.b64encode(b"ab" + CANARY).decode(),
        base64.urlsafe_b64encode(CANARY + b"z").decode(),
    ):
        assert leaks(blob), blob
    assert not leaks(b"KEYTURN-CANARY-DEK-never-leak" + os.urandom(8))


@pytest.fixture
def canary_source(key_source) -> CanaryKeySource:
    return CanaryKeySource(key_source)


def test_the_canary_really_is_the_dek(canary_source):
    encrypted = encrypt_direct(canary_source, keyed_batches(["p1"], 1, 4)[0][1], "p1", version=1)
    envelopes = encrypted.column(arrow_codec.DEK_COLUMN).dictionary.to_pylist()
    assert envelopes
    for raw in envelopes:
        envelope = parse_envelope(raw)
        assert derive_commitment(CANARY, envelope.dek_id) == envelope.commitment


# --------------------------------------------------------------------------- DoFn lifecycle, called directly


def _unwrap_output(value: Any) -> Any:
    if isinstance(value, TaggedOutput):
        value = value.value
    if isinstance(value, WindowedValue):
        value = value.value
    return value


def _assert_clean(value: Any, where: str) -> None:
    """No canary in `value`'s pickle, cloudpickle, str and repr, nor in any batch's IPC bytes."""
    found = []
    for name, blob in (
        ("pickle", lambda: pickle.dumps(value)),
        ("cloudpickle", lambda: beam_pickler.dumps(value)),
        ("str", lambda: str(value)),
        ("repr", lambda: repr(value)),
    ):
        found += [(name, f) for f in leaks(blob())]
    batches = (
        [value]
        if isinstance(value, pa.RecordBatch)
        else [v for v in (value if isinstance(value, tuple) else ()) if isinstance(v, pa.RecordBatch)]
    )
    for batch in batches:
        found += [("ipc", f) for f in leaks(batch_to_ipc(batch))]
    assert not found, f"canary DEK found in {where}: {found}"


def _run_lifecycle(fn: beam.DoFn, elements: list, label: str) -> tuple[list, list]:
    """setup, start_bundle, process each element, finish_bundle, teardown; check the DoFn's pickles after each."""
    _assert_clean(fn, f"{label} before setup")
    fn.setup()
    _assert_clean(fn, f"{label} after setup")
    fn.start_bundle()
    _assert_clean(fn, f"{label} after start_bundle")
    outputs = []
    for element in elements:
        outputs += [_unwrap_output(o) for o in fn.process(element, window=GlobalWindow())]
        _assert_clean(fn, f"{label} mid-bundle, after process")
    open_scopes = [ledger.scope for ledger in fn._ledgers.values() if ledger.scope is not None]
    outputs += [_unwrap_output(o) for o in fn.finish_bundle()]
    _assert_clean(fn, f"{label} after finish_bundle")
    assert all(scope.closed for scope in open_scopes)
    fn.teardown()
    _assert_clean(fn, f"{label} after teardown")
    for i, out in enumerate(outputs):
        _assert_clean(out, f"{label} output {i}")
    return outputs, open_scopes


def test_dofn_pickles_and_outputs_never_hold_the_canary(canary_source):
    plain = keyed_batches(["p1", "p2"], 2, 5)
    encrypt = EncryptFn(
        ArrowAdapter(SENSITIVE), canary_source, DATASET, limits=ScopeLimits(), actor="tests", reason="leak test"
    )
    outputs, scopes = _run_lifecycle(encrypt, plain, "EncryptFn")
    assert [s.stats.deks_generated for s in scopes] == [1, 1]  # a canary DEK was live mid-bundle in each scope
    encrypted = [o for o in outputs if isinstance(o, tuple) and isinstance(o[1], pa.RecordBatch)]
    assert len(encrypted) == len(plain)

    decrypt = DecryptFn(ArrowAdapter(), canary_source, DATASET, stale_to_main=True, actor="tests", reason="leak test")
    tampered = [("p1", tamper_cells(encrypted[0][1], [0])), ("p1", with_version(encrypted[2][1], None))]
    outputs, _ = _run_lifecycle(decrypt, encrypted + tampered, "DecryptFn")
    assert any(isinstance(o, dict) and o.get("reason") == "corrupt" for o in outputs)  # quarantine was exercised

    rotate(canary_source.inner)
    for mode in ("reencrypt", "rewrap"):
        reencrypt = ReencryptFn(
            ArrowAdapter(),
            canary_source,
            DATASET,
            mode=mode,
            dek_max_age=timedelta(days=365),
            limits=ScopeLimits(),
            actor="tests",
            reason="leak test",
        )
        outputs, scopes = _run_lifecycle(reencrypt, encrypted, f"ReencryptFn({mode})")
        if mode == "reencrypt":
            assert sum(s.stats.deks_generated for s in scopes) == 2  # fresh canary DEKs were in use


# --------------------------------------------------------------------------- pipelines and logs


def _no_canary(expect_some: bool):
    def check(actual: list) -> None:
        actual = list(actual)
        if expect_some and not actual:
            raise BeamAssertException("expected elements to inspect, got none")
        for i, element in enumerate(actual):
            try:
                _assert_clean(element, f"element {i}")
            except AssertionError as exc:
                raise BeamAssertException(str(exc)) from None

    return check


def _check_outputs(outputs: Any, label: str, expect: dict[str, bool]) -> None:
    for name in ("main", "version_mismatch", "quarantine", "audit"):
        assert_that(getattr(outputs, name), _no_canary(expect[name]), label=f"{label}{name.title()}Clean")


def test_pipeline_outputs_and_debug_logs_never_carry_the_canary(canary_source, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    data = keyed_batches(["p1", "p2"], 3, 6)

    def encrypt(p: beam.Pipeline) -> None:
        enc = p | beam.Create(data) | EncryptBatches(canary_source, DATASET, SENSITIVE)
        _check_outputs(enc, "Enc", {"main": True, "version_mismatch": False, "quarantine": False, "audit": True})
        write_jsonl(enc.main | beam.Map(keyed_to_json), tmp_path / "enc", "Write")

    run_pipeline(encrypt)
    encrypted = [keyed_from_json(line) for line in read_jsonl(tmp_path / "enc")]
    unknown = ("p1", encrypt_direct(canary_source, data[0][1], "p1", version=99))
    rotate(canary_source.inner)
    inputs = encrypted + [
        unknown,
        ("p2", tamper_cells(encrypted[1][1], [0, 1])),
        ("p1", with_version(encrypted[2][1], None)),
    ]

    with batch_pipeline() as p:
        sealed = p | beam.Create(inputs)
        dec = sealed | "Decrypt" >> DecryptBatches(canary_source, DATASET)
        _check_outputs(dec, "Dec", {"main": True, "version_mismatch": True, "quarantine": True, "audit": True})
        re = sealed | "Reencrypt" >> ReencryptBatches(canary_source, DATASET, mode="reencrypt")
        _check_outputs(re, "Re", {"main": True, "version_mismatch": True, "quarantine": True, "audit": True})
        rw = sealed | "Rewrap" >> ReencryptBatches(canary_source, DATASET, mode="rewrap")
        _check_outputs(rw, "Rw", {"main": True, "version_mismatch": True, "quarantine": False, "audit": True})

    records = caplog.records
    assert records, "no log records were captured at DEBUG"
    assert any(r.levelno == logging.DEBUG for r in records)
    found = leaks(caplog.text)
    for record in records:
        found += leaks(record.getMessage()) + leaks(repr(record.args)) + leaks(str(record.exc_info))
    assert not found, f"canary DEK found in the logs: {found}"

"""The codecs on the native kernel against the pure-Python cell path, through the public API.

With the same DEKs (a deterministic KMS and dek_id source), `encrypt_batch`
writes byte-identical batches on both paths, and each path's batches decrypt
on the other, for every Arrow type with nulls, sliced arrays, empty
batches, bound row keys and caps that force a new DEK inside one batch;
hypothesis drives random columns. Bad cells are classified the same, row
for row. The kernel really is called on the native path and never on the
Python one, it gets the cell key from a buffer the scope or reader wipes
on close, and nonces it was given are never given again after a failure.

These tests run wherever cargo is (a missing kernel fails them there); only
a machine without cargo skips them.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyturn import native
from keyturn.arrow_codec import decrypt_batch, encrypt_batch
from keyturn.arrow_values import to_plaintexts
from keyturn.errors import ScopeClosedError
from keyturn.kms.local import LocalKms
from keyturn.policy import ReadStatus
from keyturn.reader import DekReader
from keyturn.scope import DekScope, KekRef, ScopeLimits
from test_arrow_codec import TYPED_ARRAYS
from test_cell_path_bytes import KEK, LOCATION, Recorder, mixed_batch
from test_native_kernel import require_kernel

PATHS = ("python", "native")


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


class Paths:
    """Switch the cell path with ``KEYTURN_NATIVE``; the KMS, its KEK and the DEK sources are the same on both."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._patch = monkeypatch
        self.kms_random = Recorder(1)
        self.kms = LocalKms.in_memory({KEK: bytes(range(32))}, random_bytes=self.kms_random)

    def use(self, path: str) -> None:
        self._patch.setenv(native.ENV_VAR, "1" if path == "native" else "0")

    def encrypt(self, path: str, batch: pa.RecordBatch, columns, *, bind=(), limits=ScopeLimits(), seed: int = 2):
        """`encrypt_batch` on `path` with DEKs from fixed seeds: the same seeds give the same DEKs on both paths."""
        self.use(path)
        kms = LocalKms.in_memory({KEK: bytes(range(32))}, random_bytes=Recorder(seed))
        with DekScope(kms, KekRef(1, KEK), LOCATION, limits=limits, random_bytes=Recorder(seed + 1)) as scope:
            return encrypt_batch(batch, list(columns), scope, bind_columns=list(bind))

    def decrypt(self, path: str, encrypted: pa.RecordBatch, policy):
        self.use(path)
        kms = LocalKms.in_memory({KEK: bytes(range(32))})
        with DekReader(kms) as reader:
            return decrypt_batch(encrypted, reader, policy, LOCATION)


@pytest.fixture
def paths(monkeypatch) -> Paths:
    return Paths(monkeypatch)


def check_both_ways(paths: Paths, policy, batch, columns, *, bind=(), limits=ScopeLimits()) -> dict[str, pa.RecordBatch]:
    """Encrypt on each path: the same bytes; decrypt each on the other path: the batch back, every row current."""
    sealed = {path: paths.encrypt(path, batch, columns, bind=bind, limits=limits) for path in PATHS}
    assert sealed["native"].equals(sealed["python"], check_metadata=True)
    plains = {}
    for written, read in (("python", "native"), ("native", "python")):
        result = paths.decrypt(read, sealed[written], policy)
        assert result.counts()["current"] == batch.num_rows
        assert _same(result.plain, batch), (written, read)
        plains[read] = result.plain
    assert _same(plains["native"], plains["python"])
    return sealed


def _same(a: pa.RecordBatch, b: pa.RecordBatch) -> bool:
    """The same schema and values: equal arrays, or equal plaintext bytes (NaNs; a slice's dictionary comes back re-encoded)."""
    if a.schema != b.schema:
        return False
    for x, y in zip(a.columns, b.columns):
        if pa.types.is_dictionary(x.type):
            x, y = x.dictionary_decode(), y.dictionary_decode()
        if not (x.equals(y) or to_plaintexts(x) == to_plaintexts(y)):
            return False
    return True


@pytest.mark.parametrize("type_name", sorted(TYPED_ARRAYS))
def test_every_type_is_the_same_bytes_on_both_paths_and_reads_across(type_name, paths, policy):
    values = TYPED_ARRAYS[type_name]()
    n = len(values)
    batch = pa.record_batch({"id": pa.array(np.arange(n, dtype=np.int64)), "v": values})
    check_both_ways(paths, policy, batch, ["v"])
    check_both_ways(paths, policy, batch, ["v"], bind=["id"])
    if n > 2:  # a slice: the kernel reads Arrow buffers at an offset
        check_both_ways(paths, policy, batch.slice(1, n - 1), ["v"])


def test_a_long_sliced_fixed_width_column_with_nulls_at_odd_offsets(paths, policy):
    rng = np.random.default_rng(3)
    values = pa.array(rng.integers(-(2**62), 2**62, 5000), pa.int64(), mask=rng.random(5000) < 0.3)
    batch = pa.record_batch({"v": values, "w": pa.array(rng.random(5000), pa.float64())})
    for start in (0, 1, 7, 9, 4093):
        check_both_ways(paths, policy, batch.slice(start, 5000 - start - 3), ["v", "w"])


def test_empty_batches(paths, policy):
    for values in (pa.array([], pa.string()), pa.array([], pa.int64()), pa.array([], pa.list_(pa.int32()))):
        batch = pa.record_batch({"id": pa.array([], pa.int64()), "v": values})
        sealed = check_both_ways(paths, policy, batch, ["v"], bind=["id"])
        assert sealed["native"].num_rows == 0


def test_all_null_columns(paths, policy):
    batch = pa.record_batch({"s": pa.nulls(5, pa.string()), "i": pa.nulls(5, pa.int64()), "b": pa.nulls(5, pa.bool_())})
    check_both_ways(paths, policy, batch, ["s", "i", "b"])


@pytest.mark.parametrize("max_cells", [1000, 4321])
@pytest.mark.parametrize("bind", [(), ("id",)], ids=["unbound", "bound"])
def test_caps_that_force_new_deks_inside_a_batch(max_cells, bind, paths, policy):
    batch = mixed_batch(3001)
    limits = ScopeLimits(max_cells=max_cells)
    sealed = check_both_ways(paths, policy, batch, ["email", "amount", "blob", "flag"], bind=bind, limits=limits)
    assert len(sealed["native"].column("_keyturn_dek").dictionary) > 2


def test_a_byte_cap_forces_new_deks_too(paths, policy):
    batch = mixed_batch(2000)
    check_both_ways(paths, policy, batch, ["email", "blob"], limits=ScopeLimits(max_bytes=1500))


def _tampered(batch: pa.RecordBatch, name: str) -> pa.RecordBatch:
    cells = batch.column(name).to_pylist()
    cells[0] = cells[0][:-1] + bytes([cells[0][-1] ^ 1])  # tag
    cells[2] = cells[2][:44]  # too short
    cells[3] = b"\x02" + cells[3][1:]  # another format version
    cells[4] = cells[4][:1] + bytes(16) + cells[4][17:]  # another dek_id
    cells[5] = cells[5][:17] + bytes([cells[5][17] ^ 0x80]) + cells[5][18:]  # nonce
    cells[6] = cells[8]  # a cell moved to another row of the same column: binds catch it
    cells[9] = b""
    i = batch.schema.get_field_index(name)
    return batch.set_column(i, batch.schema.field(i), pa.array(cells, pa.binary()))


def test_bad_cells_are_classified_the_same_row_for_row(paths, policy):
    batch = mixed_batch(40)
    for written in PATHS:
        sealed = _tampered(paths.encrypt(written, batch, ["email", "blob"], bind=["id"]), "blob")
        results = {read: paths.decrypt(read, sealed, policy) for read in PATHS}
        assert results["native"].status == results["python"].status
        corrupt = [i for i, s in enumerate(results["native"].status) if s is ReadStatus.CORRUPT]
        assert corrupt == [0, 2, 3, 4, 5, 6, 9]
        assert results["native"].plain.equals(results["python"].plain)
        assert results["native"].rows_with(ReadStatus.CORRUPT).equals(results["python"].rows_with(ReadStatus.CORRUPT))


_SCALARS = {
    "string": (st.text(max_size=40), pa.string()),
    "binary": (st.binary(max_size=70), pa.binary()),
    "int32": (st.integers(-(2**31), 2**31 - 1), pa.int32()),
    "float64": (st.floats(allow_nan=False), pa.float64()),
    "bool": (st.booleans(), pa.bool_()),
    "list": (st.lists(st.integers(-5, 5), max_size=4), pa.list_(pa.int8())),
}


@st.composite
def batches(draw):
    n = draw(st.integers(0, 60))
    names = draw(st.lists(st.sampled_from(sorted(_SCALARS)), min_size=1, max_size=4, unique=True))
    columns = {"id": pa.array(range(n), pa.int64())}
    for name in names:
        values, kind = _SCALARS[name]
        columns[name] = pa.array(draw(st.lists(st.none() | values, min_size=n, max_size=n)), kind)
    bind = draw(st.sampled_from([(), ("id",)]))
    max_cells = draw(st.sampled_from([2**32, 7, 25]))
    return pa.record_batch(columns), names, bind, max(max_cells, len(names))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(drawn=batches())
def test_random_batches_are_the_same_bytes_and_read_across(drawn, paths, policy):
    batch, names, bind, max_cells = drawn
    check_both_ways(paths, policy, batch, names, bind=bind, limits=ScopeLimits(max_cells=max_cells))


class Spy:
    """Records each call to the kernel's sealing and opening functions (and the key buffer each got), then calls them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_seal: int = 0) -> None:
        self.calls: list[str] = []
        self.keys: list[memoryview] = []
        self._fail_seal = fail_seal
        seal, open_ = native.seal_cells, native.open_cells

        def spy_seal(key, *args, **kwargs):
            self.calls.append("seal")
            self.keys.append(key)
            if self._fail_seal:
                self._fail_seal -= 1
                raise RuntimeError("the kernel failed (test)")
            return seal(key, *args, **kwargs)

        def spy_open(key, *args, **kwargs):
            self.calls.append("open")
            self.keys.append(key)
            return open_(key, *args, **kwargs)

        monkeypatch.setattr(native, "seal_cells", spy_seal)
        monkeypatch.setattr(native, "open_cells", spy_open)


def test_the_kernel_runs_on_the_native_path_only(paths, policy, monkeypatch):
    spy = Spy(monkeypatch)
    batch = mixed_batch(100)
    sealed = paths.encrypt("python", batch, ["email", "flag"])
    paths.decrypt("python", sealed, policy)
    assert spy.calls == []
    sealed = paths.encrypt("native", batch, ["email", "flag"])
    assert spy.calls == ["seal", "seal"]
    paths.decrypt("native", sealed, policy)
    assert spy.calls == ["seal", "seal", "open", "open"]


def test_the_avro_codec_keeps_the_python_path(paths, monkeypatch):
    from keyturn.avro_codec import encrypt_records

    spy = Spy(monkeypatch)
    paths.use("native")
    schema = {"type": "record", "name": "r", "fields": [{"name": "email", "type": "string"}]}
    with DekScope(paths.kms, KekRef(1, KEK), LOCATION) as scope:
        assert len(encrypt_records([{"email": "a@b"}], schema, ["email"], scope)) == 1
    assert spy.calls == []


def test_the_cell_key_the_kernel_reads_is_wiped_when_the_scope_and_the_reader_close(paths, policy, monkeypatch):
    spy = Spy(monkeypatch)
    batch = mixed_batch(50)
    paths.use("native")
    with DekScope(paths.kms, KekRef(1, KEK), LOCATION) as scope:
        sealed = encrypt_batch(batch, ["email"], scope)
        (key,) = spy.keys
        assert len(key) == 32 and bytes(key) != bytes(32) and key.readonly
        encrypt_batch(batch, ["email"], scope)
        assert bytes(spy.keys[1]) == bytes(key)  # the same buffer for the scope's life
        cell_key = bytes(key)
    assert bytes(key) == bytes(32)
    with pytest.raises(ScopeClosedError):
        encrypt_batch(batch, ["email"], scope)
    with DekReader(paths.kms) as reader:
        assert decrypt_batch(sealed, reader, policy, LOCATION).plain.equals(batch)
        opened_key = spy.keys[-1]
        assert bytes(opened_key) == cell_key  # the reader derived the same cell key, into its own buffer
        dek = reader.open(sealed.column("_keyturn_dek").dictionary[0].as_py(), LOCATION)
    assert bytes(opened_key) == bytes(32)
    with pytest.raises(ScopeClosedError):
        dek.kernel_key()


def test_nonces_given_to_a_failed_kernel_call_are_never_given_again(paths, monkeypatch):
    spy = Spy(monkeypatch, fail_seal=1)
    batch = mixed_batch(30)
    count = batch.num_rows - batch.column("email").null_count
    paths.use("native")
    with DekScope(paths.kms, KekRef(1, KEK), LOCATION) as scope:
        with pytest.raises(RuntimeError, match="kernel failed"):
            encrypt_batch(batch, ["email"], scope)
        sealed = encrypt_batch(batch, ["email"], scope)
    nonces = [int.from_bytes(c[17:29], "big") for c in sealed.column("email").to_pylist() if c is not None]
    assert nonces == list(range(count, 2 * count))
    assert spy.calls == ["seal", "seal"]


def test_keyturn_native_1_on_the_codecs_uses_the_kernel(paths, policy, monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, "1")
    assert native.native_available()
    monkeypatch.setenv(native.ENV_VAR, "maybe")
    with DekScope(paths.kms, KekRef(1, KEK), LOCATION) as scope:
        with pytest.raises(RuntimeError, match="KEYTURN_NATIVE"):
            encrypt_batch(mixed_batch(3), ["email"], scope)
    assert paths.kms_random.handed == []  # refused before any KMS call
    assert os.environ[native.ENV_VAR] == "maybe"

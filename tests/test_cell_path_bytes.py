"""The bulk cell path writes exactly the bytes docs/FORMAT.md describes.

`encrypt_batch` seals and frames cells in chunks (`SealedPart`s) with numpy
and Arrow kernels. These tests rebuild every expected cell from the spec
alone (HKDF cell key, 96-bit big-endian counter nonces taken field by field,
rows in order, nulls taking none; version byte + dek_id + nonce + AES-GCM
body) and compare byte for byte, across chunk boundaries, null runs, several
DEKs in one call and several calls on one scope.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import keyturn.scope as scope_module
from keyturn.arrow_codec import DEK_COLUMN, VERSION_COLUMN, encrypt_batch
from keyturn.arrow_values import ArrowPlaintexts, arrow_type_descriptor, to_plaintexts
from keyturn.context import encode_context
from keyturn.errors import ScopeClosedError
from keyturn.format import cell_aad, derive_cell_key, parse_envelope
from keyturn.kms.local import LocalKms
from keyturn.scope import ColumnSizes, DekScope, KekRef, Location, PlainColumn, ScopeLimits, nonce_block

LOCATION = Location("sales", "dt=2024-06-01")
KEK = "kek-1"


class Recorder:
    """A deterministic random source that remembers what it handed out."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self.handed: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        out = self._rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        self.handed.append(out)
        return out

    def deks(self) -> list[bytes]:
        return [b for b in self.handed if len(b) == 32]


def make_scope(limits: ScopeLimits = ScopeLimits()) -> tuple[DekScope, Recorder]:
    kms_random = Recorder(1)
    kms = LocalKms.in_memory({KEK: bytes(range(32))}, random_bytes=kms_random)
    return DekScope(kms, KekRef(1, KEK), LOCATION, limits=limits, random_bytes=Recorder(2)), kms_random


def expected_cells(batch, columns, bind, envelopes, row_envelope, deks, counters):
    """Every cell of `columns`, built from the spec; `counters` carries each DEK's next nonce across calls."""
    plain = {name: to_plaintexts(batch.column(name)) for name in columns}
    bound = {name: to_plaintexts(batch.column(name)) for name in bind}
    out = {name: [None] * batch.num_rows for name in columns}
    segments = [(k, [i for i, e in enumerate(row_envelope) if e == k]) for k in range(len(envelopes))]
    for k, rows in segments:
        env = parse_envelope(envelopes[k])
        aead = AESGCM(derive_cell_key(deks[env.dek_id], env.dek_id))
        for name in columns:  # field by field, rows in order
            value_type = arrow_type_descriptor(batch.schema.field(name).type)
            for i in rows:
                value = plain[name][i]
                if value is None:
                    continue
                bindings = {b: bound[b][i] for b in bind if bound[b][i] is not None}
                aad = encode_context(
                    cell_aad(
                        dataset=LOCATION.dataset,
                        partition=LOCATION.partition,
                        field=name,
                        dek_id=env.dek_id,
                        value_type=value_type,
                        bindings=bindings or None,
                    )
                )
                nonce = counters.get(env.dek_id, 0).to_bytes(12, "big")
                counters[env.dek_id] = counters.get(env.dek_id, 0) + 1
                out[name][i] = b"\x01" + env.dek_id + nonce + aead.encrypt(nonce, value, aad)
    return out


def mixed_batch(n: int, seed: int = 7) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    strings = ["".join(rng.choice(list("abcdé€"), rng.integers(0, 9))) for _ in range(n)]
    return pa.record_batch(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "email": pa.array([None if i % 7 == 3 else s for i, s in enumerate(strings)], pa.string()),
            "amount": pa.array([None if i % 11 == 5 else int(v) for i, v in enumerate(rng.integers(-(2**40), 2**40, n))], pa.int64()),
            "blob": pa.array([bytes(rng.integers(0, 256, i % 5, dtype=np.uint8)) for i in range(n)], pa.binary()),
            "flag": pa.array([None if i % 13 == 0 else bool(i % 2) for i in range(n)], pa.bool_()),
        }
    )


def envelope_indices(enc: pa.RecordBatch) -> tuple[list[bytes], list[int]]:
    dek = enc.column(DEK_COLUMN)
    return dek.dictionary.to_pylist(), dek.indices.to_pylist()


@pytest.fixture
def small_chunks(monkeypatch):
    """Parts of 1000 rows, so a few thousand rows cross many part boundaries."""
    monkeypatch.setattr(scope_module, "_CHUNK", 1000)
    monkeypatch.setattr(scope_module, "_NATIVE_CHUNK", 1000)


@pytest.mark.parametrize("bind", [[], ["id"]], ids=["unbound", "bound"])
@pytest.mark.parametrize("max_cells", [2**32, 4321], ids=["one-dek", "several-deks"])
def test_encrypt_batch_writes_the_spec_bytes(small_chunks, bind, max_cells):
    scope, kms_random = make_scope(ScopeLimits(max_cells=max_cells))
    columns = ["email", "amount", "blob", "flag"]
    counters: dict[bytes, int] = {}
    with scope:
        for seed in (7, 8):  # two calls on one scope: the counters carry over
            batch = mixed_batch(3001, seed)
            enc = encrypt_batch(batch, columns, scope, bind_columns=bind)
            envelopes, rows = envelope_indices(enc)
            deks = {parse_envelope(e).dek_id: d for e, d in zip(envelopes, kms_random.deks()[-len(envelopes):])}
            want = expected_cells(batch, columns, bind, envelopes, rows, deks, counters)
            for name in columns:
                assert enc.column(name).type == pa.binary()
                assert enc.column(name).to_pylist() == want[name], name
            assert enc.column(VERSION_COLUMN).to_pylist() == [1] * batch.num_rows
            assert enc.column("id").equals(batch.column("id"))
    if max_cells < 2**32:
        assert len(kms_random.deks()) > 2


def test_sealed_rows_lists_the_same_cells_as_the_arrow_framing(small_chunks):
    batch = mixed_batch(2500)
    columns = ["email", "amount", "blob"]
    one, _ = make_scope()
    two, _ = make_scope()  # same random sources: the same DEK and dek_id
    with one, two:
        sealed = one.seal_rows(
            columns,
            [to_plaintexts(batch.column(c)) for c in columns],
            types=[arrow_type_descriptor(batch.schema.field(c).type) for c in columns],
        )
        enc = encrypt_batch(batch, columns, two)
    assert sealed.row_envelope == [0] * batch.num_rows
    for name, cells in zip(columns, sealed.cells):
        assert enc.column(name).to_pylist() == cells


def test_a_column_of_nulls_and_an_empty_batch():
    scope, _ = make_scope()
    with scope:
        batch = pa.record_batch({"a": pa.nulls(5, pa.string()), "b": pa.array(["x", None, "y", None, "z"])})
        enc = encrypt_batch(batch, ["a", "b"], scope)
        assert enc.column("a").null_count == 5 and enc.column("a").type == pa.binary()
        nonces = [c[17:29] for c in enc.column("b").to_pylist() if c is not None]
        assert nonces == [i.to_bytes(12, "big") for i in range(3)]  # field a took none
        empty = encrypt_batch(batch.slice(0, 0), ["a", "b"], scope)
        assert empty.num_rows == 0 and empty.column("b").type == pa.binary()


@pytest.mark.parametrize(
    "first, count",
    [(0, 0), (0, 5), (255, 3), (2**32 - 2, 4), (2**64 - 3, 7), (2**95, 2), (2**96 - 4, 4), (123456789 * 2**40, 1000)],
)
def test_nonce_block_is_the_big_endian_counter(first, count):
    block = nonce_block(first, count)
    assert block.shape == (count, 12) and block.dtype == np.uint8
    assert [bytes(row) for row in block] == [(first + k).to_bytes(12, "big") for k in range(count)]


@pytest.mark.parametrize("first, count", [(2**96 - 4, 5), (-1, 1), (0, -1)])
def test_nonce_block_refuses_to_leave_the_nonce_space(first, count):
    with pytest.raises(OverflowError):
        nonce_block(first, count)


@pytest.mark.parametrize(
    "array",
    [
        pa.array(["a", None, "", "héllo"], pa.string()),
        pa.array(["a", None, "ü"], pa.large_string()),
        pa.array([b"\x00", None, b""], pa.binary()),
        pa.array([b"\x00", None, b"xyz"], pa.large_binary()),
        pa.array([1, None, -(2**63)], pa.int64()),
        pa.array([1.5, None], pa.float64()),
        pa.array([b"abcd", None], pa.binary(4)),
        pa.array([True, None, False], pa.bool_()),
        pa.array([[1, 2], None, []], pa.list_(pa.int8())),
        pa.array(["x", "y", None, "x"]).dictionary_encode(),
        pa.chunked_array([pa.array(["a", None]), pa.array(["bc"])]),
    ],
    ids=lambda a: str(a.type),
)
def test_arrow_plaintexts_sizes_and_values_match_to_plaintexts(array):
    column = ArrowPlaintexts(array)
    plain = to_plaintexts(array)
    lengths = [len(v) for v in plain if v is not None]
    sizes = column.sizes()
    assert (sizes.cells, sizes.bytes, sizes.longest, sizes.nulls) == (
        len(lengths), sum(lengths), max(lengths, default=0), None in plain
    )
    assert len(column) == len(plain)
    for start, stop in itertools.combinations(range(len(plain) + 1), 2):
        assert list(column.values(start, stop)) == plain[start:stop]


def test_fixed_width_plaintexts_are_the_little_endian_buffer_bytes():
    values = [0, -1, 2**63 - 1, None, 12345]
    arr = pa.array(values, pa.int64()).slice(1)
    assert to_plaintexts(arr) == [v if v is None else v.to_bytes(8, "little", signed=True) for v in values[1:]]


class LyingColumn(PlainColumn):
    """Reports fewer values than it holds."""

    def __len__(self) -> int:
        return 3

    def sizes(self) -> ColumnSizes:
        return ColumnSizes(cells=1, bytes=1, longest=1, nulls=False)

    def values(self, start: int, stop: int):
        return [b"a", b"b", b"c"][start:stop]


def test_a_column_that_misreports_its_sizes_is_refused_and_its_dek_retired():
    scope, kms_random = make_scope()
    with scope:
        with pytest.raises(ValueError, match="reported 1 values but held 3"):
            scope.seal_rows(["f"], [LyingColumn()], types=["arrow:binary"])
        first = parse_envelope(scope.seal_rows(["f"], [[b"x"]], types=["arrow:binary"]).envelopes[0])
    assert len(kms_random.deks()) == 2 and first.dek_id  # a fresh DEK after the refusal


def test_a_stream_stops_when_its_scope_closes():
    scope, _ = make_scope()
    sealing = scope.seal_stream(["f"], [[b"x"] * 3], types=["arrow:binary"])
    scope.close()
    with pytest.raises(ScopeClosedError):
        next(iter(sealing.parts))

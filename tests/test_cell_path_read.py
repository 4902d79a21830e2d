"""The bulk read path: array checks, chunked decryption and per-pair classification behave like the per-row rules.

`decrypt_batch` checks cells with Arrow kernels, decrypts them DEK by DEK in
chunks (`OpenedDek.open_many`) and classifies each distinct (version,
envelope) pair once. These tests hold it to the per-row definitions: every
malformed or tampered cell, wherever it sits in a chunk, marks its row (and
only its row) corrupt; every other row reads back exactly; statuses and
versions equal `classify_keys` on the same rows.
"""

from __future__ import annotations

import datetime as dt
import decimal

import numpy as np
import pyarrow as pa
import pytest

import keyturn.arrow_codec as arrow_codec
from keyturn.arrow_codec import DEK_COLUMN, VERSION_COLUMN, decrypt_batch, encrypt_batch, row_keys
from keyturn.arrow_values import from_plain_array, from_plaintexts, to_plaintexts
from keyturn.context import encode_context
from keyturn.errors import DecryptionError
from keyturn.format import cell_aad
from keyturn.policy import ReadStatus, classify_keys, count_statuses
from keyturn.reader import DekReader
from keyturn.scope import ScopeLimits

CHUNK = 256


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(arrow_codec, "_OPEN_CHUNK", CHUNK)


def plain_batch(n: int) -> pa.RecordBatch:
    return pa.record_batch(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "email": pa.array([None if i % 9 == 4 else f"user{i}@example.com" for i in range(n)], pa.string()),
            "amount": pa.array([None if i % 10 == 7 else i * 1000 - 7 for i in range(n)], pa.int64()),
        }
    )


@pytest.fixture
def two_dek_batch(make_scope):
    """1000 rows over two DEKs (a cap of 1100 cells), plus the plain batch."""
    plain = plain_batch(1000)
    with make_scope(limits=ScopeLimits(max_cells=1100)) as scope:
        enc = encrypt_batch(plain, ["email", "amount"], scope)
    assert len(enc.column(DEK_COLUMN).dictionary) == 2
    return plain, enc


def decrypt(batch, kms, policy, location, **kwargs):
    with DekReader(kms) as reader:
        return decrypt_batch(batch, reader, policy, location, **kwargs)


def replace_cells(batch: pa.RecordBatch, column: str, changes: dict[int, bytes | None]) -> pa.RecordBatch:
    cells = batch.column(column).to_pylist()
    for i, value in changes.items():
        cells[i] = value
    i = batch.schema.get_field_index(column)
    return batch.set_column(i, batch.schema.field(i), pa.array(cells, pa.binary()))


def test_round_trip_across_chunks_and_deks(kms, policy, location, two_dek_batch):
    plain, enc = two_dek_batch
    result = decrypt(enc, kms, policy, location)
    assert result.status == [ReadStatus.CURRENT] * plain.num_rows
    assert result.plain.equals(plain)
    assert kms.calls.decrypt == 2


def malformed(cell: bytes, other_dek_cell: bytes) -> dict[str, bytes]:
    flipped_tag = bytearray(cell)
    flipped_tag[-1] ^= 1
    flipped_nonce = bytearray(cell)
    flipped_nonce[20] ^= 0x80
    return {
        "empty": b"",
        "one-short": cell[:44],
        "header-only": cell[:29],
        "no-tag": cell[:-16],
        "version-2": b"\x02" + cell[1:],
        "other-dek-id": cell[:1] + other_dek_cell[1:17] + cell[17:],
        "other-dek-cell": other_dek_cell,
        "tag-bit": bytes(flipped_tag),
        "nonce-bit": bytes(flipped_nonce),
        "appended-byte": cell + b"\x00",
    }


@pytest.mark.parametrize("row", [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 5, 999])
def test_each_malformed_cell_marks_only_its_row(kms, policy, location, two_dek_batch, row):
    plain, enc = two_dek_batch
    cells = enc.column("amount").to_pylist()
    deks = enc.column(DEK_COLUMN).indices.to_pylist()
    other = next(c for c, d in zip(cells, deks) if c is not None and d != deks[row])
    mine = cells[row] if cells[row] is not None else next(c for c, d in zip(cells, deks) if c is not None and d == deks[row])
    for kind, bad in malformed(mine, other).items():
        result = decrypt(replace_cells(enc, "amount", {row: bad}), kms, policy, location)
        want = [ReadStatus.CORRUPT if i == row else ReadStatus.CURRENT for i in range(plain.num_rows)]
        assert result.status == want, kind
        kept = [i for i in range(plain.num_rows) if i != row]
        assert result.plain.equals(plain.take(pa.array(kept))), kind


def test_many_bad_cells_in_both_columns_and_both_deks(kms, policy, location, two_dek_batch):
    plain, enc = two_dek_batch
    rng = np.random.default_rng(3)
    bad_email = {int(i): b"\x01" + bytes(60) for i in rng.choice(1000, 40, replace=False)}
    bad_amount = {int(i): b"" for i in rng.choice(1000, 40, replace=False)}
    tampered = replace_cells(replace_cells(enc, "email", bad_email), "amount", bad_amount)
    result = decrypt(tampered, kms, policy, location)
    corrupt = set(bad_email) | set(bad_amount)
    assert [i for i, s in enumerate(result.status) if s is ReadStatus.CORRUPT] == sorted(corrupt)
    kept = [i for i in range(plain.num_rows) if i not in corrupt]
    assert result.plain.equals(plain.take(pa.array(kept)))
    assert result.plain_status == [ReadStatus.CURRENT] * len(kept)


def test_a_cell_nulled_out_reads_as_null(kms, policy, location, two_dek_batch):
    plain, enc = two_dek_batch
    result = decrypt(replace_cells(enc, "email", {0: None, 500: None}), kms, policy, location)
    assert result.counts()["current"] == plain.num_rows
    emails = result.plain.column("email").to_pylist()
    assert emails[0] is None and emails[500] is None and emails[1] == "user1@example.com"


def test_cells_swapped_between_rows_of_a_bound_column_are_corrupt(kms, make_scope, policy, location):
    plain = plain_batch(600)
    with make_scope() as scope:
        enc = encrypt_batch(plain, ["email"], scope, bind_columns=["id"])
    cells = enc.column("email").to_pylist()
    swapped = replace_cells(enc, "email", {1: cells[300], 300: cells[1]})
    result = decrypt(swapped, kms, policy, location)
    assert [i for i, s in enumerate(result.status) if not s.readable] == [1, 300]
    assert result.plain.equals(plain.take(pa.array([i for i in range(600) if i not in (1, 300)])))


def test_classification_equals_classify_keys_on_a_mixed_batch(kms, make_scope, make_policy, location, two_dek_batch):
    """Mixed versions, envelopes, nulls, garbage and a dictionary repeating an envelope: one answer per pair."""
    plain, enc = two_dek_batch
    envelopes = enc.column(DEK_COLUMN).dictionary.to_pylist()
    indices = enc.column(DEK_COLUMN).indices.to_pylist()
    versions = enc.column(VERSION_COLUMN).to_pylist()
    older = {}
    for version in (2, 3):  # 2 is retired, 3 is not in the policy
        with make_scope(version) as scope:
            older[version] = scope.seal_rows(["x"], [[b"x"]], types=["arrow:binary"]).envelopes[0]
    dictionary = [envelopes[0], envelopes[1], envelopes[0], b"garbage", None, older[2], older[3]]
    rng = np.random.default_rng(5)
    new_indices, new_versions = [], []
    for k, v in zip(indices, versions):
        pick = int(rng.integers(0, 12))
        index, version = {
            0: (None, v),  # no envelope: missing
            1: (3, v),  # garbage envelope: corrupt
            2: (4, v),  # a null dictionary value: missing
            3: (2 if k == 0 else k, v),  # the repeated envelope: current
            4: (k, None),  # no version: missing
            5: (5, 2),  # retired
            6: (6, 3),  # unknown
            7: (k, 9),  # version disagrees with the envelope: corrupt
        }.get(pick, (k, v))
        new_indices.append(index)
        new_versions.append(version)
    dek = pa.DictionaryArray.from_arrays(pa.array(new_indices, pa.int32()), pa.array(dictionary, pa.binary()))
    mixed = enc.set_column(enc.schema.get_field_index(DEK_COLUMN), enc.schema.field(DEK_COLUMN), dek)
    version_index = mixed.schema.get_field_index(VERSION_COLUMN)
    mixed = mixed.set_column(version_index, mixed.schema.field(VERSION_COLUMN), pa.array(new_versions, pa.int64()))
    policy = make_policy(active=1, retired=[2])
    result = decrypt(mixed, kms, policy, location)
    want = classify_keys(policy, *row_keys(mixed))
    assert result.status == want.status
    assert result.versions == want.versions
    assert {s.value for s in result.status} == {"current", "missing", "corrupt", "retired", "unknown"}
    readable = [i for i, s in enumerate(result.status) if s.readable]
    assert result.plain.equals(plain.take(pa.array(readable)))
    assert result.counts() == count_statuses(want.status)


def test_a_plain_batch_of_one_pair_uses_no_per_row_classification(kms, policy, location, two_dek_batch):
    _, enc = two_dek_batch
    one = enc.slice(0, 100)  # rows of the first DEK only
    assert len(set(one.column(DEK_COLUMN).indices.to_pylist())) == 1
    result = decrypt(one, kms, policy, location)
    assert result.status == [ReadStatus.CURRENT] * 100 and result.versions == [1] * 100


def test_count_statuses_accepts_members_and_values():
    counts = count_statuses([ReadStatus.CURRENT, "current", ReadStatus.CORRUPT, "missing"])
    assert counts == {"current": 2, "stale": 0, "retired": 0, "unknown": 0, "missing": 1, "corrupt": 1}
    with pytest.raises(ValueError):
        count_statuses(["bogus"])


def test_open_many_reports_the_failed_positions_and_returns_no_plaintext_for_them(kms, make_scope, location):
    with make_scope() as scope:
        sealed = scope.seal_rows(["f"], [[b"a", b"bb", b"ccc"]], types=["arrow:binary"])
    cells = sealed.cells[0]
    with DekReader(kms) as reader:
        dek = reader.open(sealed.envelopes[0], location)
        aad = encode_context(
            cell_aad(dataset=location.dataset, partition=location.partition, field="f", dek_id=dek.envelope.dek_id, value_type="arrow:binary")
        )
        nonces = [c[17:29] for c in cells]
        bodies = [c[29:] for c in cells]
        assert dek.open_many(nonces, bodies, aad) == ([b"a", b"bb", b"ccc"], [])
        bodies[1] = bodies[1][:-1] + bytes([bodies[1][-1] ^ 1])
        assert dek.open_many(nonces, bodies, aad) == ([b"a", None, b"ccc"], [1])
        assert dek.open_many(nonces, bodies, [aad, aad, b"other"]) == ([b"a", None, None], [1, 2])


D = decimal.Decimal
TYPED = [
    (pa.field("v", pa.string()), ["a", None, "", "héllo"]),
    (pa.field("v", pa.large_string()), ["a", None]),
    (pa.field("v", pa.binary()), [b"\x00", None, b""]),
    (pa.field("v", pa.large_binary()), [b"x", None]),
    (pa.field("v", pa.binary(3)), [b"abc", None]),
    (pa.field("v", pa.bool_()), [True, None, False]),
    (pa.field("v", pa.int8()), [-128, None, 127]),
    (pa.field("v", pa.int64()), [2**63 - 1, None, -1]),
    (pa.field("v", pa.uint64()), [2**64 - 1, None]),
    (pa.field("v", pa.float16()), None),
    (pa.field("v", pa.float64()), [float("inf"), None, -0.0]),
    (pa.field("v", pa.decimal128(10, 2)), [D("1.25"), None]),
    (pa.field("v", pa.decimal256(40, 2)), [D("-1.25"), None]),
    (pa.field("v", pa.date32()), [dt.date(2024, 2, 29), None]),
    (pa.field("v", pa.timestamp("us", tz="UTC")), [0, None, -1]),
    (pa.field("v", pa.duration("ns")), [5, None]),
    (pa.field("v", pa.list_(pa.int8())), [[1, 2], None, []]),
    (pa.field("v", pa.dictionary(pa.int32(), pa.string())), ["x", None, "x", "y"]),
    (pa.field("v", pa.null()), [None, None]),
]


def typed_array(f: pa.Field, values) -> pa.Array:
    if values is None:  # float16 from numpy
        return pa.array(np.array([1.5, 0.0, -2.0], dtype=np.float16), type=pa.float16(), mask=np.array([False, True, False]))
    return pa.array(values, f.type)


@pytest.mark.parametrize("f, values", TYPED, ids=lambda x: str(x.type) if isinstance(x, pa.Field) else "")
@pytest.mark.parametrize("shape", ["as-is", "all-null", "sliced", "large"])
def test_from_plain_array_equals_from_plaintexts(f, values, shape):
    plaintexts = to_plaintexts(typed_array(f, values))
    if shape == "all-null":
        plaintexts = [None] * len(plaintexts)
    array = pa.array([b"pad"] + plaintexts, pa.binary()).slice(1) if shape == "sliced" else pa.array(plaintexts, pa.binary())
    if shape == "large":
        array = array.cast(pa.large_binary())
    got = from_plain_array(array, f)
    want = from_plaintexts(plaintexts, f)
    assert got.type == want.type and got.equals(want)


@pytest.mark.parametrize(
    "f, plaintexts",
    [
        (pa.field("v", pa.string()), [b"ok", b"\xff\xfe"]),
        (pa.field("v", pa.large_string()), [b"\xc3"]),
        (pa.field("v", pa.int64()), [bytes(8), bytes(7)]),
        (pa.field("v", pa.int32()), [bytes(4), bytes(5), None]),
        (pa.field("v", pa.bool_()), [b"\x02"]),
        (pa.field("v", pa.binary(3)), [b"ab"]),
        (pa.field("v", pa.null()), [b""]),
    ],
    ids=lambda x: str(x.type) if isinstance(x, pa.Field) else "",
)
def test_from_plain_array_refuses_what_from_plaintexts_refuses(f, plaintexts):
    with pytest.raises(DecryptionError):
        from_plaintexts(plaintexts, f)
    with pytest.raises(DecryptionError):
        from_plain_array(pa.array(plaintexts, pa.binary()), f)


def test_binary_builder_add_joined_rebuilds_the_values_and_refuses_lengths_that_do_not_add_up():
    parts = [[b"", b"abc", b"\x00" * 5], [b"x"], [], [b"", b""]]
    values = [v for part in parts for v in part]
    builder = arrow_codec._BinaryBuilder(sum(map(len, values)), len(values))
    for part in parts:
        builder.add_joined(b"".join(part), np.array([len(v) for v in part], dtype=np.int64))
    assert builder.full
    assert builder.array().to_pylist() == values
    assert builder.array().type == pa.binary()

    short = arrow_codec._BinaryBuilder(10, 3)
    with pytest.raises(ValueError):  # the joined bytes and the lengths disagree: never guess the cut
        short.add_joined(b"abcd", np.array([1, 2], dtype=np.int64))
    with pytest.raises(ValueError):  # more values than the builder was sized for
        short.add_joined(b"abcd", np.array([1, 1, 1, 1], dtype=np.int64))
    assert short.count == 0 and short.array().to_pylist() == []

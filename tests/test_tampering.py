"""Bad input never yields wrong plaintext: tampered, truncated, moved, swapped, unknown or retired data.

Two levels:

- reader level (`DekReader.open`, `OpenedDek.open_cell`): every corruption
  raises `DecryptionError`. One documented exception: an envelope whose KEK
  id (as parsed) names no KEK of the KMS raises `KmsKeyNotFoundError`, the
  KMS interface's error for an unknown key. We assert that it happens only
  then (the parsed id is checked against the keystore);
- batch level (`decrypt_batch`): never raises for bad data. Every input row
  gets a status, only `current`/`stale` rows are decrypted, and the rows in
  `plain` plus the rows returned by `rows_with(<other statuses>)` account for
  every input row.
"""

from __future__ import annotations

import base64
import json

import pyarrow as pa
import pytest

from keyturn.arrow_codec import DEK_COLUMN, VERSION_COLUMN, decrypt_batch, encrypt_batch, rewrap_batch
from keyturn.arrow_values import encode_plain_field
from keyturn.context import encode_context
from keyturn.errors import DecryptionError, KmsError, KmsKeyNotFoundError, KmsUnavailableError
from keyturn.format import cell_aad, parse_envelope
from keyturn.policy import ReadStatus
from keyturn.reader import DekReader
from keyturn.scope import Location, ScopeLimits

UNREADABLE = [s for s in ReadStatus if not s.readable]


# ----------------------------------------------------------------------------- helpers


def flips(data: bytes):
    """Every single-bit flip of `data`, as (bit index, flipped bytes)."""
    for i in range(len(data) * 8):
        out = bytearray(data)
        out[i // 8] ^= 1 << (i % 8)
        yield i, bytes(out)


def truncations(data: bytes):
    for n in range(len(data)):
        yield n, data[:n]


def set_column(batch: pa.RecordBatch, name: str, array: pa.Array, field: pa.Field | None = None) -> pa.RecordBatch:
    i = batch.schema.get_field_index(name)
    return batch.set_column(i, field or batch.schema.field(i), array)


def replace_cell(batch: pa.RecordBatch, column: str, row: int, value: bytes | None) -> pa.RecordBatch:
    cells = batch.column(column).to_pylist()
    cells[row] = value
    return set_column(batch, column, pa.array(cells, pa.binary()))


def set_envelopes(batch: pa.RecordBatch, envelopes: list[bytes | None]) -> pa.RecordBatch:
    dek = pa.array(envelopes, pa.binary()).dictionary_encode().cast(pa.dictionary(pa.int32(), pa.binary()))
    return set_column(batch, DEK_COLUMN, dek)


def with_field_metadata(batch: pa.RecordBatch, name: str, metadata: dict[bytes, bytes]) -> pa.RecordBatch:
    i = batch.schema.get_field_index(name)
    field = batch.schema.field(i).with_metadata(metadata)
    return pa.RecordBatch.from_arrays(batch.columns, schema=batch.schema.set(i, field))


def check_accounting(result, batch: pa.RecordBatch) -> None:
    """Main output plus every rejected row equals the input, row for row."""
    n = batch.num_rows
    assert len(result.status) == n
    readable = [i for i, s in enumerate(result.status) if s.readable]
    assert result.plain.num_rows == len(readable) == len(result.plain_status)
    rejected = result.rows_with(*UNREADABLE)
    assert result.plain.num_rows + rejected.num_rows == n
    others = [i for i in range(n) if i not in set(readable)]
    assert rejected.equals(batch.take(pa.array(others, pa.int64())))
    assert sum(result.counts().values()) == n


def decrypt(batch, kms, policy, location):
    with DekReader(kms) as reader:
        result = decrypt_batch(batch, reader, policy, location)
    check_accounting(result, batch)
    return result


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def plain():
    return pa.record_batch(
        {
            "id": pa.array([10, 11, 12, 13], pa.int64()),
            "ssn": ["111-11-1111", "222-22-2222", "333-33-3333", "444-44-4444"],
            "email": ["a@x", "b@x", "c@x", "d@x"],
            "note": ["n0", "n1", "n2", "n3"],
        }
    )


@pytest.fixture
def sealed(plain, make_scope):
    with make_scope() as scope:
        return encrypt_batch(plain, ["ssn", "email"], scope)


@pytest.fixture
def cell_and_dek(kms, make_scope, location):
    """One cell, its envelope, its AAD, and an opened DEK."""
    with make_scope() as scope:
        s = scope.seal_rows(["ssn"], [[b"123-45-6789"]], types=["arrow:binary"])
    env = s.envelopes[0]
    reader = DekReader(kms)
    dek = reader.open(env, location)
    aad = encode_context(
        cell_aad(
            dataset=location.dataset,
            partition=location.partition,
            field="ssn",
            dek_id=dek.envelope.dek_id,
            value_type="arrow:binary",
        )
    )
    assert dek.open_cell(s.cells[0][0], aad) == b"123-45-6789"
    return s.cells[0][0], env, aad, dek


# ----------------------------------------------------------------------------- reader level


def test_every_bit_flip_and_truncation_of_a_cell_is_rejected(cell_and_dek):
    cell, _, aad, dek = cell_and_dek
    count = 0
    for _, bad in list(flips(cell)) + list(truncations(cell)) + [(0, cell + b"\x00"), (0, cell + cell)]:
        with pytest.raises(DecryptionError):
            dek.open_cell(bad, aad)
        count += 1
    assert count == len(cell) * 9 + 2


def test_cell_with_wrong_aad_is_rejected(cell_and_dek, location):
    cell, _, aad, dek = cell_and_dek
    env = dek.envelope
    elsewhere = [("email", location.dataset, location.partition), ("ssn", "other", location.partition), ("ssn", location.dataset, "p2")]
    for field, ds, part in elsewhere:
        other = encode_context(cell_aad(dataset=ds, partition=part, field=field, dek_id=env.dek_id, value_type="arrow:binary"))
        with pytest.raises(DecryptionError):
            dek.open_cell(cell, other)
    for _, bad_aad in flips(aad):
        with pytest.raises(DecryptionError):
            dek.open_cell(cell, bad_aad)


def test_every_bit_flip_and_truncation_of_an_envelope_is_rejected(kms, local_kms, cell_and_dek, location):
    _, env, _, _ = cell_and_dek
    not_found = 0
    with DekReader(kms) as reader:
        for i, bad in list(flips(env)) + list(truncations(env)) + [(0, env + b"\x00")]:
            try:
                reader.open(bad, location)
            except DecryptionError:
                continue
            except KmsKeyNotFoundError:
                # documented exception: allowed only when the parsed KEK id is unknown to the KMS
                assert not local_kms.has_kek(parse_envelope(bad).kek_id)
                not_found += 1
                continue
            pytest.fail(f"envelope with bit {i} flipped was accepted")
    assert 0 < not_found < 5 * 8  # only flips inside the 5-byte KEK id "kek-1"


def test_envelope_flips_with_a_valid_kek_id_are_decryption_errors(kms, cell_and_dek, location):
    """Flipping "kek-1" to "kek-3" reaches a real KEK, which must still refuse the wrapped DEK."""
    _, env, _, _ = cell_and_dek
    bad = env.replace(b"kek-1", b"kek-3")
    assert parse_envelope(bad).kek_id == "kek-3"
    with DekReader(kms) as reader, pytest.raises(DecryptionError):
        reader.open(bad, location)


def test_substituted_dek_fails_the_commitment(kms, make_scope, location):
    """A wrapped DEK from another envelope, re-bound to this dek_id, still fails the key commitment."""
    with make_scope() as s1, make_scope() as s2:
        e1 = parse_envelope(s1.seal_rows(["f"], [[b"x"]], types=["arrow:binary"]).envelopes[0])
        e2 = parse_envelope(s2.seal_rows(["f"], [[b"y"]], types=["arrow:binary"]).envelopes[0])
    # rewrap DEK 2 under the context of DEK 1 (an attacker with KMS access could do this)
    from keyturn.format import kms_context

    rewrapped = kms.rewrap(
        e2.wrapped_dek,
        source_kek_id="kek-1",
        source_context=kms_context(dataset=location.dataset, partition=location.partition, dek_id=e2.dek_id, key_version=1),
        destination_kek_id="kek-1",
        destination_context=kms_context(dataset=location.dataset, partition=location.partition, dek_id=e1.dek_id, key_version=1),
    ).wrapped
    forged = e1.with_wrapping(key_version=1, kek_id="kek-1", wrapped_dek=rewrapped).to_bytes()
    with DekReader(kms) as reader, pytest.raises(DecryptionError):
        reader.open(forged, location)


def test_reader_caches_a_bad_envelope(kms, cell_and_dek, location):
    """One KMS attempt per bad envelope, not one per row (CountingKms counts only successes)."""

    class Attempts:
        def __init__(self, inner):
            self.inner, self.decrypts = inner, 0

        def decrypt(self, *args, **kwargs):
            self.decrypts += 1
            return self.inner.decrypt(*args, **kwargs)

    _, env, _, _ = cell_and_dek
    bad = env[:-1] + bytes([env[-1] ^ 1])  # a flipped bit in the wrapped DEK: parses, fails in the KMS
    attempts = Attempts(kms)
    with DekReader(attempts) as reader:
        for _ in range(3):
            with pytest.raises(DecryptionError):
                reader.open(bad, location)
    assert attempts.decrypts == 1


# ----------------------------------------------------------------------------- batch level: moved and swapped data


def test_every_bit_flip_of_a_cell_in_a_batch_marks_only_that_row(kms, policy, location, sealed, plain):
    cell = sealed.column("ssn")[2].as_py()
    with DekReader(kms) as reader:
        for _, bad in list(flips(cell)) + list(truncations(cell)):
            batch = replace_cell(sealed, "ssn", 2, bad)
            result = decrypt_batch(batch, reader, policy, location)
            assert result.status == [ReadStatus.CURRENT, ReadStatus.CURRENT, ReadStatus.CORRUPT, ReadStatus.CURRENT]
            assert result.plain.to_pylist() == [plain.to_pylist()[i] for i in (0, 1, 3)]
    check_accounting(result, batch)
    assert kms.calls.decrypt == 1


def test_every_bit_flip_of_the_envelope_in_a_batch_is_never_readable(kms, policy, location, sealed):
    env = sealed.column(DEK_COLUMN).dictionary[0].as_py()
    for i, bad in list(flips(env)) + list(truncations(env)):
        batch = set_envelopes(sealed, [bad] * 4)
        result = decrypt(batch, kms, policy, location)
        assert all(s in (ReadStatus.CORRUPT, ReadStatus.UNKNOWN) for s in result.status), i
        assert result.plain.num_rows == 0


def test_cell_moved_to_another_column_is_corrupt(kms, policy, location, sealed, plain):
    batch = replace_cell(sealed, "email", 1, sealed.column("ssn")[1].as_py())
    result = decrypt(batch, kms, policy, location)
    assert result.status[1] is ReadStatus.CORRUPT
    assert [s.value for s in result.status] == ["current", "corrupt", "current", "current"]
    assert result.plain.column("id").to_pylist() == [10, 12, 13]


def test_cells_swapped_between_columns_of_the_same_row(kms, policy, location, sealed):
    ssn, email = sealed.column("ssn")[0].as_py(), sealed.column("email")[0].as_py()
    batch = replace_cell(replace_cell(sealed, "ssn", 0, email), "email", 0, ssn)
    result = decrypt(batch, kms, policy, location)
    assert result.status[0] is ReadStatus.CORRUPT


def test_cell_moved_to_another_row_with_bound_columns_is_corrupt(kms, policy, location, plain, make_scope):
    with make_scope() as scope:
        sealed = encrypt_batch(plain, ["ssn", "email"], scope, bind_columns=["id"])
    a, b = sealed.column("ssn")[0].as_py(), sealed.column("ssn")[3].as_py()
    batch = replace_cell(replace_cell(sealed, "ssn", 0, b), "ssn", 3, a)
    result = decrypt(batch, kms, policy, location)
    assert [s.value for s in result.status] == ["corrupt", "current", "current", "corrupt"]
    # changing the bound value itself is caught too
    batch = set_column(sealed, "id", pa.array([10, 11, 99, 13], pa.int64()))
    assert decrypt(batch, kms, policy, location).status[2] is ReadStatus.CORRUPT


def test_without_bound_columns_a_cell_is_bound_to_column_and_dek_only(kms, policy, location, sealed, plain):
    """Documents the contract: row binding needs bind_columns; a same-DEK row swap is otherwise undetectable."""
    a, b = sealed.column("ssn")[0].as_py(), sealed.column("ssn")[3].as_py()
    batch = replace_cell(replace_cell(sealed, "ssn", 0, b), "ssn", 3, a)
    result = decrypt(batch, kms, policy, location)
    assert result.plain.column("ssn").to_pylist()[0] == plain.column("ssn")[3].as_py()


@pytest.mark.parametrize("other", [Location("sales", "2024-01-02"), Location("hr", "2024-01-01")], ids=["partition", "dataset"])
def test_data_read_at_another_location_is_corrupt(kms, policy, location, sealed, other):
    result = decrypt(sealed, kms, policy, other)
    assert result.status == [ReadStatus.CORRUPT] * 4 and result.plain.num_rows == 0


@pytest.mark.parametrize("other", [Location("sales", "2024-01-02"), Location("hr", "2024-01-01")], ids=["partition", "dataset"])
def test_rows_and_cells_moved_from_another_location_are_corrupt(kms, policy, location, plain, make_scope, other):
    with make_scope() as here, make_scope(at=other) as there:
        home = encrypt_batch(plain, ["ssn", "email"], here)
        away = encrypt_batch(plain, ["ssn", "email"], there)
    # a single cell from the other location, in a row of this one
    batch = replace_cell(home, "ssn", 1, away.column("ssn")[1].as_py())
    result = decrypt(batch, kms, policy, location)
    assert [s.value for s in result.status] == ["current", "corrupt", "current", "current"]
    # a whole row (cells and envelope) from the other location
    mixed = pa.Table.from_batches([home.slice(0, 2), away.slice(2, 1), home.slice(3, 1)]).combine_chunks().to_batches()[0]
    result = decrypt(mixed, kms, policy, location)
    assert [s.value for s in result.status] == ["current", "current", "corrupt", "current"]


def test_swapped_envelopes_of_two_rows_with_different_deks(kms, policy, location, plain, make_scope):
    with make_scope(limits=ScopeLimits(max_cells=4)) as scope:
        sealed = encrypt_batch(plain, ["ssn", "email"], scope)  # 2 rows per DEK
    envs = sealed.column(DEK_COLUMN).to_pylist()
    assert envs[0] != envs[3]
    envs[0], envs[3] = envs[3], envs[0]
    result = decrypt(set_envelopes(sealed, envs), kms, policy, location)
    assert [s.value for s in result.status] == ["corrupt", "current", "current", "corrupt"]


def test_version_column_disagreeing_with_the_envelope_is_corrupt(kms, make_policy, location, sealed):
    policy = make_policy(active=2, decrypt_only=[1])
    for version in (2, 3, 0, -1, 2**40):
        batch = set_column(sealed, VERSION_COLUMN, pa.array([1, version, 1, 1], pa.int64()))
        result = decrypt(batch, kms, policy, location)
        assert result.status[1] is ReadStatus.CORRUPT, version
        assert [result.status[i] for i in (0, 2, 3)] == [ReadStatus.STALE] * 3


def test_envelope_kek_id_disagreeing_with_the_policy_is_corrupt_without_kms_calls(kms, policy, location, sealed):
    env = parse_envelope(sealed.column(DEK_COLUMN).dictionary[0].as_py())
    for kek_id in ("kek-2", "kek-0", "kek\r1", "x" * 1024):
        forged = env.with_wrapping(key_version=1, kek_id=kek_id, wrapped_dek=env.wrapped_dek).to_bytes()
        before = kms.calls.total
        result = decrypt(set_envelopes(sealed, [forged] * 4), kms, policy, location)
        assert result.status == [ReadStatus.CORRUPT] * 4
        assert kms.calls.total == before
        rewrapped = rewrap_batch(set_envelopes(sealed, [forged] * 4), kms, policy, location)
        assert rewrapped.status == [ReadStatus.CORRUPT] * 4 and kms.calls.total == before


# ----------------------------------------------------------------------------- batch level: versions the policy refuses


def test_unknown_version_is_classified_not_decrypted(kms, make_policy, make_scope, location, plain):
    with make_scope(3) as scope:
        sealed = encrypt_batch(plain, ["ssn"], scope)
    policy = make_policy(active=2, decrypt_only=[1])
    result = decrypt(sealed, kms, policy, location)
    assert result.status == [ReadStatus.UNKNOWN] * 4
    assert kms.calls.decrypt == 0
    assert result.rows_with(ReadStatus.UNKNOWN).equals(sealed)
    assert result.versions == [3] * 4


@pytest.mark.parametrize("state", ["retired", "pending_deletion"])
def test_retired_versions_are_classified_not_decrypted(kms, make_policy, make_scope, location, plain, state):
    with make_scope(1) as s1:
        old = encrypt_batch(plain.slice(0, 2), ["ssn"], s1)
    with make_scope(2) as s2:
        new = encrypt_batch(plain.slice(2, 2), ["ssn"], s2)
    batch = pa.Table.from_batches([old, new]).combine_chunks().to_batches()[0]
    policy = make_policy(active=2, **{state: [1]})
    result = decrypt(batch, kms, policy, location)
    assert [s.value for s in result.status] == ["retired", "retired", "current", "current"]
    assert kms.calls.decrypt == 1  # only the version-2 DEK
    retired = result.rows_with(ReadStatus.RETIRED)
    assert retired.schema == old.schema and retired.to_pylist() == old.to_pylist()
    before = kms.calls.total
    rewrapped = rewrap_batch(batch, kms, policy, location)
    assert kms.calls.total == before and rewrapped.batch.equals(batch)


def test_missing_metadata_is_classified_not_decrypted(kms, policy, location, sealed):
    cases = {
        "null-version": set_column(sealed, VERSION_COLUMN, pa.array([None, 1, 1, 1], pa.int64())),
        "null-envelope": set_envelopes(sealed, [sealed.column(DEK_COLUMN)[0].as_py(), None, *sealed.column(DEK_COLUMN).to_pylist()[2:]]),
    }
    for name, batch in cases.items():
        result = decrypt(batch, kms, policy, location)
        bad = 0 if name == "null-version" else 1
        assert result.status[bad] is ReadStatus.MISSING, name
        assert sum(s is ReadStatus.CURRENT for s in result.status) == 3
    before = kms.calls.decrypt
    for drop in ([VERSION_COLUMN, DEK_COLUMN], [VERSION_COLUMN], [DEK_COLUMN]):
        # ciphertext without its key columns is a projection that dropped them: a clear error, not 4 silent
        # `missing` rows (a reader of whole files that lack them adds them as nulls: see the lines above)
        batch = sealed.drop_columns(drop)
        with pytest.raises(ValueError, match="lacks the key column"):
            decrypt(batch, kms, policy, location)
    assert kms.calls.decrypt == before


def test_metadata_columns_of_the_wrong_type_do_not_crash(kms, policy, location, sealed):
    as_text = set_column(sealed, VERSION_COLUMN, pa.array(["1"] * 4), pa.field(VERSION_COLUMN, pa.string()))
    assert all(not s.readable for s in decrypt(as_text, kms, policy, location).status)
    as_ints = set_column(sealed, DEK_COLUMN, pa.array([1, 2, 3, 4], pa.int64()), pa.field(DEK_COLUMN, pa.int64()))
    assert decrypt(as_ints, kms, policy, location).status == [ReadStatus.CORRUPT] * 4
    plain_binary = set_column(
        sealed, DEK_COLUMN, sealed.column(DEK_COLUMN).dictionary_decode(), pa.field(DEK_COLUMN, pa.binary())
    )
    assert decrypt(plain_binary, kms, policy, location).status == [ReadStatus.CURRENT] * 4


# ----------------------------------------------------------------------------- batch level: tampered field metadata


def _plain_field_cases(sealed: pa.RecordBatch) -> dict[str, dict[bytes, bytes]]:
    meta = dict(sealed.schema.field("ssn").metadata)

    def with_plain(value: bytes | None) -> dict[bytes, bytes]:
        out = dict(meta)
        if value is None:
            del out[b"keyturn.plain_field"]
        else:
            out[b"keyturn.plain_field"] = value
        return out

    two_fields = base64.b64encode(pa.schema([pa.field("ssn", pa.string()), pa.field("x", pa.int8())]).serialize().to_pybytes())
    good = meta[b"keyturn.plain_field"]
    return {
        "not-base64": with_plain(b"%%%not base64%%%"),
        "base64-of-garbage": with_plain(base64.b64encode(b"\x00garbage" * 10)),
        "truncated": with_plain(good[: len(good) // 2]),
        "empty": with_plain(b""),
        "missing": with_plain(None),
        "two-fields": with_plain(two_fields),
        "other-name": with_plain(encode_plain_field(pa.field("email", pa.string()))),
        "int64": with_plain(encode_plain_field(pa.field("ssn", pa.int64()))),
        "bool": with_plain(encode_plain_field(pa.field("ssn", pa.bool_()))),
        "list": with_plain(encode_plain_field(pa.field("ssn", pa.list_(pa.int64())))),
        "struct": with_plain(encode_plain_field(pa.field("ssn", pa.struct([("a", pa.int8())])))),
        "null-type": with_plain(encode_plain_field(pa.field("ssn", pa.null()))),
        "bind-not-json": {**meta, b"keyturn.bind": b"[not json"},
        "bind-not-a-list": {**meta, b"keyturn.bind": b'{"a": 1}'},
        "bind-unknown-column": {**meta, b"keyturn.bind": b'["nope"]'},
        "bind-added": {**meta, b"keyturn.bind": b'["id"]'},
    }


FIELD_METADATA_CASES = [
    "not-base64", "base64-of-garbage", "truncated", "empty", "missing", "two-fields", "other-name", "int64", "bool",
    "list", "struct", "null-type", "bind-not-json", "bind-not-a-list", "bind-unknown-column", "bind-added",
]


@pytest.mark.parametrize("case", FIELD_METADATA_CASES)
def test_tampered_field_metadata_marks_rows_corrupt(kms, policy, location, sealed, case):
    cases = _plain_field_cases(sealed)
    assert sorted(cases) == sorted(FIELD_METADATA_CASES)
    batch = with_field_metadata(sealed, "ssn", cases[case])
    result = decrypt(batch, kms, policy, location)
    assert result.status == [ReadStatus.CORRUPT] * 4
    assert result.plain.num_rows == 0


def test_bind_removed_from_metadata_is_corrupt(kms, policy, location, plain, make_scope):
    with make_scope() as scope:
        sealed = encrypt_batch(plain, ["ssn"], scope, bind_columns=["id"])
    meta = {**sealed.schema.field("ssn").metadata, b"keyturn.bind": b"[]"}
    result = decrypt(with_field_metadata(sealed, "ssn", meta), kms, policy, location)
    assert result.status == [ReadStatus.CORRUPT] * 4


@pytest.mark.parametrize(
    "values, original, tampered",
    [
        ([1, 2], pa.int64(), pa.float64()),
        ([1, 2], pa.timestamp("s"), pa.timestamp("ns")),
        ([1, 2], pa.int32(), pa.uint32()),
        ([1, 2], pa.timestamp("us", tz="UTC"), pa.timestamp("us", tz="Asia/Tokyo")),
        ([1, 2], pa.duration("ms"), pa.int64()),
        (["1.50", "2.25"], pa.decimal128(10, 2), pa.decimal128(10, 3)),
        (["a", "b"], pa.string(), pa.binary()),
        (["a", "b"], pa.string(), pa.large_string()),
        ([[1], [2, 3]], pa.list_(pa.int64()), pa.list_(pa.float64())),
        ([[1], [2, 3]], pa.list_(pa.int64()), pa.list_(pa.timestamp("ns"))),
        ([{"x": 1}, {"x": 2}], pa.struct([("x", pa.int32())]), pa.struct([("x", pa.float32())])),
    ],
    ids=[
        "int64-as-float64", "ts-s-as-ns", "int32-as-uint32", "tz-UTC-as-Tokyo", "duration-as-int64",
        "decimal-scale", "string-as-binary", "string-as-large-string", "list-int-as-list-double",
        "list-int-as-list-ts", "struct-int-as-struct-float",
    ],
)
def test_same_width_type_swap_in_field_metadata_is_corrupt(kms, policy, location, make_scope, values, original, tampered):
    """The plain type is bound into every cell's AAD: reinterpreting the bytes fails authentication."""
    if pa.types.is_decimal(original):
        import decimal

        values = [decimal.Decimal(v) for v in values]
    batch = pa.record_batch({"v": pa.array(values, original)})
    with make_scope() as scope:
        sealed = encrypt_batch(batch, ["v"], scope)
    meta = {**sealed.schema.field("v").metadata, b"keyturn.plain_field": encode_plain_field(pa.field("v", tampered))}
    result = decrypt(with_field_metadata(sealed, "v", meta), kms, policy, location)
    assert result.status == [ReadStatus.CORRUPT] * 2


def test_field_metadata_tampering_in_one_column_spares_no_row_but_loses_none(kms, policy, location, sealed):
    meta = {**sealed.schema.field("email").metadata, b"keyturn.plain_field": b"junk"}
    batch = with_field_metadata(sealed, "email", meta)
    result = decrypt(batch, kms, policy, location)
    assert result.status == [ReadStatus.CORRUPT] * 4
    assert result.rows_with(ReadStatus.CORRUPT).equals(batch)
    # reading only the intact column still works
    with DekReader(kms) as reader:
        only_ssn = decrypt_batch(batch, reader, policy, location, columns=["ssn"])
    assert only_ssn.status == [ReadStatus.CURRENT] * 4
    assert json.loads(batch.schema.field("ssn").metadata[b"keyturn.bind"]) == []


# ----------------------------------------------------------------------------- KMS trouble is not bad data


def test_a_closed_kms_raises_and_never_marks_rows_corrupt(local_kms, policy, make_policy, location, sealed):
    """A closed (or otherwise unusable) KMS is the caller's problem, not the data's: no row is quarantined."""
    local_kms.close()
    with DekReader(local_kms) as reader:
        with pytest.raises(KmsError):
            decrypt_batch(sealed, reader, policy, location)
        with pytest.raises(KmsError):
            reader.open(sealed.column(DEK_COLUMN).dictionary[0].as_py(), location)
    with pytest.raises(KmsError):
        rewrap_batch(sealed, local_kms, make_policy(active=2, decrypt_only=[1]), location)


def test_a_kms_outage_propagates_and_is_not_cached(kms, policy, location, sealed, plain):
    class Flaky:
        def __init__(self, inner):
            self.inner, self.down = inner, True

        def decrypt(self, *args, **kwargs):
            if self.down:
                raise KmsUnavailableError("service unavailable")
            return self.inner.decrypt(*args, **kwargs)

    flaky = Flaky(kms)
    with DekReader(flaky) as reader:
        with pytest.raises(KmsUnavailableError):
            decrypt_batch(sealed, reader, policy, location)
        flaky.down = False  # the same reader recovers: an outage is never remembered as bad data
        result = decrypt_batch(sealed, reader, policy, location)
    assert result.status == [ReadStatus.CURRENT] * 4 and result.plain.equals(plain)

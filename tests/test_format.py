"""Wire format v1 (keyturn/format.py) and the canonical context (keyturn/context.py)."""

from __future__ import annotations

import itertools
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from keyturn.context import MAX_CONTEXT_BYTES, MAX_KEY_BYTES, MAX_VALUE_BYTES, encode_context
from keyturn.errors import DecryptionError
from keyturn.format import (
    CELL_OVERHEAD,
    DEK_ID_BYTES,
    FORMAT_VERSION,
    MAX_KEK_ID_BYTES,
    MAX_WRAPPED_DEK_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    Envelope,
    cell_aad,
    commitment_matches,
    derive_cell_key,
    derive_commitment,
    kms_context,
    parse_cell_header,
    parse_envelope,
)
from keyturn.reader import DekReader
from keyturn.scope import Location

DEK = bytes(range(32))
DEK_ID = bytes(range(100, 116))
COMMITMENT = bytes(range(200, 232))


def envelope(**overrides) -> Envelope:
    fields = dict(dek_id=DEK_ID, key_version=7, kek_id="kek-1", commitment=COMMITMENT, wrapped_dek=b"W" * 61)
    fields.update(overrides)
    return Envelope(**fields)


# ----------------------------------------------------------------------------- envelope layout


def test_envelope_layout_byte_by_byte():
    env = envelope(key_version=0x01020304, kek_id="kek-é", wrapped_dek=b"\xaa\xbb\xcc")
    data = env.to_bytes()
    kek = "kek-é".encode()
    assert data[0] == FORMAT_VERSION == 0x01
    assert data[1] == 0x01  # AES-256-GCM with HKDF-SHA256 subkeys
    assert data[2:18] == DEK_ID
    assert data[18:22] == b"\x01\x02\x03\x04"
    assert data[22:24] == struct.pack(">H", len(kek))
    assert data[24 : 24 + len(kek)] == kek
    pos = 24 + len(kek)
    assert data[pos : pos + 32] == COMMITMENT
    assert data[pos + 32 : pos + 34] == b"\x00\x03"
    assert data[pos + 34 :] == b"\xaa\xbb\xcc"
    assert len(data) == 58 + len(kek) + 3


def test_envelope_round_trip_and_rewrap_fields():
    env = envelope()
    assert parse_envelope(env.to_bytes()) == env
    assert parse_envelope(bytearray(env.to_bytes())) == env
    assert parse_envelope(memoryview(env.to_bytes())) == env
    moved = env.with_wrapping(key_version=8, kek_id="kek-2", wrapped_dek=b"X" * 61)
    assert (moved.dek_id, moved.commitment, moved.algorithm) == (env.dek_id, env.commitment, env.algorithm)
    assert (moved.key_version, moved.kek_id, moved.wrapped_dek) == (8, "kek-2", b"X" * 61)


def test_envelope_bounds_accepted_at_the_limits():
    big = envelope(key_version=2**32 - 1, kek_id="k" * MAX_KEK_ID_BYTES, wrapped_dek=b"w" * MAX_WRAPPED_DEK_BYTES)
    assert parse_envelope(big.to_bytes()) == big
    small = envelope(key_version=1, kek_id="k", wrapped_dek=b"w")
    assert parse_envelope(small.to_bytes()) == small


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"dek_id": b"short"}, "dek_id"),
        ({"key_version": 0}, "key_version"),
        ({"key_version": 2**32}, "key_version"),
        ({"kek_id": ""}, "kek_id"),
        ({"kek_id": "k" * (MAX_KEK_ID_BYTES + 1)}, "kek_id"),
        ({"kek_id": "é" * (MAX_KEK_ID_BYTES // 2 + 1)}, "kek_id"),  # the cap counts UTF-8 bytes
        ({"commitment": b"c" * 31}, "commitment"),
        ({"wrapped_dek": b""}, "wrapped"),
        ({"wrapped_dek": b"w" * (MAX_WRAPPED_DEK_BYTES + 1)}, "wrapped"),
        ({"algorithm": 2}, "algorithm"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_envelope_rejects_out_of_bounds_fields(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        envelope(**overrides)


def _with_u16(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack(">H", value) + data[offset + 2 :]


def _bad_envelopes() -> dict[str, bytes]:
    good = envelope(kek_id="kek-1").to_bytes()
    wrapped_len_at = 24 + 5 + 32
    return {
        "empty": b"",
        "version-only": b"\x01",
        "version-0": b"\x00" + good[1:],
        "version-2": b"\x02" + good[1:],
        "version-0x80": b"\x80" + good[1:],
        "algorithm-0": good[:1] + b"\x00" + good[2:],
        "algorithm-2": good[:1] + b"\x02" + good[2:],
        "key-version-0": good[:18] + b"\x00\x00\x00\x00" + good[22:],
        "kek-len-0": _with_u16(good, 22, 0),
        "kek-len-too-big": _with_u16(good, 22, MAX_KEK_ID_BYTES + 1),
        "kek-len-past-end": _with_u16(good, 22, 0xFFFF),
        "kek-len-plus-1": _with_u16(good, 22, 6),
        "kek-len-minus-1": _with_u16(good, 22, 4),
        "kek-not-utf8": good[:24] + b"\xff\xfe\xfd\xfc\xfb" + good[29:],
        "wrapped-len-0": _with_u16(good, wrapped_len_at, 0),
        "wrapped-len-plus-1": _with_u16(good, wrapped_len_at, 62),
        "wrapped-len-minus-1": _with_u16(good, wrapped_len_at, 60),
        "wrapped-len-max": _with_u16(good, wrapped_len_at, 0xFFFF),
        "trailing-byte": good + b"\x00",
        "missing-byte": good[:-1],
        "header-only": good[:24],
        "no-wrapped-length": good[: wrapped_len_at + 1],
    }


@pytest.mark.parametrize("name", sorted(_bad_envelopes()))
def test_parse_envelope_rejects(name):
    with pytest.raises(DecryptionError):
        parse_envelope(_bad_envelopes()[name])


@pytest.mark.parametrize("first", [b for b in range(256) if b != FORMAT_VERSION])
def test_envelope_version_byte_is_checked(first):
    good = envelope().to_bytes()
    with pytest.raises(DecryptionError):
        parse_envelope(bytes([first]) + good[1:])


@pytest.mark.parametrize("value", ["text", None, 12, 3.5, [1, 2]], ids=repr)
def test_parse_envelope_wrong_input_types_are_decryption_errors(value):
    with pytest.raises(DecryptionError):
        parse_envelope(value)  # type: ignore[arg-type]


def test_all_parse_failures_share_one_message():
    messages = set()
    for data in _bad_envelopes().values():
        with pytest.raises(DecryptionError) as info:
            parse_envelope(data)
        messages.add(str(info.value))
    for cell in (b"", b"\x02" + bytes(60), bytes(CELL_OVERHEAD - 1)):
        with pytest.raises(DecryptionError) as info:
            parse_cell_header(cell)
        messages.add(str(info.value))
    assert len(messages) == 1


def test_envelope_repr_shows_no_secret_material():
    env = envelope()
    text = repr(env)
    assert DEK_ID.hex() in text and "kek-1" in text
    assert COMMITMENT.hex() not in text and "WWWW" not in text


# ----------------------------------------------------------------------------- cells


def test_cell_layout(make_scope):
    with make_scope() as scope:
        sealed = scope.seal_rows(["f"], [[b"hello", b"", None, b"x" * 100]], types=["arrow:binary"])
    envelope_ = parse_envelope(sealed.envelopes[0])
    cells = sealed.cells[0]
    assert cells[2] is None
    for cell, plain in zip([cells[0], cells[1], cells[3]], [b"hello", b"", b"x" * 100]):
        assert cell[0] == FORMAT_VERSION
        assert cell[1:17] == envelope_.dek_id
        assert len(cell) == 1 + DEK_ID_BYTES + NONCE_BYTES + len(plain) + TAG_BYTES == CELL_OVERHEAD + len(plain)
        header = parse_cell_header(cell)
        assert header.dek_id == envelope_.dek_id and header.nonce == cell[17:29]
    # nonces are a big-endian counter from 0, consumed only by non-null values
    assert [c[17:29] for c in (cells[0], cells[1], cells[3])] == [i.to_bytes(12, "big") for i in range(3)]


def test_cell_is_aes_gcm_under_the_hkdf_cell_key(kms, make_scope, location):
    """A known-structure check: decrypt a cell by hand from the unwrapped DEK and the documented AAD."""
    with make_scope() as scope:
        sealed = scope.seal_rows(["ssn"], [[b"123-45-6789"]], types=["arrow:binary"])
    env = parse_envelope(sealed.envelopes[0])
    dek = kms.decrypt(
        env.kek_id,
        env.wrapped_dek,
        kms_context(dataset=location.dataset, partition=location.partition, dek_id=env.dek_id, key_version=1),
    ).plaintext.material
    expected_key = HKDF(hashes.SHA256(), 32, salt=env.dek_id, info=b"keyturn/v1/cell-key").derive(dek)
    assert derive_cell_key(dek, env.dek_id) == expected_key
    expected_commitment = HKDF(hashes.SHA256(), 32, salt=env.dek_id, info=b"keyturn/v1/commitment").derive(dek)
    assert env.commitment == derive_commitment(dek, env.dek_id) == expected_commitment
    assert commitment_matches(dek, env)
    assert not commitment_matches(bytes(32), env)
    assert not commitment_matches(dek[:31], env)
    aad = encode_context(
        {
            "keyturn:format": "1",
            "dataset": "sales",
            "partition": "2024-01-01",
            "field": "ssn",
            "type": "arrow:binary",
            "dek": env.dek_id,
        }
    )
    assert aad == encode_context(
        cell_aad(dataset="sales", partition="2024-01-01", field="ssn", dek_id=env.dek_id, value_type="arrow:binary")
    )
    cell = sealed.cells[0][0]
    assert AESGCM(expected_key).decrypt(cell[17:29], cell[29:], aad) == b"123-45-6789"


def test_derived_keys_differ_and_check_lengths():
    cell_key = derive_cell_key(DEK, DEK_ID)
    commitment = derive_commitment(DEK, DEK_ID)
    assert len(cell_key) == len(commitment) == 32
    assert len({cell_key, commitment, DEK}) == 3
    assert derive_cell_key(DEK, bytes(16)) != cell_key  # dek_id is the salt
    for bad in (DEK[:31], DEK + b"\x00", b""):
        with pytest.raises(ValueError, match="32 bytes"):
            derive_cell_key(bad, DEK_ID)
        with pytest.raises(ValueError, match="32 bytes"):
            derive_commitment(bad, DEK_ID)


@pytest.mark.parametrize(
    "cell",
    [b"", b"\x01", bytes([1]) + bytes(CELL_OVERHEAD - 2), b"\x02" + bytes(CELL_OVERHEAD), b"\x00" + bytes(CELL_OVERHEAD)],
    ids=["empty", "one-byte", "one-short", "version-2", "version-0"],
)
def test_parse_cell_header_rejects(cell):
    with pytest.raises(DecryptionError):
        parse_cell_header(cell)


@pytest.mark.parametrize("value", ["x" * 60, None, 7, [1] * 60], ids=["str", "None", "int", "list"])
def test_parse_cell_header_wrong_types(value):
    with pytest.raises(DecryptionError):
        parse_cell_header(value)  # type: ignore[arg-type]


def test_parse_cell_header_accepts_minimum():
    cell = bytes([1]) + DEK_ID + bytes(12) + bytes(16)
    assert parse_cell_header(cell).dek_id == DEK_ID
    assert parse_cell_header(memoryview(cell)).nonce == bytes(12)


def test_kms_context_and_cell_aad_contents():
    assert kms_context(dataset="d", partition="p", dek_id=DEK_ID, key_version=3) == {
        "keyturn:dataset": "d",
        "keyturn:partition": "p",
        "keyturn:dek": DEK_ID.hex(),
        "keyturn:version": "3",
    }
    aad = cell_aad(dataset="d", partition="p", field="f", dek_id=DEK_ID, value_type="arrow:int64", bindings={"id": b"\x01"})
    assert aad == {
        "keyturn:format": "1",
        "dataset": "d",
        "partition": "p",
        "field": "f",
        "type": "arrow:int64",
        "dek": DEK_ID,
        "row:id": b"\x01",
    }


def test_reader_rejects_an_envelope_for_another_location(kms, make_scope, location):
    with make_scope() as scope:
        env = scope.seal_rows(["f"], [[b"v"]], types=["arrow:binary"]).envelopes[0]
    with DekReader(kms) as reader:
        for other in (Location("sales", "2024-01-02"), Location("other", location.partition)):
            with pytest.raises(DecryptionError):
                reader.open(env, other)
        assert reader.open(env, location).envelope.dek_id == parse_envelope(env).dek_id


# ----------------------------------------------------------------------------- canonical context


def test_context_no_delimiter_collisions():
    assert encode_context({"ab": "c"}) != encode_context({"a": "bc"})
    assert encode_context({"a": "b", "c": "d"}) != encode_context({"a": "bcd"})
    assert encode_context({"a": ""}) != encode_context({})
    assert encode_context({"a": "b"}) != encode_context({"a": "b", "c": ""})
    assert encode_context({"k": "a=b"}) != encode_context({"k=a": "b"})


def test_context_layout():
    assert encode_context({}) == b"\x00\x00"
    assert encode_context({"b": b"\x01\x02", "a": "xy"}) == (
        b"\x00\x02" + b"\x00\x01a" + b"\x00\x00\x00\x02xy" + b"\x00\x01b" + b"\x00\x00\x00\x02\x01\x02"
    )


def test_context_order_independent():
    pairs = [("dataset", "d"), ("field", "f"), ("dek", b"\x00\x01"), ("row:z", b""), ("Row", "x")]
    encodings = {encode_context(dict(p)) for p in itertools.permutations(pairs)}
    assert len(encodings) == 1


def test_context_sorts_by_key_bytes_not_code_points():
    # U+FF5E and U+10000 sort differently as UTF-16 and as UTF-8 bytes; the encoding uses bytes
    a, b = "\uff5e", "\U00010000"
    encoded = encode_context({b: "2", a: "1"})
    assert encoded.index(a.encode()) < encoded.index(b.encode())


@given(
    st.dictionaries(st.text(min_size=1, max_size=6), st.text(max_size=6), max_size=4),
    st.dictionaries(st.text(min_size=1, max_size=6), st.text(max_size=6), max_size=4),
)
@settings(max_examples=400, deadline=None)
def test_context_encoding_is_injective(a, b):
    assert (encode_context(a) == encode_context(b)) == (a == b)


@pytest.mark.parametrize(
    "context, error, needle",
    [
        ({"": "v"}, ValueError, "1..255"),
        ({"k" * (MAX_KEY_BYTES + 1): "v"}, ValueError, "1..255"),
        ({"é" * 128: "v"}, ValueError, "1..255"),  # 256 UTF-8 bytes
        ({"k": "v" * (MAX_VALUE_BYTES + 1)}, ValueError, "exceeds"),
        ({"k": b"v" * (MAX_VALUE_BYTES + 1)}, ValueError, "exceeds"),
        ({1: "v"}, TypeError, "keys must be str"),
        ({b"k": "v"}, TypeError, "keys must be str"),
        ({"k": 1}, TypeError, "str or bytes"),
        ({"k": None}, TypeError, "str or bytes"),
        ({f"k{i:02d}": b"v" * MAX_VALUE_BYTES for i in range(16)}, ValueError, "cap"),
    ],
    ids=[
        "empty-key", "long-key", "long-utf8-key", "long-value", "long-bytes-value",
        "int-key", "bytes-key", "int-value", "none-value", "total-cap",
    ],
)
def test_context_caps_and_types(context, error, needle):
    with pytest.raises(error, match=needle):
        encode_context(context)


def test_context_caps_accept_the_limits():
    assert len(encode_context({"k" * MAX_KEY_BYTES: "v" * MAX_VALUE_BYTES})) == 2 + 2 + 255 + 4 + MAX_VALUE_BYTES
    # 15 maximal values fit under the 1 MiB cap, a 16th does not (see the caps test)
    fifteen = {f"k{i:02d}": b"v" * MAX_VALUE_BYTES for i in range(15)}
    assert len(encode_context(fifteen)) <= MAX_CONTEXT_BYTES


def test_context_too_many_pairs():
    with pytest.raises(ValueError, match="too many pairs"):
        encode_context({str(i): "" for i in range(0x10000)})

"""Fuzzing the parsers and the open path with random and mutated headers.

Thousands of inputs go to `parse_envelope`, `parse_cell_header`,
`DekReader.open` and `OpenedDek.open_cell`: random bytes, and mutations of
valid envelopes and cells (byte edits, length-field edits, insertions,
deletions, truncations). The contract:

- the only exception is `DecryptionError`;
- the one documented exception to that: `DekReader.open` may raise
  `KmsKeyNotFoundError`, the KMS interface's error for an unknown key, and
  only when the KEK id it parsed names no KEK of the KMS (checked below).
  At the batch level such an envelope never reaches the KMS: the policy
  check in `classify_rows` marks it corrupt first (see test_tampering.py);
- anything accepted is exactly what was sealed: a parsed envelope
  re-serializes to the same bytes, and an envelope or cell that opens is the
  unmodified original;
- no input hangs: each example has a deadline far above its normal cost.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from keyturn.context import encode_context
from keyturn.errors import DecryptionError, KmsKeyNotFoundError
from keyturn.format import CELL_OVERHEAD, cell_aad, parse_cell_header, parse_envelope
from keyturn.kms.base import CountingKms
from keyturn.kms.local import LocalKms
from keyturn.reader import DekReader, OpenedDek
from keyturn.scope import DekScope, KekRef, Location

LOCATION = Location("sales", "2024-01-01")
PLAINTEXT = b"123-45-6789"
FUZZ = settings(
    max_examples=3000,
    deadline=timedelta(seconds=2),  # generous: catches hangs, not slow machines
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Material:
    local: LocalKms
    kms: CountingKms
    envelope: bytes
    cell: bytes
    aad: bytes
    opened: OpenedDek


def _build() -> Material:
    import os

    local = LocalKms.in_memory({"kek-1": os.urandom(32), "kek-2": os.urandom(32)})
    kms = CountingKms(local)
    with DekScope(kms, KekRef(1, "kek-1"), LOCATION) as scope:
        sealed = scope.seal_rows(["ssn"], [[PLAINTEXT]], types=["arrow:binary"])
    envelope, cell = sealed.envelopes[0], sealed.cells[0][0]
    opened = DekReader(kms).open(envelope, LOCATION)
    aad = encode_context(
        cell_aad(
            dataset=LOCATION.dataset,
            partition=LOCATION.partition,
            field="ssn",
            dek_id=opened.envelope.dek_id,
            value_type="arrow:binary",
        )
    )
    assert opened.open_cell(cell, aad) == PLAINTEXT
    return Material(local, kms, envelope, cell, aad, opened)


M = _build()
KEK_LEN = struct.unpack(">H", M.envelope[22:24])[0]
ENVELOPE_FIELDS = [(18, 4), (22, 2), (24 + KEK_LEN + 32, 2)]  # key version, KEK id length, wrapped length


ALL_OPS = ("edit", "flip", "length", "insert", "delete", "truncate", "extend")
IN_PLACE = ("edit", "flip")


@st.composite
def mutations(draw, base: bytes, length_fields: list[tuple[int, int]], ops: tuple[str, ...] = ALL_OPS) -> bytes:
    """`base` after 1-4 random edits; in-place `ops` ("edit", "flip") keep most envelopes parseable."""
    data = bytearray(base)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3, 4]))):  # mostly one mutation, so many still parse
        op = draw(st.sampled_from(ops))
        if op == "edit" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "flip" and data:
            i = draw(st.integers(0, len(data) * 8 - 1))
            data[i // 8] ^= 1 << (i % 8)
        elif op == "length" and length_fields:
            offset, size = draw(st.sampled_from(length_fields))
            if offset + size <= len(data):
                old = int.from_bytes(data[offset : offset + size], "big")
                top = (1 << (8 * size)) - 1
                new = draw(
                    st.one_of(
                        st.integers(0, top),
                        st.integers(-3, 3).map(lambda d: min(max(old + d, 0), top)),
                        st.sampled_from([0, 1, top, 1024, 1025, 4096, 4097]).map(lambda v: min(v, top)),
                    )
                )
                data[offset : offset + size] = new.to_bytes(size, "big")
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            j = draw(st.integers(i + 1, min(len(data), i + 16)))
            del data[i:j]
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


random_bytes = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b"\x01" + b),  # past the version byte
    st.binary(max_size=200).map(lambda b: b"\x01\x01" + b),  # past version and algorithm
)
envelopes = st.one_of(
    random_bytes,
    mutations(M.envelope, ENVELOPE_FIELDS),
    mutations(M.envelope, ENVELOPE_FIELDS),
    mutations(M.envelope, ENVELOPE_FIELDS, IN_PLACE),
    mutations(M.envelope, ENVELOPE_FIELDS, IN_PLACE),
)
cells = st.one_of(
    random_bytes,
    st.binary(min_size=CELL_OVERHEAD, max_size=CELL_OVERHEAD + 40).map(lambda b: b"\x01" + b[1:]),
    mutations(M.cell, []),
    mutations(M.cell, [], IN_PLACE),
)


def _open_envelope(data: bytes):
    """DekReader.open under the contract above; returns the OpenedDek or None."""
    try:
        with DekReader(M.kms) as reader:
            opened = reader.open(data, LOCATION)
    except DecryptionError:
        event("DecryptionError")
        return None
    except KmsKeyNotFoundError:
        event("KmsKeyNotFoundError")
        assert not M.local.has_kek(parse_envelope(data).kek_id), "KmsKeyNotFoundError for a KEK the KMS has"
        return None
    event("opened")
    return opened


@FUZZ
@given(envelopes)
def test_parse_envelope_only_raises_decryption_error(data):
    try:
        env = parse_envelope(data)
    except DecryptionError:
        event("rejected")
        return
    event("parsed")
    assert env.to_bytes() == data  # parsing is exact: no ignored or trailing bytes


@FUZZ
@given(cells)
def test_parse_cell_header_only_raises_decryption_error(data):
    try:
        header = parse_cell_header(data)
    except DecryptionError:
        return
    assert data[0] == 1 and len(data) >= CELL_OVERHEAD
    assert header.dek_id == data[1:17] and header.nonce == data[17:29]


@FUZZ
@given(envelopes)
def test_reader_open_rejects_everything_but_the_original(data):
    opened = _open_envelope(data)
    if opened is not None:
        assert data == M.envelope
        assert opened.open_cell(M.cell, M.aad) == PLAINTEXT


@FUZZ
@given(cells)
def test_open_cell_rejects_everything_but_the_original(data):
    try:
        plain = M.opened.open_cell(data, M.aad)
    except DecryptionError:
        return
    assert data == M.cell and plain == PLAINTEXT


@settings(max_examples=1000, deadline=timedelta(seconds=2))
@given(st.one_of(st.binary(max_size=64), mutations(M.aad, [])))
def test_open_cell_with_random_aad(aad):
    assume(aad != M.aad)
    with pytest.raises(DecryptionError):
        M.opened.open_cell(M.cell, aad)


def test_the_valid_inputs_do_open():
    """The fuzz targets accept the originals, so rejecting a mutation means something."""
    assert parse_envelope(M.envelope).to_bytes() == M.envelope
    with DekReader(M.kms) as reader:
        assert reader.open(M.envelope, LOCATION).envelope == parse_envelope(M.envelope)
    assert M.opened.open_cell(M.cell, M.aad) == PLAINTEXT

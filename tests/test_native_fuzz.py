"""Fuzzing the native kernel's open path and its buffer parsing: a typed outcome, never a crash or a hang.

Random cells and mutations of valid ones (bit flips, truncations,
extensions, spliced headers and tags) are opened by the kernel and by the
Python reader's checks: the same rows fail, the same plaintexts come back,
and a bad cell is only ever a failed row. Hostile Arrow buffers (offsets that
run backwards or past the data, short bitmaps, huge counts) give `ValueError`
or `TypeError` before any byte is read. A hung case would hit the suite's
timeout; a memory error would kill the worker: both fail the run.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyturn import native
from test_native_kernel import python_open, python_seal, require_kernel

KEY = os.urandom(32)
DEK_ID = os.urandom(16)
AAD = os.urandom(120)
SEED_VALUES = [b"", b"a", os.urandom(15), os.urandom(16), os.urandom(17), os.urandom(200)]
SEED_CELLS = python_seal(KEY, DEK_ID, 1000, SEED_VALUES, AAD)

_fuzz = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


def _both(cells: list, aad) -> None:
    """The kernel and the Python reader classify `cells` the same way, and nothing unauthenticated is returned."""
    opened = native.open_cells(KEY, DEK_ID, cells, aad)
    expected_values, expected_failed = python_open(KEY, DEK_ID, cells, aad)
    assert opened.values.to_pylist() == expected_values
    assert set(opened.failed.tolist()) == expected_failed
    for i, cell in enumerate(cells):
        code = int(opened.status[i])
        assert code == (1 if cell is None else 2 if i in expected_failed else 0)


_random_cell = st.one_of(
    st.none(),
    st.binary(max_size=120),
    st.binary(min_size=28, max_size=100).map(lambda b: b"\x01" + DEK_ID + b),  # right prefix, random rest
)


@_fuzz
@given(st.lists(_random_cell, max_size=12), st.one_of(st.just(AAD), st.binary(max_size=40)))
def test_random_cells_only_ever_fail(cells, aad) -> None:
    _both(cells, aad)


@st.composite
def _mutated(draw):
    cell = bytearray(draw(st.sampled_from(SEED_CELLS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "set"]))
        if kind == "flip" and cell:
            i = draw(st.integers(0, len(cell) - 1))
            cell[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate" and cell:
            del cell[draw(st.integers(0, len(cell) - 1)) :]
        elif kind == "extend":
            cell += draw(st.binary(min_size=1, max_size=20))
        elif kind == "splice":  # another cell's header, nonce or tag
            other = draw(st.sampled_from(SEED_CELLS))
            lo = draw(st.sampled_from([0, 1, 17, 29]))
            hi = min(len(cell), len(other), draw(st.sampled_from([17, 29, 45])))
            if lo < hi:
                cell[lo:hi] = other[lo:hi]
            cell[-16:] = other[-16:] if len(cell) >= 16 else cell[-16:]
        elif kind == "set" and cell:
            cell[draw(st.integers(0, len(cell) - 1))] = draw(st.integers(0, 255))
    return bytes(cell)


@_fuzz
@given(st.lists(st.one_of(_mutated(), st.sampled_from(SEED_CELLS), st.none()), min_size=1, max_size=8))
def test_mutated_cells_fail_exactly_where_python_fails(cells) -> None:
    _both(cells, AAD)
    _both(cells, [AAD if c is not None else None for c in cells])


@settings(max_examples=1000, deadline=None)
@given(
    st.binary(max_size=64),
    st.binary(max_size=80),
    st.sampled_from([4, 8, 2, 0]),
    st.one_of(st.integers(0, 20), st.integers(2**31, 2**63)),
    st.one_of(st.integers(0, 20), st.integers(2**31, 2**63)),
    st.one_of(st.none(), st.binary(max_size=4)),
    st.booleans(),
)
def test_hostile_arrow_buffers_are_refused_with_a_typed_error(data, offsets, width, start, count, validity, seal) -> None:
    import keyturn._native as ext

    column = (data, offsets, width, start, count, validity)
    try:
        if seal:
            result = ext.seal_cells(KEY, DEK_ID, 0, column, b"")
        else:
            result = ext.open_cells(KEY, DEK_ID, column, b"")
    except (ValueError, TypeError, OverflowError):
        return
    assert len(result[1]) in ((count + 1) * 4, (count + 1) * 8)


def test_a_real_arrow_array_with_garbage_cells_never_raises() -> None:
    cells = pa.array([os.urandom(n) for n in range(0, 200)] + [None] * 5 + SEED_CELLS, pa.binary())
    opened = native.open_cells(KEY, DEK_ID, cells, AAD)
    assert opened.failed.tolist() == list(range(200))
    assert opened.values.to_pylist()[-len(SEED_VALUES) :] == SEED_VALUES

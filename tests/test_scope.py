"""DekScope: one DEK per scope, hard caps, nonce uniqueness, fresh DEKs for retries."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from keyturn.arrow_codec import encrypt_batch
from keyturn.errors import ScopeClosedError
from keyturn.format import CELL_OVERHEAD, parse_cell_header, parse_envelope
from keyturn.reader import DekReader, open_rows
from keyturn.scope import DekScope, KekRef, Location, ScopeLimits


def dek_ids(cells):
    return [None if c is None else parse_cell_header(c).dek_id for c in cells]


def open_all(kms, location, fields, sealed):
    with DekReader(kms) as reader:
        envs = [sealed.envelopes[i] for i in sealed.row_envelope]
        nrows = len(sealed.row_envelope)
        opened = open_rows(reader, location, fields, sealed.cells, envs, range(nrows), types=["arrow:binary"] * len(fields))
    assert opened.failed == set()
    return opened.values


# ----------------------------------------------------------------------------- one DEK per scope


def test_one_kms_call_per_scope_across_many_calls(kms, make_scope, location):
    with make_scope() as scope:
        envelopes = set()
        for i in range(20):
            sealed = scope.seal_rows(["a", "b"], [[b"x%d" % i] * 5, [b"y"] * 5], types=["arrow:binary", "arrow:binary"])
            envelopes.update(sealed.envelopes)
    assert kms.calls.generate == 1
    assert len(envelopes) == 1
    assert scope.stats.deks_generated == 1 and scope.stats.rows == 100 and scope.stats.cells == 200
    assert len(scope.stats.kms_request_ids) == 1


def test_no_dek_until_first_row(kms, make_scope):
    with make_scope() as scope:
        sealed = scope.seal_rows(["a"], [[]], types=["arrow:binary"])
        assert sealed.envelopes == [] and sealed.cells == [[]]
        encrypt_batch(pa.record_batch({"a": pa.array([], pa.string())}), ["a"], scope)
    assert kms.calls.total == 0


def test_nulls_stay_null_and_use_no_nonce(kms, make_scope, location):
    with make_scope() as scope:
        sealed = scope.seal_rows(["a"], [[None, b"1", None, b"2"]], types=["arrow:binary"])
    cells = sealed.cells[0]
    assert cells[0] is None and cells[2] is None
    assert [parse_cell_header(c).nonce for c in (cells[1], cells[3])] == [bytes(12), (1).to_bytes(12, "big")]
    assert open_all(kms, location, ["a"], sealed) == [[None, b"1", None, b"2"]]


# ----------------------------------------------------------------------------- nonces


def test_no_nonce_repeats_across_2_17_cells_in_one_scope(kms, make_scope):
    total = 1 << 17
    nonces = []
    ids = set()
    with make_scope() as scope:
        # several calls and several columns, so the counter must carry across both
        for start in range(0, total, 1 << 15):
            half = 1 << 14
            a = [i.to_bytes(3, "big") for i in range(start, start + half)]
            b = [i.to_bytes(3, "big") for i in range(start + half, start + 2 * half)]
            sealed = scope.seal_rows(["a", "b"], [a, b], types=["arrow:binary", "arrow:binary"])
            for col in sealed.cells:
                for cell in col:
                    nonces.append(cell[17:29])
                    ids.add(cell[1:17])
    assert len(nonces) == total
    assert len(set(nonces)) == total
    assert len(ids) == 1 and kms.calls.generate == 1


def test_a_fresh_scope_on_the_same_data_gets_a_fresh_dek(kms, make_scope, location):
    """A retried bundle opens a new scope: new DEK id, new wrapped key, different ciphertexts."""
    data = [[b"alice", b"bob", b"carol"], [b"1", b"2", b"3"]]
    with make_scope() as first:
        one = first.seal_rows(["name", "n"], data, types=["arrow:binary", "arrow:binary"])
    with make_scope() as retry:
        two = retry.seal_rows(["name", "n"], data, types=["arrow:binary", "arrow:binary"])
    assert kms.calls.generate == 2
    e1, e2 = parse_envelope(one.envelopes[0]), parse_envelope(two.envelopes[0])
    assert e1.dek_id != e2.dek_id
    assert e1.wrapped_dek != e2.wrapped_dek
    assert e1.commitment != e2.commitment
    for c1, c2 in zip(one.cells, two.cells):
        for x, y in zip(c1, c2):
            assert x != y
            assert x[29:] != y[29:]  # the ciphertext body, not just the header
    assert open_all(kms, location, ["name", "n"], one) == data
    assert open_all(kms, location, ["name", "n"], two) == data


# ----------------------------------------------------------------------------- caps


@pytest.mark.parametrize("cap", [1, 2, 7])
def test_cell_cap_forces_a_new_dek_at_cell_n_plus_1(kms, make_scope, location, cap):
    rows = [b"%d" % i for i in range(cap + 1)]
    with make_scope(limits=ScopeLimits(max_cells=cap)) as scope:
        sealed = scope.seal_rows(["a"], [rows], types=["arrow:binary"])
    ids = dek_ids(sealed.cells[0])
    assert len(set(ids[:cap])) == 1
    assert ids[cap] != ids[0]
    assert kms.calls.generate == 2
    assert sealed.row_envelope == [0] * cap + [1]
    assert [parse_envelope(e).dek_id for e in sealed.envelopes] == [ids[0], ids[cap]]
    assert parse_cell_header(sealed.cells[0][cap]).nonce == bytes(12)  # the new DEK counts from 0
    assert open_all(kms, location, ["a"], sealed) == [rows]


def test_cell_cap_exactly_reached_keeps_one_dek(kms, make_scope):
    with make_scope(limits=ScopeLimits(max_cells=5)) as scope:
        sealed = scope.seal_rows(["a"], [[b"x"] * 5], types=["arrow:binary"])
    assert len(set(dek_ids(sealed.cells[0]))) == 1 and kms.calls.generate == 1


def test_cell_cap_counts_across_calls(kms, make_scope):
    with make_scope(limits=ScopeLimits(max_cells=4)) as scope:
        first = scope.seal_rows(["a"], [[b"x"] * 3], types=["arrow:binary"])
        second = scope.seal_rows(["a"], [[b"y"]], types=["arrow:binary"])  # the 4th cell: same DEK
        third = scope.seal_rows(["a"], [[b"z"]], types=["arrow:binary"])  # the 5th: a new one
    assert kms.calls.generate == 2
    assert first.envelopes == second.envelopes != third.envelopes
    assert dek_ids(second.cells[0])[0] == dek_ids(first.cells[0])[0] != dek_ids(third.cells[0])[0]


def test_cell_cap_ignores_nulls(kms, make_scope):
    with make_scope(limits=ScopeLimits(max_cells=2)) as scope:
        sealed = scope.seal_rows(["a"], [[b"x", None, None, b"y", None, b"z"]], types=["arrow:binary"])
    ids = dek_ids(sealed.cells[0])
    assert ids[0] == ids[3] != ids[5]
    assert kms.calls.generate == 2


def test_byte_cap_forces_a_new_dek_at_the_boundary(kms, make_scope, location):
    rows = [bytes([i]) * 10 for i in range(7)]
    with make_scope(limits=ScopeLimits(max_bytes=30)) as scope:
        sealed = scope.seal_rows(["a"], [rows], types=["arrow:binary"])
    ids = dek_ids(sealed.cells[0])
    # 3 rows of 10 bytes reach the 30-byte cap exactly; the 4th and 7th rows start new DEKs
    assert ids[0] == ids[1] == ids[2] != ids[3]
    assert ids[3] == ids[4] == ids[5] != ids[6]
    assert len(set(ids)) == 3 and kms.calls.generate == 3
    assert sealed.row_envelope == [0, 0, 0, 1, 1, 1, 2]
    assert open_all(kms, location, ["a"], sealed) == [rows]


def test_byte_cap_one_byte_over(kms, make_scope):
    with make_scope(limits=ScopeLimits(max_bytes=20)) as scope:
        sealed = scope.seal_rows(["a"], [[b"0123456789", b"0123456789A"]], types=["arrow:binary"])
    ids = dek_ids(sealed.cells[0])
    assert ids[0] != ids[1] and kms.calls.generate == 2


def test_a_row_never_straddles_two_deks(kms, make_scope, location):
    # 3 sensitive columns; a cap of 7 cells fits two full rows (6 cells) but not a third
    cols = [[b"a%d" % i for i in range(10)], [b"b%d" % i for i in range(10)], [b"c%d" % i for i in range(10)]]
    cols[1][4] = None  # a row with fewer cells shifts the packing
    with make_scope(limits=ScopeLimits(max_cells=7)) as scope:
        sealed = scope.seal_rows(["a", "b", "c"], cols, types=["arrow:binary", "arrow:binary", "arrow:binary"])
    per_row = []
    for i in range(10):
        row_ids = {parse_cell_header(col[i]).dek_id for col in sealed.cells if col[i] is not None}
        assert len(row_ids) == 1, f"row {i} straddles DEKs"
        (dek,) = row_ids
        assert parse_envelope(sealed.envelopes[sealed.row_envelope[i]]).dek_id == dek
        per_row.append(dek)
    # cells per DEK never exceed the cap
    for dek in set(per_row):
        assert sum(1 for col in sealed.cells for c in col if c is not None and c[1:17] == dek) <= 7
    # the exact packing: 3+3 | 3+3 | 2+3 (row 4 has two cells; 3+3+2 would be 8) | 3+3 | 3+3
    assert sealed.row_envelope == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert open_all(kms, location, ["a", "b", "c"], sealed) == cols


def test_a_row_larger_than_the_cell_cap_is_refused(make_scope):
    with make_scope(limits=ScopeLimits(max_cells=2)) as scope:
        with pytest.raises(ValueError, match="max_cells=2"):
            scope.seal_rows(["a", "b", "c"], [[b"1"], [b"2"], [b"3"]], types=["arrow:binary", "arrow:binary", "arrow:binary"])


def test_a_row_larger_than_the_byte_cap_is_refused(make_scope):
    with make_scope(limits=ScopeLimits(max_bytes=50)) as scope:
        with pytest.raises(ValueError, match="max_bytes=50"):
            scope.seal_rows(["a"], [[b"ok", b"x" * 51]], types=["arrow:binary"])
        with pytest.raises(ValueError, match="max_bytes=50"):
            encrypt_batch(pa.record_batch({"a": pa.array(["y" * 30]), "b": pa.array(["z" * 21])}), ["a", "b"], scope)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_cells": 0}, {"max_cells": 2**96}, {"max_cells": 1.5}, {"max_bytes": 0}, {"max_bytes": -1}, {"max_bytes": "10"}],
    ids=repr,
)
def test_scope_limits_validated(kwargs):
    with pytest.raises(ValueError):
        ScopeLimits(**kwargs)


# ----------------------------------------------------------------------------- lifecycle and caller mistakes


def test_closed_scope_raises(kms, make_scope):
    scope = make_scope()
    with scope:
        scope.seal_rows(["a"], [[b"x"]], types=["arrow:binary"])
    assert scope.closed
    with pytest.raises(ScopeClosedError):
        scope.seal_rows(["a"], [[b"x"]], types=["arrow:binary"])
    with pytest.raises(ScopeClosedError):
        encrypt_batch(pa.record_batch({"a": pa.array(["x"])}), ["a"], scope)
    scope.close()  # idempotent
    never_used = make_scope()
    never_used.close()
    with pytest.raises(ScopeClosedError):
        never_used.seal_rows(["a"], [[b"x"]], types=["arrow:binary"])
    assert kms.calls.generate == 1


def test_scope_refuses_pickling_and_hides_keys(make_scope):
    with make_scope() as scope:
        scope.seal_rows(["a"], [[b"x"]], types=["arrow:binary"])
        with pytest.raises(TypeError):
            pickle.dumps(scope)
        text = repr(scope)
    assert "sales" in text and "version=1" in text and "deks=1" in text


@pytest.mark.parametrize(
    "fields, columns, bindings, needle",
    [
        (["a", "b"], [[b"x"]], None, "same length"),
        (["a", "b"], [[b"x"], [b"y", b"z"]], None, "same number of rows"),
        (["a"], [[b"x", b"y"]], [{"id": b"1"}], "one entry per row"),
    ],
    ids=["fields-vs-columns", "ragged", "bindings"],
)
def test_seal_rows_caller_mistakes(make_scope, fields, columns, bindings, needle):
    with make_scope() as scope:
        with pytest.raises(ValueError, match=needle):
            scope.seal_rows(fields, columns, bindings, types=["arrow:binary"] * len(fields))


@pytest.mark.parametrize(
    "types, error, needle",
    [
        ("arrow:binary", TypeError, "not one string"),
        (["arrow:binary"], ValueError, "one descriptor per field"),
        (["arrow:binary", ""], ValueError, "field 'b'"),
        (["arrow:binary", None], ValueError, "field 'b'"),
        (["arrow:binary", "t" * 65537], ValueError, "exceeds"),
    ],
    ids=["bare-str", "too-few", "empty", "None", "too-long"],
)
def test_seal_rows_type_descriptor_mistakes(kms, make_scope, types, error, needle):
    with make_scope() as scope:
        with pytest.raises(error, match=needle):
            scope.seal_rows(["a", "b"], [[b"x"], [b"y"]], types=types)
    assert kms.calls.generate == 0


def test_type_descriptor_is_bound(kms, make_scope, location):
    with make_scope() as scope:
        sealed = scope.seal_rows(["a"], [[b"\x00" * 8]], types=["arrow:int64"])
    envs = [sealed.envelopes[0]]
    with DekReader(kms) as reader:
        ok = open_rows(reader, location, ["a"], sealed.cells, envs, [0], types=["arrow:int64"])
        bad = open_rows(reader, location, ["a"], sealed.cells, envs, [0], types=["arrow:double"])
    assert ok.failed == set() and ok.values == [[b"\x00" * 8]]
    assert bad.failed == {0} and bad.values == [[None]]


def test_location_and_kekref_validation():
    with pytest.raises(ValueError, match="dataset"):
        Location("", "p")
    with pytest.raises(TypeError, match="partition"):
        Location("d", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="version"):
        KekRef(0, "k")
    with pytest.raises(ValueError, match="kek_id"):
        KekRef(1, "")


def test_scope_location_and_version_are_bound(kms, make_scope, location):
    other = Location("sales", "2024-01-02")
    with make_scope() as here, make_scope(at=other) as there:
        a = here.seal_rows(["f"], [[b"v"]], types=["arrow:binary"])
        b = there.seal_rows(["f"], [[b"v"]], types=["arrow:binary"])
    with DekReader(kms) as reader:
        wrong = open_rows(reader, location, ["f"], b.cells, [b.envelopes[0]], [0], types=["arrow:binary"])
        right = open_rows(reader, location, ["f"], a.cells, [a.envelopes[0]], [0], types=["arrow:binary"])
    assert wrong.failed == {0} and wrong.values == [[None]]
    assert right.failed == set() and right.values == [[b"v"]]


def test_cell_size_is_plaintext_plus_overhead(make_scope):
    with make_scope() as scope:
        sealed = scope.seal_rows(["a"], [[b"", b"x" * 1000]], types=["arrow:binary"])
    assert [len(c) for c in sealed.cells[0]] == [CELL_OVERHEAD, CELL_OVERHEAD + 1000]


def test_random_bytes_is_injected_for_dek_ids(kms, location):
    ids = iter([b"\x01" * 16, b"\x02" * 16])
    scope = DekScope(kms, KekRef(1, "kek-1"), location, limits=ScopeLimits(max_cells=1), random_bytes=lambda n: next(ids))
    with scope:
        sealed = scope.seal_rows(["a"], [[b"x", b"y"]], types=["arrow:binary"])
    assert [parse_envelope(e).dek_id for e in sealed.envelopes] == [b"\x01" * 16, b"\x02" * 16]
    bad = DekScope(kms, KekRef(1, "kek-1"), location, random_bytes=lambda n: b"short")
    with pytest.raises(ValueError, match="wrong length"):
        bad.seal_rows(["a"], [[b"x"]], types=["arrow:binary"])

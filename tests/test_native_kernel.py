"""The native column kernel (keyturn._native) against the pure-Python cell path, which stays the reference.

Sealing gives byte-identical cells (same framing, same nonces, same tags) to
`DekScope.seal_rows` and to the known-answer vectors; opening accepts what
the Python path accepts and rejects what it rejects, per cell, on every
vector. Hypothesis drives both directions on random columns, nulls,
associated data and nonce ranges.

These tests run wherever cargo is: there a missing extension is a failure
(build it with `sh native/build-dev.sh .venv/bin/python`; `make` does).
Only a machine without cargo skips them, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keyturn
from keyturn import native
from keyturn.context import encode_context
from keyturn.errors import DecryptionError
from keyturn.format import (
    MAX_CELL_PLAINTEXT,
    Envelope,
    cell_aad,
    commitment_matches,
    derive_cell_key,
    kms_context,
    parse_envelope,
)
from keyturn.kms.local import LocalKms
from keyturn.reader import DekReader, OpenedDek, cell_aad_bytes
from keyturn.scope import DekScope, KekRef, Location, nonce_block

REPO = Path(__file__).resolve().parent.parent
VECTORS = [v for p in sorted((REPO / "docs" / "vectors").glob("*.json")) for v in json.loads(p.read_text())["vectors"]]
POSITIVE = [v for v in VECTORS if "plaintext" in v]
NEGATIVE = [v for v in VECTORS if "error" in v]
MAX_NONCE = (1 << 96) - 1


def require_kernel() -> None:
    """Fail loudly where cargo could have built the kernel but it is not loaded; skip only without cargo."""
    if native.kernel_loaded():
        return
    if shutil.which("cargo") is None:
        pytest.skip("no cargo on this machine, so no native kernel to test (keyturn runs its pure-Python cell path)")
    pytest.fail(
        "cargo is on this machine but the native kernel is not loaded; build it with "
        "`sh native/build-dev.sh .venv/bin/python` (make does it)",
        pytrace=False,
    )


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_kernel()


# -- the pure-Python reference -------------------------------------------------------


def python_seal(key: bytes, dek_id: bytes, first: int, values: list, aad) -> list:
    """docs/FORMAT.md sections 4 and 6 in Python: the k-th non-null value takes nonce first + k."""
    present = [i for i, v in enumerate(values) if v is not None]
    nonces = nonce_block(first, len(present))
    aead = AESGCM(key)
    out: list = [None] * len(values)
    for k, i in enumerate(present):
        nonce = nonces[k].tobytes()
        one_aad = aad if isinstance(aad, bytes) else aad[i]
        out[i] = b"\x01" + dek_id + nonce + aead.encrypt(nonce, values[i], one_aad)
    return out


def python_open(key: bytes, dek_id: bytes, cells: list, aad) -> tuple[list, set[int]]:
    """The reader's own per-cell checks (`OpenedDek.open_cells`): (plaintexts, failed rows)."""
    dek = OpenedDek(Envelope(dek_id, 1, "kek-1", bytes(32), b"\x01"), AESGCM(key))
    out: list = [None] * len(cells)
    failed: set[int] = set()
    if isinstance(aad, bytes):
        dek.open_cells(cells, range(len(cells)), aad, out, failed)
    else:
        for i in range(len(cells)):
            dek.open_cells(cells, (i,), aad[i] if aad[i] is not None else b"", out, failed)
    return out, failed


def native_open(key: bytes, dek_id: bytes, cells, aad) -> tuple[list, set[int]]:
    opened = native.open_cells(key, dek_id, cells, aad)
    return opened.values.to_pylist(), set(opened.failed.tolist())


# -- loading, the switch and the debug line --------------------------------------------


def test_the_kernel_is_loaded_in_the_one_namespace_and_on() -> None:
    import keyturn._native as ext

    assert Path(ext.__file__).parent.name == "keyturn"
    assert native.kernel_loaded() and native.kernel_version() == ext.__version__
    if os.environ.get(native.ENV_VAR, "").lower() not in ("0", "false", "no", "off"):
        assert keyturn.native_available() is True


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != native.ENV_VAR}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True, timeout=120, check=False
    )


_REPORT = """
    import logging, sys
    logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(name)s %(message)s")
    import keyturn
    try:
        print("available", keyturn.native_available())
    except RuntimeError as err:
        print("error", err)
"""

_BLOCKED = """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "keyturn._native":
                raise ImportError("blocked for the test")
            return None
    sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("setting", ["0", "false", "OFF", "no"])
def test_keyturn_native_off_forces_the_python_path_and_says_so(setting: str) -> None:
    done = _run(_REPORT, KEYTURN_NATIVE=setting)
    assert done.returncode == 0, done.stderr
    assert "available False" in done.stdout
    assert "keyturn.native keyturn cell path: pure Python (KEYTURN_NATIVE=" in done.stdout


def test_by_default_the_native_path_runs_and_says_so_at_debug_level() -> None:
    for env in ({}, {"KEYTURN_NATIVE": "1"}):
        done = _run(_REPORT, **env)
        assert done.returncode == 0, done.stderr
        assert "available True" in done.stdout
        assert "keyturn cell path: native kernel (keyturn._native" in done.stdout


def test_a_bad_switch_value_is_refused() -> None:
    done = _run(_REPORT, KEYTURN_NATIVE="maybe")
    assert "error KEYTURN_NATIVE must be one of" in done.stdout


def test_without_the_extension_keyturn_runs_as_before() -> None:
    """The extension cannot import: the Python path runs, a requirement of it fails clearly, sealing still works."""
    code = _BLOCKED + """
    import keyturn, keyturn.native as native
    from keyturn.kms.local import LocalKms
    from keyturn.scope import DekScope, KekRef, Location
    print("available", keyturn.native_available(), native.kernel_loaded())
    with DekScope(LocalKms.in_memory({"k": b"k" * 32}), KekRef(1, "k"), Location("d", "")) as scope:
        print("sealed", len(scope.seal_rows(["a"], [[b"x", None]], types=["arrow:binary"]).cells[0]))
    try:
        native.seal_cells(b"k" * 32, b"d" * 16, 0, [b"x"], b"")
    except RuntimeError as err:
        print("kernel", err)
    """
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert "available False False" in done.stdout
    assert "sealed 2" in done.stdout
    assert "kernel the native kernel is not loaded: the extension keyturn._native is not installed" in done.stdout
    required = _run(_BLOCKED + _REPORT, KEYTURN_NATIVE="1")
    assert "error KEYTURN_NATIVE=1 requires the native kernel, but the extension keyturn._native is not installed" in (
        required.stdout
    )


# -- known-answer vectors ---------------------------------------------------------------


def _vector_aad(v: dict, dek_id: bytes) -> bytes:
    bindings = {name: bytes.fromhex(value) for name, value in v["bindings"].items()}
    return encode_context(
        cell_aad(
            dataset=v["dataset"], partition=v["partition"], field=v["field"], dek_id=dek_id, value_type=v["type"], bindings=bindings
        )
    )


@pytest.mark.parametrize("v", POSITIVE, ids=[v["id"] for v in POSITIVE])
def test_positive_vector_seals_to_its_exact_bytes_and_opens(v: dict) -> None:
    dek_id = parse_envelope(bytes.fromhex(v["envelope"])).dek_id
    key = derive_cell_key(bytes.fromhex(v["dek"]), dek_id)
    aad = _vector_aad(v, dek_id)
    plaintext, cell = bytes.fromhex(v["plaintext"]), bytes.fromhex(v["cell"])
    assert native.seal_cells(key, dek_id, v["nonce"], [plaintext], aad).to_pylist() == [cell]
    assert native.seal_cells(key, dek_id, v["nonce"], pa.array([None, plaintext, None], pa.binary()), aad).to_pylist() == [
        None,
        cell,
        None,
    ]
    assert native_open(key, dek_id, [cell], aad) == ([plaintext], set())
    assert native_open(key, dek_id, [cell], [aad]) == ([plaintext], set())


def _cell_key_as_the_reader_gets_it(v: dict) -> bytes | None:
    """Steps 1 to 3 of docs/FORMAT.md section 11 (the reader's), then the cell key; None where they reject."""
    kms = LocalKms.in_memory({v["kek_id"]: bytes.fromhex(v["kek"])})
    location = Location(v["dataset"], v["partition"])
    with DekReader(kms) as reader:
        try:
            reader.open(bytes.fromhex(v["envelope"]), location)
        except DecryptionError:
            return None
    envelope = parse_envelope(bytes.fromhex(v["envelope"]))
    context = kms_context(
        dataset=location.dataset, partition=location.partition, dek_id=envelope.dek_id, key_version=envelope.key_version
    )
    unwrapped = kms.decrypt(envelope.kek_id, envelope.wrapped_dek, context)
    try:
        material = unwrapped.plaintext.material
        assert commitment_matches(material, envelope)
        return derive_cell_key(material, envelope.dek_id)
    finally:
        unwrapped.plaintext.wipe()


@pytest.mark.parametrize("v", NEGATIVE, ids=[v["id"] for v in NEGATIVE])
def test_negative_vector_is_rejected_by_the_kernel_as_by_python(v: dict) -> None:
    """Rejected before any cell is touched (envelope, KMS, commitment), or by the kernel as a failed cell."""
    key = _cell_key_as_the_reader_gets_it(v)
    if key is None:  # the reader refused the envelope: the kernel is never given a key
        assert not v["fails_at"].startswith("cell"), v["fails_at"]
        return
    assert v["fails_at"].startswith("cell"), v["fails_at"]
    dek_id = parse_envelope(bytes.fromhex(v["envelope"])).dek_id
    cell, aad = bytes.fromhex(v["cell"]), _vector_aad(v, dek_id)
    opened = native.open_cells(key, dek_id, [cell, None], aad)
    assert opened.values.to_pylist() == [None, None]
    assert opened.failed.tolist() == [0]
    assert opened.status.tolist() == [2, 1]
    assert python_open(key, dek_id, [cell, None], aad) == ([None, None], {0})


def test_every_cell_stage_negative_vector_reaches_the_kernel() -> None:
    """The parametrized test above is not vacuous: most negatives get to the cell stage."""
    reached = [v["id"] for v in NEGATIVE if _cell_key_as_the_reader_gets_it(v) is not None]
    assert len(reached) == sum(v["fails_at"].startswith("cell") for v in NEGATIVE) >= 20


# -- byte-identical to DekScope, nonces and all --------------------------------------------

_KEK = os.urandom(32)


def _scope_cells(fields, columns, bindings=None, types=None):
    """Seal with the real DekScope; also return the cell key and dek_id, recovered as a reader would."""
    kms = LocalKms.in_memory({"kek-1": _KEK})
    location = Location("sales", "dt=2024-06-01")
    types = types or ["arrow:binary"] * len(fields)
    with DekScope(kms, KekRef(1, "kek-1"), location) as scope:
        sealed = scope.seal_rows(fields, columns, bindings, types=types)
    assert len(sealed.envelopes) == 1
    envelope = parse_envelope(sealed.envelopes[0])
    context = kms_context(dataset=location.dataset, partition=location.partition, dek_id=envelope.dek_id, key_version=1)
    unwrapped = kms.decrypt("kek-1", envelope.wrapped_dek, context)
    key = derive_cell_key(unwrapped.plaintext.material, envelope.dek_id)
    unwrapped.plaintext.wipe()
    return sealed.cells, key, envelope.dek_id, location, types


def _native_like_scope(fields, columns, key, dek_id, location, types, bindings=None):
    """Seal field after field as DekScope does: field j starts where field j - 1's nonces ended."""
    out, first = [], 0
    for name, col, t in zip(fields, columns, types):
        if bindings is None:
            aad = cell_aad_bytes(location, name, dek_id, t)
        else:
            aad = [cell_aad_bytes(location, name, dek_id, t, b) if v is not None else None for v, b in zip(col, bindings)]
        out.append(native.seal_cells(key, dek_id, first, col, aad).to_pylist())
        first += native.cells_to_seal(col)
    return out


def test_a_scope_and_the_kernel_write_the_same_bytes_for_several_fields_with_nulls() -> None:
    rng = np.random.default_rng(7)
    n = 300
    cols = [
        [None if rng.random() < 0.3 else rng.bytes(int(rng.integers(0, 70))) for _ in range(n)],
        [rng.bytes(8) for _ in range(n)],
        [None] * n,
        [b""] * n,
    ]
    fields = ["email", "amount", "nothing", "empty"]
    types = ["arrow:binary", "arrow:int64", "arrow:binary", "arrow:string"]
    cells, key, dek_id, location, types = _scope_cells(fields, cols, types=types)
    assert _native_like_scope(fields, cols, key, dek_id, location, types) == cells
    for name, col, t, sealed in zip(fields, cols, types, cells):
        assert native_open(key, dek_id, sealed, cell_aad_bytes(location, name, dek_id, t)) == (col, set())


def test_a_scope_and_the_kernel_agree_with_bound_row_keys() -> None:
    n = 50
    col = [None if i % 7 == 3 else b"v%d" % i for i in range(n)]
    bindings = [{"id": i.to_bytes(8, "little"), **({"k": b"x"} if i % 2 else {})} for i in range(n)]
    cells, key, dek_id, location, types = _scope_cells(["v"], [col], bindings)
    assert _native_like_scope(["v"], [col], key, dek_id, location, types, bindings) == cells
    aads = [cell_aad_bytes(location, "v", dek_id, types[0], b) for b in bindings]
    assert native_open(key, dek_id, cells[0], aads) == (col, set())
    moved = aads[1:] + aads[:1]  # every cell read with another row's keys
    values, failed = native_open(key, dek_id, cells[0], moved)
    assert failed == {i for i, v in enumerate(col) if v is not None} and values == [None] * n


def test_empty_columns() -> None:
    key, dek_id = os.urandom(32), os.urandom(16)
    for values in ([], pa.array([], pa.binary()), [None, None], pa.nulls(3, pa.binary())):
        sealed = native.seal_cells(key, dek_id, 5, values, b"a")
        assert sealed.type == pa.binary() and sealed.null_count == len(sealed)
        opened = native.open_cells(key, dek_id, sealed, b"a")
        assert opened.values.null_count == len(values) and opened.failed.size == 0
        assert opened.status.tolist() == [1] * len(values)


def test_arrow_input_is_read_in_place_whatever_its_type_offset_and_width() -> None:
    key, dek_id, aad = os.urandom(32), os.urandom(16), b"ctx"
    values = [b"alpha", None, b"", "\u00e9t\u00e9".encode(), None, os.urandom(300)]
    expected = python_seal(key, dek_id, 11, values, aad)
    for arrow_type in (pa.binary(), pa.large_binary()):
        assert native.seal_cells(key, dek_id, 11, pa.array(values, arrow_type), aad).to_pylist() == expected
    strings = pa.array([None if v is None else v.decode("utf-8", "replace") for v in values[:5]], pa.string())
    as_bytes = [None if s is None else s.encode() for s in strings.to_pylist()]
    assert native.seal_cells(key, dek_id, 11, strings, aad).to_pylist() == python_seal(key, dek_id, 11, as_bytes, aad)
    whole = pa.array([b"skip", b"me"] + values, pa.binary())
    sliced = whole.slice(2, len(values))  # a non-zero array offset, into offsets and validity alike
    assert native.seal_cells(key, dek_id, 11, sliced, aad).to_pylist() == expected
    chunked = pa.chunked_array([pa.array(values[:2], pa.binary()), pa.array(values[2:], pa.binary())])
    assert native.seal_cells(key, dek_id, 11, chunked, aad).to_pylist() == expected
    cells = pa.array(expected, pa.binary())
    for form in (cells, cells.cast(pa.large_binary()), pa.array([b"x"] + expected, pa.binary()).slice(1)):
        assert native_open(key, dek_id, form, aad) == (values, set())
    with pytest.raises(TypeError, match="binary, string, large_binary or large_string"):
        native.seal_cells(key, dek_id, 0, pa.array([1, 2]), aad)


def test_nonces_advance_as_nonce_block_lays_them_out_across_the_64_bit_carry_and_the_end() -> None:
    key, dek_id = os.urandom(32), os.urandom(16)
    values = [b"a", None, b"b", b"c", None, b"d", b"e"]
    for first in (0, 255, (1 << 64) - 3, (1 << 80) + 1, MAX_NONCE - 4):
        sealed = native.seal_cells(key, dek_id, first, values, b"")
        assert sealed.to_pylist() == python_seal(key, dek_id, first, values, b"")
        nonces = [c[17:29] for c in sealed.to_pylist() if c is not None]
        assert nonces == [row.tobytes() for row in nonce_block(first, 5)]
    with pytest.raises(OverflowError):
        nonce_block(MAX_NONCE - 3, 5)
    for first in (MAX_NONCE - 3, MAX_NONCE + 1, 1 << 200, -1):
        with pytest.raises(OverflowError, match="nonce space exhausted"):
            native.seal_cells(key, dek_id, first, values, b"")
    assert native.seal_cells(key, dek_id, MAX_NONCE + 1, [None, None], b"").null_count == 2  # no nonce taken


def test_caller_mistakes_are_typed_errors_that_name_no_key() -> None:
    key, dek_id = os.urandom(32), os.urandom(16)
    cases = [
        (dict(cell_key=key[:31]), ValueError, "a cell key must be 32 bytes"),
        (dict(cell_key="not a buffer"), TypeError, "the cell key must support the buffer protocol"),
        (dict(dek_id=dek_id[:15]), ValueError, "dek_id must be 16 bytes"),
        (dict(values=[b"a", "str"]), TypeError, "values items must be bytes or None"),
        (dict(values=[b"a", b"b"], aad=[b"x"]), ValueError, "one per row"),
        (dict(values=[b"a", b"b"], aad=[b"x", None]), TypeError, "aad is None at a row that holds a value"),
        (dict(values=[b"a"], aad=["x"]), TypeError, "per-row aad items must be bytes or None"),
    ]
    for change, error, message in cases:
        args = dict(cell_key=key, dek_id=dek_id, first_nonce=0, values=[b"a"], aad=b"")
        args.update(change)
        with pytest.raises(error, match=message):
            native.seal_cells(**args)
    assert native.seal_cells(key, dek_id, 0, [b"a", None], [b"x", None]).null_count == 1  # None at a null row is fine


def test_cells_up_to_64_mib_and_not_one_byte_more() -> None:
    key, dek_id = os.urandom(32), os.urandom(16)
    biggest = bytes(MAX_CELL_PLAINTEXT)
    sealed = native.seal_cells(key, dek_id, 0, [biggest, b"x"], b"a")
    cells = sealed.to_pylist()
    assert cells[0] == python_seal(key, dek_id, 0, [biggest], b"a")[0]
    assert native_open(key, dek_id, sealed, b"a") == ([biggest, b"x"], set())
    with pytest.raises(ValueError, match="a cell value exceeds 67108864 bytes"):
        native.seal_cells(key, dek_id, 0, [biggest + b"!"], b"a")
    too_long = cells[0] + b"!"  # 45 + 64 MiB + 1: rejected by its length, as the Python reader does
    assert native_open(key, dek_id, [too_long], b"a") == ([None], {0})
    assert python_open(key, dek_id, [too_long], b"a") == ([None], {0})


def test_parallel_and_single_threaded_runs_give_the_same_bytes() -> None:
    import keyturn._native as ext

    key, dek_id, aad = os.urandom(32), os.urandom(16), os.urandom(136)
    rng = np.random.default_rng(3)
    values = [None if rng.random() < 0.1 else rng.bytes(int(rng.integers(0, 400))) for _ in range(20000)]
    arrays = {}
    for parallel in (True, False):
        validity, offsets, data, large, count = ext.seal_cells(key, dek_id, 9, values, aad, parallel=parallel)
        arrays[parallel] = (validity, offsets, data)
        assert not large and count == native.cells_to_seal(values)
    assert arrays[True] == arrays[False]
    cells = native.seal_cells(key, dek_id, 9, values, aad)
    assert cells.to_pylist() == python_seal(key, dek_id, 9, values, aad)
    mangled = cells.to_pylist()
    for i in range(0, len(mangled), 97):
        if mangled[i] is not None:
            mangled[i] = mangled[i][:-1] + bytes([mangled[i][-1] ^ 1])
    results = [ext.open_cells(key, dek_id, mangled, aad, parallel=p) for p in (True, False)]
    assert results[0] == results[1]
    assert native_open(key, dek_id, mangled, aad) == python_open(key, dek_id, mangled, aad)


def test_a_failed_cell_leaves_no_plaintext_and_no_ciphertext_behind() -> None:
    key, dek_id = os.urandom(32), os.urandom(16)
    secret = b"S" * 64
    good = native.seal_cells(key, dek_id, 0, [secret, secret], b"right").to_pylist()
    opened = native.open_cells(key, dek_id, good, [b"right", b"wrong"])
    assert opened.values.to_pylist() == [secret, None] and opened.failed.tolist() == [1]
    validity, offsets, data = opened.values.buffers()
    assert data.to_pybytes() == secret + bytes(64)  # the failed slot is zeros: neither plaintext nor ciphertext


# -- hypothesis: the two paths, both directions ---------------------------------------------

_values = st.lists(st.one_of(st.none(), st.binary(max_size=300)), max_size=60)
_firsts = st.one_of(st.integers(0, 1000), st.integers((1 << 64) - 70, (1 << 64) + 10), st.integers(MAX_NONCE - 200, MAX_NONCE - 60))


@st.composite
def _columns(draw):
    values = draw(_values)
    if draw(st.booleans()):
        aad = draw(st.binary(max_size=400))
    else:
        aad = [None if v is None and draw(st.booleans()) else draw(st.binary(max_size=80)) for v in values]
    as_arrow = draw(st.sampled_from([None, pa.binary(), pa.large_binary()]))
    return values, aad, as_arrow


_settings = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(_columns(), _firsts, st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16))
def test_native_seal_is_python_seal_and_python_opens_it(column, first, key, dek_id) -> None:
    values, aad, as_arrow = column
    arg = values if as_arrow is None else pa.array(values, as_arrow)
    sealed = native.seal_cells(key, dek_id, first, arg, aad).to_pylist()
    assert sealed == python_seal(key, dek_id, first, values, aad)
    assert python_open(key, dek_id, sealed, aad) == (values, set())


@_settings
@given(_columns(), _firsts, st.binary(min_size=32, max_size=32), st.binary(min_size=16, max_size=16))
def test_python_seal_opens_natively(column, first, key, dek_id) -> None:
    values, aad, as_arrow = column
    sealed = python_seal(key, dek_id, first, values, aad)
    arg = sealed if as_arrow is None else pa.array(sealed, as_arrow)
    opened = native.open_cells(key, dek_id, arg, aad)
    assert opened.values.to_pylist() == values and opened.failed.size == 0
    assert opened.status.tolist() == [1 if v is None else 0 for v in values]

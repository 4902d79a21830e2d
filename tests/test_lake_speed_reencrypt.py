"""Issue 12, lake jobs: a re-encrypted cell is decrypted once, encrypted once, and decrypted once more to verify.

The counts are taken at the AES-GCM objects keyturn builds (the reader's,
which only decrypt, and the scope's, which only encrypt), on the Python
cell path (``KEYTURN_NATIVE=0``), so the test sees every cell operation the
rewrite makes.
"""

from __future__ import annotations

import threading
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import keyturn.reader
import keyturn.scope
from keyturn.lake.rewrite import rewrite_file
from lake_support import DATASET, SENSITIVE, build_lake, make_home, plain_equal, rotate, source_table


class _Tally:
    def __init__(self) -> None:
        self.decrypts = 0
        self.encrypts = 0
        self.lock = threading.Lock()


class _CountingAead:
    """Wraps an AESGCM; every decrypt and encrypt call is tallied."""

    def __init__(self, inner: Any, tally: _Tally) -> None:
        self._inner = inner
        self._tally = tally

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        out = self._inner.decrypt(nonce, data, aad)
        with self._tally.lock:
            self._tally.decrypts += 1
        return out

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None) -> bytes:
        with self._tally.lock:
            self._tally.encrypts += 1
        return self._inner.encrypt(nonce, data, aad)


@pytest.fixture
def counted(monkeypatch):
    # the Python cell path, whose AES-GCM objects can be counted (the native kernel, where loaded, takes
    # the same cells in bulk and is byte-identical to it)
    monkeypatch.setenv("KEYTURN_NATIVE", "0")
    tally = _Tally()
    for module in (keyturn.reader, keyturn.scope):
        real = module.AESGCM
        monkeypatch.setattr(module, "AESGCM", lambda key, real=real: _CountingAead(real(key), tally))
    return tally


@pytest.fixture
def home(tmp_path):
    return make_home(str(tmp_path / "home"))


@pytest.fixture
def source():
    return source_table(300, 3)


def _cells(path: str) -> int:
    table = pq.read_table(path)
    return sum(table.column(name).length() - table.column(name).null_count for name in SENSITIVE)


def _rewrite(lake, home, data_file):
    registry = home.registry()
    with home.kms() as kms:
        return rewrite_file(
            lake, data_file, kms=kms, policy=home.policy(), dataset=DATASET, directory=registry,
            contract=registry.get_contract(DATASET),
        )


@pytest.mark.parametrize("row_group_size", [40, 1000])
def test_reencrypt_decrypts_each_cell_once_encrypts_once_and_verifies_once(home, source, tmp_path, counted, row_group_size):
    lake = build_lake(home, str(tmp_path / "lake"), source, files_per_partition=2, row_group_size=row_group_size)
    rotate(home)
    files = lake.data_files()
    cells = sum(_cells(f.path) for f in files)
    assert cells > 0
    counted.decrypts = counted.encrypts = 0
    for f in files:
        out = _rewrite(lake, home, f)
        assert out.result == "rewritten", out.detail
    assert counted.encrypts == cells  # one encrypt per cell
    assert counted.decrypts == 2 * cells  # one to re-encrypt, one verifying decrypt of the new file
    assert plain_equal(home, lake.root, source)


def test_verification_still_catches_a_changed_clear_column(home, source, tmp_path, monkeypatch):
    """What the rewrite holds in memory is the reference: a clear column changed on the way to disk fails."""
    import keyturn.lake.rewrite as rw

    lake = build_lake(home, str(tmp_path / "lake"), source, files_per_partition=1, row_group_size=40)
    rotate(home)
    real = rw._reseal

    def changing(*args, **kwargs):
        sealed, changed = real(*args, **kwargs)
        i = sealed.schema.get_field_index("spend")
        spend = pa.array([v + 1 for v in sealed.column("spend").to_pylist()], sealed.schema.field("spend").type)
        return sealed.set_column(i, sealed.schema.field("spend"), spend), changed

    monkeypatch.setattr(rw, "_reseal", changing)
    f = lake.data_files()[0]
    before = open(f.path, "rb").read()
    out = _rewrite(lake, home, f)
    assert (out.result, out.reason) == ("failed", "verify_failed")
    assert open(f.path, "rb").read() == before
    assert lake.temp_files() == []


def test_a_uniform_row_group_is_counted_without_a_per_row_loop(home, source, tmp_path, monkeypatch):
    """Every row of a row group on one stale version: statuses come from a tally, never row by row."""
    import keyturn.lake.rewrite as rw

    lake = build_lake(home, str(tmp_path / "lake"), source, files_per_partition=1, row_group_size=1000)
    rotate(home)
    calls = []
    real = rw._READABLE

    class _Watch(dict):
        def __getitem__(self, key):
            calls.append(key)
            return real[key]

    monkeypatch.setattr(rw, "_READABLE", _Watch(real))
    for f in lake.data_files():
        out = _rewrite(lake, home, f)
        assert out.result == "rewritten"
        assert out.status_rows["stale"] == out.rows and out.rows_moved == out.rows
    assert calls == []

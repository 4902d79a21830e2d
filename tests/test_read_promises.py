"""Issue 10, items 2, 5 and 6: what a read promises.

- A projection that drops the key columns is a caller mistake with a clear
  error, not every row silently `missing`; genuinely missing rows still are.
- `decrypt` writes nothing into the lake it reads: its side outputs go under
  the output (or `--side-outputs`), and the output's own globs see only data.
- A directory of plain Parquet is "not a keyturn lake", and a lake read with
  another dataset's key home says which dataset and home were expected.
"""

from __future__ import annotations

import glob
import os
import shutil

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from keyturn.arrow_codec import DEK_COLUMN, VERSION_COLUMN, decrypt_batch, encrypt_batch
from keyturn.contract import arrow_contract
from keyturn.errors import LakeError
from keyturn.kms.local import LocalKms
from keyturn.lake import Lake
from keyturn.errors import NotAKeyturnLakeError, WrongKeyHomeError
from keyturn.lake.sideoutputs import SideOutputDir, read_side_outputs
from keyturn.policy import KeyPolicy, ReadStatus
from keyturn.reader import DekReader
from keyturn.registry.sqlite import SqliteKeyRegistry
from keyturn.scope import DekScope, KekRef, Location
from keyturn.pipelines import decrypt, encrypt, exitcodes, status
from tests.cli_support import run_cli
from tests.pipeline_support import SENSITIVE, customers, data_files, make_home, write_parquet_source

KEY_COLUMNS = (VERSION_COLUMN, DEK_COLUMN)


def assert_one_line_error(result, code: int, *words: str) -> None:
    assert result.code == code, (result.code, result.out, result.err)
    assert result.err.count("\n") == 1 and result.err.startswith("keyturn: error: "), result.err
    assert "Traceback" not in result.err
    for word in words:
        assert word in result.err, (word, result.err)


def tree_snapshot(root: str, *, skip: tuple[str, ...] = ()) -> dict[str, tuple[bytes, int]]:
    """{relative path: (bytes, mtime_ns)} of every file under `root` (paths in `skip` by path only)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True) + glob.glob(os.path.join(root, "**", ".*"), recursive=True)):
        if os.path.isfile(path):
            rel = os.path.relpath(path, root)
            st = os.stat(path)
            out[rel] = (b"", 0) if rel in skip else (open(path, "rb").read(), st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------- item 2: projections, in the core


@pytest.fixture
def core(tmp_path):
    registry = SqliteKeyRegistry(str(tmp_path / "registry.sqlite"))
    registry.initialize("kek-1", actor="t", reason="t")
    kms = LocalKms.in_memory({"kek-1": os.urandom(32)})
    plain = pa.record_batch({
        "id": pa.array(range(20), pa.int64()),
        "email": pa.array([f"u{i}@example.com" for i in range(20)], pa.string()),
        "spend": pa.array([float(i) for i in range(20)], pa.float64()),
    })
    contract = registry.pin_contract(arrow_contract("customers", plain.schema, ["email"]), actor="t", reason="t")
    where = Location("customers", "region=1")
    with DekScope(kms, KekRef(1, "kek-1"), where, directory=registry, contract_revision=contract.revision) as scope:
        sealed = encrypt_batch(plain, ["email"], scope, contract=contract)
    return registry, kms, plain, sealed, contract, where, KeyPolicy.from_registry(registry)


def _read(core, batch, *, with_contract: bool):
    registry, kms, _, _, contract, where, policy = core
    with DekReader(kms, directory=registry) as reader:
        return decrypt_batch(batch, reader, policy, where, contract=contract if with_contract else None)


def _strip_metadata(batch: pa.RecordBatch) -> pa.RecordBatch:
    """What DuckDB or Spark leave of a batch: the same columns, no field or schema metadata."""
    fields = [pa.field(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for f in batch.schema]
    return pa.RecordBatch.from_arrays([c.cast(f.type) for c, f in zip(batch.columns, fields)], schema=pa.schema(fields))


@pytest.mark.parametrize("with_contract", [True, False], ids=["contract", "metadata"])
def test_projection_without_the_key_columns_is_a_clear_error(core, with_contract):
    sealed = core[3]
    projected = sealed.select(["id", "email"])
    with pytest.raises(ValueError, match="lacks the key column.*_keyturn_version.*_keyturn_dek.*'email'"):
        _read(core, projected, with_contract=with_contract)


@pytest.mark.parametrize("kept", KEY_COLUMNS)
def test_projection_with_one_key_column_is_a_clear_error(core, kept):
    sealed = core[3]
    with pytest.raises(ValueError, match="lacks the key column"):
        _read(core, sealed.select(["id", "email", kept]), with_contract=True)
    with pytest.raises(ValueError, match="lacks the key column"):  # not even a ciphertext column: one key column is enough
        _read(core, sealed.select(["id", kept]), with_contract=True)


def test_projection_of_stripped_ciphertext_is_a_clear_error_by_the_contract(core):
    """Another engine dropped the field metadata; the contract still says `email` is ciphertext."""
    stripped = _strip_metadata(core[3]).select(["id", "email"])
    assert not stripped.schema.field("email").metadata
    with pytest.raises(ValueError, match="lacks the key column"):
        _read(core, stripped, with_contract=True)


def test_genuinely_missing_rows_are_still_missing(core):
    registry, kms, plain, sealed, contract, where, policy = core
    nulled = sealed.set_column(
        sealed.schema.get_field_index(VERSION_COLUMN), sealed.schema.field(VERSION_COLUMN), pa.nulls(sealed.num_rows, pa.int64())
    )
    # a file keyturn never wrote, no contract column. (A projection of plain columns only looks the same:
    # the core cannot tell them apart, so readers that project must keep the key columns.)
    never_keyturn = plain.select(["id", "spend"])
    legacy = plain  # a legacy plain file: contract column as plaintext, no key columns at all
    cases = [(nulled, True), (nulled, False), (never_keyturn, True), (never_keyturn, False), (legacy, True), (legacy, False)]
    for batch, with_contract in cases:
        result = _read(core, batch, with_contract=with_contract)
        assert set(result.status) == {ReadStatus.MISSING}, (batch.schema.names, with_contract)
        assert result.plain.num_rows == 0


def test_plain_binary_contract_column_without_key_columns_is_missing_not_an_error(tmp_path):
    """A contract column whose plain type is binary looks like ciphertext: without metadata, no sign of a projection."""
    registry = SqliteKeyRegistry(str(tmp_path / "registry.sqlite"))
    registry.initialize("kek-1", actor="t", reason="t")
    kms = LocalKms.in_memory({"kek-1": os.urandom(32)})
    plain = pa.record_batch({"id": pa.array([1, 2], pa.int64()), "card": pa.array([b"4111", None], pa.binary())})
    contract = registry.pin_contract(arrow_contract("cards", plain.schema, ["card"]), actor="t", reason="t")
    with DekReader(kms, directory=registry) as reader:
        result = decrypt_batch(plain, reader, KeyPolicy.from_registry(registry), Location("cards", "p"), contract=contract)
    assert result.status == [ReadStatus.MISSING] * 2


# --------------------------------------------------------------------------- lakes


@pytest.fixture
def home(tmp_path):
    return make_home(tmp_path / "home")


@pytest.fixture
def lake(home, tmp_path):
    src = write_parquet_source(tmp_path / "src", customers(400, partitions=2), files=1)
    path = str(tmp_path / "lake")
    encrypt.run(home=home, source=src, lake=path, columns=SENSITIVE, partition_by="region")
    return path


def _foreign_lake(tmp_path, name: str, dataset: str) -> tuple[str, object]:
    """A lake written by another key home (`dataset`), and that home."""
    other = make_home(tmp_path / f"{name}-home", dataset=dataset)
    src = write_parquet_source(tmp_path / f"{name}-src", customers(60, partitions=2, start=10_000), files=1)
    path = str(tmp_path / f"{name}-lake")
    encrypt.run(home=other, source=src, lake=path, columns=SENSITIVE, partition_by="region")
    return path, other


def _tamper_one_cell(path: str) -> None:
    t = pq.read_table(path)
    cells = t.column("email").to_pylist()
    cells[3] = cells[3][:-1] + bytes([cells[3][-1] ^ 1])
    i = t.schema.get_field_index("email")
    t = t.set_column(i, t.schema.field(i), pa.array(cells, pa.binary()))
    pq.write_table(t.replace_schema_metadata(t.schema.metadata), path)


def test_decrypt_of_a_whole_lake_file_without_key_columns_counts_missing_rows(home, lake, tmp_path):
    """The pipeline reads whole files: a file stripped of a key column is `missing`, never a crash."""
    victim = os.path.join(lake, data_files(lake)[0])
    t = pq.read_table(victim)
    rows = t.num_rows
    pq.write_table(t.drop_columns([DEK_COLUMN]), victim)
    report = decrypt.run(home=home, lake=lake, out=str(tmp_path / "out"))
    assert report["rows_by_status"]["missing"] == rows
    assert report["rows_written"] == 400 - rows


# --------------------------------------------------------------------------- item 5: decrypt never writes into the lake


def test_decrypt_writes_nothing_into_the_lake_and_keeps_side_outputs_under_the_output(home, lake, tmp_path):
    files = data_files(lake)
    _tamper_one_cell(os.path.join(lake, files[0]))  # one corrupt row
    foreign, _ = _foreign_lake(tmp_path, "other", "customers")  # rows under DEKs this home does not know
    shutil.copy(os.path.join(foreign, data_files(foreign)[0]), os.path.join(lake, "region=0", "part-unknown.parquet"))
    with open(os.path.join(lake, "region=1", "part-broken.parquet"), "wb") as f:  # an unreadable file
        f.write(b"PAR1" + os.urandom(4096) + b"PAR1")
    lock = os.path.join("_keyturn", "lock")
    assert os.path.exists(os.path.join(lake, lock))  # encrypt made it; decrypt must not need to
    before = tree_snapshot(lake, skip=(lock,))

    out = str(tmp_path / "out")
    report = decrypt.run(home=home, lake=lake, out=out)

    assert tree_snapshot(lake, skip=(lock,)) == before  # every file: same bytes, same mtime; none added
    s = report["rows_by_status"]
    assert s["corrupt"] == 1 and s["unknown"] > 0 and report["files_unreadable"] == 1
    run = report["run_id"]
    assert report["side_outputs"] == os.path.join(out, "_keyturn")
    for kind in ("quarantine", "mismatch", "audit"):
        assert os.path.isfile(os.path.join(out, "_keyturn", kind, f"{run}.avro")), kind
    side = SideOutputDir.of(Lake(report["side_outputs"]))
    assert sorted(q["reason"] for q in read_side_outputs(side, "quarantine", run_id=run)) == ["corrupt", "unparseable"]
    assert {e["reason"] for e in read_side_outputs(side, "mismatch", run_id=run)} == {"unknown"}
    assert report["quarantine_file"].startswith(out + os.sep) and report["mismatch_file"].startswith(out + os.sep)

    # the output's own globs and readers see data only
    parquet = glob.glob(os.path.join(out, "**", "*.parquet"), recursive=True)
    assert len(parquet) == report["files_written"] and not [p for p in parquet if "_keyturn" in p]
    assert sum(pq.read_metadata(p).num_rows for p in parquet) == report["rows_written"]
    assert ds.dataset(out, format="parquet", partitioning="hive").count_rows() == report["rows_written"]


def test_side_outputs_go_where_the_user_says(home, lake, tmp_path):
    _tamper_one_cell(os.path.join(lake, data_files(lake)[0]))
    lock = os.path.join("_keyturn", "lock")
    before = tree_snapshot(lake, skip=(lock,))
    out, side = str(tmp_path / "out"), str(tmp_path / "errors")
    result = run_cli("--home", home.path, "--json", "decrypt", "--lake", lake, "--out", out, "--side-outputs", side)
    assert result.code == exitcodes.DATA, (result.out, result.err)
    report = result.json()
    assert report["side_outputs"] == side and os.path.isfile(os.path.join(side, "quarantine", f"{report['run_id']}.avro"))
    assert not os.path.exists(os.path.join(out, "_keyturn"))
    assert tree_snapshot(lake, skip=(lock,)) == before

    text = run_cli("--home", home.path, "decrypt", "--lake", lake, "--out", str(tmp_path / "out2"), "--side-outputs", side)
    assert text.code == exitcodes.DATA and f"Side outputs: {side}" in text.out

    inside = run_cli("--home", home.path, "decrypt", "--lake", lake, "--out", str(tmp_path / "o3"),
                     "--side-outputs", os.path.join(lake, "_keyturn"))
    assert_one_line_error(inside, exitcodes.USAGE, "overlaps the lake")
    visible = run_cli("--home", home.path, "decrypt", "--lake", lake, "--out", str(tmp_path / "o4"),
                      "--side-outputs", str(tmp_path / "o4" / "errors"))
    assert_one_line_error(visible, exitcodes.USAGE, "would take it for data")
    assert tree_snapshot(lake, skip=(lock,)) == before


# --------------------------------------------------------------------------- item 6: not a keyturn lake, wrong home


@pytest.fixture
def plain_dir(tmp_path):
    path = str(tmp_path / "plain")
    write_parquet_source(path, customers(500, partitions=2), hive_by="region")
    return path


def test_plain_parquet_is_not_a_keyturn_lake(tmp_path, plain_dir):
    fresh = make_home(tmp_path / "fresh")  # no contract, no DEK
    before = tree_snapshot(plain_dir)
    with pytest.raises(NotAKeyturnLakeError, match="not a keyturn lake"):
        status.run(home=fresh, lake=plain_dir)
    assert issubclass(NotAKeyturnLakeError, LakeError)

    st = run_cli("--home", fresh.path, "status", "--lake", plain_dir)
    assert_one_line_error(st, exitcodes.USAGE, "not a keyturn lake", plain_dir, fresh.path)
    as_json = run_cli("--home", fresh.path, "--json", "status", "--lake", plain_dir)
    assert as_json.code == exitcodes.USAGE and "not a keyturn lake" in as_json.json()["error"]

    out = str(tmp_path / "out")
    dec = run_cli("--home", fresh.path, "decrypt", "--lake", plain_dir, "--out", out)
    assert_one_line_error(dec, exitcodes.USAGE, "not a keyturn lake")
    dec_cols = run_cli("--home", fresh.path, "decrypt", "--lake", plain_dir, "--out", out, "--columns", "email")
    assert_one_line_error(dec_cols, exitcodes.USAGE, "not a keyturn lake")
    assert not os.path.exists(out)
    assert tree_snapshot(plain_dir) == before  # not even a lock file


def test_plain_parquet_with_a_home_that_has_a_contract_is_a_named_problem(home, lake, plain_dir):
    """The home has encrypted this dataset: plain files under its name are a data problem, named as such."""
    result = run_cli("--home", home.path, "--json", "status", "--lake", plain_dir)
    assert result.code == exitcodes.DATA, (result.out, result.err)
    [problem] = [p for p in result.json()["problems"] if p["path"] is None]
    assert problem["reason"] == "no_keyturn_files" and "plain source" in problem["detail"]
    text = run_cli("--home", home.path, "status", "--lake", plain_dir)
    assert "lake: no_keyturn_files:" in text.out


def test_an_empty_lake_is_still_fine(home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert status.run(home=home, lake=str(empty))["problems"] == []


def test_lake_of_another_dataset_names_both_datasets_and_the_home(home, tmp_path):
    orders, _ = _foreign_lake(tmp_path, "orders", "orders")
    with pytest.raises(WrongKeyHomeError) as caught:
        status.run(home=home, lake=orders)
    message = str(caught.value)
    assert "belong to dataset 'orders'" in message and "is for dataset 'customers'" in message
    assert home.path in message and "wrong --home" in message

    st = run_cli("--home", home.path, "status", "--lake", orders)
    assert_one_line_error(st, exitcodes.USAGE, "dataset 'orders'", "dataset 'customers'", home.path, "wrong --home")
    out = str(tmp_path / "out")
    dec = run_cli("--home", home.path, "decrypt", "--lake", orders, "--out", out)
    assert_one_line_error(dec, exitcodes.USAGE, "dataset 'orders'", "wrong --home")
    assert not os.path.exists(out)


def test_same_dataset_home_that_knows_no_dek_says_so(tmp_path):
    lake, _ = _foreign_lake(tmp_path, "theirs", "customers")
    mine = make_home(tmp_path / "mine", dataset="customers")

    st = run_cli("--home", mine.path, "--json", "status", "--lake", lake)
    assert st.code == exitcodes.DATA, (st.out, st.err)
    report = st.json()
    assert report["status_rows"]["unknown"] == report["rows"] == 60  # every row is still counted
    [problem] = [p for p in report["problems"] if p["path"] is None]
    assert problem["reason"] == "no_known_dek" and problem["rows"] == 60
    assert "knows none of this lake's" in problem["detail"] and "directory rebuild" in problem["detail"]
    assert mine.path in problem["detail"]
    text = run_cli("--home", mine.path, "status", "--lake", lake)
    assert "no_known_dek" in text.out and "wrong --home" in text.out

    dec = run_cli("--home", mine.path, "decrypt", "--lake", lake, "--out", str(tmp_path / "out"))
    assert dec.code == exitcodes.DATA and "knows none of this lake's" in dec.out and "directory rebuild" in dec.out

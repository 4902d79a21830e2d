"""`keyturn encrypt` accounts for every source row, and binds row keys when asked.

- Partition column names a hive directory cannot carry (hidden "_x"/".x",
  keyturn's own ``_keyturn``, "/", "=", empty, twice) are refused before any
  work: one `InputError` line, exit 2, no lake created.
- Every run reports ``rows_source`` and checks written + skipped
  (+ quarantined) == source before it commits; a run whose rows do not add
  up fails (`AccountingError`, exit 3) and commits nothing.
- Partition *values* that look hidden ("_eu", ".eu"), or hold "/", "=",
  "%", all land in the lake and read back; a null and the literal string
  ``__HIVE_DEFAULT_PARTITION__`` land in two directories and read back as
  a null and as the string (DuckDB, keyturn's own hive parser).
- ``--bind COL`` (and ``encryption.bind_columns``) binds row-key columns,
  recorded in the dataset contract: cells swapped between two rows of one
  column are quarantined on decrypt; without a binding they are not (the
  documented limitation, FORMAT section 17). A later write that binds
  another list is refused by the contract.
- ingest checks each landed file against the contract's plain types: an
  int64 ``email`` in a string-``email`` dataset is rejected and
  quarantined, and the stream goes on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from cli_support import run_cli
from keyturn import encrypt_plan
from keyturn.errors import AccountingError, InputError
from keyturn.lake.layout import Lake
from keyturn.pipelines import decrypt, encrypt, ingest
from keyturn.pipelines.exitcodes import DATA, exit_code_for
from keyturn.lake.sideoutputs import read_side_outputs
from keyturn.lake.hive import hive_segments
from tests.pipeline_support import SENSITIVE, all_files, customers, data_files, make_home, read_hive, write_parquet_source

pytestmark = pytest.mark.beam

NULL = "__HIVE_DEFAULT_PARTITION__"


@pytest.fixture
def home(tmp_path):
    return make_home(tmp_path / "home")


def _source_with(tmp_path: Path, name: str, values: list, *, rows: int = 60) -> str:
    """A two-file source with a partition column `name` cycling through `values`."""
    table = customers(rows).drop_columns(["region"])
    column = pa.array([values[i % len(values)] for i in range(rows)], pa.string())
    return write_parquet_source(tmp_path / "src", table.append_column(name, column), files=2)


# ------------------------------------------------------------------ partition column names


@pytest.mark.parametrize(
    "partition_by",
    ["_region", ".region", "_keyturn", "_keyturn_version", ["a/b"], ["a=b"], [""], ["tier", "tier"]],
    ids=["underscore", "dot", "keyturn-dir", "reserved-column", "slash", "equals", "empty", "twice"],
)
def test_partition_column_names_a_hive_directory_cannot_carry_are_refused_before_any_work(home, tmp_path, partition_by):
    names = [partition_by] if isinstance(partition_by, str) else partition_by
    table = customers(40)
    for name in dict.fromkeys(names):
        if name not in table.column_names:
            table = table.append_column(name, pa.array(["x"] * table.num_rows))
    src = write_parquet_source(tmp_path / "src", table, files=1)
    lake = tmp_path / "lake"
    with pytest.raises(InputError, match="partition column") as info:
        encrypt.run(home=home, source=src, lake=str(lake), columns=SENSITIVE, partition_by=partition_by)
    assert "\n" not in str(info.value)
    assert not lake.exists()  # before any work: no lake, no staging, no DEK
    assert home.registry().get_contract(home.dataset) is None


def test_cli_refuses_a_hidden_partition_column_with_one_line_and_exit_2(home, tmp_path):
    table = customers(30).rename_columns(["id", "_region", "email", "ssn", "spend", "signup"])
    src = write_parquet_source(tmp_path / "src", table, files=1)
    result = run_cli("--home", str(home.path), "encrypt", "--source", src, "--lake", str(tmp_path / "lake"),
                     "--columns", "email", "--partition-by", "_region")
    assert result.code == 2, result.err
    assert result.err.count("\n") == 1 and result.err.startswith("keyturn: error: partition column '_region'")
    assert not (tmp_path / "lake").exists()


# ------------------------------------------------------------------ accounting


def test_every_encrypt_reports_and_accounts_for_every_source_row(home, tmp_path):
    table = customers(900, partitions=3)
    src = write_parquet_source(tmp_path / "src", table, files=3)
    lake = tmp_path / "lake"
    first = encrypt.run(home=home, source=src, lake=str(lake), columns=SENSITIVE, partition_by="region")
    assert first["rows_source"] == 900 == first["rows_written"] and first["rows_skipped"] == 0
    # more source rows in a new partition: the old partitions are skipped, the new one written, all counted
    more = customers(300, partitions=1, start=5000).set_column(1, "region", pa.array([7] * 300, pa.int64()))
    pq.write_table(more, Path(src) / "more.parquet")
    second = encrypt.run(home=home, source=src, lake=str(lake), columns=SENSITIVE, partition_by="region")
    assert second["rows_source"] == 1200
    assert second["rows_written"] == 300 and second["rows_skipped"] == 900
    assert second["rows_written"] + second["rows_skipped"] == second["rows_source"]
    assert read_hive(lake).num_rows == 1200


def test_rows_that_do_not_add_up_fail_the_run_and_commit_nothing(home, tmp_path, monkeypatch):
    # take away the name check: the hidden partition directory that used to swallow rows silently
    monkeypatch.setattr(encrypt_plan, "check_partition_names", lambda names: None)
    table = customers(120).rename_columns(["id", "_region", "email", "ssn", "spend", "signup"])
    src = write_parquet_source(tmp_path / "src", table, files=2)
    lake = tmp_path / "lake"
    with pytest.raises(AccountingError, match="120 source rows were read but 0 written") as info:
        encrypt.run(home=home, source=src, lake=str(lake), columns=["email"], partition_by="_region")
    assert exit_code_for(info.value) == DATA and "\n" not in str(info.value)
    assert data_files(lake) == []
    assert not [f for f in all_files(lake) if "staging/" in f or f.endswith(".parquet")]


# ------------------------------------------------------------------ partition values


def test_partition_values_that_look_hidden_or_hold_path_characters_are_all_kept(home, tmp_path):
    values = ["_eu", ".eu", "..", "a/b", "x=y", "%41", "plain"]
    src = _source_with(tmp_path, "zone", values, rows=70)
    lake, out = tmp_path / "lake", tmp_path / "out"
    report = encrypt.run(home=home, source=src, lake=str(lake), columns=SENSITIVE, partition_by="zone")
    back = read_hive(lake)
    assert back.num_rows == 70
    assert sorted(set(back.column("zone").to_pylist())) == sorted(values)
    assert report["rows_source"] == report["rows_written"] == 70
    assert len(report["partitions_written"]) == len(values)
    assert decrypt.run(home=home, lake=str(lake), out=str(out))["rows_written"] == 70
    plain = read_hive(out)
    assert plain.column("zone").to_pylist() == [values[i % len(values)] for i in range(70)]
    assert plain.column("email").to_pylist() == [f"user{i}@example.com" for i in range(70)]


def test_null_and_the_literal_default_partition_string_stay_distinct(home, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    table = customers(40).drop_columns(["region"])
    zone = pa.array([None if i % 2 else NULL for i in range(40)], pa.string())
    src = write_parquet_source(tmp_path / "src", table.append_column("zone", zone), files=1)
    lake, out = tmp_path / "lake", tmp_path / "out"
    report = encrypt.run(home=home, source=src, lake=str(lake), columns=SENSITIVE, partition_by="zone")
    # two partitions (two DEK scopes, two directories), 20 rows each
    assert {p: c["rows"] for p, c in report["partitions_written"].items()} == {
        f"zone={NULL}": 20, "zone=%5F%5FHIVE_DEFAULT_PARTITION%5F%5F": 20
    }
    assert {p: dict(hive_segments(p))["zone"] for p in report["partitions_written"]} == {
        f"zone={NULL}": None, "zone=%5F%5FHIVE_DEFAULT_PARTITION%5F%5F": NULL
    }
    decrypt.run(home=home, lake=str(lake), out=str(out))
    for root in (lake, out):  # the lake and its decrypted copy, as DuckDB (and Spark) read hive paths
        rows = duckdb.connect().execute(
            f"select zone, count(*), min(id) % 2 from read_parquet('{root}/**/*.parquet', hive_partitioning = true) "
            "group by zone order by zone nulls last"
        ).fetchall()
        assert rows == [(NULL, 20, 0), (None, 20, 1)], root
    # the decrypted rows come back in the directory of their own value
    ids = {str(Path(p).parent): sorted(pq.read_table(out / p).column("id").to_pylist()) for p in data_files(out)}
    assert ids == {f"zone={NULL}": list(range(1, 40, 2)), "zone=%5F%5FHIVE_DEFAULT_PARTITION%5F%5F": list(range(0, 40, 2))}


# ------------------------------------------------------------------ --bind


def _swap_cells(lake: Path, column: str) -> tuple[int, int]:
    """Swap `column`'s cells between the first two rows of the first lake file; returns their ids."""
    path = lake / data_files(lake)[0]
    table = pq.read_table(path)
    cells = table.column(column).to_pylist()
    cells[0], cells[1] = cells[1], cells[0]
    index = table.schema.get_field_index(column)
    swapped = table.set_column(index, table.schema.field(column), pa.array(cells, table.schema.field(column).type))
    footer = pq.read_metadata(path).metadata[b"keyturn"]
    pq.write_table(swapped.replace_schema_metadata({**(swapped.schema.metadata or {}), b"keyturn": footer}), path)
    ids = table.column("id").to_pylist()
    return ids[0], ids[1]


@pytest.mark.parametrize("bind", [True, False], ids=["bound-to-id", "unbound"])
def test_cells_swapped_between_rows_are_quarantined_only_when_bound(home, tmp_path, bind):
    table = customers(200, partitions=2)
    src = write_parquet_source(tmp_path / "src", table, files=1)
    lake, out = tmp_path / "lake", tmp_path / "out"
    args = ["--home", str(home.path), "--json", "encrypt", "--source", src, "--lake", str(lake),
            "--columns", "email,ssn", "--partition-by", "region"] + (["--bind", "id"] if bind else [])
    written = run_cli(*args)
    assert written.code == 0, written.err
    assert written.json()["bind"] == (["id"] if bind else [])
    assert list(home.registry().get_contract(home.dataset).bind) == (["id"] if bind else [])
    a, b = _swap_cells(lake, "email")
    report = decrypt.run(home=home, lake=str(lake), out=str(out))
    plain = read_hive(out) if report["rows_written"] else None
    if bind:
        assert report["rows_by_status"]["corrupt"] == 2 and report["rows_written"] == 198
        assert a not in plain.column("id").to_pylist() and b not in plain.column("id").to_pylist()
    else:  # the documented limitation: without a row-key binding a swap within one column authenticates
        assert report["rows_by_status"]["corrupt"] == 0 and report["rows_written"] == 200
        emails = dict(zip(plain.column("id").to_pylist(), plain.column("email").to_pylist()))
        assert emails[a] == f"user{b}@example.com" and emails[b] == f"user{a}@example.com"


def test_a_later_encrypt_binding_other_columns_is_refused_by_the_contract(home, tmp_path):
    table = customers(100, partitions=2)
    src = write_parquet_source(tmp_path / "src", table, files=1)
    lake = tmp_path / "lake"
    base = ["--home", str(home.path), "encrypt", "--source", src, "--lake", str(lake), "--columns", "email"]
    assert run_cli(*base, "--bind", "id").code == 0
    refused = run_cli(*base, "--bind", "spend")
    assert refused.code == 2 and "binds spend" in refused.err and refused.err.count("\n") == 1
    # no --bind: the contract's binding is used, not silently dropped
    again = run_cli(*base, "--json")
    assert again.code == 0 and again.json()["bind"] == ["id"]
    bad = run_cli(*base, "--bind", "email")
    assert bad.code == 2 and "also encrypted" in bad.err


def test_the_config_key_binds_row_key_columns(home, tmp_path):
    config = Path(home.path) / "config.yaml"
    doc = yaml.safe_load(config.read_text())
    doc.setdefault("encryption", {})["bind_columns"] = ["id"]
    config.write_text(yaml.safe_dump(doc))
    table = customers(50, partitions=1)
    src = write_parquet_source(tmp_path / "src", table, files=1)
    report = encrypt.run(home=str(home.path), source=src, lake=str(tmp_path / "lake"), columns=["email"])
    assert report["bind"] == ["id"]
    assert list(home.registry().get_contract(home.dataset).bind) == ["id"]


# ------------------------------------------------------------------ ingest checks types (item 4)


def test_ingest_rejects_a_file_whose_column_type_breaks_the_contract_and_goes_on(home, tmp_path):
    land, lake = tmp_path / "land", tmp_path / "lake"
    land.mkdir()
    good = customers(100, partitions=2)
    pq.write_table(good, land / "a-good.parquet")
    bad = customers(50, partitions=2, start=1000)
    bad = bad.set_column(bad.schema.get_field_index("email"), "email", pc.cast(bad.column("id"), pa.int64()))
    pq.write_table(bad, land / "b-bad.parquet")
    pq.write_table(customers(30, partitions=2, start=2000), land / "c-good.parquet")
    report = ingest.run(home=home, watch=str(land), lake=str(lake), columns=["email"], partition_by="region",
                        poll_interval=0.1, until_idle=1.0)
    assert report["files_ingested"] == 2 and report["rows_written"] == 130
    assert report["files_quarantined"] == 1 and report["quarantined"] == [str(land / "b-bad.parquet")]
    assert sorted(read_hive(lake).column("id").to_pylist()) == list(range(100)) + list(range(2000, 2030))
    records = read_side_outputs(Lake(str(lake)), "quarantine")
    assert len(records) == 1 and "b-bad.parquet" in records[0]["detail"]
    assert records[0]["payload"] == (land / "b-bad.parquet").read_bytes()
    entries = json.loads((lake / "_keyturn" / "ingested.json").read_text())["sources"]
    assert entries["b-bad.parquet"]["status"] == "rejected"
    assert home.registry().get_contract(home.dataset).column("email").type_descriptor.endswith("string")


def test_ingest_refuses_a_bind_other_than_the_contracts_before_any_work(tmp_path):
    from cli_support import run_cli

    home = str(tmp_path / "home")
    assert run_cli("--home", home, "init", "--dataset", "customers").code == 0
    land = tmp_path / "land"
    land.mkdir()
    pq.write_table(pa.table({"id": [1, 2], "email": ["a@x", "b@x"]}), land / "one.parquet")
    lake = str(tmp_path / "lake")
    first = run_cli("--home", home, "ingest", "--watch", str(land), "--lake", lake, "--columns", "email",
                    "--bind", "id", "--until-idle", "0.5", "--poll-interval", "0.05")
    assert first.code == 0, first.err
    shown = run_cli("--home", home, "--json", "dataset", "show").json()
    assert shown["contract"]["bind"] == ["id"]
    pq.write_table(pa.table({"id": [3], "email": ["c@x"]}), land / "two.parquet")
    refused = run_cli("--home", home, "ingest", "--watch", str(land), "--lake", lake, "--bind", "email,id",
                      "--until-idle", "0.5", "--poll-interval", "0.05")
    assert refused.code == 2 and "binds id" in refused.err and refused.err.count("\n") == 1

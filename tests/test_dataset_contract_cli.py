"""`keyturn dataset show|add-column`: the contract evolves only through an audited verb.

Each test drives the CLI in-process on a real key home and a lake written by
`keyturn encrypt` (Beam's in-process runner), as a user would.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from cli_support import run_cli
from keyturn.audit.chain import AuditChain
from keyturn.pipelines import exitcodes

pytestmark = pytest.mark.beam

ROWS = 120


def _source(path, regions: list[str], start: int = 0) -> str:
    os.makedirs(path, exist_ok=True)
    ids = list(range(start, start + ROWS))
    table = pa.table(
        {
            "id": ids,
            "region": [regions[i % len(regions)] for i in range(ROWS)],
            "email": [f"user{i}@example.com" for i in ids],
            "phone": [f"+1-555-{i:04d}" for i in ids],
        }
    )
    pq.write_table(table, os.path.join(path, "part.parquet"))
    return str(path)


@pytest.fixture()
def lake_home(tmp_path):
    home = str(tmp_path / "home")
    assert run_cli("--home", home, "init", "--dataset", "customers").code == 0
    first = _source(tmp_path / "src1", ["r0", "r1"])
    enc = run_cli("--home", home, "encrypt", "--source", first, "--lake", str(tmp_path / "lake"),
                  "--columns", "email", "--partition-by", "region")
    assert enc.code == 0, enc.err
    return home, tmp_path


def cli(home: str, *args: str):
    return run_cli("--home", home, "--json", *args)


def test_first_write_pins_the_contract_and_show_reports_it(lake_home):
    home, _ = lake_home
    shown = cli(home, "dataset", "show")
    assert shown.code == 0
    contract = shown.json()["contract"]
    assert [c["name"] for c in contract["columns"]] == ["email"] and contract["revision"] == 1
    assert contract["partition_by"] == ["region"]
    assert [h["revision"] for h in shown.json()["history"]] == [1]


def test_add_column_is_audited_and_makes_the_next_write_encrypt_it(lake_home):
    home, tmp = lake_home
    second = _source(tmp / "src2", ["r2"], start=1000)
    chain_before = len(AuditChain(os.path.join(home, "audit.log")).entries())

    added = cli(home, "dataset", "add-column", "phone", "--source", second, "--reason", "phone is PII now")
    assert added.code == 0, added.err
    assert [c["name"] for c in added.json()["contract"]["columns"]] == ["email", "phone"]
    entries = AuditChain(os.path.join(home, "audit.log")).entries()
    assert len(entries) == chain_before + 1 and entries[-1].event.action.value == "contract"

    # the old column list is refused now, before any work; the new one is accepted
    lake = str(tmp / "lake")
    refused = cli(home, "encrypt", "--source", second, "--lake", lake, "--columns", "email", "--partition-by", "region")
    assert refused.code == exitcodes.USAGE and "add-column" in refused.err
    assert not os.path.exists(os.path.join(lake, "region=r2"))
    ok = cli(home, "encrypt", "--source", second, "--lake", lake, "--columns", "email,phone", "--partition-by", "region")
    assert ok.code == 0, ok.err
    new_file = next((tmp / "lake" / "region=r2").glob("*.parquet"))
    assert pq.read_schema(new_file).field("phone").type == pa.binary()  # ciphertext, not the plain number
    assert b"+1-555-1000" not in new_file.read_bytes()

    # new rows decrypt phone; old rows (DEKs born before revision 2) read it as null: a clear value in a
    # contract column is never returned (nothing proves it genuine), and it stays in the old file
    out = tmp / "plain"
    dec = cli(home, "decrypt", "--lake", lake, "--out", str(out))
    assert dec.code == 0, dec.err
    plain = ds.dataset(str(out), format="parquet", partitioning="hive").to_table().sort_by("id")
    assert plain.num_rows == 2 * ROWS
    assert plain.column("phone").to_pylist() == [None] * ROWS + [f"+1-555-{i:04d}" for i in range(1000, 1000 + ROWS)]
    assert all(b"+1-555-0001" in f.read_bytes() for f in (tmp / "lake" / "region=r1").glob("*.parquet"))  # kept
    status = cli(home, "status", "--lake", lake)
    assert {p["reason"] for p in status.json()["problems"]} == {"legacy_plain_column"}


def test_reencrypt_leaves_files_with_a_column_still_in_clear_and_says_so(lake_home):
    home, tmp = lake_home
    second = _source(tmp / "src2", ["r2"], start=1000)
    assert cli(home, "dataset", "add-column", "phone", "--source", second).code == 0
    assert cli(home, "rotate").code == 0
    lake = tmp / "lake"
    before = {f: f.read_bytes() for f in lake.glob("region=*/*.parquet")}
    re = cli(home, "reencrypt", "--lake", str(lake))
    assert re.code == exitcodes.DATA, re.err
    assert {p["reason"] for p in re.json()["problems"]} >= {"legacy_plain_column"}
    assert {f: f.read_bytes() for f in lake.glob("region=*/*.parquet")} == before  # neither sealed nor dropped


def test_a_forged_row_naming_an_old_dek_cannot_smuggle_clear_values_into_an_added_column(lake_home):
    """Storage access: copy an old row's key columns into a new file whose added column holds chosen plaintext."""
    home, tmp = lake_home
    second = _source(tmp / "src2", ["r2"], start=1000)
    assert cli(home, "dataset", "add-column", "phone", "--source", second).code == 0
    lake = tmp / "lake"
    old_file = next((lake / "region=r0").glob("*.parquet"))
    old = pq.read_table(old_file).slice(0, 5)  # its phone column is plain (it was not sensitive then)
    i = old.schema.get_field_index("phone")
    forged = old.set_column(i, "phone", pa.array([f"FORGED-{i}" for i in range(5)])).replace_schema_metadata(None)
    pq.write_table(forged, lake / "region=r0" / "part-forged.parquet")
    out = tmp / "plain"
    dec = cli(home, "decrypt", "--lake", str(lake), "--out", str(out))
    assert dec.code in (exitcodes.OK, exitcodes.DATA), dec.err
    plain = ds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert not any(str(v).startswith("FORGED") for v in plain.column("phone").to_pylist())


def test_a_newer_row_with_plaintext_under_an_added_column_is_quarantined(lake_home):
    """After add-column, a file written under the new revision whose column was swapped for plaintext is a downgrade."""
    home, tmp = lake_home
    second = _source(tmp / "src2", ["r2"], start=1000)
    assert cli(home, "dataset", "add-column", "phone", "--source", second).code == 0
    lake = tmp / "lake"
    assert cli(home, "encrypt", "--source", second, "--lake", str(lake), "--columns", "email,phone",
               "--partition-by", "region").code == 0
    target = next((lake / "region=r2").glob("*.parquet"))
    table = pq.read_table(target)
    i = table.schema.get_field_index("phone")
    forged = table.set_column(i, pa.field("phone", pa.string()), pa.array(["FORGED"] * table.num_rows))
    pq.write_table(forged, target)
    out = tmp / "plain"
    dec = cli(home, "decrypt", "--lake", str(lake), "--out", str(out))
    assert dec.code == exitcodes.DATA
    plain = ds.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert "FORGED" not in plain.column("phone").to_pylist()
    assert plain.num_rows == ROWS  # the old partitions only; the forged file's rows are quarantined
    status = cli(home, "status", "--lake", str(lake))
    assert status.code == exitcodes.DATA
    assert any(p["reason"] == "contract_violation" for p in status.json()["problems"])


def test_add_column_refuses_what_cannot_be_encrypted(lake_home):
    home, tmp = lake_home
    second = _source(tmp / "src2", ["r2"])
    assert cli(home, "dataset", "add-column", "email", "--source", second).code == exitcodes.USAGE  # already
    assert cli(home, "dataset", "add-column", "region", "--source", second).code == exitcodes.USAGE  # partition
    assert cli(home, "dataset", "add-column", "nope", "--source", second).code == exitcodes.USAGE  # not in the data
    assert [c["name"] for c in cli(home, "dataset", "show").json()["contract"]["columns"]] == ["email"]

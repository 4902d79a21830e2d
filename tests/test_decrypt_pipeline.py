"""`keyturn.pipelines.decrypt`: an encrypted lake back to plain Parquet, with every row accounted for."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keyturn.errors import InputError, VersionInUseError
from keyturn.lake.layout import Lake
from keyturn.lake.sideoutputs import SideOutputDir
from keyturn.pipelines import decrypt, encrypt
from keyturn.lake.sideoutputs import read_side_outputs
from tests.pipeline_support import SENSITIVE, all_files, customers, data_files, make_home, read_hive, run_cli, write_parquet_source

pytestmark = pytest.mark.beam


class NoData:
    """An inventory that (wrongly) finds nothing: the registry's DEK directory must still refuse the retire."""

    def references(self, version: int) -> int:
        return 0


def force_retire(home, version: int) -> None:
    """Retire `version` behind the registry's back, DEKs still under it (write access to the registry file,
    or a registry restored from an old backup). Readers must still refuse the version's data."""
    import sqlite3
    from datetime import datetime, timezone

    at = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    with sqlite3.connect(home.registry().path) as conn:
        conn.execute("UPDATE versions SET state = 'retired', state_changed_at = ? WHERE version = ?", (at, version))
        conn.execute(
            "INSERT INTO history (version, from_state, to_state, at, actor, reason) "
            "VALUES (?, 'decrypt_only', 'retired', ?, 'intruder', 'out of band')",
            (version, at),
        )


def rotate(home) -> int:
    registry = home.registry()
    version = registry.active().version + 1
    return registry.rotate(home.provision_kek(version), actor="tests", reason="rotation under test").version


@pytest.fixture
def home(tmp_path):
    return make_home(tmp_path / "home")


@pytest.fixture
def table():
    return customers(1600, partitions=4)


@pytest.fixture
def lake(home, tmp_path, table):
    src = write_parquet_source(tmp_path / "src", table, files=2)
    path = tmp_path / "lake"
    encrypt.run(home=home, source=src, lake=str(path), columns=SENSITIVE, partition_by="region", file_rows=300)
    return path


def side_outputs(report) -> SideOutputDir:
    """Where a decrypt run put its side outputs (under its output by default; never in the lake)."""
    return SideOutputDir.of(Lake(report["side_outputs"]))


def snapshot(path: Path) -> dict[str, bytes]:
    return {f: (path / f).read_bytes() for f in data_files(path)}


def test_decrypt_restores_the_source_with_its_layout(home, lake, table, tmp_path):
    before = snapshot(lake)
    out = tmp_path / "out"
    report = decrypt.run(home=home, lake=str(lake), out=str(out))
    assert report["rows_written"] == 1600 and report["problems"] == []
    assert report["rows_by_status"] == {"current": 1600, "stale": 0, "retired": 0, "unknown": 0, "missing": 0, "corrupt": 0}
    assert sorted({os.path.dirname(f) for f in data_files(out)}) == [f"region={r}" for r in range(4)]
    back = read_hive(out)
    for name in table.column_names:
        assert back.column(name).to_pylist() == table.column(name).to_pylist(), name
    # plain output: no keyturn footer, no keyturn columns
    some = out / data_files(out)[0]
    assert b"keyturn" not in (pq.read_metadata(some).metadata or {})
    assert not {"_keyturn_version", "_keyturn_dek"} & set(pq.read_schema(some).names)
    assert snapshot(lake) == before  # the lake is never modified
    assert report["kms_calls"] == report["audit_events"] >= 4  # one unwrap per DEK per bundle


def test_columns_limits_what_is_decrypted(home, lake, table, tmp_path):
    out = tmp_path / "out"
    decrypt.run(home=home, lake=str(lake), out=str(out), columns=["ssn"])
    back = read_hive(out)
    assert "email" not in back.column_names
    assert back.column("ssn").to_pylist() == table.column("ssn").to_pylist()
    assert back.column("spend").to_pylist() == table.column("spend").to_pylist()


@pytest.mark.parametrize(
    "columns, message",
    [
        (["nope"], "'nope' is not an encrypted column of dataset 'customers' \\(encrypted: email, ssn\\)"),
        (["spend"], "'spend' is not an encrypted column"),
        (["ssn", "region"], "'region' is not an encrypted column"),
    ],
)
def test_unknown_column_is_refused_before_anything_is_written(home, lake, tmp_path, columns, message):
    with pytest.raises(InputError, match=message):
        decrypt.run(home=home, lake=str(lake), out=str(tmp_path / "out"), columns=columns)
    assert not (tmp_path / "out").exists()


def test_out_must_be_new_or_empty_and_outside_the_lake(home, lake, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        decrypt.run(home=home, lake=str(lake), out=str(tmp_path / "busy"))
    with pytest.raises(InputError, match="overlaps the lake"):
        decrypt.run(home=home, lake=str(lake), out=str(lake / "plain"))


def test_after_rotation_old_rows_decrypt_as_stale_and_read_as_current_after_a_rewrap(home, lake, table, tmp_path):
    rotate(home)
    report = decrypt.run(home=home, lake=str(lake), out=str(tmp_path / "out1"))
    assert report["rows_written"] == 1600
    assert report["rows_by_status"]["stale"] == 1600 and report["problems"] == []
    events = read_side_outputs(side_outputs(report), "mismatch", run_id=report["run_id"])
    assert {e["reason"] for e in events} == {"stale"} and sum(e["rows"] for e in events) == 1600
    assert {(e["found_version"], e["current_version"]) for e in events} == {(1, 2)}
    assert read_hive(tmp_path / "out1").column("email").to_pylist() == table.column("email").to_pylist()

    # the control-plane write-back: a rewrap moves their DEKs to version 2 in the directory, not one lake byte
    from keyturn.pipelines import reencrypt

    before = snapshot(lake)
    report = reencrypt.run(str(lake), home=home.path, mode="rewrap")
    assert report["directory_rewrap"]["complete"] and report["files_rewritten"] == 0
    assert snapshot(lake) == before
    again = decrypt.run(home=home, lake=str(lake), out=str(tmp_path / "out2"))
    assert again["rows_by_status"]["current"] == 1600 and again["rows_by_status"]["stale"] == 0
    assert read_hive(tmp_path / "out2").column("ssn").to_pylist() == table.column("ssn").to_pylist()


def test_bad_files_and_rows_go_to_side_outputs_and_nothing_is_deleted(home, lake, table, tmp_path):
    # 1. a corrupt Parquet file
    (lake / "region=0" / "part-corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    # 2. a file missing key metadata (plain rows dropped into the lake)
    plain = customers(50, partitions=1, start=50_000).drop_columns(["region"])
    pq.write_table(plain, lake / "region=1" / "part-plain.parquet")
    # 3. rows under a version this registry does not know: another home, rotated to version 3
    other = make_home(tmp_path / "other-home")
    rotate(other), rotate(other)
    src2 = write_parquet_source(tmp_path / "src2", customers(40, partitions=1, start=60_000), files=1)
    encrypt.run(home=other, source=src2, lake=str(tmp_path / "lake2"), columns=SENSITIVE, partition_by="region")
    shutil.copy(tmp_path / "lake2" / data_files(tmp_path / "lake2")[0], lake / "region=0" / "part-foreign.parquet")
    # 4. a retired version: rotate, then (wrongly) retire version 1 while data remains; the registry refuses
    # whatever an inventory says, so the retire is made behind its back
    rotate(home)
    with pytest.raises(VersionInUseError, match="the DEK directory holds"):
        home.registry().retire(1, actor="tests", reason="bad operator", inventory=NoData())
    force_retire(home, 1)
    before = set(all_files(lake))

    out = tmp_path / "out"
    report = decrypt.run(home=home, lake=str(lake), out=str(out))

    status = report["rows_by_status"]
    assert status == {"current": 0, "stale": 0, "retired": 1600, "unknown": 40, "missing": 50, "corrupt": 0}
    assert report["files_unreadable"] == 1 and "part-corrupt.parquet" in report["unreadable"][0]
    assert report["rows_written"] == 0
    problems = {p["reason"]: p["rows"] for p in report["problems"]}
    assert [p["path"] for p in report["problems"] if p["reason"] == "unreadable"] == ["region=0/part-corrupt.parquet"]
    assert problems == {"unreadable": 0, "retired": 1600, "unknown": 40, "missing": 50}
    lake_obj = side_outputs(report)
    quarantined = read_side_outputs(lake_obj, "quarantine", run_id=report["run_id"])
    assert [q["reason"] for q in quarantined] == ["unparseable"]
    assert quarantined[0]["payload"] == b"PAR1 this is not parquet at all PAR1"
    reasons = {e["reason"] for e in read_side_outputs(lake_obj, "mismatch", run_id=report["run_id"])}
    assert reasons == {"retired", "unknown", "missing"}
    assert before == set(all_files(lake))  # nothing deleted, nothing added: the side outputs are under the output


def test_tampered_cells_are_quarantined_with_their_bytes(home, lake, tmp_path):
    victim = lake / data_files(lake)[0]
    t = pq.read_table(victim)
    cells = t.column("ssn").to_pylist()
    i = next(k for k, c in enumerate(cells) if c is not None)
    cells[i] = cells[i][:-1] + bytes([cells[i][-1] ^ 1])
    t = t.set_column(t.schema.get_field_index("ssn"), t.schema.field("ssn"), pa.array(cells, pa.binary()))
    pq.write_table(t, victim)
    report = decrypt.run(home=home, lake=str(lake), out=str(tmp_path / "out"))
    assert report["rows_by_status"]["corrupt"] == 1 and report["rows_written"] == 1599
    [record] = read_side_outputs(side_outputs(report), "quarantine", run_id=report["run_id"])
    assert record["reason"] == "corrupt" and record["rows"] == 1 and record["payload_format"] == "arrow_ipc"


def test_cli_decrypt_reports_data_problems_with_exit_code_3(home, lake, tmp_path):
    (lake / "region=2" / "part-corrupt.parquet").write_bytes(b"not parquet")
    proc = run_cli(["decrypt", "--home", home.path, "--lake", str(lake), "--out", str(tmp_path / "out"), "--json"])
    assert proc.returncode == 3, proc.stderr
    assert '"files_unreadable": 1' in proc.stdout
    proc = run_cli(["decrypt", "--home", home.path, "--lake", str(lake), "--out", str(tmp_path / "o2"), "--columns", "zip"])
    assert proc.returncode == 2 and "'zip' is not an encrypted column" in proc.stderr and "Traceback" not in proc.stderr

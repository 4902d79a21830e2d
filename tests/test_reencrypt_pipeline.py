"""The reencrypt job end to end on a real key home and lake (Beam FnApiRunner, in process)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_support import run_cli
from keyturn.errors import LakeError, LakeLockedError
from keyturn.lake import Lake, footer_for, write_parquet_atomically
from keyturn.lake.sideoutputs import read_side_outputs
from keyturn.scope import KekRef
from lake_support import (
    DATASET,
    SENSITIVE,
    CountingKeySource,
    build_lake,
    data_snapshot,
    file_versions,
    hive_view,
    lake_plaintext,
    make_home,
    plain_equal,
    rotate,
    snapshot,
    source_table,
    temp_files,
    write_encrypted_file,
)
from keyturn.pipelines import reencrypt

pytestmark = pytest.mark.beam


@pytest.fixture
def home(tmp_path):
    return make_home(str(tmp_path / "home"))


@pytest.fixture
def source():
    return source_table(400, 4)


@pytest.fixture
def lake(home, tmp_path, source):
    return build_lake(home, str(tmp_path / "lake"), source, files_per_partition=2, row_group_size=40)


def _counting(home, tmp_path):
    return CountingKeySource(home.key_source(), str(tmp_path / "kms-calls.log"))


def test_dry_run_max_files_then_finish(lake, home, source, tmp_path):
    hive_before = hive_view(lake.uri)
    sensitive_before = {f.relpath: pq.read_table(f.path, columns=SENSITIVE) for f in lake.data_files()}
    rotate(home)

    before = snapshot(lake.uri)
    dry = reencrypt.run(lake.uri, home=home.path, dry_run=True)
    assert snapshot(lake.uri) == before  # bytes and mtimes of every file, and no new file (not even the lock)
    assert dry["plan"]["files"] == 8 and dry["plan"]["stale_rows"] == 400 and dry["plan"]["rows_by_version"] == {"1": 400}
    assert set(dry["plan"]["partitions"]) == {f"region={i}" for i in range(4)}
    assert dry["files_rewritten"] == 0 and dry["problems"] == [] and not dry["complete"]

    keys = _counting(home, tmp_path)
    first = reencrypt.run(lake.uri, keys=keys, dataset=DATASET, max_files=3)
    assert first["files_rewritten"] == 3 and first["rows_moved"] == 150
    assert sum(1 for v in file_versions(lake.uri).values() if v == {2: 50}) == 3
    assert first["inventory"]["stale_files"] == 5 and not first["complete"]
    assert first["problems"] == []
    # the stale files left are reported on the mismatch side output (reason stale, from footers)
    mismatch = read_side_outputs(lake, "mismatch", run_id=first["run_id"])
    assert sorted(m["reason"] for m in mismatch) == ["stale"] * 5 and sum(m["rows"] for m in mismatch) == 250

    second = reencrypt.run(lake.uri, keys=keys, dataset=DATASET)
    assert second["files_rewritten"] == 5 and second["complete"]
    assert all(v == {2: 50} for v in file_versions(lake.uri).values())
    assert plain_equal(home, lake.uri, source)
    assert temp_files(lake.uri) == []
    # the default mode re-encrypts: fresh DEKs, so every ciphertext changed; other readers see the same
    # non-sensitive data and layout
    for f in lake.data_files():
        assert not pq.read_table(f.path, columns=SENSITIVE).equals(sensitive_before[f.relpath])
    assert hive_view(lake.uri).equals(hive_before)
    assert first["mode"] == second["mode"] == "reencrypt" and first["directory_rewrap"] is None
    audit = read_side_outputs(lake, "audit")
    assert len(audit) == 8 and {a["action"] for a in audit} == {"reencrypt"}
    assert sum(a["counts"]["rows_moved"] for a in audit) == 400
    assert os.path.isfile(lake.side_output_path("audit", second["run_id"]))
    assert second["kms_calls"] == sum(a["counts"]["kms_calls"] for a in read_side_outputs(lake, "audit", run_id=second["run_id"]))

    # a finished job: a third run reads footers only, calls no KMS, rewrites nothing
    calls_so_far = len(keys.calls())
    assert calls_so_far == first["kms_calls"] + second["kms_calls"] > 0
    data_before = {rel: (data, os.stat(lake.path(rel)).st_mtime_ns) for rel, data in data_snapshot(lake.uri).items()}
    third = reencrypt.run(lake.uri, keys=keys, dataset=DATASET)
    assert len(keys.calls()) == calls_so_far
    assert third["files_rewritten"] == 0 and third["kms_calls"] == 0 and third["plan"]["files"] == 0
    assert {rel: (data, os.stat(lake.path(rel)).st_mtime_ns) for rel, data in data_snapshot(lake.uri).items()} == data_before


def test_reencrypt_mode_changes_ciphertext_not_plaintext(lake, home, source):
    before = {f.relpath: pq.read_table(f.path, columns=["ssn"]) for f in lake.data_files()}
    rotate(home)
    report = reencrypt.run(lake.uri, home=home.path, mode="reencrypt", workers=3)
    assert report["files_rewritten"] == 8 and report["complete"] and report["mode"] == "reencrypt"
    for f in lake.data_files():
        assert not pq.read_table(f.path, columns=["ssn"]).equals(before[f.relpath])
    assert plain_equal(home, lake.uri, source)
    assert {a["action"] for a in read_side_outputs(lake, "audit")} == {"reencrypt"}


def test_rewrap_mode_moves_the_directory_only(lake, home, source, tmp_path):
    """`reencrypt --mode rewrap` is an alias of `keyturn rewrap`: one KMS call per DEK, not one lake byte written."""
    rotate(home)
    versions_before = file_versions(lake.uri)
    data_before = {rel: (data, os.stat(lake.path(rel)).st_mtime_ns) for rel, data in data_snapshot(lake.uri).items()}
    keys = _counting(home, tmp_path)
    report = reencrypt.run(lake.uri, keys=keys, dataset=DATASET, mode="rewrap")
    rw = report["directory_rewrap"]
    assert (rw["deks_moved"], rw["kms_calls"], rw["complete"], rw["lake_bytes_written"]) == (8, 8, True, 0)
    assert keys.calls() == ["rewrap"] * 8  # one ReEncrypt per DEK; no DEK generated or unwrapped
    assert report["files_rewritten"] == 0 and report["kms_calls"] == 0 and report["complete"]
    assert report["problems"] == [] and report["inventory"]["current_fraction"] == 1.0
    assert {rel: (data, os.stat(lake.path(rel)).st_mtime_ns) for rel, data in data_snapshot(lake.uri).items()} == data_before
    assert file_versions(lake.uri) == versions_before  # the rows keep their birth version
    assert home.registry().deks_by_version() == {2: 8}
    got, statuses = lake_plaintext(home, lake.uri)
    assert statuses["current"] == 400 and plain_equal(home, lake.uri, source)
    assert read_side_outputs(lake, "mismatch", run_id=report["run_id"]) == []
    again = reencrypt.run(lake.uri, keys=keys, dataset=DATASET, mode="rewrap")
    assert again["directory_rewrap"]["kms_calls"] == 0 and len(keys.calls()) == 8
    # nothing is left for the re-encrypting job either: every DEK is current and young
    assert reencrypt.run(lake.uri, keys=keys, dataset=DATASET, mode="reencrypt")["plan"]["files"] == 0
    assert len(keys.calls()) == 8


def _backdate_deks(home, dek_ids, days: int) -> None:
    """Make these directory entries `days` older (as if their DEKs had been generated then)."""
    import sqlite3
    from datetime import datetime, timedelta, timezone

    from keyturn.registry.sqlite import _to_text

    then = _to_text(datetime.now(timezone.utc) - timedelta(days=days))
    with sqlite3.connect(home.registry().path) as conn:
        for dek_id in dek_ids:
            assert conn.execute("UPDATE deks SET created_at = ? WHERE dek_id = ?", (then, dek_id)).rowcount == 1


def test_auto_mode_rewraps_the_directory_then_reencrypts_only_over_age_files(lake, home, source):
    from keyturn.lake import read_file_summary

    files = lake.data_files()
    old = files[:3]
    _backdate_deks(home, [d for f in old for d in read_file_summary(lake, f).dek_rows], days=400)  # > dek_max_age_days
    rotate(home)
    young_before = {f.relpath: (open(f.path, "rb").read(), os.stat(f.path).st_mtime_ns) for f in files[3:]}
    report = reencrypt.run(lake.uri, home=home.path, mode="auto")
    assert report["mode"] == "auto" and report["directory_rewrap"]["deks_moved"] == 8
    assert report["files_rewritten"] == 3 and report["complete"] and report["problems"] == []
    assert {r["path"] for r in report["files"] if r["result"] == "rewritten"} == {f.relpath for f in old}
    versions = file_versions(lake.uri)
    assert all(versions[f.relpath] == {2: 50} for f in old)  # fresh DEKs, born under version 2
    # the young files were only re-wrapped in the directory: not one byte, not one mtime changed
    assert {f.relpath: (open(f.path, "rb").read(), os.stat(f.path).st_mtime_ns) for f in files[3:]} == young_before
    assert all(versions[rel] == {1: 50} for rel in young_before)
    got, statuses = lake_plaintext(home, lake.uri)
    assert statuses["current"] == 400 and plain_equal(home, lake.uri, source)
    again = reencrypt.run(lake.uri, home=home.path, mode="auto")
    assert again["files_rewritten"] == 0 and again["kms_calls"] == 0 and again["directory_rewrap"]["kms_calls"] == 0


def test_read_after_rotation_old_rows_decrypt_and_are_written_back_on_the_new_version(lake, home, source):
    rotate(home)
    got, statuses = lake_plaintext(home, lake.uri)
    assert statuses["stale"] == 400 and got.num_rows == 400  # old records still decrypt
    reencrypt.run(lake.uri, home=home.path)
    got, statuses = lake_plaintext(home, lake.uri)
    assert statuses["current"] == 400 and statuses["stale"] == 0
    assert plain_equal(home, lake.uri, source)


def test_bad_input_is_reported_and_nothing_is_deleted(lake, home, source, tmp_path):
    rotate(home)
    # a truncated Parquet file, a plain file without key metadata, a file under an unknown version
    good = lake.data_files()
    data = open(good[0].path, "rb").read()
    truncated = lake.path("region=0/part-truncated.parquet")
    open(truncated, "wb").write(data[: len(data) // 2])
    plain = lake.path("region=1/part-plain.parquet")
    write_parquet_atomically(lake, plain, pa.table({"id": [9001, 9002], "spend": [1.0, 2.0]}), None)
    with home.kms() as kms:
        kms.create_kek("kek-stray")
    extra = source_table(10, 1).drop_columns(["region"])
    unknown = write_encrypted_file(home, lake, "region=2", extra, KekRef(7, "kek-stray"))
    untouched = {p: open(p, "rb").read() for p in (truncated, plain, unknown)}

    report = reencrypt.run(lake.uri, home=home.path)
    reasons = {(os.path.basename(p["path"] or ""), p["reason"]) for p in report["problems"]}
    assert ("part-truncated.parquet", "unreadable") in reasons
    assert ("part-plain.parquet", "missing") in reasons
    assert (os.path.basename(unknown), "unknown") in reasons
    assert report["files_rewritten"] == 8  # the rest of the lake was finished
    for path, data in untouched.items():
        assert open(path, "rb").read() == data
    mismatch = read_side_outputs(lake, "mismatch", run_id=report["run_id"])
    assert {(m["reason"], m["found_version"], m["rows"]) for m in mismatch} == {("missing", None, 2), ("unknown", 7, 10)}
    # the CLI verb exits with "data problems"
    result = run_cli("--home", home.path, "--json", "reencrypt", "--lake", lake.uri)
    assert result.code == 3 and result.json()["problems"], result.err
    os.remove(truncated)  # helper below reads every file
    os.remove(plain)
    got, statuses = lake_plaintext(home, lake.uri)
    assert statuses["unknown"] == 10 and statuses["current"] == 400


def test_corrupt_rows_go_to_quarantine_and_stay(lake, home):
    f = lake.data_files()[0]
    table = pq.read_table(f.path)
    ssn = table.column("ssn").to_pylist()
    i = next(k for k, v in enumerate(ssn) if v is not None)
    ssn[i] = ssn[i][:-1] + bytes([ssn[i][-1] ^ 1])
    table = table.set_column(table.schema.get_field_index("ssn"), table.schema.field("ssn"), pa.array(ssn, pa.binary()))
    write_parquet_atomically(lake, f.path, table, footer_for(DATASET, f.partition, {1: table.num_rows}, table.num_rows, SENSITIVE))
    rotate(home)
    report = reencrypt.run(lake.uri, home=home.path, mode="reencrypt")
    assert report["corrupt_rows"] == 1 and any(p["reason"] == "corrupt" for p in report["problems"])
    quarantine = read_side_outputs(lake, "quarantine", run_id=report["run_id"])
    assert [(q["reason"], q["rows"], q["payload_format"]) for q in quarantine] == [("corrupt", 1, "arrow_ipc")]
    after = pq.read_table(f.path)
    assert after.num_rows == table.num_rows and after.column("ssn")[i].as_py() == ssn[i]


def test_second_run_is_refused_while_the_lake_is_locked(lake, home):
    rotate(home)
    before = data_snapshot(lake.uri)
    with lake.lock():
        with pytest.raises(LakeLockedError):
            reencrypt.run(lake.uri, home=home.path)
    assert data_snapshot(lake.uri) == before
    assert reencrypt.run(lake.uri, home=home.path)["complete"]


def test_leftover_temp_files_are_removed_and_never_read(lake, home, source):
    rotate(home)
    stray = lake.path("region=0/.keyturn-tmp-0123-part-x.parquet")
    open(stray, "wb").write(b"half a file")
    report = reencrypt.run(lake.uri, home=home.path)
    assert report["temp_files_removed"] == ["region=0/.keyturn-tmp-0123-part-x.parquet"]
    assert temp_files(lake.uri) == [] and plain_equal(home, lake.uri, source)


def test_missing_lake_and_bad_arguments(home, tmp_path):
    with pytest.raises(LakeError):
        reencrypt.run(str(tmp_path / "nope"), home=home.path)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError):
        reencrypt.run(str(tmp_path / "empty"), home=home.path, mode="sideways")
    with pytest.raises(ValueError):
        reencrypt.run(str(tmp_path / "empty"), home=home.path, max_files=-1)
    report = reencrypt.run(str(tmp_path / "empty"), home=home.path)
    assert report["complete"] and report["files_rewritten"] == 0


def test_report_is_json_and_renders(lake, home):
    rotate(home)
    dry = run_cli("--home", home.path, "--json", "reencrypt", "--lake", lake.uri, "--dry-run")
    assert dry.code == 0, dry.err
    report = dry.json()
    assert report["dry_run"] and report["plan"]["files"] == 8
    assert "temp_files" in report and "inventory_before" not in report  # a dry run's keys only
    one = run_cli("--home", home.path, "reencrypt", "--lake", lake.uri, "--max-files", "1")
    assert one.code == 0, one.err
    assert "rewrote 1 files" in one.out and "7 files still stale" in one.out

"""keyturn.pipelines.status and `keyturn status`: counts per version and partition, problems, HTML report, read-only."""

from __future__ import annotations

import json
import os
import re
from xml.etree import ElementTree

import pyarrow.parquet as pq
import pytest

from cli_support import (
    customers,
    run_cli,
    snapshot,
    write_encrypted_file,
    write_versioned_plain_file,
)
from keyturn.errors import LakeError, VersionInUseError
from keyturn.rotation import rotate
from keyturn.pipelines import exitcodes, output, status
from keyturn.home import KeyHome


@pytest.fixture
def home(tmp_path) -> KeyHome:
    return KeyHome.init(tmp_path / "home", dataset="customers")


def _rotate(home: KeyHome) -> None:
    rotate(home.registry(), home.provision_kek, home.chain(), actor="test", reason="test")


@pytest.fixture
def mixed_lake(tmp_path, home) -> str:
    """region=0: 2 files on v1 (30 + 20 rows); rotate; region=0: 1 file on v2 (10); region=1: 1 file on v2 (40)."""
    lake = str(tmp_path / "lake")
    write_encrypted_file(home, lake, "region=0", customers(30))
    write_encrypted_file(home, lake, "region=0", customers(20, 30))
    _rotate(home)
    write_encrypted_file(home, lake, "region=0", customers(10, 50))
    write_encrypted_file(home, lake, "region=1", customers(40, 60))
    return lake


def test_counts_per_version_and_partition(home, mixed_lake):
    report = status.run(home=home, lake=mixed_lake)
    assert (report["rows"], report["files"], report["partition_count"]) == (100, 4, 2)
    assert report["active_version"] == 2
    assert report["percent_current"] == 50.0
    assert report["status_rows"] == {"current": 50, "stale": 50, "retired": 0, "unknown": 0, "missing": 0, "corrupt": 0}
    assert report["status_files"] == {
        "current": 2, "stale": 2, "retired": 0, "unknown": 0, "missing": 0, "corrupt": 0, "unreadable": 0
    }
    assert (report["stale_files"], report["current_files"]) == (2, 2)
    assert report["versions"] == {
        "1": {"state": "decrypt_only", "rows": 50, "files": 2},
        "2": {"state": "active", "rows": 50, "files": 2},
    }
    r0, r1 = report["partitions"]["region=0"], report["partitions"]["region=1"]
    assert (r0["files"], r0["rows"], r0["rows_by_version"], r0["files_by_version"]) == (3, 60, {"1": 50, "2": 10}, {"1": 2, "2": 1})
    assert r0["percent_current"] == pytest.approx(100 * 10 / 60, abs=0.01)
    assert (r1["rows_by_version"], r1["percent_current"]) == ({"2": 40}, 100.0)
    assert report["problems"] == []
    assert report["directory"] == {"1": 2, "2": 2}  # one DEK per file
    assert exitcodes.report_exit_code(report) == exitcodes.OK


def test_after_a_rewrap_rows_count_under_the_directory_version(home, mixed_lake):
    from keyturn.rotation import rewrap

    before = snapshot(mixed_lake)
    with home.kms() as kms:
        moved = rewrap(home.registry(), kms, home.chain(), actor="test", reason="test", dataset=home.dataset)
    assert moved["deks_moved"] == 2
    assert snapshot(mixed_lake) == before  # no lake file was touched
    report = status.run(home=home, lake=mixed_lake)
    assert (report["rows"], report["percent_current"], report["stale_files"], report["current_files"]) == (100, 100.0, 0, 4)
    assert report["status_rows"] == {"current": 100, "stale": 0, "retired": 0, "unknown": 0, "missing": 0, "corrupt": 0}
    assert report["versions"] == {
        "1": {"state": "decrypt_only", "rows": 0, "files": 0},
        "2": {"state": "active", "rows": 100, "files": 4},
    }
    assert report["partitions"]["region=0"]["rows_by_version"] == {"2": 60}
    assert report["directory"] == {"2": 4} and report["problems"] == []
    # ...while the files still say version 1 in their footers and rows: their birth version
    births = sorted(json.loads(pq.read_metadata(os.path.join(mixed_lake, rel)).metadata[b"keyturn"])["versions"].get("1", 0)
                    for rel in before if rel.endswith(".parquet"))
    assert births == [0, 0, 20, 30]


def force_retire(home: KeyHome, version: int) -> None:
    """Retire `version` behind the registry's back, DEKs still under it (write access to the registry file,
    or a registry restored from an old backup): the registry itself refuses this."""
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


def test_retired_unknown_missing_corrupt_and_unreadable_are_problems(tmp_path, home, mixed_lake):
    _rotate(home)  # v3 active; v1, v2 decrypt-only
    with pytest.raises(VersionInUseError, match="the DEK directory holds 2 DEK"):
        home.registry().retire(1, actor="t", reason="t")  # the registry refuses while DEKs are wrapped under v1
    force_retire(home, 1)  # so it is simulated: a retire done behind the registry's back
    other = KeyHome.init(tmp_path / "other-home", dataset="customers")
    write_encrypted_file(other, mixed_lake, "region=2", customers(5, 100))  # a DEK this directory does not know
    write_versioned_plain_file(mixed_lake, "region=2", 9, 5)  # a version column but no DEK envelope
    write_versioned_plain_file(mixed_lake, "region=2", None, 7)  # no key metadata at all
    # a downgrade: key columns intact, but the contract's ciphertext column holds plaintext
    downgraded = write_encrypted_file(home, mixed_lake, "region=4", customers(6, 200))
    table = pq.read_table(downgraded)
    table = table.set_column(table.schema.get_field_index("email"), "email", customers(6, 200).column("email"))
    pq.write_table(table, downgraded)
    bad = os.path.join(mixed_lake, "region=3", "part-bad.parquet")
    os.makedirs(os.path.dirname(bad))
    with open(bad, "wb") as f:
        f.write(b"PAR1 this is not parquet")
    report = status.run(home=home, lake=mixed_lake)
    assert report["status_rows"] == {"current": 0, "stale": 50, "retired": 50, "unknown": 5, "missing": 12, "corrupt": 6}
    assert report["status_files"]["unreadable"] == 1 and report["status_files"]["corrupt"] == 1
    assert report["status_files"]["unknown"] == 1 and report["status_files"]["missing"] == 2
    assert set(report["versions"]) == {"1", "2", "3"}  # only versions the directory wraps DEKs under, and the registry's
    assert report["versions"]["1"] == {"state": "retired", "rows": 50, "files": 2}
    assert report["versions"]["3"] == {"state": "active", "rows": 0, "files": 0}
    reasons = sorted(p["reason"] for p in report["problems"])
    assert reasons == ["contract_violation"] * 3 + ["corrupt", "missing", "missing", "retired", "retired", "unknown", "unreadable"]
    [violation] = [p for p in report["problems"] if p["reason"] == "contract_violation" and p["partition"] == "region=4"]
    assert violation["rows"] == 6 and "'email'" in violation["detail"]
    assert exitcodes.report_exit_code(report) == exitcodes.DATA


def test_status_reads_footers_only(home, mixed_lake, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("status read data pages")

    for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, no_data)
    monkeypatch.setattr(pq, "read_table", no_data)
    report = status.run(home=home, lake=mixed_lake)  # every footer carries its "deks" map
    assert report["rows"] == 100 and report["status_rows"]["current"] == 50


def test_status_without_deks_in_the_footer_reads_only_the_dek_column(home, mixed_lake, monkeypatch):
    """Files written before the footer's "deks" map: status reads their `_keyturn_dek` column, nothing else."""
    for rel in snapshot(mixed_lake):
        path = os.path.join(mixed_lake, rel)
        table = pq.read_table(path)
        meta = dict(pq.read_metadata(path).metadata)
        meta.pop(b"ARROW:schema", None)
        footer = json.loads(meta[b"keyturn"])
        del footer["deks"]
        meta[b"keyturn"] = json.dumps(footer).encode()
        pq.write_table(table.replace_schema_metadata(meta), path)
        assert "deks" not in json.loads(pq.read_metadata(path).metadata[b"keyturn"])
    read: list[list[str]] = []
    real = pq.ParquetFile.read_row_group

    def only_dek_column(self, i, columns=None, **kwargs):
        if columns != ["_keyturn_dek"]:
            raise AssertionError(f"status read {columns or 'every column'}")
        read.append(columns)
        return real(self, i, columns=columns, **kwargs)

    def no_data(*args, **kwargs):
        raise AssertionError("status read data pages")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", only_dek_column)
    for name in ("read", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, no_data)
    monkeypatch.setattr(pq, "read_table", no_data)
    report = status.run(home=home, lake=mixed_lake)
    assert len(read) >= 4  # at least one row group per file
    assert report["rows"] == 100 and report["status_rows"]["current"] == 50 and report["status_rows"]["stale"] == 50
    assert report["problems"] == []


def test_status_changes_nothing(home, mixed_lake, tmp_path):
    before = snapshot(mixed_lake)
    result = run_cli("--home", home.path, "status", "--lake", mixed_lake, "--report", str(tmp_path / "r.html"))
    assert result.code == 0, result.err
    assert snapshot(mixed_lake) == before


def test_empty_and_missing_lake(home, tmp_path):
    (tmp_path / "empty").mkdir()
    report = status.run(home=home, lake=str(tmp_path / "empty"))
    assert (report["rows"], report["files"], report["percent_current"], report["partitions"]) == (0, 0, 100.0, {})
    assert "0 rows in 0 files" in output.render_text(report)
    with pytest.raises(LakeError, match="does not exist"):
        status.run(home=home, lake=str(tmp_path / "nowhere"))
    result = run_cli("--home", home.path, "status", "--lake", str(tmp_path / "nowhere"))
    assert result.code == exitcodes.USAGE
    assert result.err.count("\n") == 1 and result.err.startswith("keyturn: error: no lake at")


def test_html_report_is_self_contained(home, mixed_lake, tmp_path):
    weird = "tag=<b>&x</b>"
    write_encrypted_file(home, mixed_lake, weird, customers(3))
    out = tmp_path / "report.html"
    report = status.run(home=home, lake=mixed_lake, report_path=str(out))
    assert report["report"] == str(out)
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<svg" in page and "</svg>" in page
    assert not re.search(r"<script|<link|<img|<iframe|src=|href=|url\(|@import", page, re.I)
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"]  # the SVG namespace only
    assert "<b>&x</b>" not in page and "tag=&lt;b&gt;&amp;x&lt;/b&gt;" in page
    # one stacked bar per partition plus the whole lake; green width proportional to current rows
    bars = re.findall(r'<rect x="[\d.]+" y="\d+" width="([\d.]+)" height="20" fill="#2e7d32"><title>([^<]*)</title>', page)
    titles = {t.split(":")[0]: float(w) for w, t in bars}
    assert titles["region=1"] == pytest.approx(600.0)
    assert titles["region=0"] == pytest.approx(600.0 * 10 / 60, abs=0.01)
    svg = page[page.index("<svg") : page.index("</svg>") + len("</svg>")]
    ElementTree.fromstring(svg)  # well-formed XML
    for temp in os.listdir(tmp_path):
        assert not temp.startswith(".keyturn-report-")


def test_html_chart_caps_partitions(home, tmp_path, monkeypatch):
    monkeypatch.setattr(status, "MAX_CHART_PARTITIONS", 3)
    lake = str(tmp_path / "lake")
    for p in range(5):
        write_encrypted_file(home, lake, f"p={p}", customers(2))
    page = status.render_html(status.run(home=home, lake=lake))
    assert "the 3 partitions furthest behind, of 5" in page
    assert page.count('height="20"') == 4  # whole lake + 3


def test_text_rendering(home, mixed_lake):
    text = output.render_text(status.run(home=home, lake=mixed_lake))
    assert "100 rows in 4 files, 2 partitions" in text
    assert "Active key version 2: 50.0% of rows are on it." in text
    assert re.search(r"region=0\s+3\s+60\s+50\s+10\s+16\.7%", text)


def test_cli_status_json(home, mixed_lake):
    result = run_cli("--home", home.path, "--json", "status", "--lake", mixed_lake)
    assert result.code == 0, result.err
    data = result.json()
    assert data["percent_current"] == 50.0 and data["report"] is None
    assert result.err == ""


def test_cli_status_exit_3_on_problems(home, mixed_lake):
    with open(os.path.join(mixed_lake, "region=0", "part-junk.parquet"), "wb") as f:
        f.write(b"junk")
    result = run_cli("--home", home.path, "status", "--lake", mixed_lake)
    assert result.code == exitcodes.DATA
    assert "unreadable" in result.out
    assert os.path.exists(os.path.join(mixed_lake, "region=0", "part-junk.parquet"))


def test_cli_status_takes_the_home_from_the_environment(home, mixed_lake):
    result = run_cli("status", "--lake", mixed_lake, env={"KEYTURN_HOME": home.path})
    assert result.code == 0, result.err
    assert "Active key version 2" in result.out

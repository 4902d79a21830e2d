"""pipelines.status and `keyturn status`: counts per version and partition, problems, HTML report, read-only."""

from __future__ import annotations

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
from keyturn.errors import LakeError
from keyturn.rotation import rotate
from pipelines import exitcodes, status
from pipelines.home import KeyHome


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
    assert report["status_rows"] == {"current": 50, "stale": 50, "retired": 0, "unknown": 0, "missing": 0}
    assert report["status_files"] == {"current": 2, "stale": 2, "retired": 0, "unknown": 0, "missing": 0, "unreadable": 0}
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
    assert exitcodes.report_exit_code(report) == exitcodes.OK


def test_retired_unknown_missing_and_unreadable_are_problems(tmp_path, home, mixed_lake):
    _rotate(home)  # v3 active; v1, v2 decrypt-only
    home.registry().retire(1, actor="t", reason="t")  # no inventory: simulates a retire done elsewhere
    write_versioned_plain_file(mixed_lake, "region=2", 9, 5)  # a version the registry never had
    write_versioned_plain_file(mixed_lake, "region=2", None, 7)  # no version metadata at all
    bad = os.path.join(mixed_lake, "region=3", "part-bad.parquet")
    os.makedirs(os.path.dirname(bad))
    with open(bad, "wb") as f:
        f.write(b"PAR1 this is not parquet")
    report = status.run(home=home, lake=mixed_lake)
    assert report["status_rows"] == {"current": 0, "stale": 50, "retired": 50, "unknown": 5, "missing": 7}
    assert report["status_files"]["unreadable"] == 1
    assert report["versions"]["9"] == {"state": "unknown", "rows": 5, "files": 1}
    assert report["versions"]["1"]["state"] == "retired"
    reasons = sorted(p["reason"] for p in report["problems"])
    assert reasons == ["missing", "retired", "retired", "unknown", "unreadable"]
    assert exitcodes.report_exit_code(report) == exitcodes.DATA


def test_status_reads_footers_only(home, mixed_lake, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("status read data pages")

    for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
        monkeypatch.setattr(pq.ParquetFile, name, no_data)
    monkeypatch.setattr(pq, "read_table", no_data)
    report = status.run(home=home, lake=mixed_lake)
    assert report["rows"] == 100


def test_status_changes_nothing(home, mixed_lake, tmp_path):
    before = snapshot(mixed_lake)
    result = run_cli("--home", home.path, "status", "--lake", mixed_lake, "--report", str(tmp_path / "r.html"))
    assert result.code == 0, result.err
    assert snapshot(mixed_lake) == before


def test_empty_and_missing_lake(home, tmp_path):
    (tmp_path / "empty").mkdir()
    report = status.run(home=home, lake=str(tmp_path / "empty"))
    assert (report["rows"], report["files"], report["percent_current"], report["partitions"]) == (0, 0, 100.0, {})
    assert "0 rows in 0 files" in status.render_text(report)
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
    text = status.render_text(status.run(home=home, lake=mixed_lake))
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


def test_python_m_entry_point(home, mixed_lake, monkeypatch, capsys):
    monkeypatch.setenv("KEYTURN_HOME", home.path)
    assert status.main(["--lake", mixed_lake]) == 0
    assert "Active key version 2" in capsys.readouterr().out

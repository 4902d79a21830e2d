"""The demo (`make demo`, which runs `keyturn demo`), run small."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from keyturn.pipelines import demo
from tests.pipeline_support import run_cli, run_python

pytestmark = pytest.mark.beam


def test_defaults_meet_the_brief():
    assert demo.DEFAULT_ROWS >= 1_000_000 and demo.DEFAULT_PARTITIONS >= 10
    small = demo.sample_table(1000, 10)
    assert small.equals(demo.sample_table(1000, 10))  # deterministic
    assert sorted(set(small.column("region").to_pylist())) == list(range(10))
    assert set(demo.SENSITIVE) <= set(small.column_names)


def test_demo_run_tells_the_whole_story(tmp_path):
    out = tmp_path / "demo-out"
    report = demo.run(rows=3000, partitions=10, out=str(out))
    assert report["problems"] == []
    assert report["encrypt"]["rows"] == 3000 and report["encrypt"]["files"] == 10
    assert report["encrypt"]["kms_calls"] == 10  # one data key per partition
    pct = report["percent_current"]
    assert pct["after_encrypt"] == 100 and pct["after_rotate"] == 0
    assert 0 < pct["after_first_rewrap"] < 100  # lazily: a bounded first run
    assert pct["after_second_rewrap"] == 100
    rw = report["rewrap"]
    assert rw["deks"] == 10 and rw["deks_moved"] == 10 and rw["kms_calls"] == 10  # one KMS call per DEK
    assert rw["lake_untouched"] is True and rw["lake_bytes_written"] == 0  # rotation never touches the lake
    assert rw["third_run_kms_calls"] == 0 and rw["third_run_deks"] == 0
    assert report["steps"]["retire"]["state"] == "retired"
    assert report["sample"]["identical_to_source"] and report["sample"]["rows"] == 300
    text = report["summary"]
    for words in ("3,000 synthetic customers", "KMS calls", "50% current", "100% current", "identical to the source",
                  "nothing to do", "Lake bytes written: 0"):
        assert words in text, words
    # the lake it leaves is a real encrypted lake, plus an HTML status report
    assert (out / "status.html").read_text().lower().startswith("<!doctype html")
    some = next((out / "lake" / "region=3").glob("part-*.parquet"))
    # the files still carry their birth version: the directory, not the file, says they are on version 2
    assert json.loads(pq.read_metadata(some).metadata[b"keyturn"])["versions"] == {"1": 300}
    # running it again starts from scratch
    assert demo.run(rows=200, partitions=10, out=str(out))["encrypt"]["rows"] == 200


def test_demo_text_and_json_through_the_cli(tmp_path):
    proc = run_python(f"import sys; from keyturn.pipelines.cli import main; sys.exit(main(['demo', '--rows', '500', '--partitions', '10', '--out', {str(tmp_path / 'a')!r}]))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "identical to the source" in proc.stdout
    proc = run_cli(["demo", "--rows", "500", "--partitions", "10", "--out", str(tmp_path / "b"), "--json"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["sample"]["identical_to_source"] is True
